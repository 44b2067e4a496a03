package testbed

import (
	"fmt"
	"math"
	"strings"
	"testing"
	"time"
)

func TestSockperfGap(t *testing.T) {
	log := []byte(`sockperf: header
packet, txTime(sec), rxTime(sec), latency(usec)
0, 1.000, 1.001, 500
1, 1.010, 1.011, 500
2, 1.020, 1.620, 300000
3, 1.630, 1.631, 500
`)
	gap, rtt, n, err := SockperfGap(log)
	if err != nil || n != 4 {
		t.Fatalf("n %d err %v", n, err)
	}
	if d := gap - 609*time.Millisecond; d > time.Millisecond || d < -time.Millisecond {
		t.Errorf("gap %v, want 609ms", gap)
	}
	if d := rtt - 600*time.Millisecond; d > time.Millisecond || d < -time.Millisecond {
		t.Errorf("max rtt %v, want 600ms", rtt)
	}
	if _, _, _, err := SockperfGap([]byte("nothing")); err == nil {
		t.Error("an empty log must be an error")
	}
	if d := SockperfSpan(log) - 630*time.Millisecond; d > time.Millisecond || d < -time.Millisecond {
		t.Errorf("span %v, want 630ms (first reply to last)", SockperfSpan(log))
	}
	if SockperfSpan([]byte("nothing")) != 0 {
		t.Error("an empty log spans no time")
	}
}

// The post-copy phase's latency: the 99th percentile of the round trips sent within the
// window after the largest gap, beside the same window before it; nothing outside.
func TestSockperfAfterGap(t *testing.T) {
	var b strings.Builder
	b.WriteString("packet, txTime(sec), rxTime(sec), latency(usec)\n")
	tx := 1.0
	add := func(rtt float64) {
		fmt.Fprintf(&b, "0, %.6f, %.6f, 0\n", tx, tx+rtt)
		tx += rtt + 0.005
	}
	for i := 0; i < 100; i++ { // before: 1 ms, one of them 4 ms
		add(map[bool]float64{true: 0.004, false: 0.001}[i == 50])
	}
	add(0.6)                   // frozen: the largest gap
	for i := 0; i < 100; i++ { // after: 2 ms, two of them 30 ms (page faults)
		add(map[bool]float64{true: 0.030, false: 0.002}[i == 10 || i == 20])
	}
	for i := 0; i < 200; i++ { // long after: 50 ms, outside the window
		add(0.050)
	}
	during, before, n, err := SockperfAfterGap([]byte(b.String()), 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if n < 60 || n > 80 {
		t.Errorf("%d requests in the 500 ms after the gap, want about 70", n)
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	if math.Abs(ms(during)-30) > 0.01 || math.Abs(ms(before)-4) > 0.01 {
		t.Errorf("p99 during %v, before %v: want 30ms and 4ms", during, before)
	}
	if _, _, _, err := SockperfAfterGap([]byte("packet, x\n0, 1.0, 1.1, 0\n"), time.Second); err == nil {
		t.Error("one reply has no gap: want an error")
	}
}

// The rate after the gap counts only what followed the gap: a slow start does not lower it,
// a client that slowed after the move does.
func TestSockperfRateAfterGap(t *testing.T) {
	log := func(after float64) []byte {
		var b strings.Builder
		b.WriteString("packet, txTime(sec), rxTime(sec), latency(usec)\n")
		tx := 1.0
		for i := 0; i < 50; i++ { // a slow warm-up: 20/s
			fmt.Fprintf(&b, "0, %.6f, %.6f, 0\n", tx, tx+0.001)
			tx += 0.05
		}
		tx += 0.7 // frozen
		for i := 0; i < 600; i++ {
			fmt.Fprintf(&b, "0, %.6f, %.6f, 0\n", tx, tx+0.001)
			tx += 1 / after
		}
		return []byte(b.String())
	}
	for _, c := range []struct{ after, want float64 }{{200, 200}, {100, 100}} {
		rate, n, err := SockperfRateAfterGap(log(c.after))
		if err != nil {
			t.Fatal(err)
		}
		if math.Abs(rate-c.want) > 1 || n != 599 {
			t.Errorf("client at %v/s after the gap: rate %.1f/s over %d replies, want %v/s over 599", c.after, rate, n, c.want)
		}
	}
	if _, _, err := SockperfRateAfterGap([]byte("packet, x\n0, 1.0, 1.001, 0\n0, 2.0, 2.001, 0\n0, 2.1, 2.101, 0\n")); err == nil {
		t.Error("0.1 s after the gap: want an error")
	}
}
