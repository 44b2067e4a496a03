package testbed_test

import (
	"context"

	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/internal/testenv"
	"github.com/migrate-project/migrate/testbed"
)

var tools = []string{"ip", "nsenter", "unshare", "podman", "runc", "conmon", "criu",
	"ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "iperf3", "sockperf"}

// up starts a testbed and tears it down when the test ends, pass or fail.
func up(t *testing.T, cfg testbed.Config) *testbed.Testbed {
	t.Helper()
	testenv.Root(t, tools...)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cfg.Owner = os.Getpid()
	tb, err := testbed.Up(ctx, cfg)
	if err != nil {
		t.Fatalf("testbed up: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() && cfg.Agents != "" {
			t.Logf("agent logs:\n%s", tb.AgentLogs())
		}
		// MIGRATE_AGENT_LOGS=DIR keeps the agents' logs of every run (experiment.sh sets
		// it): their debug lines time the frozen phase's parts.
		if dir := os.Getenv("MIGRATE_AGENT_LOGS"); dir != "" && cfg.Agents != "" {
			if err := tb.KeepAgentLogs(dir); err != nil {
				t.Errorf("keep agent logs: %v", err)
			}
		}
		if err := testbed.Down(context.Background(), cfg.Name); err != nil {
			t.Errorf("testbed down: %v", err)
		}
	})
	return tb
}

// machineState is what a testbed may touch on the machine: every namespace by inode (of
// every process, and those kept by a bind mount under /run/netns), every process with the
// namespaces and cgroups it is in, the mounts, the testbed roots.
type machineState struct {
	netns, mounts, procs []string
	namespaces           []string            // "net:4026532289": every namespace in use
	inNS                 map[string][]string // namespace -> processes ("pid:comm") in it
	cgroups              map[string][]string // cgroup path -> processes in it
	roots                map[string]bool     // testbed roots that exist
}

// nsKinds are the namespaces a process has in /proc/PID/ns.
var nsKinds = []string{"net", "mnt", "pid", "uts", "ipc", "cgroup", "user"}

func snapshot(t *testing.T) machineState {
	t.Helper()
	s := machineState{roots: map[string]bool{}, inNS: map[string][]string{}, cgroups: map[string][]string{}}
	for _, root := range []string{testbed.StateRoot, testbed.DataRoot} {
		if _, err := os.Stat(root); err == nil {
			s.roots[root] = true
		}
	}
	nsSet := map[string]bool{}
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			s.netns = append(s.netns, e.Name())
			var st syscall.Stat_t
			if syscall.Stat(filepath.Join("/run/netns", e.Name()), &st) == nil {
				nsSet["net:"+strconv.FormatUint(st.Ino, 10)] = true
			}
		}
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 {
			s.mounts = append(s.mounts, f[4])
		}
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		st, err := os.ReadFile(filepath.Join(dir, "stat"))
		if err != nil {
			continue // ended meanwhile
		}
		// "pid (comm) state ...": zombies have ended; PID 1 reaps them.
		f := strings.Fields(string(st)[strings.LastIndexByte(string(st), ')')+1:])
		if len(f) == 0 || f[0] == "Z" {
			continue
		}
		comm, _ := os.ReadFile(filepath.Join(dir, "comm"))
		who := e.Name() + ":" + strings.TrimSpace(string(comm))
		s.procs = append(s.procs, who)
		for _, k := range nsKinds {
			l, err := os.Readlink(filepath.Join(dir, "ns", k)) // "net:[4026531840]"
			if err != nil {
				continue
			}
			id := strings.NewReplacer("[", "", "]", "").Replace(l)
			nsSet[id] = true
			s.inNS[id] = append(s.inNS[id], who)
		}
		if cg, err := os.ReadFile(filepath.Join(dir, "cgroup")); err == nil {
			for _, line := range strings.Split(strings.TrimSpace(string(cg)), "\n") {
				if parts := strings.SplitN(line, ":", 3); len(parts) == 3 {
					key := parts[1] + ":" + parts[2]
					s.cgroups[key] = append(s.cgroups[key], who)
				}
			}
		}
	}
	for id := range nsSet {
		s.namespaces = append(s.namespaces, id)
	}
	for _, l := range [][]string{s.netns, s.mounts, s.procs, s.namespaces} {
		sort.Strings(l)
	}
	return s
}

// testbedOwned lists, from a snapshot taken while a testbed ran, the namespaces and cgroups
// that are its own: namespaces that did not exist before, and cgroups that processes in
// those namespaces are in and that no process was in before.
func testbedOwned(before, during machineState) (namespaces, cgroups []string) {
	namespaces = added(before.namespaces, during.namespaces)
	seen := map[string]bool{}
	for _, ns := range namespaces {
		for _, p := range during.inNS[ns] {
			seen[p] = true
		}
	}
	for cg, ps := range during.cgroups {
		if len(before.cgroups[cg]) > 0 {
			continue
		}
		for _, p := range ps {
			if seen[p] {
				cgroups = append(cgroups, cg)
				break
			}
		}
	}
	sort.Strings(cgroups)
	return namespaces, cgroups
}

// leftIn lists the processes that after still has in the given namespaces and cgroups.
func leftIn(after machineState, namespaces, cgroups []string) []string {
	var out []string
	for _, ns := range namespaces {
		for _, p := range after.inNS[ns] {
			out = append(out, p+" in "+ns)
		}
	}
	for _, cg := range cgroups {
		for _, p := range after.cgroups[cg] {
			out = append(out, p+" in cgroup "+cg)
		}
	}
	return out
}

// addedOf lists the processes added that run a program the testbed starts (by name:
// a process of ours that left the namespaces, e.g. by setns).
func addedOf(before, after []string) []string {
	var out []string
	for _, p := range added(before, after) {
		switch p[strings.IndexByte(p, ':')+1:] {
		case "podman", "conmon", "ovs-vswitchd", "ovsdb-server", "memload", "iperf3", "sockperf", "runc", "criu", "migrate", "nc", "sleep", "testbed.test":
			out = append(out, p)
		}
	}
	return out
}

// notOutsiders drops from procs ("pid:comm") those started by a process that ran before
// the testbed and is none of its programs (an operator's shell that runs sleep beside
// the test): a process the testbed leaves has init, a subreaper or another of its
// programs as its parent.
func notOutsiders(procs, before []string) []string {
	was := map[string]bool{}
	for _, p := range before {
		was[p] = true
	}
	var out []string
	for _, p := range procs {
		pid := p[:strings.IndexByte(p, ':')]
		st, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
		if err == nil {
			f := strings.Fields(string(st)[strings.LastIndexByte(string(st), ')')+1:])
			if len(f) > 1 && f[1] != "1" {
				comm, _ := os.ReadFile(filepath.Join("/proc", f[1], "comm"))
				parent := f[1] + ":" + strings.TrimSpace(string(comm))
				if was[parent] && len(addedOf(nil, []string{parent})) == 0 {
					continue
				}
			}
		}
		out = append(out, p)
	}
	return out
}

// added lists what is in after but not in before.
func added(before, after []string) []string {
	have := map[string]int{}
	for _, x := range before {
		have[x]++
	}
	var out []string
	for _, x := range after {
		if have[x] > 0 {
			have[x]--
			continue
		}
		out = append(out, x)
	}
	return out
}

func TestDownLeavesNothingEvenAfterACrash(t *testing.T) {
	testenv.Root(t, tools...)
	before := snapshot(t)
	ctx := context.Background()
	tb, err := testbed.Up(ctx, testbed.Config{Name: "leak", Link: testbed.Link{RateMbit: 100, Delay: 2 * time.Millisecond},
		Agents: testenv.Migrate(t, t.TempDir())})
	if err != nil {
		testbed.Down(ctx, "leak")
		t.Fatalf("up: %v", err)
	}
	// Something running in every host: a container (with conmon) and a plain process.
	archive := filepath.Join(t.TempDir(), "busybox.tar")
	makeRootfsTar(t, archive)
	for _, h := range []string{"a", "b"} {
		if _, err := tb.Run(ctx, h, "podman", "import", "-q", archive, "localhost/leaktest"); err != nil {
			t.Fatal(err)
		}
		if _, err := tb.Run(ctx, h, "podman", "run", "-d", "--name", "sleeper", "--network", "none", "localhost/leaktest", "sleep", "600"); err != nil {
			t.Fatal(err)
		}
	}
	cmd, err := tb.Command(ctx, "client", "sleep", "600")
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go cmd.Wait()
	// A crash: the state file is gone and a's podman service was killed.
	os.Remove(filepath.Join(testbed.StateRoot, "leak", "testbed.json"))
	if pid, err := os.ReadFile(filepath.Join(testbed.StateRoot, "leak", "a", "podman.pid")); err == nil {
		p, _ := strconv.Atoi(string(pid))
		syscall.Kill(p, syscall.SIGKILL)
	}
	// The three sleeps, once each has started (the client's is nsenter until it execs).
	var during machineState
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		during = snapshot(t)
		if n := len(addedOf(before.procs, during.procs)); n >= 3 && strings.Count(strings.Join(added(before.procs, during.procs), " "), ":sleep") >= 3 {
			break
		}
		if time.Now().After(deadline) {
			break // the check below says what is missing
		}
	}
	if len(added(before.netns, during.netns)) < 4 || len(added(before.procs, during.procs)) < 12 {
		t.Fatalf("the testbed did not start what it should: netns %v, processes %v",
			added(before.netns, during.netns), added(before.procs, during.procs))
	}
	ownNS, ownCG := testbedOwned(before, during)
	// The watch must see what the test planted: the client's sleep and the containers'
	// sleeps, in namespaces of the testbed's own.
	planted := 0
	for _, ns := range ownNS {
		for _, p := range during.inNS[ns] {
			if strings.HasSuffix(p, ":sleep") && strings.HasPrefix(ns, "net:") {
				planted++
			}
		}
	}
	if planted < 3 {
		t.Fatalf("the leak check does not see the 3 sleeps the test started (saw %d) in the testbed's namespaces %v", planted, ownNS)
	}
	t.Logf("watching %d namespaces and %d cgroups of the testbed", len(ownNS), len(ownCG))

	if err := testbed.Down(ctx, "leak"); err != nil {
		t.Fatalf("down: %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	after := snapshot(t)
	for what, diff := range map[string][]string{
		"network namespaces (/run/netns)":        added(before.netns, after.netns),
		"namespaces (by inode)":                  added(before.namespaces, after.namespaces),
		"mounts":                                 added(before.mounts, after.mounts),
		"processes in its namespaces or cgroups": leftIn(after, ownNS, ownCG),
		"processes of its programs":              notOutsiders(addedOf(before.procs, after.procs), before.procs),
	} {
		if len(diff) > 0 {
			t.Errorf("testbed down left %s behind: %v", what, diff)
		}
	}
	if l := testbed.Leftovers("leak"); len(l) > 0 {
		t.Errorf("leftovers: %v", l)
	}
	for _, root := range []string{testbed.StateRoot, testbed.DataRoot} {
		if _, err := os.Stat(filepath.Join(root, "leak")); err == nil {
			t.Errorf("%s still exists", filepath.Join(root, "leak"))
		}
		// The roots themselves go with the last testbed (another one may be up beside).
		if _, err := os.Stat(root); err == nil && !before.roots[root] {
			t.Errorf("%s still exists", root)
		}
	}
	if err := testbed.Down(ctx, "leak"); err != nil {
		t.Errorf("second down should be a no-op: %v", err)
	}
}

// makeRootfsTar writes a tar with a static busybox as /bin/sleep and /bin/sh.
func makeRootfsTar(t *testing.T, path string) {
	t.Helper()
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "bin"), 0o755)
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("busybox-static: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "bin", "busybox"), b, 0o755)
	os.Symlink("busybox", filepath.Join(dir, "bin", "sleep"))
	os.Symlink("busybox", filepath.Join(dir, "bin", "sh"))
	if out, err := runOut("tar", "-C", dir, "-cf", path, "."); err != nil {
		t.Fatalf("tar: %v %s", err, out)
	}
}

var statusRE = regexp.MustCompile(`memload counter=(\d+) pages=\d+ sum=([0-9a-f]+) expect=([0-9a-f]+) ok=(\w+)`)

type memStatus struct {
	counter     uint64
	sum, expect string
}

// memloadStatus asks memload in container name on host for a fresh status line.
func memloadStatus(t *testing.T, tb *testbed.Testbed, host, name string, after uint64) memStatus {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := tb.Run(ctx, host, "podman", "kill", "--signal", "USR1", name); err != nil {
			t.Fatalf("signal memload: %v", err)
		}
		time.Sleep(300 * time.Millisecond)
		logs, err := tb.Run(ctx, host, "podman", "logs", name)
		if err != nil {
			t.Fatalf("memload logs: %v", err)
		}
		m := statusRE.FindAllStringSubmatch(logs, -1)
		if len(m) == 0 {
			continue
		}
		last := m[len(m)-1]
		c, _ := strconv.ParseUint(last[1], 10, 64)
		if c > after {
			return memStatus{counter: c, sum: last[2], expect: last[3]}
		}
	}
	t.Fatalf("memload in %s on %s reported no status past counter %d", name, host, after)
	return memStatus{}
}

func TestSmokeCheckpointOnARestoreOnB(t *testing.T) {
	testenv.Root(t, tools...)
	tb := up(t, testbed.Config{Name: "smoke", Memload: testenv.Memload(t, t.TempDir())})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	if _, err := tb.Run(ctx, "a", "podman", "run", "-d", "--name", "mem", "--network", "none",
		testbed.ImageV1, "memload", "-size", "64", "-rate", "1000"); err != nil {
		t.Fatal(err)
	}
	before := memloadStatus(t, tb, "a", "mem", 100)
	if before.sum != before.expect {
		t.Fatalf("memload is inconsistent before the move: %+v", before)
	}

	a, b := podman(t, tb, "a"), podman(t, tb, "b")
	// A's checkpoint archive streams straight into B's restore: no file in between.
	pr, pw := io.Pipe()
	expErr := make(chan error, 1)
	go func() {
		_, err := a.Export(ctx, "mem", pw, checkpoint.Options{})
		pw.CloseWithError(err)
		expErr <- err
	}()
	res, err := b.Import(ctx, pr, checkpoint.RestoreOptions{})
	if e := <-expErr; e != nil {
		t.Fatalf("checkpoint on a: %v", e)
	}
	if err != nil {
		t.Fatalf("restore on b: %v", err)
	}
	t.Logf("moved %d bytes of checkpoint in %s", res.Bytes, res.Duration)
	if res.Bytes < 64<<20 {
		t.Errorf("archive of %d bytes cannot hold 64 MiB of memory", res.Bytes)
	}

	after := memloadStatus(t, tb, "b", "mem", before.counter)
	if after.sum != after.expect {
		t.Fatalf("memory corrupted by the move: sum %s, expected %s (counter %d)", after.sum, after.expect, after.counter)
	}
	if state, err := b.State(ctx, "mem"); err != nil || state != "running" {
		t.Fatalf("on b: state %q, %v", state, err)
	}
	if state, err := a.State(ctx, "mem"); err != nil || state == "running" {
		t.Fatalf("on a after the move: state %q, %v; want it stopped", state, err)
	}
	t.Logf("memload counter %d on a -> %d on b, checksum %s intact", before.counter, after.counter, after.sum)

	// An unknown container is a clear error.
	if _, err := a.Export(ctx, "nosuch", io.Discard, checkpoint.Options{}); err == nil || !strings.Contains(err.Error(), "no such container") {
		t.Errorf("checkpoint of an unknown container: %v", err)
	}
}

func podman(t *testing.T, tb *testbed.Testbed, host string) *checkpoint.Podman {
	t.Helper()
	h, err := tb.Host(host)
	if err != nil {
		t.Fatal(err)
	}
	p, err := checkpoint.Connect(context.Background(), h.PodmanURI)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func runOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// The README's demo: an iperf3 stream over the overlay through `migrate push` a -> b.
func TestDemoStreamSurvivesPush(t *testing.T) {
	tb := upAgents(t, "demot", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d, err := tb.RunDemo(ctx, "a", "b", 9*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("gap %s, push %+v, iperf3 sent %d received %d, stream %+v", d.LargestGap, d.Push, d.SentBytes, d.ReceivedBytes, d.Stream)
	if !d.Survived || !d.Stream.Intact() || d.ReceivedBytes == 0 {
		t.Fatalf("the connections did not survive: %+v", d)
	}
	if d.LargestGap <= 0 {
		t.Errorf("no gap measured: the move cannot have happened mid-stream (%+v)", d)
	}
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "b" {
		t.Errorf("after the demo web runs on %v, want b", w)
	}
}

// A test run killed mid-way leaves its testbed up; the next run of the same test must not
// fail on it ("already up"), yet a testbed whose owner still runs is never taken over.
func TestUpReclaimsATestbedWhoseOwnerEnded(t *testing.T) {
	testenv.Root(t, tools...)
	ctx := context.Background()
	owner := exec.Command("sleep", "600")
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	ownerDone := make(chan struct{})
	go func() { owner.Wait(); close(ownerDone) }()
	t.Cleanup(func() { owner.Process.Kill(); <-ownerDone; testbed.Down(context.Background(), "reclaim") })

	cfg := testbed.Config{Name: "reclaim", NoOVS: true, Owner: owner.Process.Pid}
	if _, err := testbed.Up(ctx, cfg); err != nil {
		t.Fatalf("up: %v", err)
	}
	cfg.Owner = os.Getpid()
	if _, err := testbed.Up(ctx, cfg); err == nil || !strings.Contains(err.Error(), "already up") {
		t.Fatalf("up over a testbed whose owner runs: %v, want 'already up'", err)
	}
	owner.Process.Kill()
	<-ownerDone
	tb, err := testbed.Up(ctx, cfg)
	if err != nil {
		t.Fatalf("up over a testbed whose owner ended: %v", err)
	}
	if tb.Owner != os.Getpid() {
		t.Errorf("owner %d, want %d", tb.Owner, os.Getpid())
	}
	// A testbed the user keeps (no owner) is never reclaimed.
	if err := testbed.Down(ctx, "reclaim"); err != nil {
		t.Fatal(err)
	}
	cfg.Owner = 0
	if _, err := testbed.Up(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.Up(ctx, cfg); err == nil || !strings.Contains(err.Error(), "already up") {
		t.Fatalf("up over a kept testbed: %v, want 'already up'", err)
	}
}
