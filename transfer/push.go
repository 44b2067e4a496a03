package transfer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/migrate-project/migrate/overlaynet"
	"github.com/migrate-project/migrate/pages"
)

// handlePush runs a move and streams its events as newline-delimited JSON. The move goes
// on to its end (commit or rollback) even if the operator disconnects.
func (a *Agent) handlePush(w http.ResponseWriter, r *http.Request) {
	var req PushRequest
	if err := decodeBody(r, &req); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(apiError{Error: err.Error()})
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	fl, _ := w.(http.Flusher)
	emit := func(ev Event) {
		ev.Time = time.Now()
		mu.Lock()
		defer mu.Unlock()
		if enc.Encode(ev) == nil && fl != nil {
			fl.Flush()
		}
	}
	res := a.Push(context.WithoutCancel(r.Context()), req, emit)
	emit(Event{Kind: "result", Result: res})
}

// watchdog calls fire if kick is not called for d (until stopped).
type watchdog struct {
	t *time.Timer
	d time.Duration
}

func newWatchdog(d time.Duration, fire func()) *watchdog {
	return &watchdog{d: d, t: time.AfterFunc(d, fire)}
}

func (w *watchdog) kick() { w.t.Reset(w.d) }
func (w *watchdog) stop() { w.t.Stop() }

// thaw lets traffic reach the container again; the frames held during the freeze follow
// it to wherever it now runs.
func (a *Agent) thaw(mac string, res *PushResult) error {
	var err error
	res.HeldFrames, res.LostFrames, err = a.ovs.Thaw(mac)
	return err
}

func stallTimeout(req PushRequest) time.Duration {
	if req.StallTimeout <= 0 {
		return 60 * time.Second
	}
	return req.StallTimeout
}

// Push moves a container from this host to req.To. It never loses the container: any
// failure before the overlay points at the target rolls back, and the container runs here
// again with its connections.
func (a *Agent) Push(ctx context.Context, req PushRequest, emit func(Event)) *PushResult {
	res := &PushResult{Container: req.Container, From: a.cfg.Name, To: req.To, DryRun: req.DryRun}
	start := time.Now()
	defer func() {
		res.Total = time.Since(start)
		res.Finished = time.Now()
		if !req.DryRun {
			a.mu.Lock()
			a.last = res
			a.mu.Unlock()
		}
	}()
	fail := func(err error) *PushResult {
		res.Error = err.Error()
		emit(Event{Kind: "error", Error: err.Error()})
		return res
	}
	if err := a.needPodman(); err != nil {
		return fail(err)
	}
	if req.To == a.cfg.Name {
		return fail(fmt.Errorf("container %s already runs on %s", req.Container, req.To))
	}
	a.mu.Lock()
	if a.inflight[req.Container] {
		a.mu.Unlock()
		return fail(fmt.Errorf("container %s is already being moved", req.Container))
	}
	a.inflight[req.Container] = true
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.inflight, req.Container)
		a.mu.Unlock()
	}()

	phase := func(name string, t0 time.Time) {
		res.Phases = append(res.Phases, Phase{Name: name, Duration: time.Since(t0)})
	}

	// 1. What is being moved.
	emit(Event{Kind: "phase", Phase: "inspect"})
	c, err := a.podman.Inspect(ctx, req.Container)
	if err != nil {
		return fail(err)
	}
	if c.State != "running" {
		return fail(fmt.Errorf("container %s is %s on %s, not running", c.Name, c.State, a.cfg.Name))
	}
	ep, ok := endpointOf(c)
	if !ok {
		return fail(fmt.Errorf("container %s is not on the overlay (start it with `migrate run --ip ...`): its address could not follow it", c.Name))
	}
	target, err := a.peer(req.To)
	if err != nil {
		return fail(err)
	}

	// 2. The pre-flight gate: nothing is frozen before the target says it can restore.
	t0 := time.Now()
	emit(Event{Kind: "phase", Phase: "preflight"})
	var tinfo HostInfo
	if err := target.Call(ctx, "/v1/info", nil, &tinfo); err != nil {
		return fail(err)
	}
	res.Checks = append(res.Checks,
		Check{Property: "podman", Target: fmt.Sprint(tinfo.Podman), OK: tinfo.Podman, Detail: "the target runs no podman service"},
		Check{Property: "criu (source)", Source: a.info.CRIU, OK: a.info.CRIUProblem == "", Detail: a.info.CRIUProblem},
		Check{Property: "kernel", Source: a.info.Kernel, Target: tinfo.Kernel, OK: true},
	)
	// The image: only the layers the target lacks cross the link, before anything freezes.
	plan, err := a.layerPlanOf(ctx, c, req.To)
	if err != nil {
		return fail(fmt.Errorf("layer plan: %w", err))
	}
	res.Plan = plan
	if !plan.ImagePresent && !req.DryRun {
		t1 := time.Now()
		emit(Event{Kind: "phase", Phase: "image"})
		ir, err := a.shipImage(ctx, plan, func(n int64) { res.ImageBytes = n })
		if err != nil {
			return fail(fmt.Errorf("%w (nothing was frozen: %s runs on %s)", err, c.Name, a.cfg.Name))
		}
		res.ImageBytes = ir.Bytes
		phase("image", t1)
	}
	cpu, err := cpuinfoDump(ctx)
	if err != nil {
		return fail(fmt.Errorf("pre-flight on %s: %w", a.cfg.Name, err))
	}
	prep := PrepareRequest{Container: c.Name, Image: c.Image, Source: a.cfg.Name, Endpoint: ep,
		Runtime: a.info.Runtime, Cgroups: a.info.Cgroups, CPUInfo: cpu, DryRun: req.DryRun}
	var pr PrepareResponse
	if err := target.Call(ctx, "/v1/prepare", prep, &pr); err != nil {
		return fail(fmt.Errorf("pre-flight on %s: %w", req.To, err))
	}
	for _, ch := range pr.Checks {
		if ch.Property == "image" && !ch.OK && req.DryRun && !plan.ImagePresent {
			ch.OK, ch.Target = true, fmt.Sprintf("missing: %d of %d layers to ship, %.1f MB", plan.MissingLayers, len(plan.Layers), float64(plan.MissingBytes)/1e6)
		}
		res.Checks = append(res.Checks, ch)
	}
	for i := range res.Checks {
		if res.Checks[i].OK {
			res.Checks[i].Detail = ""
		}
		emit(Event{Kind: "check", Check: &res.Checks[i]})
	}
	for _, ch := range res.Checks {
		if !ch.OK {
			return fail(fmt.Errorf("%s cannot restore %s: %s: source %q, target %q %s", req.To, c.Name, ch.Property, ch.Source, ch.Target, ch.Detail))
		}
	}
	phase("preflight", t0)
	if req.DryRun {
		res.OK = true
		return res
	}

	// From here on every failure rolls back.
	rollback := func(cause error, restoreHere bool) *PushResult {
		emit(Event{Kind: "phase", Phase: "rollback"})
		rctx := context.WithoutCancel(ctx)
		var errs []error
		actx, cancel := context.WithTimeout(rctx, 30*time.Second)
		if err := target.Call(actx, "/v1/abort", AbortRequest{Container: c.Name, Source: a.cfg.Name, Endpoint: ep}, nil); err != nil {
			// The target's agent recovers from its journal when it comes back.
			slog.Warn("abort on target", "target", req.To, "err", err)
		}
		cancel()
		if restoreHere {
			if st, err := a.podman.State(rctx, c.Name); err == nil && st != "running" {
				if err := a.podman.RestoreLocal(rctx, c.Name, true); err != nil {
					errs = append(errs, fmt.Errorf("resume on %s: %w", a.cfg.Name, err))
				}
			}
		}
		if err := a.thaw(ep.MAC, res); err != nil {
			errs = append(errs, err)
		}
		res.RolledBack = len(errs) == 0
		if len(errs) > 0 {
			cause = fmt.Errorf("%w; ROLLBACK INCOMPLETE: %w", cause, errors.Join(errs...))
		} else {
			cause = fmt.Errorf("%w (rolled back: %s runs on %s)", cause, c.Name, a.cfg.Name)
		}
		return fail(cause)
	}

	// 3. Pre-copy: memory crosses the link while the container runs.
	l, err := newLink(req.Compress, req.BWLimitMbit)
	if err != nil {
		return rollback(err, false)
	}
	res.Mode = req.Mode
	if res.Mode == "" {
		res.Mode = ModePrecopy
	}
	res.DirtyTrack = "unavailable (soft-dirty): changed pages found by hash"
	if a.info.DirtyTracking {
		res.DirtyTrack = "available; pages still found by hash"
	}
	sess := pages.NewSession()
	seen := newLastSent(sess, a.store)
	switch res.Mode {
	case ModePrecopy:
		t0 = time.Now()
		emit(Event{Kind: "phase", Phase: "precopy"})
		// Rounds are under a stall watchdog too: a cut link may send no reset.
		pctx, pcancel := context.WithCancelCause(ctx)
		pwd := newWatchdog(stallTimeout(req), func() {
			pcancel(fmt.Errorf("pre-copy to %s made no progress for %s (link cut?)", req.To, stallTimeout(req)))
		})
		l.progress = pwd.kick
		rounds, why, err := a.precopy(pctx, target, c, req, l, sess, seen, emit)
		pwd.stop()
		l.progress = nil
		if cause := context.Cause(pctx); cause != nil && err != nil {
			err = cause
		}
		pcancel(nil)
		res.Rounds, res.StopReason = rounds, why
		for _, r := range rounds {
			res.RoundBytes += r.WireBytes
		}
		res.Bytes = res.RoundBytes
		if err != nil {
			return rollback(err, false)
		}
		phase("precopy", t0)
	case ModeStopCopy:
	default:
		return rollback(fmt.Errorf("mode %q: want %s or %s", req.Mode, ModePrecopy, ModeStopCopy), false)
	}

	// 4. Freeze and copy the rest: traffic for the container is held here (on the hold
	// port, delivered after the switch), CRIU dumps it with its TCP connections, and the
	// archive streams to the target (pages it holds by reference, pages changed since the
	// last round as deltas), which restores it into the prepared namespace.
	t0 = time.Now()
	emit(Event{Kind: "phase", Phase: "checkpoint"})
	if err := a.ovs.Freeze(ep.MAC); err != nil {
		return rollback(err, false)
	}
	frozenAt := time.Now()
	// A watchdog cancels the transfer if it stalls: a cut link may send no reset.
	stall := stallTimeout(req)
	tctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	wd := newWatchdog(stall, func() {
		cancel(fmt.Errorf("the transfer to %s made no progress for %s (link cut?)", req.To, stall))
	})
	defer wd.stop()
	var lastEmit time.Time
	rr, fst, ft, rerr := a.finalCopy(tctx, target, c, l, sess, seen, func(n int64) {
		wd.kick()
		res.Bytes = res.RoundBytes + n
		if time.Since(lastEmit) > 200*time.Millisecond {
			lastEmit = time.Now()
			emit(Event{Kind: "progress", Phase: "transfer", Bytes: res.Bytes})
		}
	}, wd.stop)
	restoredAt := time.Now()
	if cause := context.Cause(tctx); cause != nil && rerr != nil {
		rerr = cause
	}
	var ee exportError
	if errors.As(rerr, &ee) {
		err := ee.error
		if dir := a.keepLogs(c.Name, c.StaticDir, "dump.log"); dir != "" {
			res.LogsDir = a.cfg.Name + ":" + dir
			err = fmt.Errorf("%w (CRIU log kept in %s)", err, res.LogsDir)
		}
		return rollback(fmt.Errorf("checkpoint %s on %s: %w", c.Name, a.cfg.Name, err), true)
	}
	if rerr != nil {
		return rollback(fmt.Errorf("move %s to %s: %w", c.Name, req.To, rerr), true)
	}
	res.Final = fst
	phase("checkpoint+transfer+restore", t0)

	// 5. Commit: every node's rules point at the target.
	t0 = time.Now()
	emit(Event{Kind: "phase", Phase: "commit"})
	if failed := a.announce(ctx, ep.Location(req.To)); len(failed) > 0 {
		slog.Warn("some nodes did not learn the new location yet", "hosts", failed)
	}
	// The frames held here during the freeze follow the container to the target.
	if err := a.thaw(ep.MAC, res); err != nil {
		slog.Warn("unfreeze", "err", err)
	}
	res.Frozen = time.Since(frozenAt)
	res.Downtime = frozenSteps(frozenAt, ft, restoredAt, time.Now(), rr.CRIURestore)
	if err := target.Call(ctx, "/v1/commit", AbortRequest{Container: c.Name}, nil); err != nil {
		slog.Warn("commit on target", "err", err)
	}
	phase("commit", t0)

	// 6. The source lets go.
	t0 = time.Now()
	emit(Event{Kind: "phase", Phase: "cleanup"})
	if err := a.podman.Remove(ctx, c.Name); err != nil {
		slog.Warn("remove source copy", "container", c.Name, "err", err)
	}
	if err := a.ovs.Unplumb(ctx, overlaynet.Endpoint{Name: ep.Name, MAC: ep.MAC, NetNS: ep.NetNS, Prefix: ep.Prefix}); err != nil {
		slog.Warn("unplumb source endpoint", "container", c.Name, "err", err)
	}
	phase("cleanup", t0)
	res.OK = true
	return res
}

// The names of the frozen phase's steps in PushResult.Downtime; indented ones are parts
// of the step above them, as CRIU measured its own.
const (
	StepCheckpoint    = "checkpoint (CRIU dump, podman archive)"
	StepCRIUFreeze    = "  of checkpoint: CRIU freezing the processes"
	StepCRIUDump      = "  of checkpoint: CRIU dumping them (frozen)"
	StepCRIUMemory    = "  of checkpoint: CRIU memory drain + page image write" // its own counters; may overlap the dump
	StepPodmanArchive = "  of checkpoint: podman (runtime, archive) before its first byte"
	StepStream        = "stream (archive read, encoded, sent)"
	StepRestore       = "restore (target: rebuild, podman import, CRIU)"
	StepCRIURestore   = "  of restore: CRIU itself"
	StepOverlaySwitch = "overlay switch"
)

// frozenSteps splits the frozen time into its steps, with what CRIU measured of its own
// part where it is known.
func frozenSteps(frozenAt time.Time, ft finalTimes, restoredAt, switched time.Time, criuRestore time.Duration) []Phase {
	checkpoint := ft.firstByte.Sub(frozenAt)
	steps := []Phase{{Name: StepCheckpoint, Duration: checkpoint}}
	if d := ft.dump; d != nil {
		steps = append(steps,
			Phase{Name: StepCRIUFreeze, Duration: d.Freezing},
			Phase{Name: StepCRIUDump, Duration: d.Frozen},
			Phase{Name: StepCRIUMemory, Duration: d.MemDump + d.MemWrite},
			Phase{Name: StepPodmanArchive, Duration: max(0, checkpoint-d.Freezing-d.Frozen)})
	}
	steps = append(steps,
		Phase{Name: StepStream, Duration: ft.lastByte.Sub(ft.firstByte)},
		Phase{Name: StepRestore, Duration: restoredAt.Sub(ft.lastByte)})
	if criuRestore > 0 {
		steps = append(steps, Phase{Name: StepCRIURestore, Duration: criuRestore})
	}
	return append(steps, Phase{Name: StepOverlaySwitch, Duration: switched.Sub(restoredAt)})
}
