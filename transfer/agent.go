package transfer

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/overlaynet"
	"github.com/migrate-project/migrate/pages"
)

// AgentConfig configures `migrate serve`.
type AgentConfig struct {
	Name      string       // this host's name in the inventory
	Inventory *Inventory   //
	CertDir   string       // ca.pem, NAME.pem, NAME-key.pem
	PodmanURI string       // this host's podman service; "" for a node without containers
	Underlay  string       // the device holding the underlay address (default eth0)
	StateDir  string       // journal of incoming moves, kept logs
	Endpoint  netip.Prefix // optional: give this node itself an overlay address (a client)
	// PageStoreBytes bounds the page store (StateDir/pages); default 2 GiB.
	PageStoreBytes int64
}

// Agent is one host's `migrate serve`.
type Agent struct {
	cfg    AgentConfig
	self   HostEntry
	tls    *tls.Config
	podman *checkpoint.Podman
	ovs    *overlaynet.OVS
	info   HostInfo
	store  *pages.Store

	mv       *mover // the journals of moves to and from this host, and what they drive
	peersMu  sync.Mutex
	peers    map[string]*Peer // one client (and its connections) per peer
	pushes   sync.WaitGroup   // moves under way (Serve waits for them on shutdown)
	mu       sync.Mutex
	inflight map[string]*inflightMove
	last     *PushResult
	sessions map[string]*incoming // page sessions of incoming moves
	// Post-copy: the target's arrivals, the source's lazy dumps and their targets.
	postcopies  map[string]*postcopyIn
	lazyDumps   map[string]*lazyDump
	lazyTargets map[string]string
	// unresolved: journal entries the last settling pass could not finish.
	unresolved []string
	conns      atomic.Int64 // connections the server holds
}

// inflightMove is a push under way on this (source) host.
type inflightMove struct {
	move   string
	to     string
	since  time.Time
	cancel context.CancelCauseFunc // cancels the move while nothing is frozen yet
	frozen bool
}

// NewAgent checks the configuration, sets up the overlay node and recovers from moves
// that an earlier run of the agent left unfinished.
func NewAgent(ctx context.Context, cfg AgentConfig) (*Agent, error) {
	if cfg.Inventory == nil {
		return nil, errors.New("no inventory")
	}
	self, err := cfg.Inventory.Get(cfg.Name)
	if err != nil {
		return nil, fmt.Errorf("this host: %w", err)
	}
	if cfg.Underlay == "" {
		cfg.Underlay = "eth0"
	}
	if cfg.StateDir == "" {
		cfg.StateDir = "/var/lib/migrate"
	}
	tlsConf, err := TLSConfig(cfg.CertDir, cfg.Name)
	if err != nil {
		return nil, err
	}
	if err := cfg.Inventory.Validate(); err != nil {
		return nil, fmt.Errorf("inventory: %w", err)
	}
	a := &Agent{cfg: cfg, self: self, tls: tlsConf, inflight: map[string]*inflightMove{}, sessions: map[string]*incoming{}, peers: map[string]*Peer{},
		postcopies: map[string]*postcopyIn{}, lazyDumps: map[string]*lazyDump{}, lazyTargets: map[string]string{}}
	if cfg.PageStoreBytes == 0 {
		cfg.PageStoreBytes = 2 << 30
	}
	// No move is under way when an agent starts: CRIU configuration files and lazy
	// restores a crashed agent left would steer the next dump or restore wrongly. First
	// of all: a CRIU they hold (a gate, a lazy dump waiting for its client) holds the
	// container's lock in podman, and podman's answers (hostInfo's among them) with it.
	clearMoveLeftovers(cfg.StateDir)
	if a.store, err = pages.OpenStore(filepath.Join(cfg.StateDir, "pages"), cfg.PageStoreBytes); err != nil {
		return nil, err
	}
	if cfg.PodmanURI != "" {
		if a.podman, err = checkpoint.Connect(ctx, cfg.PodmanURI); err != nil {
			return nil, err
		}
	}
	a.info = a.hostInfo(ctx)
	peers := map[string]netip.Addr{}
	for _, h := range cfg.Inventory.Hosts {
		if h.Name != cfg.Name {
			peers[h.Name] = h.Underlay()
		}
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if a.podman != nil {
		logCRIUCache(ctx)
	}
	a.ovs = overlaynet.NewOVS(overlaynet.Config{Host: cfg.Name, LocalIP: self.Underlay(), Underlay: cfg.Underlay, Peers: peers,
		NoHold: a.podman == nil, StateFile: filepath.Join(cfg.StateDir, "locations.json"), Frozen: frozenMoves(cfg.StateDir)})
	if err := a.ovs.Setup(ctx); err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}

	a.mv = &mover{self: cfg.Name, ov: a.ovs, peers: agentPeers{a}, closeSession: a.closeSession,
		out: journal{filepath.Join(cfg.StateDir, "outgoing")}, in: journal{filepath.Join(cfg.StateDir, "incoming")}}
	a.mv.out.clean()
	a.mv.in.clean()
	if a.podman != nil {
		a.mv.rt = podmanRuntime{a.podman, a}
	}
	// Containers that run here get their flows back before anything else; moves left
	// unfinished are settled once the agent serves (settle), since that may mean asking
	// a peer that is itself starting and asking us.
	if err := a.adoptLocal(ctx); err != nil {
		return nil, err
	}
	if cfg.Endpoint.IsValid() {
		ep := overlaynet.NewEndpoint(cfg.Name, cfg.Endpoint)
		ep.NetNS = ""
		a.ovs.Unplumb(ctx, ep)
		if err := a.ovs.Plumb(ctx, ep); err != nil {
			return nil, fmt.Errorf("this node's overlay endpoint: %w", err)
		}
		if err := a.ovs.Locate(ep.Location(cfg.Name)); err != nil {
			return nil, fmt.Errorf("this node's overlay endpoint: %w", err)
		}
	}
	return a, nil
}

// Serve answers peers and operators on the agent address until ctx ends.
func (a *Agent) Serve(ctx context.Context) error {
	ln, err := net.Listen("tcp", a.self.Agent)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", a.self.Agent, err)
	}
	srv := &http.Server{
		Handler:      a.mux(),
		TLSConfig:    a.tls,
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){}, // HTTP/1.1 only
		ErrorLog:     slog.NewLogLogger(slog.Default().Handler(), slog.LevelDebug),
		// Archives stream for minutes, so no whole-request timeouts; a peer that sends
		// no headers, or holds an idle connection, is cut.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				a.conns.Add(1)
			case http.StateClosed, http.StateHijacked:
				a.conns.Add(-1)
			}
		},
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	go a.syncLocations(ctx)
	goSafe("watch removals", func() { a.watchRemovals(ctx) })
	go a.settle(ctx)
	slog.Info("agent serving", "host", a.cfg.Name, "addr", a.self.Agent, "podman", a.cfg.PodmanURI != "")
	if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	// Moves under way run to their end (commit or rollback) before the agent exits; one
	// that does not within the bound is settled from the journal at the next start.
	done := make(chan struct{})
	go func() { a.pushes.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(shutdownWait):
		slog.Warn("stopping with a move under way; it is settled at the next start", "waited", shutdownWait)
	}
	return nil
}

func (a *Agent) infoHandler(r *http.Request) (any, error) {
	info := a.info
	st := a.store.Stats()
	info.PageStore = &st
	info.Goroutines = runtime.NumGoroutine()
	info.OpenConnections = a.conns.Load()
	return info, nil
}

// mux routes the agent's API: each path to its handler, for the roles that may call it.
func (a *Agent) mux() *http.ServeMux {
	mux := http.NewServeMux()
	// Who may call what. Agent-to-agent paths further check that the caller is the host
	// the move names (mustBe).
	anyone := []Role{RoleHost, RoleNode, RoleOperator}
	hosts := []Role{RoleHost}
	operators := []Role{RoleOperator}
	hostsAndOperators := []Role{RoleHost, RoleOperator}
	routes := []struct {
		pattern string
		h       http.HandlerFunc
		roles   []Role
	}{
		{"GET " + PathInfo, a.handle(a.infoHandler), anyone},
		{"GET " + PathLocations, a.handle(func(r *http.Request) (any, error) { return a.ovs.Locations(), nil }), anyone},
		{"GET " + PathRTT, a.handle(a.rtt), operators},
		{"GET " + PathContainers, a.handle(func(r *http.Request) (any, error) { return a.containers(r.Context()) }), hostsAndOperators},
		{"GET " + PathStatus, a.handle(a.status), operators},
		{"POST " + PathRun, a.handle(a.run), operators},
		{"POST " + PathRemove, a.handle(a.remove), operators},
		{"GET " + PathLogs, a.handleLogs, operators},
		{"POST " + PathExec, a.handleExec, operators},
		{"POST " + PathPush, a.handlePush, operators},
		{"POST " + PathPushCancel, a.handle(a.cancelPush), operators},
		{"POST " + PathCosts, a.handle(a.costs), operators},
		{"POST " + PathLayerPlan, a.handle(a.layerPlan), operators},
		{"POST " + PathLocate, a.handle(a.locate), hosts},
		{"POST " + PathPrepare, a.handle(a.prepare), hosts},
		{"POST " + PathRestore, a.handle(a.restore), hosts},
		{"POST " + PathPagesAnnounce, a.handle(a.announcePages), hosts},
		{"POST " + PathPagesPut, a.handle(a.putPages), hosts},
		{"POST " + PathPagesVerify, a.handle(a.verifyPages), hosts},
		{"POST " + PathPagesHave, a.handle(a.havePages), hosts},
		{"POST " + PathProbe, a.handle(a.probe), hosts},
		{"POST " + PathCommit, a.handle(a.commit), hosts},
		{"POST " + PathAbort, a.handle(a.abort), hosts},
		{"POST " + PathOutcome, a.handle(a.outcome), hosts},
		{"GET " + PathLayers, a.handle(a.holdings), hosts},
		{"POST " + PathImage, a.handle(a.loadImage), hosts},
		{"POST " + PathPostcopyPages, a.handle(a.postcopyPages), hosts},
		{"POST " + PathPostcopyWant, a.handle(a.postcopyWant), hosts},
		{"POST " + PathVolumeSync, a.handle(a.syncVolume), hosts},
	}
	for _, rt := range routes {
		mux.HandleFunc(rt.pattern, recoverPanics(allow(rt.h, rt.roles...)))
	}
	return mux
}

// handle adapts a JSON handler: bad requests are 400, forbidden ones 403, others 500,
// each with the message.
func (a *Agent) handle(fn func(*http.Request) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		out, err := fn(withResponseController(r, w))
		if err != nil {
			code := http.StatusInternalServerError
			var be badRequest
			var fe errForbidden
			switch {
			case errors.As(err, &fe):
				code = http.StatusForbidden
			case errors.As(err, new(errMoving)):
				code = http.StatusConflict
			case errors.As(err, &be):
				code = http.StatusBadRequest
			case errors.As(err, new(notFound)):
				code = http.StatusNotFound
			}
			slog.Warn("request failed", "path", r.URL.Path, "caller", callerOf(r.Context()).Name, "err", err)
			writeError(w, code, err)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(out)
	}
}

func writeError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(apiError{Error: err.Error(), Busy: errors.As(err, new(errMoving))})
}

// frozenMoves lists the MACs of containers whose outgoing move a crashed agent left frozen
// or committed: their traffic stays held until the move is settled (overlaynet.Config).
func frozenMoves(stateDir string) []string {
	out := journal{filepath.Join(stateDir, "outgoing")}
	var macs []string
	for _, name := range out.list() {
		var mv outgoingMove
		if out.get(name, &mv) == nil && (mv.State == OutFrozen || mv.State == OutCommitted) && mv.Endpoint.MAC != "" {
			macs = append(macs, mv.Endpoint.MAC)
		}
	}
	return macs
}

// goSafe runs fn in a goroutine that logs a panic instead of taking the agent (and every
// move it carries) down; for goroutines that a request starts. onPanic, if given, then
// sees the panic (to fail what fn was doing).
func goSafe(what string, fn func(), onPanic ...func(p any)) {
	go func() {
		defer func() {
			if p := recover(); p != nil {
				logPanic(what, p)
				for _, f := range onPanic {
					f(p)
				}
			}
		}()
		fn()
	}()
}

// recoverPanics turns a handler's panic into a 500 and a log line: one bad request never
// takes the agent (and the moves it carries) down.
func recoverPanics(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				logPanic(r.URL.Path, p)
				writeError(w, http.StatusInternalServerError, fmt.Errorf("internal error in %s", r.URL.Path))
			}
		}()
		h(w, r)
	}
}

func logPanic(where string, p any) {
	slog.Error("panic contained", "where", where, "panic", p, "stack", string(debug.Stack()))
}

type badRequest struct{ error }

func decodeBody(r *http.Request, v any) error {
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(v); err != nil {
		return badRequest{fmt.Errorf("bad request body: %w", err)}
	}
	return nil
}

func (a *Agent) needPodman() error {
	if a.podman == nil {
		return badRequest{fmt.Errorf("host %s runs no containers (its agent has no podman service)", a.cfg.Name)}
	}
	return nil
}

// peer returns the client for another host's agent: one per peer, so that its
// connections are reused.
func (a *Agent) peer(name string) (*Peer, error) {
	h, err := a.cfg.Inventory.Get(name)
	if err != nil {
		return nil, badRequest{err}
	}
	a.peersMu.Lock()
	defer a.peersMu.Unlock()
	if p := a.peers[name]; p != nil {
		return p, nil
	}
	p := NewPeer(h.Name, h.Agent, a.tls)
	a.peers[name] = p
	return p, nil
}

// agentPeers is the agent's movePeers: its peer clients.
type agentPeers struct{ a *Agent }

func (ap agentPeers) Client(host string) (moveClient, error) {
	p, err := ap.a.peer(host)
	if err != nil {
		return nil, err
	}
	return p, nil
}

func (ap agentPeers) Announce(ctx context.Context, loc overlaynet.Location) []string {
	return ap.a.announce(ctx, loc)
}

func (ap agentPeers) LocateAt(ctx context.Context, host string, loc overlaynet.Location) error {
	if host == ap.a.cfg.Name {
		return ap.a.ovs.Locate(loc)
	}
	p, err := ap.a.peer(host)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, announceWait)
	defer cancel()
	return p.Locate(cctx, loc)
}

// podmanRuntime is podman as a move's containerRuntime.
type podmanRuntime struct {
	p *checkpoint.Podman
	a *Agent
}

func (r podmanRuntime) State(ctx context.Context, name string) (string, bool, error) {
	ok, err := r.p.Exists(ctx, name)
	if err != nil || !ok {
		return "", false, err
	}
	st, err := r.p.State(ctx, name)
	return st, err == nil, err
}

func (r podmanRuntime) Remove(ctx context.Context, name string) error {
	if err := r.p.Remove(ctx, name); err != nil {
		return err
	}
	r.a.dropMemory(name)
	return nil
}

func (r podmanRuntime) RemoveVolumes(ctx context.Context, names []string, move string) error {
	var errs []error
	for _, n := range names {
		if move != "" {
			v, err := r.p.InspectVolume(ctx, n)
			if ok, _ := r.p.VolumeExists(ctx, n); !ok {
				continue
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if v.Labels[LabelVolumeMove] != move {
				continue // not this move's: the user's own
			}
		}
		if err := r.p.RemoveVolume(ctx, n); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Unfreeze makes a running container whose checkpoint did not complete run again: it
// thaws its cgroup and releases the network lock CRIU may have left. A checkpoint of it that is still
// failing (its agent restarted while CRIU dumped) is waited for first: CRIU, which found
// the cgroup frozen, freezes it again as it lets the processes go, so a thaw before that
// would be undone.
func (r podmanRuntime) Unfreeze(ctx context.Context, name string) error {
	c, err := r.p.Inspect(ctx, name)
	if err != nil || c.PID == 0 {
		return err
	}
	fz, err := freezerOf(c.PID)
	if err != nil {
		return nil // no freezer: nothing can be frozen
	}
	if err := waitUntraced(ctx, c.PID, 30*time.Second); err != nil {
		slog.Warn("thawing a container CRIU still holds", "container", name, "err", err)
	}
	// A lazy dump that failed leaves its network lock behind (netunlock.go).
	released, err := unlockNetwork(ctx, c.PID, filepath.Join(c.StaticDir, "checkpoint"))
	if len(released) > 0 {
		slog.Warn("released the network lock of a failed checkpoint", "container", name, "released", released)
	}
	if err != nil {
		return fmt.Errorf("release the network lock of %s: %w", name, err)
	}
	return fz.thaw()
}

// waitUntraced waits until no process of the container whose first process is init is
// traced (CRIU seizes every process it dumps with ptrace, and detaches them last).
func waitUntraced(ctx context.Context, init int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		pids, err := pages.Processes(init)
		if err != nil {
			return nil // gone: nothing to thaw
		}
		tracer := 0
		for _, p := range pids {
			if t := tracerOf(p); t != 0 {
				tracer = t
				break
			}
		}
		if tracer == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d still traces it after %s", tracer, limit)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// tracerOf is the PID tracing process pid (0: none, or pid gone).
func tracerOf(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	v, _ := statusField(b, "TracerPid")
	t, _ := strconv.Atoi(v)
	return t
}

// RestoreLocal restores the checkpoint podman kept; one whose memory went through the
// page server gets its page images back first.
func (r podmanRuntime) RestoreLocal(ctx context.Context, name string) error {
	if err := r.a.rebuildMemory(ctx, name); err != nil {
		return err
	}
	// Its directory, for the images and CRIU's log ("" if podman cannot say).
	var static string
	c, err := r.p.Inspect(ctx, name)
	if err == nil {
		static = c.StaticDir
	}
	// A dump that left the masked directories out needs them put back: the container's
	// CRIU configuration file says where, for this restore only (as runc asks otherwise).
	if static != "" && c.CRIUConfig == CRIUConfigPath(name) {
		lines, release, err := prepareMasks(name, filepath.Join(static, "checkpoint"))
		if err != nil {
			return fmt.Errorf("restore %s here: %w", name, err)
		}
		defer release()
		if len(lines) > 0 {
			if err := writeCRIUConfigFile(name, lines); err != nil {
				return err
			}
			defer removeCRIUConfig(name)
		}
	}
	if err := r.p.RestoreLocal(ctx, name, true); err != nil {
		// CRIU's own words, where its log says more than runc's "criu failed".
		if static != "" {
			err = fmt.Errorf("%w%s", err, criuErrors(filepath.Join(static, "restore.log")))
		}
		return err
	}
	r.a.dropMemory(name)
	return nil
}

func (a *Agent) hostInfo(ctx context.Context) HostInfo {
	info := HostInfo{Name: a.cfg.Name, Podman: a.podman != nil, Datapath: overlaynet.Datapath(), Cgroups: cgroupLayout()}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		info.Kernel = charsToString(u.Release[:])
	}
	if out, err := exec.CommandContext(ctx, "criu", "--version").Output(); err != nil {
		info.CRIUProblem = "no criu in PATH (run scripts/install.sh)"
	} else {
		for _, l := range strings.Split(string(out), "\n") {
			if v, ok := strings.CutPrefix(l, "Version: "); ok {
				info.CRIU = strings.TrimSpace(v)
			}
		}
		if out, err := exec.CommandContext(ctx, "criu", "check").CombinedOutput(); err != nil {
			info.CRIUProblem = "criu check fails: " + lastLine(string(out))
		}
		// Without soft-dirty bits CRIU cannot pre-dump; pre-copy then finds changed
		// pages by their hashes.
		info.DirtyTracking = exec.CommandContext(ctx, "criu", "check", "--feature", "mem_dirty_track").Run() == nil
		info.NoSysResource = !hasCapability(capSysResource)
	}
	if a.podman != nil {
		rt, err := a.podman.Runtime(ctx)
		if err != nil {
			slog.Warn("podman info", "err", err)
		}
		info.Runtime = rt
		if info.CRIUProblem == "" {
			info.MemoryProblem = memoryProblem(ctx, rt)
		}
	}
	return info
}

func charsToString(b []int8) string {
	s := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}

func lastLine(s string) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return l[len(l)-1]
}

func cgroupLayout() string {
	var st syscall.Statfs_t
	if err := syscall.Statfs("/sys/fs/cgroup", &st); err != nil {
		return "unknown"
	}
	if st.Type == 0x63677270 {
		return "v2"
	}
	if _, err := os.Stat("/sys/fs/cgroup/unified"); err == nil {
		return "v1-hybrid"
	}
	return "v1"
}

// endpointOf reads a container's overlay place from its labels.
func endpointOf(c *checkpoint.Container) (overlaynet.Endpoint, bool) {
	p, err := netip.ParsePrefix(c.Labels[LabelIP])
	if err != nil || c.Labels[LabelMAC] == "" {
		return overlaynet.Endpoint{}, false
	}
	ep := overlaynet.NewEndpoint(c.Name, p)
	ep.MAC = c.Labels[LabelMAC]
	return ep, true
}

func (a *Agent) containers(ctx context.Context) ([]ContainerInfo, error) {
	if a.podman == nil {
		return []ContainerInfo{}, nil
	}
	l, err := a.podman.List(ctx)
	if err != nil {
		return nil, err
	}
	out := []ContainerInfo{}
	for _, c := range l {
		ci := ContainerInfo{Name: c.Name, Host: a.cfg.Name, Image: c.Image, State: c.State}
		if ep, ok := endpointOf(&c); ok {
			ci.IP, ci.MAC, ci.OnOverlay = ep.Prefix, ep.MAC, true
		}
		out = append(out, ci)
	}
	return out, nil
}

// adoptLocal re-attaches the overlay endpoints of containers this host already runs (after
// an agent restart the ports are there, the flows are not).
func (a *Agent) adoptLocal(ctx context.Context) error {
	if a.podman == nil {
		return nil
	}
	l, err := a.podman.List(ctx)
	if err != nil {
		return err
	}
	for _, c := range l {
		ep, ok := endpointOf(&c)
		if !ok || c.State != "running" {
			continue
		}
		// A copy restored here by a move not settled yet is the move's: its recovery
		// attaches it (commit) or removes it (rollback). Adopted, it would be announced
		// as running here while the source runs the container.
		if a.mv.in.has(c.Name) {
			slog.Info("not adopting a container whose incoming move is not settled", "container", c.Name)
			continue
		}
		if err := a.ovs.AddLocal(ep.Location(a.cfg.Name), ep.Port()); err != nil {
			slog.Warn("adopt endpoint", "container", c.Name, "err", err)
		}
	}
	return nil
}

// syncLocations learns, from every peer, the endpoints that run there.
func (a *Agent) syncLocations(ctx context.Context) {
	for _, h := range a.cfg.Inventory.Hosts {
		if h.Name == a.cfg.Name {
			continue
		}
		go func(h HostEntry) {
			p, _ := a.peer(h.Name)
			// Until the peer answers, however long: every second for the first minute
			// (peers start together, and until a host knows a node's endpoints it drops
			// the replies to it), then every 10 s, saying so once.
			start, warned := time.Now(), false
			for ctx.Err() == nil {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				locs, err := p.Locations(cctx)
				cancel()
				if err == nil {
					for _, l := range locs {
						if l.Host == h.Name && !a.ovs.Local(l.MAC) {
							a.ovs.Locate(l)
						}
					}
					if warned {
						slog.Info("learnt the peer's endpoints", "peer", h.Name)
					}
					return
				}
				if !warned && time.Since(start) > time.Minute {
					slog.Warn("cannot learn the peer's endpoints yet; still trying", "peer", h.Name, "err", err)
					warned = true
				}
				wait := time.Second
				if warned {
					wait = 10 * time.Second
				}
				select {
				case <-ctx.Done():
				case <-time.After(wait):
				}
			}
		}(h)
	}
}

// shutdownWait bounds how long a stopping agent waits for its moves to end.
const shutdownWait = 2 * time.Minute

// announceWait bounds how long an announcement waits for one node.
const announceWait = 2 * time.Second

// announce tells every node (this one included) where an endpoint runs. It returns the
// hosts it could not reach.
func (a *Agent) announce(ctx context.Context, loc overlaynet.Location) []string {
	var mu sync.Mutex
	var failed []string
	var wg sync.WaitGroup
	for _, h := range a.cfg.Inventory.Hosts {
		wg.Add(1)
		go func(h HostEntry) {
			defer wg.Done()
			var err error
			if h.Name == a.cfg.Name {
				err = a.ovs.Locate(loc)
			} else if p, perr := a.peer(h.Name); perr != nil {
				err = perr
			} else {
				// All nodes at once, each for at most announceWait: a node that does not
				// answer learns the location from syncLocations when it is back.
				cctx, cancel := context.WithTimeout(ctx, announceWait)
				err = p.Locate(cctx, loc)
				cancel()
			}
			if err != nil {
				slog.Warn("announce location", "to", h.Name, "endpoint", loc.Name, "err", err)
				mu.Lock()
				failed = append(failed, h.Name)
				mu.Unlock()
			}
		}(h)
	}
	wg.Wait()
	sort.Strings(failed)
	return failed
}

func (a *Agent) locate(r *http.Request) (any, error) {
	var loc overlaynet.Location
	if err := decodeBody(r, &loc); err != nil {
		return nil, err
	}
	if loc.Host == "" {
		return nil, a.ovs.Forget(loc.MAC)
	}
	return nil, a.ovs.Locate(loc)
}

func (a *Agent) run(r *http.Request) (any, error) {
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	var req RunRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	ctx := r.Context()
	if req.Name == "" || req.Image == "" || !req.IP.IsValid() {
		return nil, badRequest{errors.New("run needs a name, an image and an address")}
	}
	if err := ValidContainerName(req.Name); err != nil {
		return nil, err
	}
	if err := checkRun(&req); err != nil {
		return nil, badRequest{fmt.Errorf("run %s: %w", req.Name, err)}
	}
	if ok, err := a.podman.Exists(ctx, req.Name); err != nil {
		return nil, err
	} else if ok {
		return nil, badRequest{fmt.Errorf("a container named %q already exists on %s", req.Name, a.cfg.Name)}
	}
	if owner := a.addressOwner(req.IP.Addr()); owner != "" {
		return nil, badRequest{fmt.Errorf("address %s is taken by %s", req.IP.Addr(), owner)}
	}
	mounts, vols, err := a.volumeMounts(ctx, req.Mounts)
	if err != nil {
		return nil, err
	}
	ep := overlaynet.NewEndpoint(req.Name, req.IP)
	if err := a.ovs.Plumb(ctx, ep); err != nil {
		return nil, err
	}
	labels := map[string]string{LabelIP: req.IP.String(), LabelMAC: ep.MAC}
	if len(vols) > 0 {
		labels[LabelVolumes] = strings.Join(vols, ",")
	}
	for k, v := range req.Labels {
		labels[k] = v
	}
	id, err := a.podman.Run(ctx, checkpoint.Spec{Name: req.Name, Image: req.Image, Command: req.Command, Entrypoint: req.Entrypoint,
		Env: req.Env, Labels: labels, Annotations: req.Annotations, User: req.User, WorkDir: req.WorkDir, ReadOnly: req.ReadOnly,
		Mounts: mounts, MemoryLimit: req.MemoryLimit, CPUs: req.CPUs, NetNS: ep.NetNSPath(), CRIUConfig: CRIUConfigPath(req.Name)})
	if err != nil {
		a.ovs.Unplumb(context.WithoutCancel(ctx), ep)
		return nil, err
	}
	failed := a.announce(ctx, ep.Location(a.cfg.Name))
	overlaynet.GratuitousARP(ep)
	return map[string]any{"id": id, "container": req.Name, "host": a.cfg.Name, "ip": req.IP, "mac": ep.MAC, "unannounced": failed}, nil
}

// addressOwner names the endpoint this node knows at ip, if any.
func (a *Agent) addressOwner(ip netip.Addr) string {
	for _, l := range a.ovs.Locations() {
		if l.IP == ip {
			return fmt.Sprintf("%s on %s", l.Name, l.Host)
		}
	}
	return ""
}

func (a *Agent) status(r *http.Request) (any, error) {
	cs, err := a.containers(r.Context())
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	st := Status{Host: a.cfg.Name, Containers: cs, Last: a.last, Unresolved: a.unresolved}
	for c := range a.inflight {
		st.InFlight = append(st.InFlight, c)
	}
	sort.Strings(st.InFlight)
	st.Moves = a.movesLocked()
	return st, nil
}

// cpuinfoDump returns this host's `criu cpuinfo dump` image.
func cpuinfoDump(ctx context.Context) ([]byte, error) {
	d, err := os.MkdirTemp("", "migrate-cpuinfo-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(d)
	if out, err := exec.CommandContext(ctx, "criu", "cpuinfo", "dump", "-D", d).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("criu cpuinfo dump: %w: %s", err, lastLine(string(out)))
	}
	return os.ReadFile(filepath.Join(d, "cpuinfo.img"))
}

// cpuinfoCheck runs `criu cpuinfo check` against another host's image.
func cpuinfoCheck(ctx context.Context, img []byte) error {
	d, err := os.MkdirTemp("", "migrate-cpuinfo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(d)
	if err := os.WriteFile(filepath.Join(d, "cpuinfo.img"), img, 0o644); err != nil {
		return err
	}
	if out, err := exec.CommandContext(ctx, "criu", "cpuinfo", "check", "-D", d).CombinedOutput(); err != nil {
		return fmt.Errorf("criu cpuinfo check: %s", lastLine(string(out)))
	}
	return nil
}

// keepLogs copies a failed attempt's logs out of the container's directory, which podman
// removes with the container, and returns where they are ("" if there were none).
func (a *Agent) keepLogs(container, staticDir string, files ...string) string {
	if staticDir == "" {
		return ""
	}
	dir := filepath.Join(a.cfg.StateDir, "logs", container+"-"+time.Now().UTC().Format("20060102T150405"))
	kept := false
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(staticDir, f))
		if err != nil {
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err == nil && os.WriteFile(filepath.Join(dir, f), b, 0o644) == nil {
			kept = true
		}
	}
	if !kept {
		return ""
	}
	return dir
}
