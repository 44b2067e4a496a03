package planner

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

const ms = time.Millisecond

func TestRankWeighsLatencyAgainstTheMove(t *testing.T) {
	p := Params{Horizon: 10 * time.Minute, Rate: 10, Downtime: 3 * time.Second}
	cands := []Candidate{
		{Host: "a", Current: true, RTT: 40 * ms},
		{Host: "b", RTT: 5 * ms, Layers: 30e6, Memory: 200e6, Mbit: 100}, // 18 s to send
		{Host: "c", RTT: 5 * ms, Mbit: 100},                              // holds everything
		{Host: "d", RTT: 1 * ms, Problem: "no podman"},
	}
	pl, err := Rank(cands, p)
	if err != nil {
		t.Fatal(err)
	}
	if pl.Best != "c" || !pl.Move {
		t.Fatalf("best %s (move %t), want c: %+v", pl.Best, pl.Move, pl.Scores)
	}
	if pl.Scores[1].Host != "b" || pl.Scores[len(pl.Scores)-1].Host != "d" {
		t.Errorf("order %v, want c b ... d", hosts(pl))
	}
	if !strings.Contains(pl.Why, "move to c") {
		t.Errorf("why: %s", pl.Why)
	}

	// Over a short horizon the same move does not pay: the user would sit through the
	// downtime for little.
	p.Horizon = 20 * time.Second
	pl, _ = Rank(cands, p)
	if pl.Move || pl.Best != "a" {
		t.Fatalf("short horizon: best %s move %t, want to stay on a: %s", pl.Best, pl.Move, pl.Why)
	}
	if _, err := Rank([]Candidate{{Host: "x", Problem: "down"}}, p); err == nil {
		t.Error("no usable host, yet a plan")
	}
}

func hosts(p *Plan) []string {
	var h []string
	for _, s := range p.Scores {
		h = append(h, s.Host)
	}
	return h
}

func TestTraceAndPredictor(t *testing.T) {
	tr, err := ParseTrace(strings.NewReader("# a commuter\n0 north\n30 south\n60 north\n90 south\n100 south\n120 north\n"))
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := tr.At(110 * time.Second); v.Location != "south" || v.At != 90*time.Second {
		t.Errorf("at 110 s: %+v, want south since 90 s", v)
	}
	p := Learn(tr, 119*time.Second)
	if next, prob, ok := p.Next("north"); !ok || next != "south" || prob != 1 {
		t.Errorf("after north: %s %g %t", next, prob, ok)
	}
	if d, _ := p.Dwell("north"); d != 30*time.Second {
		t.Errorf("dwell at north %s, want 30 s", d)
	}
	// Nothing is learnt from the future.
	if _, _, ok := Learn(tr, 20*time.Second).Next("north"); ok {
		t.Error("learnt a transition that had not happened yet")
	}
	for _, bad := range []string{"", "x north", "5 north\n3 south", "1 north extra"} {
		if _, err := ParseTrace(strings.NewReader(bad)); err == nil {
			t.Errorf("trace %q accepted", bad)
		}
	}
}

func TestPassiveNeedsABrokenSLOAGainAndDwell(t *testing.T) {
	pol := Policy{SLO: 20 * ms, Hysteresis: 0.2, MinDwell: time.Minute}
	params := Params{Horizon: 10 * time.Minute, Rate: 10, Downtime: time.Second}
	plan := func(a, b time.Duration) *Plan {
		pl, err := Rank([]Candidate{{Host: "a", Current: true, RTT: a}, {Host: "b", RTT: b, Mbit: 100}}, params)
		if err != nil {
			t.Fatal(err)
		}
		return pl
	}
	for _, tc := range []struct {
		a, b      time.Duration
		sinceMove time.Duration
		move      bool
		why       string
	}{
		{10 * ms, 2 * ms, -1, false, "within the SLO"},
		{40 * ms, 35 * ms, -1, false, "not 20% better"},
		{40 * ms, 5 * ms, 30 * time.Second, false, "minimum dwell"},
		{40 * ms, 5 * ms, -1, true, "SLO broken"},
		{40 * ms, 5 * ms, 2 * time.Minute, true, "SLO broken"},
	} {
		d := pol.Passive(plan(tc.a, tc.b), "a", tc.sinceMove)
		if d.Move != tc.move || !strings.Contains(d.Reason, tc.why) || (d.Move && d.To != "b") {
			t.Errorf("a %s b %s since %s: %+v, want move=%t (%s)", tc.a, tc.b, tc.sinceMove, d, tc.move, tc.why)
		}
	}
}

func TestProactiveMovesAheadOnceAndNotBack(t *testing.T) {
	tr, _ := ParseTrace(strings.NewReader("0 north\n30 south\n60 north\n90 south\n120 north\n"))
	pol := Policy{Lead: 8 * time.Second, MinProb: 0.5, MinDwell: 10 * time.Second}
	host := func(loc string) (string, bool) {
		h, ok := map[string]string{"north": "a", "south": "b"}[loc]
		return h, ok
	}
	cur, last := "a", time.Duration(-1)
	var moves []string
	for now := time.Duration(0); now <= 125*time.Second; now += 2 * time.Second {
		since := time.Duration(-1)
		if last >= 0 {
			since = now - last
		}
		d := pol.Proactive(tr, now, host, cur, since)
		if d.Move {
			moves = append(moves, d.To+"@"+now.String())
			cur, last = d.To, now
		}
	}
	// Until a visit somewhere has ended nothing is known of how long the user stays
	// there: the first moves follow the user (30 s, 60 s). From then on each move comes
	// within the lead before the user leaves (82 s, 112 s), and none goes back.
	want := []string{"b@30s", "a@1m0s", "b@1m22s", "a@1m52s"}
	if strings.Join(moves, " ") != strings.Join(want, " ") {
		t.Fatalf("moves %v, want %v", moves, want)
	}
}

func TestPlanEncodesAsJSON(t *testing.T) {
	pl, err := Rank([]Candidate{{Host: "a", Current: true, RTT: ms}, {Host: "c", Problem: "runs no podman"}}, DefaultParams)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := json.Marshal(pl); err != nil {
		t.Fatalf("a plan with an unusable host does not encode: %v", err)
	}
	if pl.Scores[1].Host != "c" || pl.Best != "a" {
		t.Fatalf("%+v", pl)
	}
}
