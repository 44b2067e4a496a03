package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/migrate-project/migrate/testbed"
	"github.com/migrate-project/migrate/transfer"
)

func TestMain(m *testing.M) {
	testbed.MaybeRunWire()
	os.Exit(m.Run())
}

func run(args ...string) (string, string, error) {
	var out, errb bytes.Buffer
	err := newApp(&out, &errb).RunContext(context.Background(), append([]string{"migrate"}, args...))
	return out.String(), errb.String(), err
}

func TestExitCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code int
	}{
		{nil, 0},
		{errors.New("x"), exitFailure},
		{usageError{errors.New("x")}, exitUsage},
		{notReadyError{errors.New("x")}, exitNotReady},
		{rolledBackError{errors.New("x")}, exitRolledBack},
		{busyError{errors.New("x")}, exitBusy},
		{fmt.Errorf("rm: %w", &transfer.AgentError{Host: "a", Code: 409, Msg: "x is being moved", Busy: true}), exitBusy},
		{&transfer.AgentError{Host: "a", Code: 409, Msg: "x is not running"}, exitFailure},
	} {
		if got := exitCode(tc.err); got != tc.code {
			t.Errorf("exitCode(%v) = %d, want %d", tc.err, got, tc.code)
		}
	}
}

func TestBadInput(t *testing.T) {
	if _, _, err := run("testbed", "exec"); exitCode(err) != exitUsage {
		t.Errorf("exec without a host: %v (code %d)", err, exitCode(err))
	}
	if _, _, err := run("--log-level", "loud", "testbed", "status"); exitCode(err) != exitUsage {
		t.Errorf("bad log level: %v", err)
	}
	if _, _, err := run("testbed", "up", "--nosuchflag"); exitCode(err) != exitUsage {
		t.Errorf("unknown flag: %v", err)
	}
	for _, bad := range [][]string{{"--mode", "fast"}, {"--compress", "zip"}, {"--bwlimit", "-1"}} {
		if _, _, err := run(append([]string{"push", "web", "--to", "b"}, bad...)...); exitCode(err) != exitUsage {
			t.Errorf("push %v: %v (code %d), want a usage error", bad, err, exitCode(err))
		}
	}
	for _, bad := range [][]string{
		{"auto", "web", "--mode", "sideways"},
		{"auto", "web", "--mode", "passive"},                         // no --user
		{"auto", "web", "--mode", "passive", "--user", "edge-user"},  // not an address
		{"auto", "web", "--mode", "proactive", "--trace", "/nosuch"}, // no trace
		{"auto", "web", "--mode", "passive", "--user", "10.0.0.1", "--hysteresis", "1.5"},
		{"plan", "web"},                      // no --user
		{"plan", "web", "--user", "nowhere"}, // not an address
	} {
		if _, _, err := run(bad...); exitCode(err) != exitUsage {
			t.Errorf("%v: %v (code %d), want a usage error", bad, err, exitCode(err))
		}
	}
	_, _, err := run("testbed", "status", "--name", "nosuch")
	if err == nil || !strings.Contains(err.Error(), "is not up") {
		t.Errorf("status of a testbed that is not up: %v", err)
	}
}

func TestReorderArgs(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"migrate push web --to b", "migrate push --to b web"},
		{"migrate --json push web --to=b --dry-run", "migrate --json push --to=b --dry-run web"},
		{"migrate push --to b web", "migrate push --to b web"},
		{"migrate layers diff web --to b", "migrate layers diff --to b web"},
		{"migrate run --on a img sh -c x", "migrate run --on a img sh -c x"},
		{"migrate testbed exec a -- ls -l", "migrate testbed exec a -- ls -l"},
		{"migrate testbed exec a --name x", "migrate testbed exec a --name x"},
	} {
		if got := strings.Join(reorderArgs(newApp(io.Discard, io.Discard).Commands, strings.Fields(tc.in)), " "); got != tc.want {
			t.Errorf("%q: got %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestHelpTeaches(t *testing.T) {
	out, _, err := run("testbed", "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"up", "down", "exec", "migrate testbed up --hosts a,b"} {
		if !strings.Contains(out, want) {
			t.Errorf("testbed --help lacks %q:\n%s", want, out)
		}
	}
}

// testbed report merges two runs (the second measured 256 MiB again), writes the merged
// CSV and plot, and prints the ratio line from the newer figures.
func TestTestbedReportMergesRuns(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := dir + "/" + name
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	const head = "size_mib,dirty_pct_per_s,case,downtime_ms,held_ms,total_ms,wire_bytes,rounds,replies,frozen_phases\n"
	first := write("a.csv", head+"256,1,stock,28000,27000,28000,268000000,0,0,x\n256,1,precopy,14000,13000,38000,272000000,3,0,y\n")
	second := write("b.csv", head+"256,1,precopy,7000,7000,35000,268000000,3,0,z\n")
	out, _, err := run("testbed", "report", "--out", dir+"/merged", first, second)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "downtime 0.250") || !strings.Contains(out, "bytes 1.000") {
		t.Fatalf("ratio line %q: want the second run's pre-copy against the first's stock", out)
	}
	csv, err := os.ReadFile(dir + "/merged/experiment.csv")
	if err != nil || strings.Count(string(csv), "\n") != 3 || !strings.Contains(string(csv), ",z,") {
		t.Fatalf("merged CSV %q, %v", csv, err)
	}
	if svg, err := os.ReadFile(dir + "/merged/experiment.svg"); err != nil || !bytes.Contains(svg, []byte("<svg")) {
		t.Fatalf("merged plot: %v", err)
	}
	if _, _, err := run("testbed", "report"); exitCode(err) != exitUsage {
		t.Errorf("report without files: %v, want a usage error", err)
	}
	if _, _, err := run("testbed", "report", write("bad.csv", "a,b\n1,2\n")); exitCode(err) != exitUsage {
		t.Errorf("report of a file that is no experiment CSV: %v, want a usage error", err)
	}
}
