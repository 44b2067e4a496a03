package testbed

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"time"
)

// sockperfReply is one request of a `sockperf ping-pong --full-log` file: when it was
// sent and when its reply arrived, in seconds.
type sockperfReply struct{ tx, rx float64 }

func sockperfReplies(log []byte) []sockperfReply {
	var s []sockperfReply
	sc := bufio.NewScanner(bytes.NewReader(log))
	started := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "packet,") {
			started = true
			continue
		}
		f := strings.Split(line, ",")
		if !started || len(f) < 3 {
			continue
		}
		tx, err1 := strconv.ParseFloat(strings.TrimSpace(f[1]), 64)
		rx, err2 := strconv.ParseFloat(strings.TrimSpace(f[2]), 64)
		if err1 == nil && err2 == nil {
			s = append(s, sockperfReply{tx, rx})
		}
	}
	return s
}

// largestGap returns the index of the reply that ends the largest time between two
// consecutive replies (len(s) >= 2).
func largestGap(s []sockperfReply) int {
	g := 1
	for i := 2; i < len(s); i++ {
		if s[i].rx-s[i-1].rx > s[g].rx-s[g-1].rx {
			g = i
		}
	}
	return g
}

func seconds(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }

// SockperfSpan reads the same log and returns the time from its first reply to its last:
// a client whose connection broke during a move has no reply after it.
func SockperfSpan(log []byte) time.Duration {
	s := sockperfReplies(log)
	if len(s) < 2 {
		return 0
	}
	return seconds(s[len(s)-1].rx - s[0].rx)
}

// SockperfGap reads a `sockperf ping-pong --full-log` file and returns the largest time
// between two consecutive replies (what a user of the service feels as downtime), the
// largest round trip, and the number of replies.
func SockperfGap(log []byte) (gap, maxRTT time.Duration, n int, err error) {
	s := sockperfReplies(log)
	if len(s) == 0 {
		return 0, 0, 0, fmt.Errorf("no replies in the sockperf log")
	}
	for _, x := range s {
		maxRTT = max(maxRTT, seconds(x.rx-x.tx))
	}
	if len(s) > 1 {
		g := largestGap(s)
		gap = seconds(s[g].rx - s[g-1].rx)
	}
	return gap, maxRTT, len(s), nil
}

// SockperfAfterGap reads the same log and returns the 99th percentile of the round
// trips of the requests sent within window after the largest gap ended (the post-copy
// phase, when the container runs on pages still arriving), and, for comparison, of the
// requests sent within the same window before the gap began. n is how many fell into
// the window after the gap.
func SockperfAfterGap(log []byte, window time.Duration) (during, before time.Duration, n int, err error) {
	s := sockperfReplies(log)
	if len(s) < 2 {
		return 0, 0, 0, fmt.Errorf("%d replies in the sockperf log: too few for a gap", len(s))
	}
	p99 := func(from, to float64) (time.Duration, int) {
		var rtts []float64
		for _, x := range s {
			if x.tx >= from && x.tx < to {
				rtts = append(rtts, x.rx-x.tx)
			}
		}
		if len(rtts) == 0 {
			return 0, 0
		}
		sort.Float64s(rtts)
		return seconds(rtts[int(math.Ceil(0.99*float64(len(rtts))))-1]), len(rtts) // nearest rank
	}
	g, w := largestGap(s), window.Seconds()
	end, begin := s[g].rx, s[g-1].rx
	during, n = p99(end, end+w)
	before, _ = p99(begin-w, begin)
	return during, before, n, nil
}

// SockperfRateAfterGap reads the same log and returns the rate of replies, per second,
// from the end of the largest gap to the last reply: whether the connection carried on
// at the client's pace after the move, whatever the client's warm-up or the machine's
// load did before it. It is an error if less than a second follows the gap.
func SockperfRateAfterGap(log []byte) (rate float64, n int, err error) {
	s := sockperfReplies(log)
	if len(s) < 2 {
		return 0, 0, fmt.Errorf("%d replies in the sockperf log: too few for a gap", len(s))
	}
	g := largestGap(s)
	span := s[len(s)-1].rx - s[g].rx
	if span < 1 {
		return 0, 0, fmt.Errorf("only %.3f s of replies after the largest gap: too little for a rate", span)
	}
	n = len(s) - g - 1 // the replies after the first one that ended the gap
	return float64(n) / span, n, nil
}

// UDP is what memload -udp-ping reports: datagrams sent, echoed back, lost, and the
// largest time between two echoes.
type UDP struct {
	Sent       int           `json:"sent"`
	Echoed     int           `json:"echoed"`
	Lost       int           `json:"lost"`
	Duplicates int           `json:"duplicates"`
	LargestGap time.Duration `json:"largest_gap_ns"`
}

// ParseUDP reads memload -udp-ping's JSON line.
func ParseUDP(b []byte) (UDP, error) {
	var u UDP
	return u, parseResultLine(b, "UDP", &u)
}

// parseResultLine decodes the first JSON object in b (a memload client's one-line result,
// after whatever else it printed) into v.
func parseResultLine(b []byte, what string, v any) error {
	i := bytes.IndexByte(b, '{')
	if i < 0 {
		return fmt.Errorf("no %s result in %.200q", what, b)
	}
	if err := json.NewDecoder(bytes.NewReader(b[i:])).Decode(v); err != nil {
		return fmt.Errorf("%s result: %w", what, err)
	}
	return nil
}

// StreamPort is where memload's stream server listens in the test containers.
const StreamPort = 7000

// StreamServe is the shell command that serves both an iperf3 server and an exact byte
// stream of n bytes paced at mbit Mbit/s (memload -stream-serve).
func StreamServe(n int64, mbit float64) string {
	return fmt.Sprintf("memload -stream-serve :%d -bytes %d -stream-rate %g & exec iperf3 -s", StreamPort, n, mbit)
}

// Stream is what memload -stream-connect reports.
type Stream struct {
	Expected   int64         `json:"expected"`
	Received   int64         `json:"received"`
	CorruptAt  int64         `json:"corrupt_at"`
	LargestGap time.Duration `json:"largest_gap_ns"`
	Duration   time.Duration `json:"duration_ns"`
	Error      string        `json:"error,omitempty"`
}

// Intact reports whether every byte arrived once, in order, unchanged.
func (s Stream) Intact() bool {
	return s.Error == "" && s.CorruptAt < 0 && s.Expected > 0 && s.Received == s.Expected
}

// ParseStream reads memload -stream-connect's JSON line.
func ParseStream(b []byte) (Stream, error) {
	var s Stream
	return s, parseResultLine(b, "stream", &s)
}

// StreamClient starts memload -stream-connect on the client against addr.
func (tb *Testbed) StreamClient(ctx context.Context, ip string, n int64) (*exec.Cmd, *bytes.Buffer, error) {
	if tb.MemloadBin == "" {
		return nil, nil, fmt.Errorf("testbed %s has no memload binary", tb.Name)
	}
	cmd, err := tb.Command(ctx, ClientName, tb.MemloadBin, "-stream-connect", fmt.Sprintf("%s:%d", ip, StreamPort), "-bytes", fmt.Sprint(n))
	if err != nil {
		return nil, nil, err
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	return cmd, &out, cmd.Start()
}
