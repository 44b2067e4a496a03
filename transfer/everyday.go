package transfer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/overlaynet"
)

// The everyday commands an operator runs against the host that runs a container: rm,
// logs, exec; and the watcher that frees the address of a container removed behind the
// agent's back.

// errMoving: the container is being moved; the command waits for the move to end.
type errMoving struct{ m MoveInFlight }

func (e errMoving) Error() string {
	return e.m.String() + "; wait for the move to end (`migrate status`)"
}

// movesLocked lists the moves under way from or to this host (a.mu held).
func (a *Agent) movesLocked() []MoveInFlight {
	var out []MoveInFlight
	for c, m := range a.inflight {
		out = append(out, MoveInFlight{Container: c, From: a.cfg.Name, To: m.to, Since: m.since})
	}
	for c, in := range a.sessions {
		out = append(out, MoveInFlight{Container: c, From: in.source, To: a.cfg.Name, Since: in.since})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Container < out[j].Container })
	return out
}

// moving returns the move of container under way from or to this host, if any.
func (a *Agent) moving(container string) (MoveInFlight, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, m := range a.movesLocked() {
		if m.Container == container {
			return m, true
		}
	}
	return MoveInFlight{}, false
}

// describe says where a move goes and since when, for an error message.
func (m *inflightMove) describe(from string) string {
	return fmt.Sprintf("from %s to %s, since %s", from, m.to, m.since.Local().Format("15:04:05"))
}

// localLocation is this host's overlay entry for the endpoint called name, if any.
func (a *Agent) localLocation(name string) (overlaynet.Location, bool) {
	for _, l := range a.ovs.Locations() {
		if l.Name == name && l.Host == a.cfg.Name {
			return l, true
		}
	}
	return overlaynet.Location{}, false
}

// remove stops and removes a container on this host and frees its overlay address on
// every node. A container already gone (removed with podman) whose address this host
// still holds gets its address freed.
func (a *Agent) remove(r *http.Request) (any, error) {
	var req RemoveRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	if err := ValidContainerName(req.Name); err != nil {
		return nil, badRequest{err}
	}
	if m, ok := a.moving(req.Name); ok {
		return nil, errMoving{m}
	}
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	ctx := r.Context()
	c, err := a.podman.Inspect(ctx, req.Name)
	if errors.Is(err, checkpoint.ErrNoSuchContainer) {
		c, err = nil, nil
	}
	if err != nil {
		return nil, err
	}
	res := RemoveResult{Container: req.Name, Host: a.cfg.Name}
	var ep overlaynet.Endpoint
	onOverlay := false
	if c != nil {
		ep, onOverlay = endpointOf(c)
	} else if l, ok := a.localLocation(req.Name); ok {
		ep, onOverlay = endpointAt(l), true
	} else {
		return nil, notFound{fmt.Errorf("no container named %s on %s, and no overlay address of that name", req.Name, a.cfg.Name)}
	}
	if c != nil {
		if err := a.podman.Remove(ctx, req.Name); err != nil {
			return nil, err
		}
		res.Removed = true
		slog.Info("removed container", "container", req.Name)
	}
	if onOverlay {
		res.Freed = ep.Prefix.Addr()
		res.Unreached = a.freeAddress(context.WithoutCancel(ctx), ep)
	}
	removeCRIUConfig(req.Name)
	return res, nil
}

// freeAddress unplumbs a local endpoint and tells every node to forget it; it returns the
// nodes that did not hear.
func (a *Agent) freeAddress(ctx context.Context, ep overlaynet.Endpoint) []string {
	if err := a.ovs.Unplumb(ctx, ep); err != nil {
		slog.Warn("unplumb", "endpoint", ep.Name, "err", err)
	}
	return a.announce(ctx, overlaynet.Location{Name: ep.Name, MAC: ep.MAC})
}

func (a *Agent) localLocationByMAC(mac string) (overlaynet.Location, bool) {
	for _, l := range a.ovs.Locations() {
		if l.MAC == mac {
			return l, true
		}
	}
	return overlaynet.Location{}, false
}

// endpointAt is the local endpoint an overlay location names.
func endpointAt(l overlaynet.Location) overlaynet.Endpoint {
	ep := overlaynet.NewEndpoint(l.Name, netip.PrefixFrom(l.IP, l.IP.BitLen()))
	ep.MAC = l.MAC
	return ep
}

// notFound is a 404 answer.
type notFound struct{ error }

// streamFrames answers a logs or exec request with a stream of Frames, one JSON line each,
// flushed as they come. run writes output through the two writers; its error ends the
// stream as an error frame.
func streamFrames(w http.ResponseWriter, run func(stdout, stderr io.Writer) (*int, error)) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	send := func(f Frame) error {
		mu.Lock()
		defer mu.Unlock()
		rc.SetWriteDeadline(time.Now().Add(eventWriteTimeout))
		if err := enc.Encode(f); err != nil {
			return err
		}
		return rc.Flush()
	}
	exit, err := run(frameWriter{send, false}, frameWriter{send, true})
	switch {
	case err != nil:
		send(Frame{Error: err.Error()})
	case exit != nil:
		send(Frame{Exit: exit})
	}
}

// frameWriter turns writes into frames on stdout or stderr.
type frameWriter struct {
	send   func(Frame) error
	stderr bool
}

// maxFrame bounds one frame's text; longer writes become several frames.
const maxFrame = 64 << 10

func (f frameWriter) Write(b []byte) (int, error) {
	for off := 0; off < len(b); off += maxFrame {
		chunk := string(b[off:min(off+maxFrame, len(b))])
		fr := Frame{Out: chunk}
		if f.stderr {
			fr = Frame{Err: chunk}
		}
		if err := f.send(fr); err != nil {
			return off, err
		}
	}
	return len(b), nil
}

func (a *Agent) handleLogs(w http.ResponseWriter, r *http.Request) {
	name := r.URL.Query().Get("name")
	if err := a.needPodman(); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	if err := ValidContainerName(name); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	follow := r.URL.Query().Get("follow") == "true"
	tail := -1
	if t := r.URL.Query().Get("tail"); t != "" {
		n, err := strconv.Atoi(t)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, fmt.Errorf("tail %q: want a number of lines", t))
			return
		}
		tail = n
	}
	if ok, err := a.podman.Exists(r.Context(), name); err != nil || !ok {
		writeError(w, http.StatusNotFound, fmt.Errorf("no container named %s on %s", name, a.cfg.Name))
		return
	}
	streamFrames(w, func(stdout, stderr io.Writer) (*int, error) {
		return nil, a.podman.Logs(r.Context(), name, follow, tail, stdout, stderr)
	})
}

// maxExecArgs bounds an exec request's command line.
const maxExecArgs = 4096

func (a *Agent) handleExec(w http.ResponseWriter, r *http.Request) {
	var req ExecRequest
	if err := a.needPodman(); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	if err := decodeBody(r, &req); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	if err := ValidContainerName(req.Name); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	if len(req.Cmd) == 0 || len(req.Cmd)+len(req.Env) > maxExecArgs {
		writeError(w, http.StatusBadRequest, fmt.Errorf("exec: want a command of at most %d arguments", maxExecArgs))
		return
	}
	if m, ok := a.moving(req.Name); ok {
		writeError(w, http.StatusConflict, errMoving{m})
		return
	}
	state, err := a.podman.State(r.Context(), req.Name)
	if err != nil {
		writeError(w, http.StatusNotFound, fmt.Errorf("no container named %s on %s", req.Name, a.cfg.Name))
		return
	}
	if state != "running" {
		writeError(w, http.StatusConflict, fmt.Errorf("container %s is %s on %s, not running", req.Name, state, a.cfg.Name))
		return
	}
	streamFrames(w, func(stdout, stderr io.Writer) (*int, error) {
		code, err := a.podman.Exec(r.Context(), req.Name, checkpoint.ExecOptions{Cmd: req.Cmd, Env: req.Env, User: req.User, WorkDir: req.WorkDir}, stdout, stderr)
		if err != nil {
			return nil, err
		}
		return &code, nil
	})
}

// watchRemovals frees the overlay address of a container removed behind the agent's back
// (`podman rm`), from podman's event stream; it reconnects while ctx lasts.
func (a *Agent) watchRemovals(ctx context.Context) {
	if a.podman == nil {
		return
	}
	for ctx.Err() == nil {
		err := a.podman.Events(ctx, func(ev checkpoint.ContainerEvent) {
			if ev.Status == "remove" && ev.Labels[LabelMAC] != "" {
				a.removedBehindBack(ctx, ev.Name, ev.Labels[LabelMAC])
			}
		})
		if ctx.Err() != nil {
			return
		}
		slog.Warn("podman events broke off; reconnecting", "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}

// removedBehindBack frees a removed container's address unless a move accounts for the
// removal (the source's copy after commit, a failed restore on the target) or a container
// of that name runs here again.
func (a *Agent) removedBehindBack(ctx context.Context, name, mac string) {
	if _, ok := a.moving(name); ok {
		return
	}
	// A move journaled here and not settled accounts for it too (a recovery removing a
	// restored copy after a restart, before any session exists).
	if a.mv.in.has(name) || a.mv.out.has(name) {
		return
	}
	l, ok := a.localLocationByMAC(mac)
	if !ok || l.Host != a.cfg.Name {
		return // located elsewhere: it moved away
	}
	if exists, err := a.podman.Exists(ctx, name); err != nil || exists {
		return
	}
	ep := endpointAt(l)
	unreached := a.freeAddress(ctx, ep)
	slog.Info("container removed outside migrate: its overlay address is free", "container", name, "ip", l.IP, "unreached", unreached)
}
