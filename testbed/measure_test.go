package testbed

import (
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
}
