package pages

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
)

// Pre-copy reads processes that run on; one that is gone by the time its memory is read
// (its /proc entry gone, or released as it was opened: ESRCH) is skipped, not an error
// that rolls the move back. Any other error still is one.
func TestScanSkipsProcessesThatExited(t *testing.T) {
	live := exec.Command("sleep", "30")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { live.Process.Kill(); live.Wait() }()
	gone := exec.Command("true")
	if err := gone.Run(); err != nil { // reaped: its PID names nothing now
		t.Fatal(err)
	}
	seen := map[int]int{}
	err := Scan([]int{gone.Process.Pid, live.Process.Pid}, 64, func(ch Chunk) error {
		seen[ch.PID] += len(ch.Addrs)
		return nil
	})
	if err != nil || seen[live.Process.Pid] == 0 || seen[gone.Process.Pid] != 0 {
		t.Fatalf("scan: %v; pages read %v: want the live process's and none of the exited one", err, seen)
	}
	for _, c := range []struct {
		err  error
		gone bool
	}{
		{&os.PathError{Op: "open", Path: "/proc/1475/mem", Err: syscall.ESRCH}, true},
		{&os.PathError{Op: "open", Path: "/proc/1475/maps", Err: syscall.ENOENT}, true},
		{&os.PathError{Op: "open", Path: "/proc/1475/mem", Err: syscall.EACCES}, false},
	} {
		if exited(c.err) != c.gone {
			t.Errorf("exited(%v) = %v, want %v", c.err, !c.gone, c.gone)
		}
	}
}
