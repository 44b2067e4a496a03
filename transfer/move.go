package transfer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/migrate-project/migrate/overlaynet"
)

// What a move drives, as small interfaces: the agent passes podman, its OVS node and its
// peers; the unit tests pass fakes, so that every rollback and recovery path is tested
// without root.

// containerRuntime is the part of podman a move's commit, rollback and recovery use.
type containerRuntime interface {
	// State is the container's state ("running", "exited", ...); exists is false when
	// there is no container of that name.
	State(ctx context.Context, name string) (state string, exists bool, err error)
	Remove(ctx context.Context, name string) error
	// RestoreLocal restores the container from the checkpoint it keeps (a rollback).
	RestoreLocal(ctx context.Context, name string) error
	// Unfreeze thaws a running container's cgroup (frozen for a checkpoint that did
	// not happen or failed).
	Unfreeze(ctx context.Context, name string) error
	// RemoveVolumes removes named volumes; with move set, only those that move created
	// (labelled with its ID). Missing ones are no error.
	RemoveVolumes(ctx context.Context, names []string, move string) error
}

// overlayNode is the part of the overlay a move drives.
type overlayNode interface {
	AddLocal(loc overlaynet.Location, port string) error
	Locate(loc overlaynet.Location) error
	Thaw(mac string) (held, lost int, err error)
	// Switch is Locate and Thaw in one.
	Switch(loc overlaynet.Location) (held, lost int, err error)
	Unplumb(ctx context.Context, e overlaynet.Endpoint) error
}

// movePeers is what a move asks of other agents.
type movePeers interface {
	// Client returns the client of host's agent.
	Client(host string) (moveClient, error)
	// Announce tells every node where an endpoint runs and returns the nodes it could
	// not reach.
	Announce(ctx context.Context, loc overlaynet.Location) []string
	// LocateAt tells one node where an endpoint runs (at most announceWait).
	LocateAt(ctx context.Context, host string, loc overlaynet.Location) error
}

// moveClient is what a move asks of one other agent (*Peer).
type moveClient interface {
	Outcome(ctx context.Context, ref MoveRef) (*MoveOutcome, error)
	Commit(ctx context.Context, ref MoveRef) error
	Abort(ctx context.Context, req AbortRequest) error
}

// mover holds one host's half of every move: the journals and what they drive.
type mover struct {
	self  string
	rt    containerRuntime // nil on a node without containers
	ov    overlayNode
	peers movePeers
	out   journal // moves away from this host
	in    journal // moves to this host
	// closeSession ends an incoming move's page session (unpins its pages).
	closeSession func(container string)
	// inMu serialises what ends an incoming move (undo, keep): a failed restore undoes
	// itself while the source's abort may arrive.
	inMu sync.Mutex
	// restoring: the restore handlers at work, by move (restoreRuns, waitRestore).
	restMu    sync.Mutex
	restoring map[string]chan struct{}
}

// restoreRuns marks a restore handler of move at work until the returned function runs.
func (m *mover) restoreRuns(move string) func() {
	done := make(chan struct{})
	m.restMu.Lock()
	if m.restoring == nil {
		m.restoring = map[string]chan struct{}{}
	}
	m.restoring[move] = done
	m.restMu.Unlock()
	return func() {
		m.restMu.Lock()
		if m.restoring[move] == done {
			delete(m.restoring, move)
		}
		m.restMu.Unlock()
		close(done)
	}
}

// waitRestore waits until no restore handler of move is at work, or limit passes (not for
// the caller's context: a source that stops waiting still needs the undo after it).
func (m *mover) waitRestore(move string, limit time.Duration) {
	m.restMu.Lock()
	done := m.restoring[move]
	m.restMu.Unlock()
	if done == nil {
		return
	}
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// abortWait bounds how long a rollback waits for the target to drop its half before the
// container resumes on the source.
const abortWait = 3 * time.Second

// peerWait bounds a move's call to a peer (outcome, commit).
const peerWait = 15 * time.Second

// call runs fn against host's agent within d.
func (m *mover) call(ctx context.Context, host string, d time.Duration, fn func(context.Context, moveClient) error) error {
	c, err := m.peers.Client(host)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return fn(cctx, c)
}

// ---- the source's side -----------------------------------------------------------------

// finished says what finishing a decided move achieved.
type finished struct {
	HeldFrames, LostFrames int
	Unannounced            []string // nodes that did not learn the new location yet
	// Running: after a rollback, the container runs on the source.
	Running bool
	// Released is when the traffic held during the freeze was let go.
	Released time.Time
	// Pending lists what is left (the peer did not acknowledge, a copy not removed);
	// the journal entry stays and the agent retries in the background.
	Pending []string
}

// setOut records a source's state before acting on it.
func (m *mover) setOut(mv *outgoingMove, state string) error {
	mv.State, mv.Updated = state, time.Now().UTC()
	if err := m.out.put(mv.Container, mv); err != nil {
		return fmt.Errorf("journal the move of %s as %s: %w", mv.Container, state, err)
	}
	return nil
}

// commit takes the decision (durable) and then carries it out: every node points at the
// target, the held frames follow, the target is told, the source's copy goes. The caller
// must know that the container runs on the target (its restore succeeded).
func (m *mover) commit(ctx context.Context, mv *outgoingMove) (finished, error) {
	t0 := time.Now()
	if err := m.setOut(mv, OutCommitted); err != nil {
		return finished{}, err
	}
	journaled := time.Since(t0)
	fault("source-committed")
	f := m.finishCommitted(ctx, mv)
	slog.Debug("committed", "container", mv.Container, "journal", journaled, "released_after", f.Released.Sub(t0))
	return f, nil
}

// finishCommitted carries out a committed move; each step is idempotent, so recovery
// runs it again until nothing is pending.
func (m *mover) finishCommitted(ctx context.Context, mv *outgoingMove) finished {
	var f finished
	// The target first: until it knows that the container is its own, its rules send
	// frames for it back here (and OpenFlow drops a frame sent out of the port it came
	// in on): the held frames would be lost. Then this node: the frames held here during
	// the freeze follow the container to the target as soon as its rules point there.
	// Other nodes learn it next; until they do, their traffic reaches this node and is
	// forwarded the same way.
	loc := mv.Endpoint.Location(mv.Target)
	if err := m.peers.LocateAt(ctx, mv.Target, loc); err != nil {
		slog.Warn("tell the target it runs the container before releasing held frames; they may be lost (clients retransmit)",
			"container", mv.Container, "target", mv.Target, "err", err)
	}
	var err error
	if f.HeldFrames, f.LostFrames, err = m.ov.Switch(loc); err != nil {
		slog.Warn("point this node at the target and release held frames", "container", mv.Container, "err", err)
	}
	f.Released = time.Now()
	f.Unannounced = m.peers.Announce(ctx, loc)
	if !mv.Acked {
		err := m.call(ctx, mv.Target, peerWait, func(ctx context.Context, c moveClient) error {
			return c.Commit(ctx, MoveRef{Container: mv.Container, Move: mv.Move})
		})
		if err != nil {
			f.Pending = append(f.Pending, fmt.Sprintf("%s has not confirmed the commit (%v); retrying", mv.Target, err))
		} else {
			mv.Acked = true
			if err := m.setOut(mv, OutCommitted); err != nil {
				f.Pending = append(f.Pending, err.Error())
			}
		}
	}
	// The source's copy (stopped, checkpointed) goes: the target runs the container.
	fault("source-cleanup")
	if m.rt != nil {
		if _, exists, err := m.rt.State(ctx, mv.Container); err != nil {
			f.Pending = append(f.Pending, fmt.Sprintf("inspect the source copy: %v", err))
		} else if exists {
			if err := m.rt.Remove(ctx, mv.Container); err != nil {
				f.Pending = append(f.Pending, fmt.Sprintf("remove the source copy: %v", err))
			}
		}
		if len(mv.Volumes) > 0 {
			if err := m.rt.RemoveVolumes(ctx, mv.Volumes, ""); err != nil {
				f.Pending = append(f.Pending, fmt.Sprintf("remove the source's volumes: %v", err))
			}
		}
	}
	if err := m.ov.Unplumb(ctx, mv.Endpoint); err != nil {
		f.Pending = append(f.Pending, fmt.Sprintf("unplumb the source endpoint: %v", err))
	}
	if len(f.Pending) == 0 {
		if err := m.out.remove(mv.Container); err != nil {
			f.Pending = append(f.Pending, fmt.Sprintf("journal: %v", err))
		}
	}
	return f
}

// abort takes the decision to roll back (durable) and carries it out.
func (m *mover) abort(ctx context.Context, mv *outgoingMove) (finished, error) {
	if err := m.setOut(mv, OutAborted); err != nil {
		// Not durable: still roll back (the container must run here), and the target
		// will find no commit when it asks.
		slog.Error("journal rollback", "container", mv.Container, "err", err)
	}
	f := m.finishAborted(ctx, mv)
	if len(f.Pending) > 0 {
		return f, errors.New(strings.Join(f.Pending, "; "))
	}
	return f, nil
}

// finishAborted carries out a rollback: the target drops its half, the container runs
// here again (restored from its checkpoint if it was stopped), traffic flows to it.
func (m *mover) finishAborted(ctx context.Context, mv *outgoingMove) finished {
	var f finished
	if !mv.Acked {
		// Briefly: the container waits, frozen, for this. A target that does not answer
		// (a cut link) is told later by the settling loop, or asks itself.
		err := m.call(ctx, mv.Target, abortWait, func(ctx context.Context, c moveClient) error {
			return c.Abort(ctx, AbortRequest{Container: mv.Container, Move: mv.Move, Source: m.self, Endpoint: mv.Endpoint})
		})
		if err != nil {
			// The target asks for the outcome when it can, and drops its half then.
			slog.Warn("abort on target", "target", mv.Target, "container", mv.Container, "err", err)
		} else {
			mv.Acked = true
			m.setOut(mv, OutAborted)
		}
	}
	running := false
	if m.rt != nil {
		st, exists, err := m.rt.State(ctx, mv.Container)
		switch {
		case err != nil:
			f.Pending = append(f.Pending, fmt.Sprintf("state of %s on %s: %v", mv.Container, m.self, err))
		case !exists:
			f.Pending = append(f.Pending, fmt.Sprintf("%s no longer exists on %s", mv.Container, m.self))
		case st == "running":
			running = true
			if err := m.rt.Unfreeze(ctx, mv.Container); err != nil {
				f.Pending = append(f.Pending, fmt.Sprintf("thaw %s on %s: %v", mv.Container, m.self, err))
				running = false
			}
		default:
			if err := m.rt.RestoreLocal(ctx, mv.Container); err != nil {
				slog.Warn("rollback: the container could not be restored here yet; retried", "container", mv.Container, "err", err)
				f.Pending = append(f.Pending, fmt.Sprintf("resume %s on %s: %v", mv.Container, m.self, err))
			} else {
				running = true
			}
		}
	}
	f.Running = running
	if running {
		// After an agent restart the node's rules no longer know the endpoint.
		if err := m.ov.AddLocal(mv.Endpoint.Location(m.self), mv.Endpoint.Port()); err != nil {
			f.Pending = append(f.Pending, fmt.Sprintf("re-attach the endpoint: %v", err))
		}
	}
	var err error
	if f.HeldFrames, f.LostFrames, err = m.ov.Thaw(mv.Endpoint.MAC); err != nil {
		f.Pending = append(f.Pending, fmt.Sprintf("release traffic: %v", err))
	}
	if !mv.Acked {
		f.Pending = append(f.Pending, fmt.Sprintf("%s has not confirmed the rollback; it drops its half when it learns the outcome", mv.Target))
	}
	if len(f.Pending) == 0 {
		if err := m.out.remove(mv.Container); err != nil {
			f.Pending = append(f.Pending, fmt.Sprintf("journal: %v", err))
		}
	}
	return f
}

// resolveOutgoing finishes a move away from this host that an earlier run of the agent
// (or an earlier attempt) left unfinished. A move not journaled as committed is rolled
// back: the source decides, and it never decided to commit.
func (m *mover) resolveOutgoing(ctx context.Context, container string) (done bool, f finished, err error) {
	var mv outgoingMove
	if err := m.out.get(container, &mv); err != nil {
		return errors.Is(err, errNoEntry), f, err
	}
	switch mv.State {
	case OutCommitted:
		f = m.finishCommitted(ctx, &mv)
	case OutStarted, OutFrozen, OutAborted:
		if mv.State != OutAborted {
			slog.Warn("rolling back an unfinished move", "container", container, "to", mv.Target, "state", mv.State)
			if err := m.setOut(&mv, OutAborted); err != nil {
				return false, f, err
			}
		}
		f = m.finishAborted(ctx, &mv)
	default:
		return false, f, fmt.Errorf("journal of %s: unknown state %q", container, mv.State)
	}
	return len(f.Pending) == 0, f, nil
}

// outcome answers a target that asks how a move ended.
func (m *mover) outcome(ctx context.Context, ref MoveRef, inflight bool) MoveOutcome {
	var mv outgoingMove
	out := MoveOutcome{State: OutcomeUnknown}
	if err := m.out.get(ref.Container, &mv); err == nil && mv.Move == ref.Move {
		switch mv.State {
		case OutCommitted:
			out.State = OutcomeCommitted
		case OutAborted:
			out.State = OutcomeAborted
		default:
			// Under way, or about to be rolled back by this agent's recovery.
			out.State = OutcomeInProgress
		}
	} else if inflight {
		out.State = OutcomeInProgress
	}
	out.RunsHere = m.runs(ctx, ref.Container)
	return out
}

// runs reports whether a container of that name runs on this host.
func (m *mover) runs(ctx context.Context, name string) bool {
	if m.rt == nil {
		return false
	}
	st, exists, err := m.rt.State(ctx, name)
	return err == nil && exists && st == "running"
}

// ---- the target's side -----------------------------------------------------------------

// setIn records a target's state before acting on it.
func (m *mover) setIn(mv *incomingMove, state string) error {
	mv.State, mv.Updated = state, time.Now().UTC()
	if err := m.in.put(mv.Prepare.Container, mv); err != nil {
		return fmt.Errorf("journal the incoming move of %s as %s: %w", mv.Prepare.Container, state, err)
	}
	return nil
}

// undoIncoming removes every trace of an incoming move: the container restored here, the
// endpoint, the journal entry; and points the endpoint's address back at the source. The
// entry stays if any of it fails, so that it is tried again.
func (m *mover) undoIncoming(ctx context.Context, mv *incomingMove) error {
	m.inMu.Lock()
	defer m.inMu.Unlock()
	if !m.stillPending(mv) {
		return nil // settled meanwhile (a failed restore's own undo, then the source's abort)
	}
	req := mv.Prepare
	if m.closeSession != nil {
		m.closeSession(req.Container)
	}
	var errs []error
	if m.rt != nil {
		// prepare made sure no container of this name existed: one that exists now is
		// the one this move restored.
		if _, exists, err := m.rt.State(ctx, req.Container); err != nil {
			errs = append(errs, err)
		} else if exists {
			if err := m.rt.Remove(ctx, req.Container); err != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", req.Container, err))
			}
		}
		if len(req.Volumes) > 0 {
			if err := m.rt.RemoveVolumes(ctx, req.Volumes, req.Move); err != nil {
				errs = append(errs, fmt.Errorf("remove the volumes of %s: %w", req.Container, err))
			}
		}
	}
	if err := m.ov.Unplumb(ctx, req.Endpoint); err != nil {
		errs = append(errs, err)
	}
	if req.Source != "" && req.Source != m.self {
		if err := m.ov.Locate(req.Endpoint.Location(req.Source)); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("undo the incoming move of %s: %w", req.Container, errors.Join(errs...))
	}
	if err := m.in.remove(req.Container); err != nil {
		return err
	}
	slog.Info("incoming move undone", "container", req.Container, "source", req.Source, "move", req.Move)
	return nil
}

// resolveIncoming settles a move to this host whose outcome this agent does not know (it
// restarted, or the source went silent): it asks the source. It removes a container only
// when the source says the move was rolled back, or when the source runs the container
// itself; while the source cannot be asked, a container restored here stays.
func (m *mover) resolveIncoming(ctx context.Context, container string) (done bool, err error) {
	var mv incomingMove
	if err := m.in.get(container, &mv); err != nil {
		return errors.Is(err, errNoEntry), err
	}
	req := mv.Prepare
	exists := false
	if m.rt != nil {
		_, e, err := m.rt.State(ctx, container)
		if err != nil {
			return false, err
		}
		exists = e
	}
	var out *MoveOutcome
	err = m.call(ctx, req.Source, peerWait, func(ctx context.Context, c moveClient) (err error) {
		out, err = c.Outcome(ctx, MoveRef{Container: container, Move: req.Move})
		return err
	})
	if err != nil {
		if mv.State != InRestored && !exists {
			// Nothing runs here, and the source cannot have committed without hearing
			// that it does: dropping the half move loses nothing.
			return settled(m.undoIncoming(ctx, &mv))
		}
		return false, fmt.Errorf("the move of %s from %s: %s cannot be asked for the outcome (%v); the container stays here until it can", container, req.Source, req.Source, err)
	}
	switch out.State {
	case OutcomeCommitted:
		return settled(m.keepIncoming(ctx, &mv))
	case OutcomeAborted:
		return settled(m.undoIncoming(ctx, &mv))
	case OutcomeInProgress:
		return false, nil
	default: // the source has no record of the move
		if out.RunsHere || !exists {
			return settled(m.undoIncoming(ctx, &mv))
		}
		slog.Warn("the source has no record of the move and does not run the container: keeping the copy here",
			"container", container, "source", req.Source)
		return settled(m.keepIncoming(ctx, &mv))
	}
}

// stillPending reports whether the journal still holds mv's move (call with inMu held).
func (m *mover) stillPending(mv *incomingMove) bool {
	var cur incomingMove
	return m.in.get(mv.Prepare.Container, &cur) == nil && cur.Prepare.Move == mv.Prepare.Move
}

// settled: a move is settled once what settles it succeeded.
func settled(err error) (bool, error) { return err == nil, err }

// keepIncoming ends a committed incoming move: the container runs here for good.
func (m *mover) keepIncoming(ctx context.Context, mv *incomingMove) error {
	m.inMu.Lock()
	defer m.inMu.Unlock()
	if !m.stillPending(mv) {
		return nil // settled meanwhile (a commit retried after a lost answer)
	}
	if m.closeSession != nil {
		m.closeSession(mv.Prepare.Container)
	}
	ep := mv.Prepare.Endpoint
	if err := m.ov.AddLocal(ep.Location(m.self), ep.Port()); err != nil {
		return fmt.Errorf("attach %s here: %w", mv.Prepare.Container, err)
	}
	return m.in.remove(mv.Prepare.Container)
}
