package transfer

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
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

	mu       sync.Mutex
	inflight map[string]bool
	last     *PushResult
	sessions map[string]*incoming // page sessions of incoming moves
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
	a := &Agent{cfg: cfg, self: self, tls: tlsConf, inflight: map[string]bool{}, sessions: map[string]*incoming{}}
	if cfg.PageStoreBytes == 0 {
		cfg.PageStoreBytes = 2 << 30
	}
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
	a.ovs = overlaynet.NewOVS(overlaynet.Config{Host: cfg.Name, LocalIP: self.Underlay(), Underlay: cfg.Underlay, Peers: peers, NoHold: a.podman == nil})
	if err := a.ovs.Setup(ctx); err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}

	if err := a.adoptLocal(ctx); err != nil {
		return nil, err
	}
	if err := a.recover(ctx); err != nil {
		return nil, err
	}
	if cfg.Endpoint.IsValid() {
		ep := overlaynet.NewEndpoint(cfg.Name, cfg.Endpoint)
		ep.NetNS = ""
		a.ovs.Unplumb(ctx, ep)
		if err := a.ovs.Plumb(ctx, ep); err != nil {
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
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/info", a.handle(func(r *http.Request) (any, error) {
		info := a.info
		st := a.store.Stats()
		info.PageStore = &st
		return info, nil
	}))
	mux.HandleFunc("GET /v1/containers", a.handle(func(r *http.Request) (any, error) { return a.containers(r.Context()) }))
	mux.HandleFunc("GET /v1/locations", a.handle(func(r *http.Request) (any, error) { return a.ovs.Locations(), nil }))
	mux.HandleFunc("POST /v1/locate", a.handle(a.locate))
	mux.HandleFunc("POST /v1/run", a.handle(a.run))
	mux.HandleFunc("POST /v1/prepare", a.handle(a.prepare))
	mux.HandleFunc("POST /v1/restore", a.handle(a.restore))
	mux.HandleFunc("POST /v1/pages/announce", a.handle(a.announcePages))
	mux.HandleFunc("POST /v1/pages/put", a.handle(a.putPages))
	mux.HandleFunc("POST /v1/pages/have", a.handle(a.havePages))
	mux.HandleFunc("POST /v1/probe", a.handle(a.probe))
	mux.HandleFunc("GET /v1/rtt", a.handle(a.rtt))
	mux.HandleFunc("POST /v1/costs", a.handle(a.costs))
	mux.HandleFunc("POST /v1/commit", a.handle(a.commit))
	mux.HandleFunc("POST /v1/abort", a.handle(a.abort))
	mux.HandleFunc("POST /v1/push", a.handlePush)
	mux.HandleFunc("GET /v1/status", a.handle(a.status))
	mux.HandleFunc("GET /v1/layers", a.handle(a.holdings))
	mux.HandleFunc("POST /v1/layers/plan", a.handle(a.layerPlan))
	mux.HandleFunc("POST /v1/image", a.handle(a.loadImage))
	srv := &http.Server{
		Handler:      mux,
		TLSConfig:    a.tls,
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){}, // HTTP/1.1 only
		ErrorLog:     slog.NewLogLogger(slog.Default().Handler(), slog.LevelDebug),
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	go a.syncLocations(ctx)
	slog.Info("agent serving", "host", a.cfg.Name, "addr", a.self.Agent, "podman", a.cfg.PodmanURI != "")
	if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// handle adapts a JSON handler: decode errors are 400, others 500 with the message.
func (a *Agent) handle(fn func(*http.Request) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		out, err := fn(r)
		w.Header().Set("Content-Type", "application/json")
		if err != nil {
			code := http.StatusInternalServerError
			var be badRequest
			if errors.As(err, &be) {
				code = http.StatusBadRequest
			}
			slog.Warn("request failed", "path", r.URL.Path, "err", err)
			w.WriteHeader(code)
			json.NewEncoder(w).Encode(apiError{Error: err.Error()})
			return
		}
		json.NewEncoder(w).Encode(out)
	}
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

// peer returns a client for another host's agent.
func (a *Agent) peer(name string) (*Peer, error) {
	h, err := a.cfg.Inventory.Get(name)
	if err != nil {
		return nil, badRequest{err}
	}
	return NewPeer(h.Name, h.Agent, a.tls), nil
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
	}
	if a.podman != nil {
		rt, err := a.podman.Runtime(ctx)
		if err != nil {
			slog.Warn("podman info", "err", err)
		}
		info.Runtime = rt
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
			p := NewPeer(h.Name, h.Agent, a.tls)
			for attempt := 0; attempt < 30 && ctx.Err() == nil; attempt++ {
				var locs []overlaynet.Location
				cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
				err := p.Call(cctx, "/v1/locations", nil, &locs)
				cancel()
				if err == nil {
					for _, l := range locs {
						if l.Host == h.Name && !a.ovs.Local(l.MAC) {
							a.ovs.Locate(l)
						}
					}
					return
				}
				time.Sleep(time.Second)
			}
		}(h)
	}
}

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
			} else {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				err = NewPeer(h.Name, h.Agent, a.tls).Call(cctx, "/v1/locate", loc, nil)
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
	if ok, err := a.podman.Exists(ctx, req.Name); err != nil {
		return nil, err
	} else if ok {
		return nil, badRequest{fmt.Errorf("a container named %q already exists on %s", req.Name, a.cfg.Name)}
	}
	if owner := a.addressOwner(req.IP.Addr()); owner != "" {
		return nil, badRequest{fmt.Errorf("address %s is taken by %s", req.IP.Addr(), owner)}
	}
	ep := overlaynet.NewEndpoint(req.Name, req.IP)
	if err := a.ovs.Plumb(ctx, ep); err != nil {
		return nil, err
	}
	labels := map[string]string{LabelIP: req.IP.String(), LabelMAC: ep.MAC}
	id, err := a.podman.Run(ctx, checkpoint.Spec{Name: req.Name, Image: req.Image, Command: req.Command,
		Env: req.Env, Labels: labels, NetNS: ep.NetNSPath()})
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
	st := Status{Host: a.cfg.Name, Containers: cs, Last: a.last}
	for c := range a.inflight {
		st.InFlight = append(st.InFlight, c)
	}
	sort.Strings(st.InFlight)
	return st, nil
}

// --- the target's side of a move -------------------------------------------------------

func (a *Agent) journal(container string) string {
	return filepath.Join(a.cfg.StateDir, "incoming", container+".json")
}

// prepare runs the target's part of the pre-flight gate and, if it passes (and this is not
// a dry run), plumbs the container's endpoint without announcing it.
func (a *Agent) prepare(r *http.Request) (any, error) {
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	var req PrepareRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	ctx := r.Context()
	resp := PrepareResponse{}
	add := func(c Check) { resp.Checks = append(resp.Checks, c) }
	add(Check{Property: "criu", Target: a.info.CRIU, OK: a.info.CRIUProblem == "", Detail: a.info.CRIUProblem})
	add(Check{Property: "oci runtime", Source: req.Runtime, Target: a.info.Runtime, OK: req.Runtime == a.info.Runtime})
	add(Check{Property: "cgroups", Source: req.Cgroups, Target: a.info.Cgroups, OK: req.Cgroups == a.info.Cgroups})
	if len(req.CPUInfo) > 0 {
		err := cpuinfoCheck(ctx, req.CPUInfo)
		c := Check{Property: "cpu features", Source: "criu cpuinfo of " + req.Source, Target: "compatible", OK: err == nil}
		if err != nil {
			c.Target, c.Detail = "incompatible", err.Error()
		}
		add(c)
	}
	has, err := a.podman.ImageExists(ctx, req.Image)
	if err != nil {
		return nil, err
	}
	add(Check{Property: "image", Source: req.Image, Target: map[bool]string{true: "present", false: "missing"}[has], OK: has,
		Detail: map[bool]string{true: "", false: "load the image on the target first"}[has]})
	exists, err := a.podman.Exists(ctx, req.Container)
	if err != nil {
		return nil, err
	}
	add(Check{Property: "name", Source: req.Container, Target: map[bool]string{true: "taken", false: "free"}[exists], OK: !exists})
	owner := ""
	for _, l := range a.ovs.Locations() {
		if l.IP == req.Endpoint.Prefix.Addr() && l.Name != req.Container {
			owner = fmt.Sprintf("%s on %s", l.Name, l.Host)
		}
	}
	_, nsErr := os.Stat(req.Endpoint.NetNSPath())
	if owner == "" && nsErr == nil {
		owner = "namespace " + req.Endpoint.NetNSPath() + " exists"
	}
	add(Check{Property: "address", Source: req.Endpoint.Prefix.String(), Target: map[bool]string{true: "free", false: owner}[owner == ""], OK: owner == ""})
	for _, c := range resp.Checks {
		if !c.OK || req.DryRun {
			return resp, nil
		}
	}
	b, _ := json.Marshal(req)
	if err := os.MkdirAll(filepath.Dir(a.journal(req.Container)), 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(a.journal(req.Container), b, 0o644); err != nil {
		return nil, err
	}
	if err := a.ovs.Plumb(ctx, req.Endpoint); err != nil {
		os.Remove(a.journal(req.Container))
		return nil, err
	}
	a.openSession(req.Container)
	return resp, nil
}

var errDigest = errors.New("archive damaged in transit: digest mismatch")

// verifyingReader hashes the request body and turns its end into an error unless the
// digest in the trailer matches: podman never sees a complete archive that is wrong.
type verifyingReader struct {
	src io.Reader // the archive: the request body, or what is rebuilt from it
	r   *http.Request
	h   hash.Hash
	n   int64
	err error
}

// newVerifyingReader checks src (the archive: the request body, or what is rebuilt from
// it) against the digest in r's trailer.
func newVerifyingReader(src io.Reader, r *http.Request) *verifyingReader {
	return &verifyingReader{src: src, r: r, h: sha256.New()}
}

func (v *verifyingReader) Read(b []byte) (int, error) {
	n, err := v.src.Read(b)
	v.h.Write(b[:n])
	v.n += int64(n)
	if err == io.EOF {
		want := v.r.Trailer.Get(digestTrailer)
		got := "sha256:" + hex.EncodeToString(v.h.Sum(nil))
		if want != got {
			v.err = fmt.Errorf("%w (sent %q, received %s after %d bytes)", errDigest, want, got, v.n)
			return n, v.err
		}
	} else if err != nil {
		v.err = fmt.Errorf("receive archive after %d bytes: %w", v.n, err)
	}
	return n, err
}

func (a *Agent) restore(r *http.Request) (any, error) {
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	name := r.URL.Query().Get("container")
	b, err := os.ReadFile(a.journal(name))
	if err != nil {
		return nil, badRequest{fmt.Errorf("container %q was not prepared on %s", name, a.cfg.Name)}
	}
	var prep PrepareRequest
	if err := json.Unmarshal(b, &prep); err != nil {
		return nil, err
	}
	start := time.Now()
	var src io.Reader = r.Body
	var pst pages.Stats
	encoded := r.URL.Query().Get("encoding") == "pages"
	if encoded {
		sess, err := a.session(name)
		if err != nil {
			return nil, err
		}
		if src, err = a.decodeArchive(r.Context(), r, sess, &pst); err != nil {
			return nil, err
		}
	}
	vr := newVerifyingReader(src, r)
	res, err := a.podman.Import(r.Context(), vr, checkpoint.RestoreOptions{TCPEstablished: true})
	if vr.err != nil {
		err = vr.err
	}
	if err != nil {
		// Nothing half-restored may stay: the source will take the container back. The
		// CRIU log is kept first.
		bctx := context.WithoutCancel(r.Context())
		where := ""
		if c, ierr := a.podman.Inspect(bctx, name); ierr == nil {
			if dir := a.keepLogs(name, c.StaticDir, "restore.log"); dir != "" {
				where = " (CRIU and runtime logs kept in " + a.cfg.Name + ":" + dir + ")"
			}
		}
		// The source cannot commit a failed restore: undo it (container, endpoint, journal)
		// now rather than wait for an abort that a cut link may never deliver.
		go a.undoIncoming(bctx, AbortRequest{Container: name, Source: prep.Source, Endpoint: prep.Endpoint})
		return nil, fmt.Errorf("restore %s on %s: %w%s", name, a.cfg.Name, err, where)
	}
	overlaynet.GratuitousARP(prep.Endpoint)
	out := RestoreResult{Bytes: vr.n, Digest: "sha256:" + hex.EncodeToString(vr.h.Sum(nil)), Restore: res.Duration,
		Received: time.Since(start), CRIURestore: res.CRIURestore}
	if encoded {
		out.Pages = &pst
	}
	return out, nil
}

func (a *Agent) commit(r *http.Request) (any, error) {
	var req AbortRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	a.closeSession(req.Container)
	return nil, os.Remove(a.journal(req.Container))
}

func (a *Agent) abort(r *http.Request) (any, error) {
	var req AbortRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	return nil, a.undoIncoming(context.WithoutCancel(r.Context()), req)
}

// undoIncoming removes every trace of an incoming move: the restored container, the
// endpoint, the journal; and points the endpoint's address back at the source.
func (a *Agent) undoIncoming(ctx context.Context, req AbortRequest) error {
	a.closeSession(req.Container)
	var errs []error
	if a.podman != nil {
		if ok, _ := a.podman.Exists(ctx, req.Container); ok {
			if err := a.podman.Remove(ctx, req.Container); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := a.ovs.Unplumb(ctx, req.Endpoint); err != nil {
		errs = append(errs, err)
	}
	if req.Source != "" && req.Source != a.cfg.Name {
		if err := a.ovs.Locate(req.Endpoint.Location(req.Source)); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(a.journal(req.Container)); err != nil && !os.IsNotExist(err) {
		errs = append(errs, err)
	}
	slog.Info("incoming move undone", "container", req.Container, "source", req.Source)
	return errors.Join(errs...)
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

// recover undoes incoming moves that a previous run of the agent left unfinished.
func (a *Agent) recover(ctx context.Context) error {
	ents, err := os.ReadDir(filepath.Join(a.cfg.StateDir, "incoming"))
	if err != nil {
		return nil
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(a.cfg.StateDir, "incoming", e.Name()))
		if err != nil {
			continue
		}
		var prep PrepareRequest
		if json.Unmarshal(b, &prep) != nil {
			continue
		}
		slog.Warn("undoing an unfinished incoming move", "container", prep.Container, "source", prep.Source)
		if err := a.undoIncoming(ctx, AbortRequest{Container: prep.Container, Source: prep.Source, Endpoint: prep.Endpoint}); err != nil {
			return fmt.Errorf("undo unfinished move of %s: %w", prep.Container, err)
		}
	}
	return nil
}
