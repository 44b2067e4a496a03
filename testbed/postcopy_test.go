package testbed_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/migrate-project/migrate/testbed"
	"github.com/migrate-project/migrate/transfer"
)

// noLazyLeftovers fails the test if a host keeps anything of a lazy restore or a lazy
// dump: CRIU configuration files, the masks' tmpfs (mounted or not), CRIU or lazy-serve
// processes, lazy restore directories.
func noLazyLeftovers(t *testing.T, tb *testbed.Testbed) {
	t.Helper()
	for _, l := range lazyLeftovers(tb, true) {
		t.Error(l)
	}
}

// lazyLeftovers lists what noLazyLeftovers fails on; without processes, the files and
// mounts only. (The testbed's hosts share the machine's PID namespace, and a lazy fill
// whose target agent was killed ends by its own deadline, minutes later.)
func lazyLeftovers(tb *testbed.Testbed, processes bool) []string {
	var out []string
	script := "ls -A /run/migrate/criu 2>/dev/null; ls -A /run/migrate/masks 2>/dev/null; grep /run/migrate/masks /proc/self/mountinfo || true"
	if processes {
		script += "; pgrep -x criu || true; pgrep -f 'migrate lazy-serv[e]' || true"
	}
	for _, h := range []string{"a", "b"} {
		got, err := tb.Run(context.Background(), h, "sh", "-c", script)
		if err != nil || strings.TrimSpace(got) != "" {
			out = append(out, fmt.Sprintf("left behind on %s (CRIU configuration files, masks' tmpfs, CRIU or lazy-serve processes): %q %v", h, got, err))
		}
		if ents, _ := os.ReadDir(filepath.Join(testbed.StateRoot, tb.Name, h, "agent", "lazy")); len(ents) > 0 {
			out = append(out, fmt.Sprintf("lazy restore directories left on %s: %v", h, ents))
		}
	}
	return out
}

// --postcopy a -> b -> a: the container resumes on the target before its last pages
// crossed; its memory checksum is intact and its connection's byte stream whole, and on
// the target it is an ordinary podman container.
func TestPostcopyThereAndBack(t *testing.T) {
	tb := upAgents(t, "postcopy", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	cmd, n := serve(2, 60)
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1,
		"sh", "-c", "memload -size 64 -rate 200 -listen :7001 & "+cmd)
	waitMemload(t, tb, webIP)
	stream, out, err := tb.StreamClient(context.Background(), webIP, n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stream.Process.Kill() })
	before := memOverNet(t, tb)
	var counters []uint64
	for _, to := range []string{"b", "a"} {
		r := pushArgs(t, tb, "web", "--to", to, "--postcopy")
		logRounds(t, r)
		if !r.OK || r.MemoryPath != transfer.PathMemory || r.Postcopy == nil || r.Postcopy.Error != "" {
			t.Fatalf("post-copy push to %s: %+v", to, r)
		}
		t.Logf("post-copy phase %s, %d bytes; traffic held %s", r.Postcopy.Duration.Round(time.Millisecond), r.Postcopy.WireBytes, r.Frozen.Round(time.Millisecond))
		m := memOverNet(t, tb)
		if m.sum != m.expect || m.counter <= before.counter {
			t.Fatalf("memory after the move to %s: %+v (before %+v)", to, m, before)
		}
		counters = append(counters, m.counter)
		if w := where(t, tb, "web"); len(w) != 1 || w[0] != to {
			t.Fatalf("web runs on %v, want %s", w, to)
		}
	}
	if err := stream.Wait(); err != nil {
		t.Fatalf("stream client: %v\n%s", err, out)
	}
	st, err := testbed.ParseStream(out.Bytes())
	if err != nil || !st.Intact() {
		t.Fatalf("the connection did not survive both moves: %v %+v", err, st)
	}
	ctx := context.Background()
	for _, args := range [][]string{{"podman", "stop", "-t", "1", "web"}, {"podman", "start", "web"}} {
		if out, err := tb.Run(ctx, "a", args...); err != nil {
			t.Fatalf("%v on a: %v %s", args, err, out)
		}
	}
	if out, err := tb.Run(ctx, "a", "podman", "inspect", "--format", "{{.State.Status}}", "web"); err != nil || strings.TrimSpace(out) != "running" {
		t.Fatalf("web after stop and start: %q %v", out, err)
	}
	waitSettled(t, tb, time.Minute)
	noLazyLeftovers(t, tb)
	t.Logf("memload counter %d -> %v, checksums intact; stream %d of %d bytes, largest gap %s",
		before.counter, counters, st.Received, st.Expected, st.LargestGap.Round(time.Millisecond))
}

// The source agent dies in the post-copy phase: as documented, the container is lost.
// The target stops its copy rather than let it run on pages it never got; the source's
// agent, back, finishes the decided move and removes its own. Nothing is left behind.
func TestPostcopySourceKilledLosesTheContainer(t *testing.T) {
	tb := upAgents(t, "pckill", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1,
		"sh", "-c", "memload -size 64 -rate 200 -listen :7001")
	waitMemload(t, tb, webIP)
	ctx := context.Background()
	if err := tb.RestartAgent(ctx, "a", []string{"MIGRATE_FAULT=crash:source-postcopy"}); err != nil {
		t.Fatal(err)
	}
	outs, errs, code := migrateWithin(t, tb, 3*time.Minute, "push", "web", "--to", "b", "--postcopy")
	t.Logf("push exit %d: %s", code, lastLine(outs+errs))
	if code != 6 {
		t.Errorf("push exited %d, want 6 (the source agent stopped answering)", code)
	}
	if err := tb.RestartAgent(ctx, "a", nil); err != nil {
		t.Fatal(err)
	}
	settled := waitSettled(t, tb, 2*time.Minute)
	deadline := time.Now().Add(time.Minute)
	for len(where(t, tb, "web")) > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Second)
	}
	if w := where(t, tb, "web"); len(w) != 0 {
		t.Fatalf("web runs on %v after the source died in post-copy: its memory cannot be complete anywhere", w)
	}
	noTraces(t, tb, "a")
	noTraces(t, tb, "b")
	noLazyLeftovers(t, tb)
	t.Logf("lost as documented; settled in %s", settled.Round(time.Second))
}
