package transfer

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// Podman's checkpoint call of a post-copy move is waited for by the pump and, after a
// failed restore, by the rollback: both get its result, and neither waits forever.
func TestExportCallIsWaitedForTwiceAndWithADeadline(t *testing.T) {
	e := &exportCall{done: make(chan struct{})}
	if err := e.wait(10 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "did not return") {
		t.Fatalf("a call still running: %v", err)
	}
	go e.finish(errors.New("checkpoint failed"))
	for i := 0; i < 2; i++ {
		if err := e.wait(time.Minute); err == nil || err.Error() != "checkpoint failed" {
			t.Fatalf("wait %d: %v", i+1, err)
		}
	}
}
