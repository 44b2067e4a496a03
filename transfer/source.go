package transfer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"time"

	"github.com/migrate-project/migrate/overlaynet"
	"github.com/migrate-project/migrate/pages"
	"github.com/migrate-project/migrate/volumes"
)

// The source's half of a move, top to bottom: Push. The target's half is in target.go;
// the decisions both journal, and what carries them out, in move.go.

// handlePush runs a move and streams its events as newline-delimited JSON. The move goes
// on to its end (commit or rollback) whatever the operator's connection does: events go
// through a buffer to a writer with a deadline per write, and once the operator stops
// reading, the move stops writing to it.
func (a *Agent) handlePush(w http.ResponseWriter, r *http.Request) {
	var req PushRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	events := make(chan Event, 256)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		rc := http.NewResponseController(w)
		enc := json.NewEncoder(w)
		broken := false
		for ev := range events {
			if broken {
				continue // drain: the move must never wait for the operator
			}
			rc.SetWriteDeadline(time.Now().Add(eventWriteTimeout))
			if enc.Encode(ev) != nil || rc.Flush() != nil {
				broken = true
				slog.Warn("operator stopped reading the push's events; the move goes on", "container", req.Container)
			}
		}
	}()
	emit := func(ev Event) {
		ev.Time = time.Now()
		select {
		case events <- ev:
		default: // 256 events behind, the operator is too slow: events are dropped, not waited for
		}
	}
	res := a.Push(context.WithoutCancel(r.Context()), req, emit)
	ev := Event{Kind: "result", Result: res, Time: time.Now()}
	select {
	case events <- ev:
	case <-time.After(eventWriteTimeout):
	}
	close(events)
	<-writerDone
}

// eventWriteTimeout bounds one write of an event to the operator.
const eventWriteTimeout = 10 * time.Second

// muteDelay: how long after its freeze a container's own frames are dropped (Push).
const muteDelay = 20 * time.Millisecond

func stallTimeout(req PushRequest) time.Duration {
	if req.StallTimeout <= 0 {
		return 60 * time.Second
	}
	return req.StallTimeout
}

// Deadlines of the frozen phase, proportional to the work: podman writes the checkpoint
// before its first byte (memory at about 50 MB/s on a slow host, plus a minute), and
// restores after the last one (at about 20 MB/s, plus a minute).
func firstByteDeadline(stall time.Duration, memBytes int64) time.Duration {
	return stall + time.Minute + time.Duration(memBytes/(50<<20))*time.Second
}

func restoreDeadline(archiveBytes int64) time.Duration {
	return time.Minute + time.Duration(archiveBytes/(20<<20))*time.Second
}

func newMoveID() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (a *Agent) isInflight(name string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.inflight[name] != nil
}

// CancelPush cancels the move of container if nothing is frozen yet; it reports whether
// it did (a frozen move runs to its end).
func (a *Agent) CancelPush(container string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.inflight[container]
	if m == nil || m.frozen {
		return false
	}
	m.cancel(errors.New("cancelled by the operator before the freeze"))
	return true
}

func (a *Agent) cancelPush(r *http.Request) (any, error) {
	var ref MoveRef
	if err := decodeBody(r, &ref); err != nil {
		return nil, err
	}
	if a.CancelPush(ref.Container) {
		return CancelResult{Cancelled: true, Detail: "the move stops and rolls back; nothing was frozen"}, nil
	}
	if a.isInflight(ref.Container) {
		return CancelResult{Detail: "the container is frozen already: the move runs to its end (commit or rollback)"}, nil
	}
	return CancelResult{Detail: "no move of " + ref.Container + " is under way here"}, nil
}

// Push moves a container from this host to req.To. It never loses the container: any
// failure before the decision to commit rolls back, and the container runs here again with
// its connections; the decision is journaled before anything irreversible happens.
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
	if err := ValidContainerName(req.Container); err != nil {
		return fail(err)
	}
	if req.To == a.cfg.Name {
		return fail(fmt.Errorf("container %s already runs on %s", req.Container, req.To))
	}
	// Until the freeze the operator may cancel (CancelPush); from then on the move runs
	// to its end under its own deadlines.
	pctx, pcancel := context.WithCancelCause(ctx)
	defer pcancel(nil)
	a.mu.Lock()
	if a.inflight[req.Container] != nil {
		a.mu.Unlock()
		res.Busy = true
		return fail(fmt.Errorf("container %s is already being moved (%s)", req.Container, a.inflight[req.Container].describe(a.cfg.Name)))
	}
	var pending outgoingMove
	if a.mv.out.get(req.Container, &pending) == nil {
		a.mu.Unlock()
		res.Busy = true
		return fail(fmt.Errorf("an earlier move of %s to %s (%s) is still being settled; see `migrate status`", req.Container, pending.Target, pending.State))
	}
	self := &inflightMove{move: newMoveID(), to: req.To, since: time.Now(), cancel: pcancel}
	a.inflight[req.Container] = self
	a.mu.Unlock()
	a.pushes.Add(1)
	defer func() {
		a.mu.Lock()
		delete(a.inflight, req.Container)
		a.mu.Unlock()
		a.pushes.Done()
	}()
	res.Move = self.move

	// throttled emits progress events at most five times a second.
	var lastProgress time.Time
	throttled := func(ev Event) {
		if time.Since(lastProgress) >= 200*time.Millisecond || ev.Bytes == ev.Total {
			lastProgress = time.Now()
			emit(ev)
		}
	}
	phase := func(name string, t0 time.Time) {
		res.Phases = append(res.Phases, Phase{Name: name, Duration: time.Since(t0)})
	}

	// 1. What is being moved.
	emit(Event{Kind: "phase", Phase: "inspect"})
	c, err := a.podman.Inspect(pctx, req.Container)
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
	// This host's own checks come first: a target is prepared only for a move that can go.
	t0 := time.Now()
	emit(Event{Kind: "phase", Phase: "preflight"})
	tinfo, err := target.Info(pctx)
	if err != nil {
		return fail(err)
	}
	res.Checks = append(res.Checks,
		Check{Property: "podman", Target: fmt.Sprint(tinfo.Podman), OK: tinfo.Podman, Detail: fmt.Sprintf("host %s runs no containers (its agent has no podman service)", req.To)},
		Check{Property: "criu (source)", Source: a.info.CRIU, OK: a.info.CRIUProblem == "", Detail: a.info.CRIUProblem},
		Check{Property: "kernel", Source: a.info.Kernel, Target: tinfo.Kernel, OK: true},
	)
	res.Checks = append(res.Checks, movable(c)...)
	res.Checks = append(res.Checks, usersCheck(a.info.NoSysResource, c)...)
	vols := volumeNames(c)
	if len(vols) > 0 {
		res.Checks = append(res.Checks, a.volumeChecks(pctx, c)...)
	}
	failedCheck := func() error {
		for _, ch := range res.Checks {
			if !ch.OK {
				return fmt.Errorf("%s cannot restore %s: %s: source %q, target %q %s", req.To, c.Name, ch.Property, ch.Source, ch.Target, ch.Detail)
			}
		}
		return nil
	}
	emitChecks := func() {
		for i := range res.Checks {
			if res.Checks[i].OK && res.Checks[i].Property != "memory path" {
				res.Checks[i].Detail = ""
			}
			emit(Event{Kind: "check", Check: &res.Checks[i]})
		}
	}
	// The memory path: where both hosts and the container allow it, the frozen phase
	// hands memory over through CRIU's page server and the target restores lazily.
	memProblem := ""
	switch {
	case req.MemoryPath == PathArchive:
		memProblem = "--memory-path archive"
	case c.CRIUConfig != CRIUConfigPath(c.Name):
		memProblem = fmt.Sprintf("the container's %s annotation is %q, not %s (start it with `migrate run`)", annotationCRIUConfig, c.CRIUConfig, CRIUConfigPath(c.Name))
	case a.info.MemoryProblem != "":
		memProblem = a.cfg.Name + ": " + a.info.MemoryProblem
	case tinfo.MemoryProblem != "":
		memProblem = req.To + ": " + tinfo.MemoryProblem
	}
	res.MemoryPath = PathMemory
	lazyProblem := lazyDumpProblem(a.info.NoSysResource)
	handOver, handOverErr := handOverFor(req.HandOver, lazyProblem)
	pathCheck := Check{Property: "memory path", OK: true, Source: "page server", Target: "lazy pages"}
	if handOver == HandOverRead {
		pathCheck.Source = "lazy dump read by the agent"
	}
	if memProblem != "" {
		res.MemoryPath = PathArchive
		pathCheck.Source, pathCheck.Target = "in podman's archive", "in podman's archive"
		pathCheck.Detail = "memory goes inside podman's archive: " + memProblem
		if req.MemoryPath == PathMemory || req.Postcopy {
			pathCheck.OK = false
			if req.Postcopy {
				pathCheck.Detail = "--postcopy needs the memory path: " + memProblem
			}
		}
	} else if req.Postcopy {
		pathCheck.Source, pathCheck.Target = "lazy dump (post-copy)", "lazy pages from the source (post-copy)"
	}
	res.Checks = append(res.Checks, pathCheck)
	if err := failedCheck(); err != nil {
		emitChecks()
		return fail(err)
	}
	// The image: only the layers the target lacks cross the link, before anything freezes.
	plan, err := a.layerPlanOf(pctx, c, req.To)
	if err != nil {
		return fail(fmt.Errorf("layer plan: %w", err))
	}
	res.Plan = plan
	if !plan.ImagePresent && !req.DryRun {
		t1 := time.Now()
		emit(Event{Kind: "phase", Phase: "image"})
		// Under a stall watchdog too (podman's save gets a minute before its first byte).
		stalled := fmt.Sprintf("the image transfer to %s made no progress for %s (link cut?)", req.To, stallTimeout(req))
		wd := newWatchdog(pctx, stallTimeout(req)+time.Minute, stalled)
		ir, err := a.shipImage(wd.ctx, plan, func(n int64) {
			wd.expect(stallTimeout(req), stalled)
			res.ImageBytes = n
			throttled(Event{Kind: "progress", Phase: "image", Bytes: n, Total: plan.MissingBytes})
		})
		err = wd.done(err)
		if err != nil {
			return fail(fmt.Errorf("%w (nothing was frozen: %s runs on %s)", err, c.Name, a.cfg.Name))
		}
		res.ImageBytes = ir.Bytes
		phase("image", t1)
	}
	cpu, err := cpuinfoDump(pctx)
	if err != nil {
		return fail(fmt.Errorf("pre-flight on %s: %w", a.cfg.Name, err))
	}
	prep := PrepareRequest{Container: c.Name, Move: self.move, Image: c.Image, Source: a.cfg.Name, Endpoint: ep,
		Runtime: a.info.Runtime, Cgroups: a.info.Cgroups, CPUInfo: cpu, DryRun: req.DryRun, Binds: bindSources(c), Volumes: volumeNames(c),
		StallTimeout: stallTimeout(req)}
	mv := outgoingMove{Move: self.move, Container: c.Name, Target: req.To, Endpoint: ep, Volumes: volumeNames(c)}
	if !req.DryRun {
		// Journal before the target acts: whatever happens next, this host knows a move
		// of c was started and settles it.
		if err := a.mv.setOut(&mv, OutStarted); err != nil {
			return fail(err)
		}
	}
	// From here on every failure rolls back.
	rollback := func(cause error) *PushResult {
		emit(Event{Kind: "phase", Phase: "rollback"})
		f, err := a.mv.abort(context.WithoutCancel(ctx), &mv)
		res.HeldFrames, res.LostFrames = f.HeldFrames, f.LostFrames
		res.Attention = f.Pending
		switch {
		case f.Running && err != nil:
			// What is left is the target's confirmation: the agents settle it.
			res.Where, res.RolledBack = a.cfg.Name, true
			cause = fmt.Errorf("%w (rolled back: %s runs on %s; still settling: %w)", cause, c.Name, a.cfg.Name, err)
		case f.Running:
			res.Where, res.RolledBack = a.cfg.Name, true
			cause = fmt.Errorf("%w (rolled back: %s runs on %s)", cause, c.Name, a.cfg.Name)
		default:
			cause = fmt.Errorf("%w; NEEDS ATTENTION: %s does not run on %s: %w", cause, c.Name, a.cfg.Name, err)
		}
		return fail(cause)
	}
	if err := fault("source-prepare"); err != nil {
		return rollback(err)
	}
	pr, err := target.Prepare(pctx, prep)
	if err != nil {
		if req.DryRun {
			return fail(fmt.Errorf("pre-flight on %s: %w", req.To, err))
		}
		return rollback(fmt.Errorf("pre-flight on %s: %w", req.To, err))
	}
	for _, ch := range pr.Checks {
		if ch.Property == "image" && !ch.OK && req.DryRun && !plan.ImagePresent {
			ch.OK, ch.Target = true, fmt.Sprintf("missing: %d of %d layers to ship, %.1f MB", plan.MissingLayers, len(plan.Layers), float64(plan.MissingBytes)/1e6)
		}
		res.Checks = append(res.Checks, ch)
	}
	emitChecks()
	if err := failedCheck(); err != nil {
		// The target answered that a check failed: it prepared nothing, and nothing
		// changed here. The move ends without a rollback.
		if !req.DryRun {
			if rerr := a.mv.out.remove(mv.Container); rerr != nil {
				slog.Warn("journal", "err", rerr)
			}
		}
		return fail(err)
	}
	phase("preflight", t0)
	if req.DryRun {
		res.OK = true
		return res
	}

	// 3. Pre-copy: memory crosses the link while the container runs.
	l, err := newLink(req.Compress, req.BWLimitMbit)
	if err != nil {
		return rollback(err)
	}
	res.Mode = req.Mode
	if res.Mode == "" {
		res.Mode = ModePrecopy
	}
	res.DirtyTrack = "unavailable (soft-dirty): changed pages found by hash"
	if a.info.DirtyTracking {
		res.DirtyTrack = "available; pages still found by hash"
	}
	// The pages this move sends stay in the store until it has settled here: the memory
	// that a rollback rebuilds refers to them by name.
	unpin := a.store.Pin()
	defer unpin()
	sess := pages.NewSession()
	seen := newLastSent(sess, a.store)
	// Volumes first, while the container runs: their content crosses the link once, then
	// the frozen phase sends only the files changed since.
	trees := map[string]*volumes.Tree{}
	syncVolumes := func(ctx context.Context, final bool) error {
		wd := newWatchdog(ctx, stallTimeout(req), fmt.Sprintf("the volume copy to %s made no progress for %s (link cut?)", req.To, stallTimeout(req)))
		l.progress = wd.kick
		vr, err := a.copyVolumes(wd.ctx, target, c.Name, vols, l, sess, trees, final, func(read, total int64) {
			throttled(Event{Kind: "progress", Phase: "volumes", Bytes: read, Total: total})
		})
		l.progress = nil
		res.Volumes = append(res.Volumes, vr...)
		for _, v := range vr {
			res.VolumeBytes += v.Wire
		}
		return wd.done(err)
	}
	if len(vols) > 0 {
		t1 := time.Now()
		emit(Event{Kind: "phase", Phase: "volumes"})
		if err := syncVolumes(pctx, false); err != nil {
			return rollback(err)
		}
		phase("volumes", t1)
	}
	var memBytes int64
	// runRounds runs pre-copy rounds from round first, under a stall watchdog (a cut link
	// may send no reset), and adds them to res.
	runRounds := func(r PushRequest, first int) (string, error) {
		wd := newWatchdog(pctx, stallTimeout(req), fmt.Sprintf("pre-copy to %s made no progress for %s (link cut?)", req.To, stallTimeout(req)))
		l.progress = wd.kick
		rounds, why, err := a.precopy(wd.ctx, target, c, r, first, l, sess, seen, emit)
		l.progress = nil
		res.Rounds = append(res.Rounds, rounds...)
		for _, x := range rounds {
			res.RoundBytes += x.WireBytes
		}
		res.Bytes = res.RoundBytes
		return why, wd.done(err)
	}
	switch res.Mode {
	case ModePrecopy:
		t0 = time.Now()
		emit(Event{Kind: "phase", Phase: "precopy"})
		why, err := runRounds(req, 1)
		res.StopReason = why
		if n := len(res.Rounds); n > 0 {
			memBytes = res.Rounds[n-1].Scanned * pages.Size
		}
		if err != nil {
			return rollback(err)
		}
		phase("precopy", t0)
	case ModeStopCopy:
	default:
		return rollback(fmt.Errorf("mode %q: want %s or %s", req.Mode, ModePrecopy, ModeStopCopy))
	}
	// The pages the target holds for the move, re-read and re-hashed there while the
	// container still runs: a damaged one fails the move here, not after the restore.
	if sess.Len() > 0 {
		t1 := time.Now()
		emit(Event{Kind: "phase", Phase: "verify"})
		limit := 30*time.Second + time.Duration(sess.Len())*pages.Size*time.Second/(40<<20) // 40 MB/s at worst
		vctx, cancel := context.WithTimeout(pctx, limit)
		v, err := target.VerifyPages(vctx, c.Name)
		cancel()
		if err != nil {
			return rollback(fmt.Errorf("%s could not vouch for the pages it holds for %s: %w", req.To, c.Name, err))
		}
		slog.Info("target verified the pages it holds", "container", c.Name, "pages", v.Pages, "took", v.Took)
		phase("verify", t1)
		// The container ran on meanwhile (a second or more at 1 GiB here): what it
		// changed crosses in one more round now, not frozen.
		if took := time.Since(t1); res.Mode == ModePrecopy && catchUp(req, len(res.Rounds), took) {
			t2 := time.Now()
			emit(Event{Kind: "phase", Phase: "catch-up"})
			one := req
			one.MaxRounds = 1
			if _, err := runRounds(one, len(res.Rounds)+1); err != nil {
				return rollback(err)
			}
			res.StopReason += fmt.Sprintf("; one more round after the target's verification (%s)", took.Round(time.Millisecond))
			phase("catch-up", t2)
		}
	}

	// 4. Freeze and copy the rest: traffic for the container is held here (on the hold
	// port, delivered after the switch), CRIU dumps it with its TCP connections, and the
	// archive streams to the target (pages it holds by reference, pages changed since the
	// last round as deltas), which restores it into the prepared namespace. The operator
	// can no longer cancel; the deadlines below bound every wait.
	if !req.Postcopy {
		seen.reserveRoom() // while it runs: for finalCopy's memory writer
	}
	a.mu.Lock()
	self.frozen = true
	a.mu.Unlock()
	if err := context.Cause(pctx); err != nil {
		return rollback(err)
	}
	t0 = time.Now()
	emit(Event{Kind: "phase", Phase: "checkpoint"})
	if err := a.mv.setOut(&mv, OutFrozen); err != nil {
		return rollback(err)
	}
	if err := a.ovs.Freeze(ep.MAC); err != nil {
		return rollback(err)
	}
	frozenAt := time.Now()
	// The processes too, before podman's checkpoint reaches CRIU (which then skips its
	// freezer loop's 100 ms steps). Without a freezer CRIU freezes them itself.
	if fz, err := freezerOf(c.PID); err == nil {
		if err := fz.freeze(ctx, 2*time.Second); err != nil {
			slog.Warn("freezing the container's cgroup before the checkpoint; CRIU will", "container", c.Name, "err", err)
		}
	}
	// Its processes frozen, what the container still sends is its kernel's, to be
	// dropped (overlaynet's Mute says why); without a freezer, from the same point. Not
	// at once: a frame its processes sent just before the freeze may still wait in the
	// port's queue (OVS's userspace datapath polls it), and a reply dropped there is
	// resent by the restored copy only when its retransmission timer fires, a second
	// later (measured: 1 move in 10 of a 200/s ping-pong). CRIU dumps the sockets well
	// after muteDelay (podman and runc start first: 60-150 ms), so nothing the client
	// sees is newer than the dump. A thaw or switch first makes the mute a no-op.
	mute := time.AfterFunc(muteDelay, func() {
		if err := a.ovs.Mute(ep.MAC); err != nil {
			slog.Debug("mute the frozen container", "container", c.Name, "err", err)
		}
	})
	defer mute.Stop()
	if err := fault("source-freeze"); err != nil {
		return rollback(err)
	}
	// The volumes' files changed since their copy (nothing changes them any more).
	var volumesFinal time.Duration
	if len(vols) > 0 {
		t1 := time.Now()
		err := syncVolumes(ctx, true)
		volumesFinal = time.Since(t1)
		if err != nil {
			return rollback(err)
		}
	}
	// The watchdog's stages: podman's checkpoint before its first byte, then the link (a
	// stall: a cut link may send no reset), then the target's restore after the last byte.
	stall := stallTimeout(req)
	firstByte := firstByteDeadline(stall, memBytes)
	wd := newWatchdog(ctx, firstByte, fmt.Sprintf("podman gave no first byte of the checkpoint within %s", firstByte))
	var lastEmit time.Time
	var archived int64
	a.dropMemory(c.Name) // an earlier move's: a rollback must not rebuild from it
	// Its neighbour cache goes along: the restored container need not ask ARP first.
	neigh, err := overlaynet.Neighbors(ep)
	if err != nil {
		slog.Warn("neighbour cache", "container", c.Name, "err", err)
	}
	progress := func(n int64) {
		if archived == 0 {
			wd.expect(stall, fmt.Sprintf("the transfer to %s made no progress for %s (link cut?)", req.To, stall))
			fault("source-stream")
		}
		archived = n
		wd.kick()
		res.Bytes = res.RoundBytes + n
		if time.Since(lastEmit) > 200*time.Millisecond {
			lastEmit = time.Now()
			emit(Event{Kind: "progress", Phase: "transfer", Bytes: res.Bytes})
		}
	}
	sent := func(archiveBytes int64) {
		d := restoreDeadline(archiveBytes)
		wd.expect(d, fmt.Sprintf("%s did not finish restoring %s within %s", req.To, c.Name, d))
	}
	var (
		rr      *RestoreResult
		fst     *pages.Stats
		ft      finalTimes
		rerr    error
		ld      *lazyDump   // post-copy: CRIU's lazy page server
		expDone *exportCall // post-copy: podman's checkpoint, which ends after the last page
	)
	// Post-copy: the pump sends every page to the target from the moment the images
	// are there; its result is pumped's.
	var pumped chan error
	pumpCtx, stopPump := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPump()
	if req.Postcopy {
		startPump := func(d *lazyDump, exp *exportCall) {
			pumped = make(chan error, 1)
			t0 := time.Now()
			goSafe("post-copy pump", func() {
				w, err := a.pumpToTarget(pumpCtx, d, target, c.Name, self.move, l, sess, seen)
				res.Postcopy = &PostcopyResult{WireBytes: w}
				if err == nil {
					// exp, not expDone: the pump may end before postcopyCopy returns.
					err = exp.wait(exportAfterPages)
				}
				res.Postcopy.Duration = time.Since(t0)
				pumped <- err
			}, func(p any) { pumped <- fmt.Errorf("post-copy: internal error: %v", p) })
		}
		rr, fst, ft, ld, expDone, rerr = a.postcopyCopy(wd.ctx, target, &PostcopyContainer{Name: c.Name, Move: self.move, StaticDir: c.StaticDir, PID: c.PID, Neighbors: neigh},
			l, sess, seen, progress, sent, startPump)
		if ld != nil {
			defer func() {
				ld.close()
				a.mu.Lock()
				delete(a.lazyDumps, c.Name)
				delete(a.lazyTargets, c.Name)
				a.mu.Unlock()
			}()
		}
	} else {
		if res.MemoryPath == PathMemory {
			if handOverErr != nil {
				return rollback(handOverErr)
			}
			if req.HandOver == HandOverAuto && handOver == HandOverPageServer {
				slog.Info("the frozen memory goes through CRIU's page server", "container", c.Name, "why not the read hand-over", lazyProblem)
			}
			res.HandOver = handOver
		}
		rr, fst, ft, rerr = a.finalCopy(wd.ctx, target, c, self.move, res.MemoryPath == PathMemory, res.Mode != ModeStopCopy, res.HandOver, neigh, l, sess, seen, progress, sent)
		if ft.early != nil {
			res.EarlyRestore = earlySummary(*ft.early, ft.streamed, rr != nil && rr.Gated)
		}
	}
	restoredAt := time.Now()
	rerr = wd.done(rerr)
	if rerr == nil {
		rerr = fault("source-restored")
	}
	if rerr != nil && ld != nil {
		// Post-copy, not restored on the target: every page comes here instead, so that
		// CRIU's dump ends as a normal one and the container is restored from it.
		if pumped != nil {
			stopPump()
			<-pumped
			pumped = nil
		}
		perr := a.pumpHere(context.WithoutCancel(ctx), ld, c.Name)
		if perr == nil {
			perr = expDone.wait(exportAfterPages)
		}
		if perr != nil {
			slog.Error("post-copy rollback: fetching the memory back", "container", c.Name, "err", perr)
		}
	}
	var ee exportError
	if errors.As(rerr, &ee) {
		err := ee.error
		if dir := a.keepLogs(c.Name, c.StaticDir, "dump.log"); dir != "" {
			res.LogsDir = a.cfg.Name + ":" + dir
			err = fmt.Errorf("%w%s (CRIU log kept in %s)", err, criuErrors(filepath.Join(dir, "dump.log")), res.LogsDir)
		}
		return rollback(fmt.Errorf("checkpoint %s on %s: %w", c.Name, a.cfg.Name, err))
	}
	if rerr != nil {
		return rollback(fmt.Errorf("move %s to %s: %w", c.Name, req.To, rerr))
	}
	res.Final = fst
	phase("checkpoint+transfer+restore", t0)

	// Post-copy: the container runs on the target; its pages follow, the ones it waits
	// for first. The commit goes on meanwhile (its removal of the source's copy waits
	// for podman, which ends once CRIU has handed over the last page).
	if ld != nil {
		// The decision first: from here on the move is not undone.
		if err := a.mv.setOut(&mv, OutCommitted); err != nil {
			return rollback(err)
		}
		ld.decided.Store(true)
		emit(Event{Kind: "phase", Phase: "postcopy"})
	}

	// 5. Commit: the decision is journaled, then every node's rules point at the target,
	// the held frames follow, the target is told, the source's copy goes. A step that
	// fails is retried by the agent in the background (the journal entry stays).
	t0 = time.Now()
	emit(Event{Kind: "phase", Phase: "commit"})
	var f finished
	if ld != nil {
		f = a.mv.finishCommitted(context.WithoutCancel(ctx), &mv) // decided above
	} else {
		f, err = a.mv.commit(context.WithoutCancel(ctx), &mv)
	}
	if err != nil {
		// Not decided: the target's copy goes, the source's comes back.
		return rollback(err)
	}
	res.HeldFrames, res.LostFrames = f.HeldFrames, f.LostFrames
	// Traffic flows again once this node points at the target and the held frames
	// follow (the rest of the commit, announcing and cleaning up, happens meanwhile).
	released := f.Released
	if released.IsZero() {
		released = time.Now()
	}
	res.Frozen = released.Sub(frozenAt)
	res.Downtime = frozenSteps(frozenAt, ft, restoredAt, released, *rr)
	if len(vols) > 0 {
		res.Downtime = append([]Phase{{Name: "volumes: changed files", Duration: volumesFinal}}, res.Downtime...)
	}
	if len(f.Unannounced) > 0 {
		res.Attention = append(res.Attention, fmt.Sprintf("nodes %v did not learn the new location yet (they will when they reach %s)", f.Unannounced, req.To))
	}
	res.Attention = append(res.Attention, f.Pending...)
	phase("commit", t0)
	if pumped != nil {
		if err := <-pumped; err != nil {
			res.Postcopy.Error = err.Error()
			res.Error = fmt.Sprintf("post-copy failed: %v; %s cannot complete its memory and is stopped on %s (the documented risk of --postcopy)", err, c.Name, req.To)
			res.Where = ""
			emit(Event{Kind: "error", Error: res.Error})
			return res
		}
		res.Bytes += res.Postcopy.WireBytes
		emit(Event{Kind: "phase", Phase: "postcopy done"})
	}
	res.OK, res.Where = true, req.To
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
	StepMemory        = "  of checkpoint: memory handed over (changed pages found, sent on to the target)"
	StepCRIULazyDump  = "  of checkpoint: CRIU dumping them until its lazy page server listened"
	StepPodmanAfter   = "  of checkpoint: CRIU's end, podman (runtime, archive) after the hand-over, before its first byte"
	StepStream        = "stream (archive read, encoded, sent)"
	// The streamed restore: CRIU's images go first, the memory after them while the
	// target restores; the restore step is what remains of it after the memory's end.
	StepStreamed       = "stream (CRIU's images, then the memory read and sent while the target restores)"
	StepStreamedMemory = "  of stream: memory handed over (changed pages found, sent on to the target)"
	StepRestoreRest    = "restore (target), what remained of it after the memory's end"
	StepRestore        = "restore (target: rebuild, podman import, CRIU)"
	StepCRIURestore    = "  of restore: CRIU itself"
	StepLazySetUp      = "  of restore: lazy set-up (memory images, page server, CRIU lazy-pages daemon)"
	StepPodmanImport   = "  of restore: podman import (runtime, CRIU)"
	StepOverlaySwitch  = "overlay switch (journal the decision, point this node at the target, release held frames)"
	// The early restore (read hand-over): podman finishes here while the target restores.
	StepPodmanOverlap = "  podman here after the hand-over (CRIU's end, runtime, archive), beside the restore"
	StepPodmanWait    = "waiting for the source's end after the target restored (podman's checkpoint, or the container's processes; after a streamed restore CRIU's end itself)"
	// The move decided on the end of the container's processes here, podman's own end
	// (runtime, network, storage) left to the background.
	StepSourceEnd = "  CRIU's end here (the container's processes dumped and ended), beside the restore"
)

// frozenSteps splits the frozen time into its steps, with what CRIU measured of its own
// part where it is known.
func frozenSteps(frozenAt time.Time, ft finalTimes, restoredAt, switched time.Time, rr RestoreResult) []Phase {
	checkpoint := ft.firstByte.Sub(frozenAt)
	steps := []Phase{{Name: StepCheckpoint, Duration: checkpoint}}
	if !ft.lazyListening.IsZero() {
		// A lazy dump: CRIU's statistics are reset by its lazy page server and say
		// nothing; its listening and the hand-over's end split the step instead.
		steps = append(steps,
			Phase{Name: StepCRIULazyDump, Duration: ft.lazyListening.Sub(frozenAt)},
			Phase{Name: StepPodmanAfter, Duration: max(0, ft.firstByte.Sub(ft.memoryDone))})
	} else if d := ft.dump; d != nil {
		steps = append(steps,
			Phase{Name: StepCRIUFreeze, Duration: d.Freezing},
			Phase{Name: StepCRIUDump, Duration: d.Frozen},
			Phase{Name: StepCRIUMemory, Duration: d.MemDump + d.MemWrite},
			Phase{Name: StepPodmanArchive, Duration: max(0, checkpoint-d.Freezing-d.Frozen)})
	}
	if !ft.memoryDone.IsZero() && !ft.streamed {
		steps = append(steps, Phase{Name: StepMemory, Duration: ft.memoryDone.Sub(frozenAt)})
	}
	early := ft.early != nil && *ft.early == "" && !ft.restored.IsZero()
	restoreEnd := restoredAt
	if early {
		restoreEnd = ft.restored
	}
	if ft.streamed {
		steps = append(steps,
			Phase{Name: StepStreamed, Duration: ft.lastByte.Sub(ft.firstByte)},
			Phase{Name: StepStreamedMemory, Duration: ft.memoryDone.Sub(ft.firstByte)},
			Phase{Name: StepRestoreRest, Duration: restoreEnd.Sub(ft.lastByte)})
	} else {
		steps = append(steps,
			Phase{Name: StepStream, Duration: ft.lastByte.Sub(ft.firstByte)},
			Phase{Name: StepRestore, Duration: restoreEnd.Sub(ft.lastByte)})
	}
	if rr.LazySetUp > 0 {
		steps = append(steps, Phase{Name: StepLazySetUp, Duration: rr.LazySetUp})
	}
	if rr.Restore > 0 {
		steps = append(steps, Phase{Name: StepPodmanImport, Duration: rr.Restore})
	}
	if rr.CRIURestore > 0 {
		steps = append(steps, Phase{Name: StepCRIURestore, Duration: rr.CRIURestore})
	}
	if early {
		// After a streamed restore CRIU's end comes after the target's (endDump): all
		// of it is in the wait.
		if !ft.endDeferred {
			name := StepPodmanOverlap
			if ft.decidedOnExit {
				name = StepSourceEnd
			}
			steps = append(steps, Phase{Name: name, Duration: ft.podmanDone.Sub(ft.memoryDone)})
		}
		steps = append(steps, Phase{Name: StepPodmanWait, Duration: max(0, restoredAt.Sub(ft.restored))})
	}
	return append(steps, Phase{Name: StepOverlaySwitch, Duration: switched.Sub(restoredAt)})
}
