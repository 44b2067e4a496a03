package testbed_test

import (
	"os"
	"testing"

	"github.com/migrate-project/migrate/testbed"
)

func TestMain(m *testing.M) {
	testbed.MaybeRunWire() // testbeds re-execute this binary as their wire
	os.Exit(m.Run())
}
