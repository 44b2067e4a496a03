package testbed_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migrate-project/migrate/planner"
	"github.com/migrate-project/migrate/testbed"
)

// The user's trace: where they are, by simulated second. Each place is a host's
// neighbourhood: near the host the user sees a 1 ms link, the other host is 15 ms away.
const userTrace = "0 a\n30 b\n60 a\n90 b\n120 a\n150 b\n"

const traceStep = 5 * time.Second

var pingRE = regexp.MustCompile(`= [\d.]+/([\d.]+)/`)

// placeUser shapes the hosts' links for a user at place.
func placeUser(t *testing.T, tb *testbed.Testbed, place string) {
	t.Helper()
	for _, h := range []string{"a", "b"} {
		d := 15 * time.Millisecond
		if h == place {
			d = time.Millisecond
		}
		if err := tb.SetLink(h, testbed.Link{RateMbit: 100, Delay: d}); err != nil {
			t.Fatal(err)
		}
	}
}

// userRTT is the round trip the user sees to the container at ip (ping over the overlay).
func userRTT(t *testing.T, tb *testbed.Testbed, ip string) time.Duration {
	t.Helper()
	out, err := tb.Run(context.Background(), testbed.ClientName, "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", ip)
	m := pingRE.FindStringSubmatch(out)
	if err != nil || m == nil {
		t.Fatalf("ping the container: %v %s", err, out)
	}
	ms, _ := strconv.ParseFloat(m[1], 64)
	return time.Duration(ms * float64(time.Millisecond))
}

type replay struct {
	policy string
	rtts   []time.Duration
	moves  []string // "HOST@trace second"
	log    []string // every decision
	bytes  int64
}

func (r replay) stats() (mean, p95 time.Duration) {
	s := append([]time.Duration(nil), r.rtts...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	var sum time.Duration
	for _, d := range s {
		sum += d
	}
	return sum / time.Duration(len(s)), s[(len(s)*95+99)/100-1]
}

// replayTrace runs the trace in simulated time: at each step the user's links follow the
// trace, the user's round trip to the container is measured (what they live with until the
// next step), then `migrate auto` runs as cron would (policy "never": it does not).
func replayTrace(t *testing.T, tb *testbed.Testbed, policy, name, ip string, trace planner.Trace) replay {
	t.Helper()
	r := replay{policy: policy}
	state := t.TempDir()
	traceFile := filepath.Join(t.TempDir(), "user.trace")
	os.WriteFile(traceFile, []byte(userTrace), 0o644)
	end := trace[len(trace)-1].At
	for at := time.Duration(0); at < end; at += traceStep {
		v, _ := trace.At(at)
		placeUser(t, tb, v.Location)
		r.rtts = append(r.rtts, userRTT(t, tb, ip))
		var args []string
		switch policy {
		case "never":
			continue
		case "passive":
			args = []string{"auto", name, "--mode", "passive", "--user", "10.99.0.100", "--slo", "10ms", "--min-dwell", "3s", "--state-dir", state}
		case "proactive":
			args = []string{"auto", name, "--mode", "proactive", "--trace", traceFile, "--trace-at", at.String(), "--lead", "8s", "--min-dwell", "3s", "--state-dir", state}
		}
		out, errs, code := migrate(t, tb, args...)
		var rec struct {
			Host     string           `json:"host"`
			Decision planner.Decision `json:"decision"`
			Result   *struct {
				OK    bool  `json:"ok"`
				Bytes int64 `json:"bytes"`
			} `json:"result"`
			Error string `json:"error"`
		}
		if code != 0 || json.Unmarshal([]byte(out), &rec) != nil {
			t.Fatalf("%s at %s: exit %d\n%s%s", policy, at, code, out, errs)
		}
		r.log = append(r.log, fmt.Sprintf("%3ds on %s: %s", int(at.Seconds()), rec.Host, rec.Decision.Reason))
		if rec.Decision.Move {
			if rec.Result == nil || !rec.Result.OK {
				t.Fatalf("%s at %s: the move failed: %s", policy, at, out)
			}
			r.moves = append(r.moves, fmt.Sprintf("%s@%d", rec.Decision.To, int(at.Seconds())))
			r.bytes += rec.Result.Bytes
			t.Logf("%s at %3ds (user at %s): move %s -> %s: %s", policy, int(at.Seconds()), v.Location, rec.Host, rec.Decision.To, rec.Decision.Reason)
		}
	}
	mean, p95 := r.stats()
	t.Logf("%-9s user round trip mean %6s p95 %6s; %d moves %v, %.1f MB", policy, mean.Round(10*time.Microsecond),
		p95.Round(10*time.Microsecond), len(r.moves), r.moves, float64(r.bytes)/1e6)
	return r
}

// A user moves between the neighbourhoods of a and b following a trace. Passive auto
// moves the container after the user's round trip breaks the SLO, proactive auto moves it
// before the user arrives once it has learnt the pattern, and neither moves it back and
// forth. The three policies (never, passive, proactive) are compared on the same trace:
// the user's mean and 95th-percentile round trip, and the number and bytes of moves.
func TestAutoFollowsTheUser(t *testing.T) {
	tb := upAgents(t, "auto", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	trace, err := planner.ParseTrace(strings.NewReader(userTrace))
	if err != nil {
		t.Fatal(err)
	}
	// A second run while one holds the container's lock does nothing and says so (exit 5).
	state := t.TempDir()
	lock, err := os.OpenFile(filepath.Join(state, "svc-never.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if _, errs, code := migrate(t, tb, "auto", "svc-never", "--mode", "passive", "--user", "10.99.0.100", "--state-dir", state); code != 5 || !strings.Contains(errs, "another migrate auto") {
		t.Errorf("auto while another run holds the lock: exit %d, %s", code, errs)
	}
	lock.Close()

	results := map[string]replay{}
	for i, policy := range []string{"never", "passive", "proactive"} {
		// Each policy starts from the same place: its own container on a, the user at a.
		name, ip := "svc-"+policy, fmt.Sprintf("10.88.2.%d", i+1)
		placeUser(t, tb, "a")
		mustMigrate(t, tb, "run", "--on", "a", "--name", name, "--ip", ip+"/16", testbed.ImageV1, "sh", "-c", fmt.Sprintf("memload -size 16 -rate 10 -seed %d & exec sockperf server --tcp -p 11111", 100+i))
		waitPing(t, tb, ip)
		results[policy] = replayTrace(t, tb, policy, name, ip, trace)
		for _, h := range []string{"a", "b"} {
			if _, err := tb.Run(context.Background(), h, "podman", "rm", "-f", "--ignore", name); err != nil {
				t.Fatal(err)
			}
		}
	}

	// Passive follows: each move comes at the first step after the user left (30, 60, 90,
	// 120 s), never before, and never back.
	if got, want := strings.Join(results["passive"].moves, " "), "b@30 a@60 b@90 a@120"; got != want {
		t.Errorf("passive moves %q, want %q", got, want)
	}
	// Proactive learns the 30 s pattern from the first visits and then moves ahead: to b
	// before the user gets there at 90 s, to a before 120 s, to b before 150 s.
	if got, want := strings.Join(results["proactive"].moves, " "), "b@30 a@60 b@85 a@115 b@145"; got != want {
		t.Errorf("proactive moves %q, want %q; decisions:\n%s", got, want, strings.Join(results["proactive"].log, "\n"))
	}
	nm, np95 := results["never"].stats()
	pm, _ := results["passive"].stats()
	am, _ := results["proactive"].stats()
	if !(am < pm && pm < nm) {
		t.Errorf("mean round trips: never %s, passive %s, proactive %s; want proactive < passive < never", nm, pm, am)
	}
	t.Logf("never: mean %s p95 %s", nm, np95)
}

// waitPing waits until the container at ip answers pings.
func waitPing(t *testing.T, tb *testbed.Testbed, ip string) {
	t.Helper()
	for i := 0; i < 30; i++ {
		if _, err := tb.Run(context.Background(), testbed.ClientName, "ping", "-n", "-q", "-c", "1", "-W", "1", ip); err == nil {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatal("the container does not answer pings")
}
