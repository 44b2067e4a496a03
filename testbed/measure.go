package testbed

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// SockperfGap reads a `sockperf ping-pong --full-log` file and returns the largest time
// between two consecutive replies (what a user of the service feels as downtime), the
// largest round trip, and the number of replies.
func SockperfGap(log []byte) (gap, maxRTT time.Duration, n int, err error) {
	sc := bufio.NewScanner(bytes.NewReader(log))
	var prev float64
	started := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "packet,") {
			started = true
			continue
		}
		if !started {
			continue
		}
		f := strings.Split(line, ",")
		if len(f) < 3 {
			continue
		}
		tx, err1 := strconv.ParseFloat(strings.TrimSpace(f[1]), 64)
		rx, err2 := strconv.ParseFloat(strings.TrimSpace(f[2]), 64)
		if err1 != nil || err2 != nil {
			continue
		}
		if rtt := time.Duration((rx - tx) * float64(time.Second)); rtt > maxRTT {
			maxRTT = rtt
		}
		if n > 0 {
			if g := time.Duration((rx - prev) * float64(time.Second)); g > gap {
				gap = g
			}
		}
		prev = rx
		n++
	}
	if n == 0 {
		return 0, 0, 0, fmt.Errorf("no replies in the sockperf log")
	}
	return gap, maxRTT, n, nil
}
