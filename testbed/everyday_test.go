package testbed_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/migrate-project/migrate/testbed"
	"github.com/migrate-project/migrate/transfer"
)

// wantExit runs migrate and fails the test unless it exits with code and its stderr
// holds every one of msgs.
func wantExit(t *testing.T, tb *testbed.Testbed, code int, msgs []string, args ...string) string {
	t.Helper()
	out, errs, got := migrate(t, tb, args...)
	if got != code {
		t.Fatalf("migrate %v: exit %d, want %d\n%s%s", args, got, code, out, errs)
	}
	for _, m := range msgs {
		if !strings.Contains(errs, m) {
			t.Fatalf("migrate %v: stderr lacks %q:\n%s", args, m, errs)
		}
	}
	return out
}

// run on a host; a failing command fails the test.
func hostRun(t *testing.T, tb *testbed.Testbed, host string, args ...string) string {
	t.Helper()
	out, err := tb.Run(context.Background(), host, args...)
	if err != nil {
		t.Fatalf("%s: %v: %v\n%s", host, args, err, out)
	}
	return strings.TrimSpace(out)
}

// volumeExists asks podman on host whether the volume exists (exit 0 or 1; anything else
// fails the test).
func volumeExists(t *testing.T, tb *testbed.Testbed, host, name string) bool {
	t.Helper()
	out := hostRun(t, tb, host, "podman", "volume", "ls", "--format", "{{.Name}}")
	for _, v := range strings.Fields(out) {
		if v == name {
			return true
		}
	}
	return false
}

// The everyday commands and what `migrate run` passes to podman, against real agents and
// podman; a named volume that moves with its container and back, written to throughout;
// what cannot move refused with its reason.
func TestEverydayCommandsAndVolumes(t *testing.T) {
	tb := upAgents(t, "everyday", testbed.Link{RateMbit: 200, Delay: 2 * time.Millisecond})

	// run with what services need; exec and logs reach it wherever it runs.
	envFile := filepath.Join(t.TempDir(), "app.env")
	os.WriteFile(envFile, []byte("# settings\nGREETING=hello from the env file\n"), 0o644)
	// The writer: 8 MiB of random data once, then a counter line every 20 ms, every line
	// fsynced; the lines must come out 1..N with none missing after the moves.
	writer := `echo "start: $GREETING in $(pwd)"; [ -f big ] || dd if=/dev/urandom of=big bs=1M count=8 2>/dev/null;
i=0; while true; do i=$((i+1)); echo $i >> counter; sync counter 2>/dev/null; sleep 0.02; done`
	mustMigrate(t, tb, "run", "--on", "a", "--name", "vol", "--ip", "10.88.0.30/16", "-v", "voldata:/data", "--workdir", "/data",
		"--env-file", envFile, "--memory", "256m", "--cpus", "1.5", "--label", "team=edge", "--annotation", "org.example/owner=ops",
		"--tmpfs", "/scratch:size=8m", "--user", "0:0", testbed.ImageV1, "sh", "-c", writer)
	inspect := hostRun(t, tb, "a", "podman", "inspect", "vol", "--format",
		`{{.HostConfig.Memory}} {{.HostConfig.CpuQuota}} {{index .Config.Labels "team"}} {{index .Config.Annotations "org.example/owner"}} {{.Config.WorkingDir}} {{.Config.User}}`)
	if want := fmt.Sprintf("%d 150000 edge ops /data 0:0", 256<<20); inspect != want {
		t.Errorf("podman inspect: %q, want %q", inspect, want)
	}
	if out := hostRun(t, tb, "a", "podman", "exec", "vol", "sh", "-c", "grep ' /scratch ' /proc/mounts"); !strings.Contains(out, "tmpfs") {
		t.Errorf("no tmpfs at /scratch: %q", out)
	}
	bigSum := func() string {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			out, _, code := migrate(t, tb, "exec", "vol", "--", "sh", "-c", "test -s counter && sha256sum big")
			if code == 0 {
				return strings.Fields(out)[0]
			}
			if time.Now().After(deadline) {
				t.Fatalf("the writer did not start: exit %d %s", code, out)
			}
		}
	}
	before := bigSum()
	if out := mustMigrate(t, tb, "logs", "vol"); !strings.Contains(out, "start: hello from the env file in /data") {
		t.Errorf("logs: %q", out)
	}
	wantExit(t, tb, 3, nil, "exec", "vol", "--", "sh", "-c", "exit 3")
	wantExit(t, tb, 1, []string{"no host has a container named nosuch"}, "exec", "nosuch", "--", "true")
	var ex struct {
		Stream string `json:"stream"`
		Data   string `json:"data"`
	}
	if out := mustMigrate(t, tb, "--json", "exec", "vol", "--", "echo", "hi"); json.Unmarshal([]byte(strings.SplitN(out, "\n", 2)[0]), &ex) != nil || ex.Data != "hi\n" {
		t.Errorf("exec --json: %q", out)
	}

	// The volume moves with it, written to all along: the big file intact, the counter
	// without a missing line, the source's volume gone once the target runs it.
	// Slowed down (the volume at 20 Mbit/s takes seconds), so that commands meet it in flight.
	p := startPush(t, tb, "push", "vol", "--to", "b", "--bwlimit", "20")
	p.waitEvent("the volumes' phase", time.Minute, func(ev transfer.Event) bool { return ev.Kind == "phase" && ev.Phase == "volumes" })
	_, errs, code := migrate(t, tb, "push", "vol", "--to", "b")
	if code != 5 || !strings.Contains(errs, "being moved") || !strings.Contains(errs, "from a to b, since") {
		t.Fatalf("a second push during the move: exit %d: %s", code, errs)
	}
	wantExit(t, tb, 5, []string{"vol is being moved from a to b"}, "rm", "vol")
	p.wait(0)
	r := p.result()
	if got := where(t, tb, "vol"); len(got) != 1 || got[0] != "b" {
		t.Fatalf("vol runs on %v after the push", got)
	}
	if len(r.Volumes) != 2 || !r.Volumes[1].Final || r.Volumes[0].Bytes < 8<<20 {
		t.Fatalf("push's volumes: %+v", r.Volumes)
	}
	t.Logf("volume passes: first %d bytes read, %d on the wire, %s; frozen %d read, %d on the wire, %s (frozen steps %v)",
		r.Volumes[0].Read, r.Volumes[0].Wire, r.Volumes[0].Duration, r.Volumes[1].Read, r.Volumes[1].Wire, r.Volumes[1].Duration, r.Downtime)
	if r.Volumes[1].Read > 1<<20 {
		t.Errorf("the frozen pass read %d bytes: more than the files changed since the first", r.Volumes[1].Read)
	}
	if volumeExists(t, tb, "a", "voldata") || !volumeExists(t, tb, "b", "voldata") {
		t.Errorf("voldata: on a %v, on b %v; want only on b", volumeExists(t, tb, "a", "voldata"), volumeExists(t, tb, "b", "voldata"))
	}
	if after := bigSum(); after != before {
		t.Errorf("big file: sha256 %s on b, %s on a", after, before)
	}
	checkCounter := func(minLines int) int {
		t.Helper()
		out := mustMigrate(t, tb, "exec", "vol", "--", "cat", "counter")
		lines := strings.Fields(out)
		for i, l := range lines {
			if l != strconv.Itoa(i+1) {
				t.Fatalf("counter line %d is %q: a write was lost or repeated in the move", i+1, l)
			}
		}
		if len(lines) < minLines {
			t.Fatalf("counter has %d lines, had %d before", len(lines), minLines)
		}
		return len(lines)
	}
	n := checkCounter(1)
	for deadline := time.Now().Add(10 * time.Second); checkCounter(n) == n; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the writer does not go on after the move")
		}
	}

	// Back to a: the pages are in a's store, so almost nothing crosses again.
	back := pushArgs(t, tb, "vol", "--to", "a")
	if back.VolumeBytes > 1<<20 {
		t.Errorf("moving the volume back sent %d bytes (it first sent %d)", back.VolumeBytes, r.VolumeBytes)
	}
	t.Logf("move back: volume bytes %d of %d", back.VolumeBytes, back.Volumes[0].Bytes)
	checkCounter(n)
	if after := bigSum(); after != before {
		t.Errorf("big file after the way back: %s, want %s", after, before)
	}

	// What cannot move is refused with its reason, and stays where it runs.
	hostRun(t, tb, "a", "mkdir", "-p", "/run/migrate/bind-test") // on a only
	mustMigrate(t, tb, "run", "--on", "a", "--name", "pinned", "--ip", "10.88.0.31/16", "--read-only",
		"-v", "/run/migrate/bind-test:/bind:ro", testbed.ImageV1, "sleep", "600")
	wantExit(t, tb, 1, []string{"bind mounts", "/run/migrate/bind-test"}, "push", "pinned", "--to", "b")
	wantExit(t, tb, 2, []string{"absolute"}, "run", "--on", "a", "--name", "bad", "--ip", "10.88.0.39/16", "-v", "data:relative", testbed.ImageV1, "true")
	wantExit(t, tb, 1, []string{"does not exist"}, "run", "--on", "b", "--name", "bad", "--ip", "10.88.0.39/16", "-v", "/run/migrate/bind-test:/x", testbed.ImageV1, "true")
	hostRun(t, tb, "a", "podman", "run", "-d", "--name", "withdev", "--network", "none", "--device", "/dev/null:/dev/xnull",
		"--label", transfer.LabelIP+"=10.88.0.32/16", "--label", transfer.LabelMAC+"=02:4d:0a:58:00:20", testbed.ImageV1, "sleep", "600")
	wantExit(t, tb, 1, []string{"devices", "host devices"}, "push", "withdev", "--to", "b")
	if got := where(t, tb, "pinned"); len(got) != 1 || got[0] != "a" {
		t.Errorf("pinned runs on %v after a refused push", got)
	}

	// rm frees name and address everywhere: the address is taken again on b at once.
	wantExit(t, tb, 1, []string{"address 10.88.0.31 is taken by pinned on a"}, "run", "--on", "b", "--name", "pinned2", "--ip", "10.88.0.31/16", testbed.ImageV1, "sleep", "600")
	if out := mustMigrate(t, tb, "rm", "pinned"); !strings.Contains(out, "10.88.0.31 is free") {
		t.Errorf("rm: %q", out)
	}
	mustMigrate(t, tb, "run", "--on", "b", "--name", "pinned", "--ip", "10.88.0.31/16", testbed.ImageV1, "sleep", "600")
	wantExit(t, tb, 1, []string{"no host has a container"}, "rm", "nosuch")

	// A container removed behind migrate's back: its agent sees podman's event and frees
	// the address on every node.
	mustMigrate(t, tb, "run", "--on", "a", "--name", "ghost", "--ip", "10.88.0.33/16", testbed.ImageV1, "sleep", "600")
	hostRun(t, tb, "a", "podman", "rm", "-f", "-t", "0", "ghost")
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		_, errs, code := migrate(t, tb, "run", "--on", "b", "--name", "ghost", "--ip", "10.88.0.33/16", testbed.ImageV1, "sleep", "600")
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the address of a container removed with podman was not freed: %s", errs)
		}
	}
	for _, name := range []string{"vol", "pinned", "ghost"} {
		mustMigrate(t, tb, "rm", name)
	}
	if got := where(t, tb, "vol"); len(got) != 0 {
		t.Errorf("vol still runs on %v after rm", got)
	}
}
