package transfer

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/internal/testenv"
	"github.com/migrate-project/migrate/pages"
)

// The early restore is taken only where podman's archive would carry nothing of the root
// file system: by podman's own rule, added and deleted paths always travel, a changed
// path only when it names a file.
func TestRootfsTravelsFollowsPodmansRule(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		changes []checkpoint.RootfsChange
		travels string
	}{
		{"nothing changed", nil, ""},
		{"changed directories only", []checkpoint.RootfsChange{{Path: dir, Kind: "C"}, {Path: "/no/such/path", Kind: "C"}}, ""},
		{"a changed file", []checkpoint.RootfsChange{{Path: dir, Kind: "C"}, {Path: file, Kind: "C"}}, "C " + file},
		{"an added path", []checkpoint.RootfsChange{{Path: dir, Kind: "C"}, {Path: "/tmp/new", Kind: "A"}}, "A /tmp/new"},
		{"a deleted path", []checkpoint.RootfsChange{{Path: "/etc/motd", Kind: "D"}}, "D /etc/motd"},
		{"a kind not known", []checkpoint.RootfsChange{{Path: "/x", Kind: "?"}}, "? /x"},
	}
	for _, c := range cases {
		if got := rootfsTravels(c.changes, os.Stat); got != c.travels {
			t.Errorf("%s: rootfsTravels = %q, want %q", c.name, got, c.travels)
		}
	}
	// A stat that fails is podman skipping the path, whatever the error.
	if got := rootfsTravels([]checkpoint.RootfsChange{{Path: file, Kind: "C"}}, func(string) (fs.FileInfo, error) { return nil, fs.ErrPermission }); got != "" {
		t.Errorf("changed path podman cannot stat: rootfsTravels = %q, want none", got)
	}
}

func TestShmHoldsNamesAFileInTheProcessesDevShm(t *testing.T) {
	// This process's /dev/shm is the host's: the answer must match what is there.
	ents, err := os.ReadDir("/dev/shm")
	testenv.Need(t, err == nil, "no /dev/shm here")
	got, err := shmHolds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if (len(ents) == 0) != (got == "") || (got != "" && !strings.HasPrefix(got, "/dev/shm/")) {
		t.Fatalf("shmHolds = %q with %d entries in /dev/shm", got, len(ents))
	}
	f, err := os.CreateTemp("/dev/shm", "migrate-early-test-")
	testenv.Need(t, err == nil, fmt.Sprintf("cannot write /dev/shm: %v", err))
	defer os.Remove(f.Name())
	f.Close()
	if got, err := shmHolds(os.Getpid()); err != nil || got == "" {
		t.Fatalf("with %s in /dev/shm: shmHolds = %q, %v", f.Name(), got, err)
	}
}

// The early restore's steps: the restore ends when the target answered, podman's work on
// the source beside it is named, and only what podman took beyond the restore counts as
// waiting; the steps still add up to the frozen time.
func TestFrozenStepsOfAnEarlyRestore(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	taken := ""
	ft := finalTimes{lazyListening: at(100), memoryDone: at(120), firstByte: at(121), lastByte: at(125),
		early: &taken, restored: at(400), podmanDone: at(430)}
	got, top := stepTimes(frozenSteps(t0, ft, at(430), at(470), RestoreResult{}))
	want := map[string]time.Duration{StepCheckpoint: 121 * time.Millisecond, StepStream: 4 * time.Millisecond, StepRestore: 275 * time.Millisecond,
		StepPodmanOverlap: 310 * time.Millisecond, StepPodmanWait: 30 * time.Millisecond, StepOverlaySwitch: 40 * time.Millisecond}
	for name, d := range want {
		if got[name] != d {
			t.Errorf("%q = %s, want %s", name, got[name], d)
		}
	}
	if top != 470*time.Millisecond {
		t.Errorf("the top-level steps add up to %s, want the 470ms frozen", top)
	}
	// Without the early restore the restore runs until podman's and the target's end.
	why := "no"
	ft.early = &why
	for _, p := range frozenSteps(t0, ft, at(430), at(470), RestoreResult{}) {
		if p.Name == StepPodmanOverlap || p.Name == StepPodmanWait {
			t.Errorf("a restore that waited for podman's archive names %q", p.Name)
		}
		if p.Name == StepRestore && p.Duration != 305*time.Millisecond {
			t.Errorf("restore = %s, want 305ms", p.Duration)
		}
	}
}

// A check that does not answer soon after the memory's hand-over means podman's archive:
// the container is not kept frozen for it.
func TestEarlyCheckThatDoesNotAnswerMeansPodmansArchive(t *testing.T) {
	ch := newEarlyCheck()
	t0 := time.Now()
	if p := ch.answer(); p == "" || time.Since(t0) > earlyWait+time.Second {
		t.Fatalf("a silent check answered %q after %s", p, time.Since(t0))
	}
	ch.set("")
	for i := 0; i < 2; i++ { // read by the prelude and at CRIU's listening
		if p := ch.answer(); p != "" {
			t.Fatalf("a check that found nothing answered %q", p)
		}
	}
}

// The read hand-over is the default only where the host can dump lazily; asked for where
// it cannot, it is refused; the page server is taken when asked for or as the fallback.
func TestHandOverForPicksTheReadHandOverWhereTheHostCan(t *testing.T) {
	for _, c := range []struct{ asked, problem, want string }{
		{HandOverAuto, "", HandOverRead},
		{HandOverAuto, "fs.pipe-max-size is 1048576", HandOverPageServer},
		{HandOverPageServer, "", HandOverPageServer},
		{HandOverRead, "", HandOverRead},
	} {
		if got, err := handOverFor(c.asked, c.problem); err != nil || got != c.want {
			t.Errorf("handOverFor(%q, %q) = %q, %v; want %q", c.asked, c.problem, got, err, c.want)
		}
	}
	if got, err := handOverFor(HandOverRead, "fs.pipe-max-size is 1048576"); err == nil {
		t.Errorf("--handover read where the host cannot dump lazily: %q, no error", got)
	}
}

// A streamed restore's steps: the images leave when CRIU listens, the memory follows
// while the target restores; the top-level steps still add up to the frozen time.
func TestFrozenStepsOfAStreamedRestore(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	taken := ""
	ft := finalTimes{lazyListening: at(100), firstByte: at(101), memoryDone: at(300), lastByte: at(301),
		early: &taken, streamed: true, restored: at(420), podmanDone: at(450)}
	got, top := stepTimes(frozenSteps(t0, ft, at(450), at(490), RestoreResult{}))
	want := map[string]time.Duration{StepCheckpoint: 101 * time.Millisecond, StepStreamed: 200 * time.Millisecond,
		StepStreamedMemory: 199 * time.Millisecond, StepRestoreRest: 119 * time.Millisecond,
		StepPodmanWait: 30 * time.Millisecond, StepOverlaySwitch: 40 * time.Millisecond}
	for name, d := range want {
		if got[name] != d {
			t.Errorf("%q = %s, want %s", name, got[name], d)
		}
	}
	for _, name := range []string{StepStream, StepRestore, StepMemory} {
		if _, ok := got[name]; ok {
			t.Errorf("a streamed restore names %q", name)
		}
	}
	if top != 490*time.Millisecond {
		t.Errorf("the top-level steps add up to %s, want the 490ms frozen", top)
	}
	// CRIU's transfer closed after the target restored: its end is in the wait, not
	// beside the restore.
	ft.decidedOnExit, ft.endDeferred = true, true
	got, _ = stepTimes(frozenSteps(t0, ft, at(450), at(490), RestoreResult{}))
	if _, ok := got[StepSourceEnd]; ok || got[StepPodmanWait] != 30*time.Millisecond {
		t.Errorf("CRIU's end after the target's restore: steps %v", got)
	}
}

// The decision may rest on the container's processes having ended: watchExit tells when
// a process ends, not before, and cannot be fooled by a number used again.
func TestWatchExitTellsWhenTheProcessEnds(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() { cmd.Process.Kill(); <-done }()
	ended, stop := watchExit(cmd.Process.Pid)
	defer stop()
	if ended == nil {
		t.Fatal("a running process cannot be watched (no pidfd?)")
	}
	select {
	case <-ended:
		t.Fatal("told of an end while the process runs")
	case <-time.After(150 * time.Millisecond):
	}
	killed := time.Now()
	cmd.Process.Kill()
	select {
	case at := <-ended:
		if at.Before(killed) {
			t.Fatalf("told of an end at %s, before the kill at %s", at, killed)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not told of the end within 5 s")
	}
	<-done
	// Ended and reaped: nothing to watch.
	if ch, stop := watchExit(cmd.Process.Pid); ch != nil {
		stop()
		t.Fatal("a process that no longer exists is watched")
	}
}

// stepTimes indexes frozen-phase steps by name, and adds up the top-level ones (the
// indented ones are parts of the step above them).
func stepTimes(steps []Phase) (map[string]time.Duration, time.Duration) {
	got := map[string]time.Duration{}
	var top time.Duration
	for _, p := range steps {
		got[p.Name] = p.Duration
		if !strings.HasPrefix(p.Name, " ") {
			top += p.Duration
		}
	}
	return got, top
}

// The decision may rest on the container's processes being killed: watchKilled tells
// once every process of the PID namespace is gone, exiting or has SIGKILL pending, not
// while one runs.
func TestWatchKilledTellsOnceEveryProcessIsKilled(t *testing.T) {
	testenv.Root(t, "sh", "sleep") // a PID namespace of its own
	cmd := exec.Command("sh", "-c", "sleep 60 & sleep 60 & wait")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() { cmd.Process.Kill(); <-done }()
	var pids []int
	for deadline := time.Now().Add(5 * time.Second); len(pids) < 3; time.Sleep(10 * time.Millisecond) {
		var err error
		if pids, err = pages.Processes(cmd.Process.Pid); err != nil || time.Now().After(deadline) {
			t.Fatalf("the namespace's processes: %v %v", pids, err)
		}
	}
	killed, stop := watchKilled(cmd.Process.Pid, time.Millisecond)
	defer stop()
	if killed == nil {
		t.Fatal("the processes cannot be watched")
	}
	// One of the two children killed (and reaped by the shell): the others run on.
	if err := syscall.Kill(pids[1], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-killed:
		t.Fatal("told of the end while two processes run")
	case <-time.After(150 * time.Millisecond):
	}
	at := time.Now()
	cmd.Process.Kill() // the namespace's first process: the kernel kills the rest
	select {
	case got := <-killed:
		if got.Before(at) {
			t.Fatalf("told at %s, before the kill at %s", got, at)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not told within 5 s of the kill")
	}
}

// What /proc says of a process that can never run again.
func TestDoomedReadsStatAndStatus(t *testing.T) {
	stat := func(state string, flags uint64) []byte {
		return []byte(fmt.Sprintf("1475 (a) b) c) %s 1 1475 1475 0 -1 %d 120 0 0 0", state, flags))
	}
	for _, c := range []struct {
		stat         []byte
		doomed, sure bool
	}{
		{stat("S", 0x400100), false, false},
		{stat("R", 0x400104), true, true}, // PF_EXITING
		{stat("Z", 0x400100), true, true},
		{stat("X", 0), true, true},
		{[]byte("garbage"), false, true},
	} {
		if d, s := doomedStat(c.stat); d != c.doomed || s != c.sure {
			t.Errorf("%q: doomed %v sure %v, want %v %v", c.stat, d, s, c.doomed, c.sure)
		}
	}
	status := func(sig, shd string) []byte {
		return []byte("Name:\tmemload\nState:\tS (sleeping)\nSigQ:\t0/7823\nSigPnd:\t" + sig + "\nShdPnd:\t" + shd + "\nSigBlk:\t0000000000000100\n")
	}
	for _, c := range []struct {
		status []byte
		want   bool
	}{
		{status("0000000000000000", "0000000000000000"), false},
		{status("0000000000000100", "0000000000000000"), true},
		{status("0000000000000000", "0000000000004100"), true},
		{status("0000000000000200", "0000000000000080"), false}, // SIGUSR1, SIGFPE: not SIGKILL
	} {
		if got := sigkillPending(c.status); got != c.want {
			t.Errorf("%q: SIGKILL pending %v, want %v", c.status, got, c.want)
		}
	}
}
