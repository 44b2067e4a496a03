// Package planner decides where a container should run: it weighs what a move costs
// (the bytes the candidate host lacks over the measured bandwidth, and the downtime its
// users sit through) against the latency the move saves them over a horizon, and predicts
// where a user goes next from a trace of where they have been.
package planner

import (
	"fmt"
	"sort"
	"time"
)

// Candidate is what is known of one host for one container.
type Candidate struct {
	Host    string        `json:"host"`
	Current bool          `json:"current"`              // the container runs here
	RTT     time.Duration `json:"user_rtt_ns"`          // the user's round trip to this host
	Layers  int64         `json:"missing_layer_bytes"`  // image bytes it lacks
	Memory  int64         `json:"missing_memory_bytes"` // memory bytes its page store lacks
	Mbit    float64       `json:"bandwidth_mbit"`       // measured from the current host
	// Unreachable or unable hosts carry the reason and are never chosen.
	Problem string `json:"problem,omitempty"`
}

// Params weigh the two sides.
type Params struct {
	Horizon time.Duration // how long the user is expected to stay where they are
	Rate    float64       // the user's requests per second: each waits one RTT
	// Downtime is the frozen time a move costs (measured moves say about 2-3 s here);
	// every request in it waits for it, about half of it on average.
	Downtime time.Duration
}

// DefaultParams are the defaults of `migrate plan`.
var DefaultParams = Params{Horizon: 10 * time.Minute, Rate: 10, Downtime: 3 * time.Second}

// Score is one ranked host. Costs are in seconds of user waiting over the horizon, so the
// two sides compare. A move takes transfer (the missing bytes over the bandwidth) plus
// the downtime; until it is done the user keeps the current host's round trip, after it the
// candidate's:
//
//	latency = rate x (move time x RTT(current) + (horizon - move time) x RTT(candidate))
//	move    = rate x downtime^2 / 2   (each request in the downtime waits half of it)
type Score struct {
	Candidate
	Transfer time.Duration `json:"transfer_ns"`    // missing bytes over the bandwidth
	Latency  float64       `json:"latency_cost_s"` // user waiting from RTT over the horizon
	Move     float64       `json:"move_cost_s"`    // user waiting from the move's downtime
	Total    float64       `json:"total_cost_s"`
}

// Plan is the ranking, best first, and why the best wins.
type Plan struct {
	Scores []Score `json:"ranking"`
	Best   string  `json:"best"`
	Move   bool    `json:"move"` // the best host is not the current one
	Why    string  `json:"why"`
}

// Rank scores the candidates. A host that lacks the image and memory is still a
// candidate: what it lacks only lengthens the transfer.
func Rank(cands []Candidate, p Params) (*Plan, error) {
	if p.Horizon <= 0 || p.Rate <= 0 {
		return nil, fmt.Errorf("horizon and request rate must be positive")
	}
	var scores []Score
	var cur *Score
	curRTT := time.Duration(-1)
	for _, c := range cands {
		if c.Current {
			curRTT = c.RTT
		}
	}
	for _, c := range cands {
		s := Score{Candidate: c}
		switch {
		case c.Problem != "":
		case c.Current || curRTT < 0:
			s.Latency = p.Rate * p.Horizon.Seconds() * c.RTT.Seconds()
		default:
			if c.Mbit > 0 {
				s.Transfer = time.Duration(float64(c.Layers+c.Memory) * 8 / (c.Mbit * 1e6) * float64(time.Second))
			} else if c.Layers+c.Memory > 0 {
				s.Problem = "no bandwidth measured to it"
				break
			}
			moving := min(s.Transfer+p.Downtime, p.Horizon).Seconds()
			s.Latency = p.Rate * (moving*curRTT.Seconds() + (p.Horizon.Seconds()-moving)*c.RTT.Seconds())
			s.Move = p.Rate * p.Downtime.Seconds() * p.Downtime.Seconds() / 2
		}
		if s.Problem == "" {
			s.Total = s.Latency + s.Move
		}
		scores = append(scores, s)
	}
	// Hosts with a problem go last and are never chosen.
	sort.SliceStable(scores, func(i, j int) bool {
		if pi, pj := scores[i].Problem != "", scores[j].Problem != ""; pi != pj {
			return pj
		}
		if scores[i].Total != scores[j].Total {
			return scores[i].Total < scores[j].Total
		}
		return scores[i].Current // a tie keeps the container where it is
	})
	for i := range scores {
		if scores[i].Current {
			cur = &scores[i]
		}
	}
	if len(scores) == 0 || scores[0].Problem != "" {
		return nil, fmt.Errorf("no host can take the container")
	}
	best := scores[0]
	pl := &Plan{Scores: scores, Best: best.Host, Move: !best.Current}
	switch {
	case cur == nil:
		pl.Why = fmt.Sprintf("%s: the user's round trip %s, the lowest cost", best.Host, best.RTT.Round(100*time.Microsecond))
	case !pl.Move:
		pl.Why = fmt.Sprintf("stay on %s: no host saves the user more than a move costs (round trip %s here)", cur.Host, cur.RTT.Round(100*time.Microsecond))
	default:
		saved := cur.Latency - best.Latency
		pl.Why = fmt.Sprintf("move to %s: round trip %s instead of %s saves %.1f s of user waiting over %s at %g requests/s; the move costs %.1f s of waiting (downtime %s) and %.1f MB over the link (%s at %.0f Mbit/s, while the container serves)",
			best.Host, best.RTT.Round(100*time.Microsecond), cur.RTT.Round(100*time.Microsecond), saved, p.Horizon, p.Rate,
			best.Move, p.Downtime, float64(best.Layers+best.Memory)/1e6, best.Transfer.Round(100*time.Millisecond), best.Mbit)
	}
	return pl, nil
}
