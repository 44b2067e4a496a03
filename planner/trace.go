package planner

import (
	"bufio"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Visit is one line of a mobility trace: from At on, the user is at Location.
type Visit struct {
	At       time.Duration `json:"at_ns"`
	Location string        `json:"location"`
}

// Trace is a user's visits, in time order. File format: one visit per line,
//
//	# seconds-since-start location
//	0    north
//	95.5 south
//
// blank lines and lines starting with # are ignored.
type Trace []Visit

// ParseTrace reads and checks a trace.
func ParseTrace(r io.Reader) (Trace, error) {
	var t Trace
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("trace line %d: %q: want SECONDS LOCATION", n, line)
		}
		secs, err := strconv.ParseFloat(f[0], 64)
		if err != nil || secs < 0 {
			return nil, fmt.Errorf("trace line %d: %q is not a number of seconds", n, f[0])
		}
		at := time.Duration(secs * float64(time.Second))
		if len(t) > 0 && at < t[len(t)-1].At {
			return nil, fmt.Errorf("trace line %d: %gs comes before the line above it", n, secs)
		}
		t = append(t, Visit{At: at, Location: f[1]})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(t) == 0 {
		return nil, fmt.Errorf("trace has no visits")
	}
	return t, nil
}

// At returns where the user is at time at, and since when.
func (t Trace) At(at time.Duration) (Visit, bool) {
	i := sort.Search(len(t), func(i int) bool { return t[i].At > at })
	if i == 0 {
		return Visit{}, false
	}
	v := t[i-1]
	// Consecutive lines at the same place are one visit.
	for i-2 >= 0 && t[i-2].Location == v.Location {
		i--
		v.At = t[i-1].At
	}
	return v, true
}

// Predictor has learnt, from the visits completed before some time, how often the user
// went from each place to each other and how long they stayed.
type Predictor struct {
	next  map[string]map[string]int
	dwell map[string][]time.Duration
}

// Learn builds a predictor from the visits of t that ended before now.
func Learn(t Trace, now time.Duration) *Predictor {
	p := &Predictor{next: map[string]map[string]int{}, dwell: map[string][]time.Duration{}}
	var cur *Visit
	for i := range t {
		v := t[i]
		if v.At > now {
			break
		}
		if cur != nil && v.Location == cur.Location {
			continue
		}
		if cur != nil {
			if p.next[cur.Location] == nil {
				p.next[cur.Location] = map[string]int{}
			}
			p.next[cur.Location][v.Location]++
			p.dwell[cur.Location] = append(p.dwell[cur.Location], v.At-cur.At)
		}
		cur = &t[i]
	}
	return p
}

// Next returns the most frequent next place after loc and its observed probability.
func (p *Predictor) Next(loc string) (string, float64, bool) {
	best, bestN, total := "", 0, 0
	for to, n := range p.next[loc] {
		total += n
		if n > bestN || (n == bestN && to < best) {
			best, bestN = to, n
		}
	}
	if total == 0 {
		return "", 0, false
	}
	return best, float64(bestN) / float64(total), true
}

// Dwell returns the mean time the user stayed at loc.
func (p *Predictor) Dwell(loc string) (time.Duration, bool) {
	d := p.dwell[loc]
	if len(d) == 0 {
		return 0, false
	}
	var sum time.Duration
	for _, x := range d {
		sum += x
	}
	return sum / time.Duration(len(d)), true
}
