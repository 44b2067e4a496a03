package testbed

import (
	"strings"
	"testing"
	"time"
)

func TestConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{}, ""},
		{Config{Name: "Bad-Name"}, "testbed name"},
		{Config{Hosts: []string{"a"}}, "2 to 50 hosts"},
		{Config{Hosts: []string{"a", "a"}}, "listed twice"},
		{Config{Hosts: []string{"a", "client"}}, "host name"},
		{Config{Links: map[string]Link{"zz": {}}}, "unknown host"},
		{Config{Links: map[string]Link{"client": {Delay: time.Millisecond}}}, ""},
	} {
		err := tc.cfg.defaults()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: got %v, want %q", tc.cfg, err, tc.want)
		}
	}
	c := Config{}
	c.defaults()
	if c.Name != "tb" || len(c.Hosts) != 2 {
		t.Errorf("defaults: %+v", c)
	}
}

func TestShaperRateDelayAndQueue(t *testing.T) {
	s := &shaper{link: Link{RateMbit: 8, Delay: 10 * time.Millisecond}} // 1 byte per µs
	t0 := time.Unix(1000, 0)
	at, ok := s.admit(t0, 1000)
	if !ok || at.Sub(t0) != time.Millisecond+10*time.Millisecond {
		t.Fatalf("first frame: %v %v", at.Sub(t0), ok)
	}
	// A second frame at the same instant waits for the first to be serialised.
	at, _ = s.admit(t0, 1000)
	if at.Sub(t0) != 2*time.Millisecond+10*time.Millisecond {
		t.Fatalf("second frame: %v", at.Sub(t0))
	}
	// Fill the queue past its limit: frames are dropped, not delayed without bound.
	dropped := 0
	for i := 0; i < 200; i++ {
		if _, ok := s.admit(t0, 1000); !ok {
			dropped++
		}
	}
	if dropped == 0 {
		t.Fatal("a full queue must drop")
	}
	if q := s.busy.Sub(t0); q > queueLimit+time.Millisecond {
		t.Fatalf("queue grew to %v, limit %v", q, queueLimit)
	}
}

func TestShaperLoss(t *testing.T) {
	s := &shaper{link: Link{Loss: 30}}
	lost := 0
	for i := 0; i < 10000; i++ {
		if _, ok := s.admit(time.Now(), 100); !ok {
			lost++
		}
	}
	if lost < 2500 || lost > 3500 {
		t.Fatalf("30%% loss lost %d of 10000", lost)
	}
	u := &shaper{}
	now := time.Now()
	if at, ok := u.admit(now, 1500); !ok || !at.Equal(now) {
		t.Fatal("an unshaped link must pass frames at once")
	}
}

func TestParseIperfGap(t *testing.T) {
	js := `{"intervals":[
	 {"sum":{"start":0,"end":0.1,"bytes":100}},
	 {"sum":{"start":0.1,"end":0.2,"bytes":0}},
	 {"sum":{"start":0.2,"end":0.3,"bytes":0}},
	 {"sum":{"start":0.3,"end":0.4,"bytes":5}},
	 {"sum":{"start":0.4,"end":0.5,"bytes":0}}],
	 "end":{"sum_sent":{"bytes":105},"sum_received":{"bytes":105}}}`
	gap, sent, recv, err := IperfStream([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	if gap < 199*time.Millisecond || gap > 201*time.Millisecond {
		t.Errorf("largest gap %v, want 200ms", gap)
	}
	if sent != 105 || recv != 105 {
		t.Errorf("bytes %d/%d", sent, recv)
	}
	if _, _, _, err := IperfStream([]byte(`{"error":"unable to connect"}`)); err == nil {
		t.Error("iperf3's error must surface")
	}
}

func TestExperimentCSVRoundTripAndRatios(t *testing.T) {
	rows := []ExpRow{
		{SizeMiB: 256, DirtyPct: 1, Case: CaseStock, Gap: 28 * time.Second, Total: 28 * time.Second, Bytes: 268e6},
		{SizeMiB: 256, DirtyPct: 1, Case: CasePrecopy, Gap: 7 * time.Second, Total: 38 * time.Second, Bytes: 272e6, OwnBytes: 260e6, Rounds: 3, Phases: "a; b, c"},
		{SizeMiB: 256, DirtyPct: 1, Case: CasePostcopy, Gap: time.Second, Total: 30 * time.Second, Bytes: 272e6, Postcopy: 1700 * time.Millisecond,
			AfterP99: 41300 * time.Microsecond, BeforeP99: 12100 * time.Microsecond},
		{SizeMiB: 190, Case: CaseStock, Gap: 20 * time.Second, Total: 20 * time.Second, Bytes: 200e6, Workload: "redis 1000000 keys"},
		{SizeMiB: 190, Case: CasePrecopy, Gap: 500 * time.Millisecond, Total: 22 * time.Second, Bytes: 202e6, Workload: "redis 1000000 keys"},
		{SizeMiB: 256, DirtyPct: 1, Case: CasePrecopyRead, Gap: 400 * time.Millisecond, Total: 26 * time.Second, Bytes: 271e6},
		{SizeMiB: 64, DirtyPct: 1, Case: CasePrecopyRead, Gap: 400 * time.Millisecond, Held: 380 * time.Millisecond, Total: 7 * time.Second, Bytes: 71e6},
		{SizeMiB: 1024, DirtyPct: 1, Case: CasePrecopyRead, Gap: 600 * time.Millisecond, Held: 590 * time.Millisecond, Total: 99 * time.Second, Bytes: 1138e6},
	}
	var b strings.Builder
	if err := WriteCSV(&b, rows); err != nil {
		t.Fatal(err)
	}
	back, err := ReadCSV(strings.NewReader(b.String()))
	if err != nil || len(back) != len(rows) || back[1] != rows[1] || back[2] != rows[2] || back[4] != rows[4] || back[7] != rows[7] {
		t.Fatalf("read back %+v, %v", back, err)
	}
	// The default against stock where both ran (256 MiB only), then the page server's,
	// the default's downtime flat in memory (1024 MiB against 64), and post-copy's.
	r := Ratios(back)
	if len(r) != 5 || !strings.Contains(r[0], "256 MiB 1%/s     pre-copy (default, read hand-over) / stock: downtime 0.014 = 1/70") ||
		!strings.Contains(r[1], "pre-copy (page server) / stock: downtime 0.250") ||
		!strings.HasPrefix(r[2], "redis 1000000 keys (190 MiB RSS) pre-copy (page server) / stock: downtime 0.025 = 1/40") ||
		r[3] != "1%/s: default downtime 1024 MiB / 64 MiB: 1.50 (600ms vs 400ms; held 590ms vs 380ms)" ||
		!strings.Contains(r[4], "client p99 41.3ms in it (12.1ms before the move)") {
		t.Fatalf("ratios %q", r)
	}
	var svg strings.Builder
	if err := WriteSVG(&svg, back); err != nil || !strings.Contains(svg.String(), "<svg") || strings.Count(svg.String(), "<rect") < 5 {
		t.Fatalf("svg: %v\n%s", err, svg.String())
	}
}

func TestMergeRowsLetsALaterRunReplaceAConfiguration(t *testing.T) {
	first := []ExpRow{
		{SizeMiB: 256, DirtyPct: 1, Case: CaseStock, Gap: 28 * time.Second},
		{SizeMiB: 256, DirtyPct: 1, Case: CasePrecopy, Gap: 7 * time.Second},
		{SizeMiB: 1024, DirtyPct: 1, Case: CaseStock, Gap: 110 * time.Second},
	}
	second := []ExpRow{
		{SizeMiB: 1024, DirtyPct: 1, Case: CaseStock, Gap: 111 * time.Second},
		{SizeMiB: 1024, DirtyPct: 1, Case: CasePrecopy, Gap: 22 * time.Second},
	}
	got := MergeRows(first, second)
	if len(got) != 4 || got[2].Gap != 111*time.Second || got[3].Case != CasePrecopy || got[1].Gap != 7*time.Second {
		t.Fatalf("merged %+v", got)
	}
}

// The experiment's headline ordering holds or says where it does not; a case measured
// as nothing is an error, not a missing bar.
func TestCheckOrdering(t *testing.T) {
	row := func(c string, gap time.Duration) ExpRow {
		return ExpRow{SizeMiB: 64, DirtyPct: 1, Case: c, Gap: gap, Total: 10 * time.Second, Bytes: 70e6}
	}
	good := []ExpRow{row(CaseStock, 9*time.Second), row(CaseStopCopy, 7*time.Second), row(CasePrecopy, 900*time.Millisecond)}
	if err := CheckOrdering(good); err != nil {
		t.Fatal(err)
	}
	// At the floor (a small Redis), the two land in either order: noise, not a defect.
	floor := []ExpRow{row(CaseStock, 1659*time.Millisecond), row(CaseStopCopy, 628*time.Millisecond), row(CasePrecopy, 731*time.Millisecond)}
	if err := CheckOrdering(floor); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		rows []ExpRow
		want string
	}{
		{[]ExpRow{row(CaseStopCopy, 7*time.Second), row(CasePrecopy, 8*time.Second)}, "pre-copy's downtime 8s is not below half of stop-and-copy's 7s"},
		{[]ExpRow{row(CaseStopCopy, 7*time.Second), row(CasePrecopy, 3500*time.Millisecond)}, "pre-copy's downtime 3.5s is not below half"},
		{[]ExpRow{row(CaseStopCopy, 500*time.Millisecond), row(CasePrecopy, 801*time.Millisecond)}, "pre-copy's downtime 801ms exceeds stop-and-copy's 500ms by more than 300ms"},
		{[]ExpRow{row(CaseStock, 6*time.Second), row(CaseStopCopy, 7*time.Second)}, "stop-and-copy's downtime 7s exceeds the stock sequence's 6s"},
		{[]ExpRow{row(CaseStock, 6*time.Second), {SizeMiB: 64, DirtyPct: 1, Case: CasePrecopy}}, "not measured"},
	} {
		if err := CheckOrdering(tc.rows); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.rows, err, tc.want)
		}
	}
}
