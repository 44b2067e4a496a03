package transfer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestInventoryFormatAndErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "inv.json")
		os.WriteFile(p, []byte(s), 0o644)
		return p
	}
	inv, err := LoadInventory(write(`{"hosts": [{"name": "a", "agent": "10.0.0.1:7443", "locations": ["north"]}, {"name": "b", "agent": "10.0.0.2:7443"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	for loc, want := range map[string]string{"north": "a", "b": "b", "a": "a"} {
		if got, ok := inv.ServedBy(loc); !ok || got != want {
			t.Errorf("ServedBy(%s) = %s, %t; want %s", loc, got, ok, want)
		}
	}
	if _, ok := inv.ServedBy("south"); ok {
		t.Error("south is served by nobody")
	}
	for body, want := range map[string]string{
		`{"hosts": []}`: "no hosts",
		`{"hosts": [{"name": "a", "agnet": "10.0.0.1:7443"}]}`:                                                                            `unknown field "agnet"`,
		`{"hosts": [{"name": "a", "agent": "edge-a:7443"}]}`:                                                                              "want an IP address",
		`{"hosts": [{"name": "a", "agent": "10.0.0.1"}]}`:                                                                                 "want IP:PORT",
		`{"hosts": [{"name": "a", "agent": "10.0.0.1:1"}, {"name": "a", "agent": "10.0.0.2:1"}]}`:                                         "listed twice",
		`{"hosts": [{"name": "edge-north-long", "agent": "10.0.0.1:1"}]}`:                                                                 "at most 12",
		`{"hosts": [{"name": "../x", "agent": "10.0.0.1:1"}]}`:                                                                            "at most 12",
		`{"hosts": [{"name": "a", "agent": "10.0.0.1:1", "locations": ["x"]}, {"name": "b", "agent": "10.0.0.2:1", "locations": ["x"]}]}`: "served by both",
		`{"hosts": [`: "unexpected EOF",
	} {
		_, err := LoadInventory(write(body))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want an error saying %q", body, err, want)
		}
	}
	if _, err := LoadInventory(filepath.Join(dir, "nosuch.json")); err == nil || !strings.Contains(err.Error(), "MIGRATE_INVENTORY") {
		t.Errorf("missing file: %v", err)
	}
}
