package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/migrate-project/migrate/planner"
	"github.com/migrate-project/migrate/transfer"
)

// exitBusy: another `migrate auto` holds the container's lock.
const exitBusy = 5

type busyError struct{ error }

var costFlags = []cli.Flag{
	&cli.DurationFlag{Name: "horizon", Value: planner.DefaultParams.Horizon, Usage: "how long the user is expected to stay: the time over which latency is weighed"},
	&cli.Float64Flag{Name: "rate", Value: planner.DefaultParams.Rate, Usage: "the user's requests per second (each waits one round trip)"},
	&cli.DurationFlag{Name: "downtime", Value: planner.DefaultParams.Downtime, Usage: "the frozen time a move costs the user"},
}

func paramsOf(c *cli.Context) planner.Params {
	return planner.Params{Horizon: c.Duration("horizon"), Rate: c.Float64("rate"), Downtime: c.Duration("downtime")}
}

// plan gathers, for container name on host from, what each host lacks (asked of from),
// the bandwidth to it, and each host's round trip to the user, and ranks them.
func (op *operator) plan(ctx context.Context, name, from string, user netip.Addr, p planner.Params) (*planner.Plan, error) {
	src, err := op.peer(from)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, h := range op.inv.Hosts {
		names = append(names, h.Name)
	}
	costs, err := src.Costs(ctx, transfer.CostRequest{Container: name, Hosts: names})
	if err != nil {
		return nil, fmt.Errorf("what moving %s would take: %w", name, err)
	}
	rtts := make([]transfer.RTTResult, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, h := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := op.peers[h].RTT(ctx, user)
			if err == nil {
				rtts[i] = *r
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	var cands []planner.Candidate
	for i, hc := range costs {
		cd := planner.Candidate{Host: hc.Host, Current: hc.Host == from, Layers: hc.LayerBytes, Memory: hc.MissingMemory, Mbit: hc.Mbit, Problem: hc.Problem}
		if i < len(rtts) && errs[i] == nil {
			cd.RTT = rtts[i].RTT
		} else if cd.Problem == "" && i < len(errs) {
			cd.Problem = fmt.Sprintf("round trip to %s: %v", user, errs[i])
		}
		cands = append(cands, cd)
	}
	return planner.Rank(cands, p)
}

var planCommand = &cli.Command{
	Name:      "plan",
	Usage:     "rank the hosts for a container: what a move costs against the latency it saves its user",
	ArgsUsage: "CONTAINER",
	Description: `  migrate plan web --user 198.51.100.7
  migrate plan web --user 198.51.100.7 --horizon 30m --rate 50 --json

Asks the container's host what each other host lacks (image layers, and memory pages its
page store does not hold) and measures the bandwidth to it; asks every host for its round
trip to the user's address (ping). Costs are seconds of user waiting over --horizon: the
user keeps the current host's round trip while the move runs (missing bytes over the
bandwidth, plus --downtime), the candidate's afterwards, and every request in the downtime
waits for it. Prints the ranking, best first, and why the best wins. Hosts without podman,
or that cannot be reached, are listed with the reason and never chosen.`,
	Flags: append([]cli.Flag{
		inventoryFlag, certsFlag, identityFlag,
		&cli.StringFlag{Name: "user", Required: true, Usage: "the user's address (each host pings it)"},
		&cli.StringFlag{Name: "from", Usage: "the container's host (default: found by asking every host)"},
	}, costFlags...),
	Action: func(c *cli.Context) error {
		if c.NArg() != 1 {
			return usageError{errors.New("usage: migrate plan CONTAINER --user ADDRESS")}
		}
		user, err := netip.ParseAddr(c.String("user"))
		if err != nil {
			return usageError{fmt.Errorf("--user %q: want an IP address", c.String("user"))}
		}
		op, err := newOperator(c)
		if err != nil {
			return err
		}
		name := c.Args().First()
		from, err := op.locate(c, name, c.String("from"))
		if err != nil {
			return err
		}
		pl, err := op.plan(c.Context, name, from, user, paramsOf(c))
		if err != nil {
			return err
		}
		if c.Bool("json") {
			return printJSON(c, pl)
		}
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "HOST\tRTT\tMISSING MB\tMBIT/S\tTRANSFER\tLATENCY COST\tMOVE COST\tTOTAL\t")
		for _, s := range pl.Scores {
			mark := s.Host
			if s.Current {
				mark += " (now)"
			}
			if s.Problem != "" {
				fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t-\t%s\n", mark, s.Problem)
				continue
			}
			fmt.Fprintf(tw, "%s\t%s\t%.1f\t%.0f\t%s\t%.1f s\t%.1f s\t%.1f s\t\n", mark, s.RTT.Round(10*time.Microsecond),
				float64(s.Layers+s.Memory)/1e6, s.Mbit, s.Transfer.Round(100*time.Millisecond), s.Latency, s.Move, s.Total)
		}
		tw.Flush()
		fmt.Fprintln(c.App.Writer, pl.Why)
		return nil
	},
}

// AutoRecord is the one JSON line `migrate auto` prints per decision.
type AutoRecord struct {
	Time      time.Time        `json:"time"`
	Container string           `json:"container"`
	Mode      string           `json:"mode"`
	Host      string           `json:"host"`
	Decision  planner.Decision `json:"decision"`
	DryRun    bool             `json:"dry_run,omitempty"`
	Plan      *planner.Plan    `json:"plan,omitempty"`
	TraceAt   time.Duration    `json:"trace_at_ns,omitempty"`
	Result    *autoResult      `json:"result,omitempty"`
	Error     string           `json:"error,omitempty"`
}

type autoResult struct {
	OK         bool          `json:"ok"`
	RolledBack bool          `json:"rolled_back,omitempty"`
	Bytes      int64         `json:"bytes"`
	Frozen     time.Duration `json:"frozen_ns"`
	Total      time.Duration `json:"total_ns"`
	Error      string        `json:"error,omitempty"`
}

// autoState is what auto remembers of a container between runs.
type autoState struct {
	Host     string    `json:"host"`
	LastMove time.Time `json:"last_move"`
	// TraceAt is the trace time of the last proactive move: a replay (--trace-at) runs
	// faster than the wall clock, so its dwell is counted in trace time.
	TraceAt *time.Duration `json:"trace_at_ns,omitempty"`
}

var autoCommand = &cli.Command{
	Name:      "auto",
	Usage:     "decide whether a container should follow its user, and move it (made for cron)",
	ArgsUsage: "CONTAINER",
	Description: `  migrate auto web --mode passive --user 198.51.100.7 --slo 20ms
  migrate auto web --mode proactive --trace /etc/migrate/user.trace --trace-start 2026-11-23T08:00:00Z

Passive: every host pings the user; if the round trip from the container's host breaks
--slo, the hosts are ranked as by 'migrate plan' and the container moves to the best one,
if that cuts the round trip by --hysteresis and the container has not moved within
--min-dwell. Proactive: the user's places come from a trace (lines "SECONDS PLACE", time
since --trace-start); from the visits so far auto learns how often the user goes from each
place to each other and how long they stay, and moves the container to the host serving
the likely next place --lead before the user is expected to leave (the inventory's
"locations" say which host serves which place). Until it has learnt, it follows the user.

One JSON line per run on stdout; no terminal needed. A lock per container means two runs
never move it at once. State (last move) lives in --state-dir.
Exit codes: 0 stayed or moved, 1 error, 2 usage, 4 the move failed and was rolled back
(the container runs where it did), 5 another run holds the container's lock.
Example crontab and systemd timer: scripts/migrate-auto.cron, scripts/migrate-auto.{service,timer}.`,
	Flags: append([]cli.Flag{
		inventoryFlag, certsFlag, identityFlag,
		&cli.StringFlag{Name: "mode", Value: "passive", Usage: "passive (follow a user whose latency broke the SLO) or proactive (move ahead, from a trace)"},
		&cli.StringFlag{Name: "user", Usage: "passive: the user's address (each host pings it)"},
		&cli.StringFlag{Name: "trace", Usage: "proactive: the user's mobility trace"},
		&cli.TimestampFlag{Name: "trace-start", Layout: time.RFC3339, Usage: "proactive: wall-clock time of the trace's second 0"},
		&cli.DurationFlag{Name: "trace-at", Usage: "proactive: act as if at this point of the trace (replays, tests) instead of now - trace-start"},
		&cli.DurationFlag{Name: "slo", Value: planner.DefaultPolicy.SLO, Usage: "passive: the user's round trip that calls for a move"},
		&cli.Float64Flag{Name: "hysteresis", Value: planner.DefaultPolicy.Hysteresis, Usage: "a move must cut the round trip by this fraction"},
		&cli.DurationFlag{Name: "min-dwell", Value: planner.DefaultPolicy.MinDwell, Usage: "never move the container again sooner than this"},
		&cli.DurationFlag{Name: "lead", Value: planner.DefaultPolicy.Lead, Usage: "proactive: move this long before the user is expected to leave"},
		&cli.Float64Flag{Name: "min-prob", Value: planner.DefaultPolicy.MinProb, Usage: "proactive: follow a prediction only if at least this likely"},
		&cli.StringFlag{Name: "state-dir", Value: "/var/lib/migrate/auto", Usage: "where auto keeps its lock and each container's last move"},
		&cli.BoolFlag{Name: "dry-run", Usage: "decide and print, move nothing"},
	}, costFlags...),
	Action: runAuto,
}

func runAuto(c *cli.Context) error {
	if c.NArg() != 1 {
		return usageError{errors.New("usage: migrate auto CONTAINER --mode passive --user ADDRESS | --mode proactive --trace FILE")}
	}
	name := c.Args().First()
	pol := planner.Policy{SLO: c.Duration("slo"), Hysteresis: c.Float64("hysteresis"), MinDwell: c.Duration("min-dwell"),
		Lead: c.Duration("lead"), MinProb: c.Float64("min-prob")}
	mode := c.String("mode")
	var user netip.Addr
	var trace planner.Trace
	var at time.Duration
	switch mode {
	case "passive":
		var err error
		if user, err = netip.ParseAddr(c.String("user")); err != nil {
			return usageError{fmt.Errorf("--user %q: passive mode needs the user's IP address", c.String("user"))}
		}
	case "proactive":
		f, err := os.Open(c.String("trace"))
		if err != nil {
			return usageError{fmt.Errorf("--trace: %w (proactive mode needs the user's mobility trace)", err)}
		}
		trace, err = planner.ParseTrace(f)
		f.Close()
		if err != nil {
			return usageError{fmt.Errorf("--trace %s: %w", c.String("trace"), err)}
		}
		switch {
		case c.IsSet("trace-at"):
			at = c.Duration("trace-at")
		case c.Timestamp("trace-start") != nil:
			at = time.Since(*c.Timestamp("trace-start"))
		default:
			return usageError{errors.New("proactive mode needs --trace-start (or --trace-at)")}
		}
	default:
		return usageError{fmt.Errorf("--mode %q: want passive or proactive", mode)}
	}
	if pol.Hysteresis < 0 || pol.Hysteresis >= 1 {
		return usageError{errors.New("--hysteresis must be in [0, 1)")}
	}
	op, err := newOperator(c)
	if err != nil {
		return err
	}
	dir := c.String("state-dir")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// One run per container at a time.
	lock, err := os.OpenFile(filepath.Join(dir, name+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return busyError{fmt.Errorf("another migrate auto holds %s (%s)", name, lock.Name())}
	}
	rec := AutoRecord{Time: time.Now().UTC(), Container: name, Mode: mode, DryRun: c.Bool("dry-run")}
	if mode == "proactive" {
		rec.TraceAt = at
	}
	emit := func(err error) error {
		if err != nil && rec.Error == "" {
			rec.Error = err.Error()
		}
		b, merr := json.Marshal(rec)
		if merr != nil {
			b, _ = json.Marshal(map[string]string{"container": name, "error": "encode decision: " + merr.Error()})
		}
		fmt.Fprintln(c.App.Writer, string(b))
		return err
	}
	from, err := op.locate(c, name, "")
	if err != nil {
		return emit(err)
	}
	rec.Host = from
	statePath := filepath.Join(dir, name+".json")
	var st autoState
	if b, err := os.ReadFile(statePath); err == nil {
		json.Unmarshal(b, &st)
	}
	since := time.Duration(-1)
	switch {
	case mode == "proactive" && st.TraceAt != nil:
		since = at - *st.TraceAt
	case !st.LastMove.IsZero():
		since = time.Since(st.LastMove)
	}
	switch mode {
	case "passive":
		pl, err := op.plan(c.Context, name, from, user, paramsOf(c))
		if err != nil {
			return emit(err)
		}
		rec.Plan = pl
		rec.Decision = pol.Passive(pl, from, since)
	case "proactive":
		rec.Decision = pol.Proactive(trace, at, op.inv.ServedBy, from, since)
	}
	if !rec.Decision.Move || rec.DryRun {
		return emit(nil)
	}
	src, err := op.peer(from)
	if err != nil {
		return emit(err)
	}
	res, err := src.Push(c.Context, transfer.PushRequest{Container: name, To: rec.Decision.To}, func(transfer.Event) {})
	if err != nil {
		return emit(err)
	}
	rec.Result = &autoResult{OK: res.OK, RolledBack: res.RolledBack, Bytes: res.Bytes, Frozen: res.Frozen, Total: res.Total, Error: res.Error}
	if res.OK {
		ns := autoState{Host: res.To, LastMove: time.Now().UTC()}
		if mode == "proactive" {
			ns.TraceAt = &at
		}
		b, _ := json.Marshal(ns)
		if err := os.WriteFile(statePath, b, 0o644); err != nil {
			return emit(err)
		}
		return emit(nil)
	}
	if res.RolledBack {
		return emit(rolledBackError{errors.New(res.Error)})
	}
	return emit(errors.New(res.Error))
}
