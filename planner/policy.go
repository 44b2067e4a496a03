package planner

import (
	"fmt"
	"time"
)

// Policy is what `migrate auto` decides by.
type Policy struct {
	SLO        time.Duration // passive: move when the user's round trip exceeds this
	Hysteresis float64       // a move must cut the round trip by at least this fraction
	MinDwell   time.Duration // never move a container again sooner than this
	Lead       time.Duration // proactive: move this long before the user is expected to leave
	MinProb    float64       // proactive: only follow a prediction at least this likely
}

// DefaultPolicy are the defaults of `migrate auto`.
var DefaultPolicy = Policy{SLO: 20 * time.Millisecond, Hysteresis: 0.2, MinDwell: 2 * time.Minute, Lead: 30 * time.Second, MinProb: 0.5}

// Decision is what auto does, and why.
type Decision struct {
	Move   bool   `json:"move"`
	To     string `json:"to,omitempty"`
	Reason string `json:"reason"`
}

// Passive decides from measured round trips: the plan ranks the hosts, cur is the host the
// container runs on, sinceMove how long ago it last moved (negative: never).
func (p Policy) Passive(plan *Plan, cur string, sinceMove time.Duration) Decision {
	var here, best *Score
	for i := range plan.Scores {
		s := &plan.Scores[i]
		if s.Host == cur {
			here = s
		}
	}
	if here == nil {
		return Decision{Reason: fmt.Sprintf("%s is not among the candidates", cur)}
	}
	if here.RTT <= p.SLO {
		return Decision{Reason: fmt.Sprintf("within the SLO: round trip %s on %s (SLO %s)", here.RTT.Round(100*time.Microsecond), cur, p.SLO)}
	}
	best = &plan.Scores[0]
	switch {
	case !plan.Move:
		return Decision{Reason: fmt.Sprintf("SLO broken (%s on %s) but no host is worth the move: %s", here.RTT.Round(100*time.Microsecond), cur, plan.Why)}
	case float64(best.RTT) > float64(here.RTT)*(1-p.Hysteresis):
		return Decision{Reason: fmt.Sprintf("SLO broken but %s (%s) is not %.0f%% better than %s (%s)", best.Host, best.RTT.Round(100*time.Microsecond), p.Hysteresis*100, cur, here.RTT.Round(100*time.Microsecond))}
	case sinceMove >= 0 && sinceMove < p.MinDwell:
		return Decision{Reason: fmt.Sprintf("SLO broken, %s would be better, but the container moved %s ago (minimum dwell %s)", best.Host, sinceMove.Round(time.Second), p.MinDwell)}
	}
	return Decision{Move: true, To: best.Host, Reason: fmt.Sprintf("SLO broken: round trip %s on %s (SLO %s); %s", here.RTT.Round(100*time.Microsecond), cur, p.SLO, plan.Why)}
}

// Proactive decides from the trace: host maps a place to the host that serves it.
func (p Policy) Proactive(t Trace, now time.Duration, host func(string) (string, bool), cur string, sinceMove time.Duration) Decision {
	v, ok := t.At(now)
	if !ok {
		return Decision{Reason: fmt.Sprintf("the trace starts after %s", now)}
	}
	target, why := v.Location, fmt.Sprintf("the user is at %s since %s", v.Location, v.At)
	pred := Learn(t, now)
	if next, prob, ok := pred.Next(v.Location); ok && prob >= p.MinProb {
		if dwell, ok := pred.Dwell(v.Location); ok {
			left := dwell - (now - v.At)
			if left <= p.Lead {
				target = next
				why = fmt.Sprintf("the user is at %s for %s of a usual %s and goes on to %s %.0f%% of the time: expected there in %s (lead %s)",
					v.Location, (now - v.At).Round(time.Second), dwell.Round(time.Second), next, prob*100, max(left, 0).Round(time.Second), p.Lead)
			}
		}
	}
	to, ok := host(target)
	if !ok {
		return Decision{Reason: fmt.Sprintf("%s; no host serves %s", why, target)}
	}
	if to == cur {
		return Decision{Reason: fmt.Sprintf("%s; %s already serves it", why, cur)}
	}
	if sinceMove >= 0 && sinceMove < p.MinDwell {
		return Decision{Reason: fmt.Sprintf("%s; %s would serve it, but the container moved %s ago (minimum dwell %s)", why, to, sinceMove.Round(time.Second), p.MinDwell)}
	}
	return Decision{Move: true, To: to, Reason: why}
}
