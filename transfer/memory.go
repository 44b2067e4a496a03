package transfer

// The memory path: in the frozen phase CRIU hands the container's pages to this agent
// (its page-server protocol, steered through runc's CRIU configuration file), the agent
// sends the target only what it lacks, and the target restores with lazy pages: CRIU's
// lazy-pages daemon asks the target agent for each page, which answers from its page
// store. Podman's archive carries only the non-memory images, and no copy of the memory
// is written to a file on either side while the container is frozen.

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/masks"
	"github.com/migrate-project/migrate/pages"
	"github.com/migrate-project/migrate/pageserver"
)

// CRIUConfigDir holds the per-container CRIU configuration files. `migrate run` points a
// container's org.criu.config annotation at CRIUConfigPath(name); an agent writes that
// file only for the duration of a dump or a restore, so at any other time CRIU runs as
// runc asks it to.
const CRIUConfigDir = "/run/migrate/criu"

// CRIUConfigPath is the CRIU configuration file of the container name.
func CRIUConfigPath(name string) string { return filepath.Join(CRIUConfigDir, name+".conf") }

// Memory paths a push may take, as PushRequest.MemoryPath and PushResult.MemoryPath.
const (
	PathAuto    = "auto"    // the memory path where both hosts and the container allow it
	PathMemory  = "memory"  // page server on the source, lazy pages on the target
	PathArchive = "archive" // the pages inside podman's checkpoint archive
)

// memoryProblem says why this host cannot take the memory path ("" if it can).
func memoryProblem(ctx context.Context, runtime string) string {
	if runtime != "" && path.Base(runtime) != "runc" {
		return fmt.Sprintf("OCI runtime %s: only runc is known to pass CRIU its configuration file", runtime)
	}
	if out, err := exec.CommandContext(ctx, "criu", "check", "--feature", "uffd-noncoop").CombinedOutput(); err != nil {
		return "criu check --feature uffd-noncoop fails (no userfaultfd for lazy pages): " + lastLine(string(out))
	}
	return ""
}

// criuNetworkLock is in every CRIU configuration file the agent writes: each is for a
// move, whose container's frames the overlay holds from before the freeze until the move
// is decided (the source's node holds them, the target's drops the restored copy's
// traffic until then), so no packet reaches either network namespace while its sockets
// are in repair mode or gone. CRIU's own lock (iptables chains in the container's
// network namespace, one iptables-restore run per connection and per chain) guards
// against exactly that, and cost about 90 ms of every restore here (CRIU's restore.log:
// "Unlock network" to the tasks' resumption) and as much of every dump.
const criuNetworkLock = "network-lock skip"

// writeCRIUConfig writes the container's CRIU configuration file for a move's dump or
// restore (one option a line).
func writeCRIUConfig(name string, lines ...string) error {
	return writeCRIUConfigFile(name, append(lines, criuNetworkLock))
}

// writeCRIUConfigFile writes the container's CRIU configuration file as it is given.
func writeCRIUConfigFile(name string, lines []string) error {
	if err := os.MkdirAll(CRIUConfigDir, 0o755); err != nil {
		return fmt.Errorf("CRIU configuration: %w", err)
	}
	if err := replaceFile(CRIUConfigPath(name), 0o644, func(w io.Writer) error {
		_, err := io.WriteString(w, strings.Join(lines, "\n")+"\n")
		return err
	}); err != nil {
		return fmt.Errorf("CRIU configuration: %w", err)
	}
	return nil
}

// replaceFile puts a whole new file at path: written beside it under a name of its own
// and renamed over it, so that a reader (CRIU, a restarted agent) finds the old file,
// the new one or none, never a part, and writers at once do not mix. Not synced: callers
// that need it durable (the journal) sync.
func replaceFile(path string, perm os.FileMode, write func(io.Writer) error) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // gone after the rename; left by a failure
	err = f.Chmod(perm)
	if err == nil {
		err = write(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

func removeCRIUConfig(name string) {
	if err := os.Remove(CRIUConfigPath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		slog.Warn("CRIU configuration", "container", name, "err", err)
	}
}

// clearMoveLeftovers removes what a crashed agent left of a move's memory path: CRIU
// configuration files (a dump would look for a page server that is gone; a restore for a
// lazy-pages daemon; a gate holds a restore until it is refused; a lazy dump waits for
// its page server's client until reset) and lazy restore directories.
func clearMoveLeftovers(stateDir string) {
	if ents, err := os.ReadDir(CRIUConfigDir); err == nil {
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), ".conf") || strings.Contains(e.Name(), ".conf.tmp") { // replaceFile's too
				// A CRIU waiting in a gate or for its lazy dump's connection fails first.
				releaseGate(filepath.Join(CRIUConfigDir, e.Name()))
				releaseLazyDump(filepath.Join(CRIUConfigDir, e.Name()), 5*time.Second, criuRuns)
				if err := os.Remove(filepath.Join(CRIUConfigDir, e.Name())); err == nil {
					slog.Warn("removed a CRIU configuration file an earlier agent left", "file", e.Name())
				}
			}
		}
	}
	os.RemoveAll(filepath.Join(stateDir, "lazy"))
	if err := masks.Clear(MasksDir); err != nil {
		slog.Warn("masked paths an earlier agent left", "dir", MasksDir, "err", err)
	}
}

// MasksDir holds, per container, the read-only empty tmpfs a restore binds in place of
// the container's masked directories (masks package) until the restore ended.
const MasksDir = "/run/migrate/masks"

// maskDumpLines are a dump's CRIU configuration lines that leave the container's masked
// directories out of it (masks package); none if they cannot be read, and CRIU then
// dumps them as before.
func maskDumpLines(name string, pid int) []string {
	if pid <= 0 {
		return nil
	}
	found, err := masks.Find(pid)
	if err != nil {
		slog.Debug("masked paths", "container", name, "err", err)
		return nil
	}
	return masks.DumpLines(found)
}

// prepareMasks readies a restore from the checkpoint images in dir: the CRIU
// configuration lines that put a read-only empty tmpfs in place of each masked directory
// the dump left out, and what undoes them once the restore ended (either way).
func prepareMasks(name, dir string) ([]string, func(), error) {
	keys, err := masks.Keys(dir)
	if err != nil || len(keys) == 0 {
		return nil, func() {}, err
	}
	if err := ValidContainerName(name); err != nil { // it names a directory
		return nil, nil, err
	}
	lines, release, err := masks.Prepare(filepath.Join(MasksDir, name), keys)
	if err != nil {
		return nil, nil, err
	}
	slog.Debug("masked directories put back as read-only empty tmpfs", "container", name, "masks", len(keys))
	var once sync.Once
	return lines, func() { once.Do(release) }, nil
}

// dumpServer is the source's page server for one dump: CRIU, told by the container's
// configuration file, connects here and sends its pages.
type dumpServer struct {
	name string
	ln   net.Listener
}

func startDumpServer(name string, extra []string) (*dumpServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("page server: %w", err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if err := writeCRIUConfig(name, append([]string{"page-server", "address 127.0.0.1", "port " + strconv.Itoa(port)}, extra...)...); err != nil {
		ln.Close()
		return nil, err
	}
	return &dumpServer{name: name, ln: ln}, nil
}

func (d *dumpServer) close() {
	removeCRIUConfig(d.name)
	d.ln.Close()
}

// receive takes the one dump's connection (until exported says podman finished without
// CRIU ever connecting) and hands its memory to mw. When CRIU closes the transfer, the
// memory is complete: keep gets it before CRIU's close is answered, because the answer
// lets CRIU end the dump and podman kill the container, and a rollback then needs the
// memory. If keep fails, or anything before it, the close goes unanswered: the dump
// fails and the container runs on.
func (d *dumpServer) receive(ctx context.Context, mw *pages.MemoryWriter, exported <-chan struct{}, keep func(*pages.Memory) error) (*pages.Memory, pages.Stats, error) {
	type accepted struct {
		c   net.Conn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := d.ln.Accept()
		ch <- accepted{c, err}
	}()
	var conn net.Conn
	select {
	case a := <-ch:
		if a.err != nil {
			return nil, pages.Stats{}, fmt.Errorf("page server: %w", a.err)
		}
		conn = a.c
	case <-exported:
		return nil, pages.Stats{}, errors.New("CRIU never connected to the page server: the runtime ignored the container's CRIU configuration file")
	case <-ctx.Done():
		return nil, pages.Stats{}, context.Cause(ctx)
	}
	// The configuration file has done its job: a restore on this host must not see it.
	removeCRIUConfig(d.name)
	d.ln.Close()
	defer conn.Close()
	var mem *pages.Memory
	var st pages.Stats
	beforeClose := func() error {
		var err error
		if mem, st, err = mw.Close(); err != nil {
			return err
		}
		return keep(mem)
	}
	if _, err := pageserver.Receive(ctx, conn, memorySink{mw}, pageserver.ReceiveOptions{MaxBytes: maxArchive(), BeforeClose: beforeClose,
		Uncork: true, Uncorked: func(err error) { slog.Debug("page server: CRIU's socket uncorked", "container", d.name, "err", err) }}); err != nil {
		return nil, pages.Stats{}, err
	}
	return mem, st, nil
}

type memorySink struct{ mw *pages.MemoryWriter }

func (s memorySink) Entry(img pageserver.Image, vaddr, n uint64, flags uint32) error {
	return s.mw.Entry(int(img.Kind), img.ID, vaddr, n, flags)
}

func (s memorySink) Pages(_ pageserver.Image, vaddr uint64, data []byte) error {
	return s.mw.Pages(vaddr, data)
}

// The source keeps what a dump's memory was (the names of its pages, which its page store
// holds) until the move ends: a rollback rebuilds the page images of the checkpoint podman
// kept from it. It is on disk, so a restarted agent can roll back too.
func (a *Agent) memoryFile(name string) string {
	return filepath.Join(a.cfg.StateDir, "memory", name+".gob")
}

func (a *Agent) saveMemory(name string, mem *pages.Memory) error {
	f := a.memoryFile(name)
	if err := os.MkdirAll(filepath.Dir(f), 0o700); err != nil {
		return err
	}
	// Not synced: the pages it names are in the store's packs, which are not synced
	// either, so a sync would not make a rollback after a power loss possible; what it
	// does keep (a rollback by an agent that restarts) needs the file only in the page
	// cache. Its sync (8 MiB at 1 GiB) waited in the frozen phase, beside the target's
	// restore, on a disk both may share.
	return replaceFile(f, 0o600, func(w io.Writer) error {
		_, err := mem.WriteTo(w)
		return err
	})
}

func (a *Agent) dropMemory(name string) {
	if err := os.Remove(a.memoryFile(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		slog.Warn("kept memory", "container", name, "err", err)
	}
}

// rebuildMemory writes the page images of a container whose memory went through the page
// server into the checkpoint podman kept, so that podman can restore it here. It does
// nothing for a container without kept memory.
func (a *Agent) rebuildMemory(ctx context.Context, name string) error {
	b, err := os.ReadFile(a.memoryFile(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var mem pages.Memory
	if pages.IsMemoryFile(b) {
		err = mem.UnmarshalBinary(b)
	} else {
		err = gob.NewDecoder(bytes.NewReader(b)).Decode(&mem) // kept by an older agent
	}
	if err != nil {
		return fmt.Errorf("kept memory of %s: %w", name, err)
	}
	c, err := a.podman.Inspect(ctx, name)
	if err != nil {
		return err
	}
	dir := filepath.Join(c.StaticDir, "checkpoint")
	t0 := time.Now()
	n, err := mem.WriteImages(dir, a.store, false)
	if err != nil {
		return fmt.Errorf("rebuild the memory of %s into %s: %w", name, dir, err)
	}
	slog.Info("memory rebuilt for a local restore", "container", name, "bytes", n, "took", time.Since(t0))
	return nil
}

// lazyRestore is the target's half of the memory path: the archive (non-memory images)
// and the memory's page names arrive together; the images go to a directory of their
// own with lazy pagemaps, a lazy-pages daemon starts that asks this agent for pages, and
// podman restores the container through a CRIU configuration file that points CRIU at
// both. The container runs once its non-memory state is restored; its memory is filled
// in the background from the page store.
type lazyRestore struct {
	a      *Agent
	name   string
	dir    string
	mem    pages.Memory
	daemon *exec.Cmd
	exited chan error
	// server is the lazy page server process (migrate lazy-serve).
	server      *exec.Cmd
	serverDone  chan error
	closeServer func()
	postcopy    *postcopyIn // post-copy: pages still arrive from the source
	// streamed: the memory arrives while podman restores; the page server (lazy-serve
	// --follow) learns of each page through index, written to indexW.
	streamed bool
	index    *lazyIndexWriter
	indexW   *os.File
	unpin    func()
	start    time.Time
	// setupTook is how long setUp took once the stream had ended: images written, the
	// page server and CRIU's lazy-pages daemon started and listening.
	setupTook time.Duration
	// releaseMasks undoes prepareMasks once podman's restore ended.
	releaseMasks func()
	// gate: CRIU waits for the configuration in it (gate.go), which setUp opens; the
	// handler removes it once podman's import returned, never this (a CRIU waiting in
	// a FIFO removed under it would wait for ever).
	gate *criuGate
}

// removeConfig removes the CRIU configuration file, unless it is a gate.
func (lr *lazyRestore) removeConfig() {
	if lr.gate == nil {
		removeCRIUConfig(lr.name)
	}
}

// lazyDir is where a lazy restore's images and CRIU's logs live.
func (a *Agent) lazyDir(name string) string { return filepath.Join(a.cfg.StateDir, "lazy", name) }

// prepareLazy decodes the stream into the archive (returned) and the memory, writes the
// images and starts the daemon and the page server it asks.
func (a *Agent) prepareLazy(ctx context.Context, name string, body io.Reader, sess *pages.Session, st *pages.Stats, pc *postcopyIn) (*lazyRestore, []byte, error) {
	lr := &lazyRestore{a: a, name: name, dir: a.lazyDir(name), exited: make(chan error, 1), unpin: a.store.Pin(), start: time.Now(), postcopy: pc}
	var archive bytes.Buffer
	var err error
	if pc != nil {
		// Post-copy: the archive's pagemaps are lazy already; the pages come later.
		*st, err = pages.Decode(body, &archive, sess, a.store, maxArchive())
	} else {
		*st, err = pages.DecodeMemory(body, &archive, sess, a.store, maxArchive(), &lr.mem)
	}
	if err != nil {
		lr.unpin()
		return nil, nil, err
	}
	began := time.Now()
	if err := lr.setUp(ctx, archive.Bytes(), lazyFillDeadline(lr.mem.Bytes())); err != nil {
		lr.stop(true) // a failed set-up: its logs are kept
		return nil, nil, err
	}
	lr.setupTook = time.Since(began)
	return lr, archive.Bytes(), nil
}

func (lr *lazyRestore) setUp(ctx context.Context, archive []byte, deadline time.Duration) error {
	if err := os.RemoveAll(lr.dir); err != nil {
		return err
	}
	if err := os.MkdirAll(lr.dir, 0o700); err != nil {
		return err
	}
	t0 := time.Now()
	if err := extractCheckpoint(archive, lr.dir); err != nil {
		return err
	}
	var port string
	var err error
	var images, server time.Duration
	if lr.postcopy != nil {
		port, err = lr.startPostcopyServer()
	} else if lr.streamed {
		// The dump's own pagemaps (lazy entries) and pages images (the rest) are in
		// the archive: nothing to write.
		port, err = lr.startServer(deadline)
		server = time.Since(t0)
	} else {
		if _, err := lr.mem.WriteImages(lr.dir, lr.a.store, true); err != nil {
			return err
		}
		images = time.Since(t0)
		port, err = lr.startServer(deadline)
		server = time.Since(t0) - images
	}
	if err != nil {
		return err
	}
	daemonAt := time.Now()
	defer func() {
		slog.Debug("lazy set-up", "container", lr.name, "images", images, "page server started", server, "daemon listening", time.Since(daemonAt))
	}()
	lr.daemon = exec.Command("criu", "lazy-pages", "-D", lr.dir, "-W", lr.dir, "-o", "lazy-pages.log",
		"--page-server", "--address", "127.0.0.1", "--port", port)
	var stderr bytes.Buffer
	lr.daemon.Stderr = &stderr
	// Its own session, as the page server's: a signal to the agent's process group must
	// not take the daemon down mid-fill.
	lr.daemon.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := lr.daemon.Start(); err != nil {
		return fmt.Errorf("criu lazy-pages: %w", err)
	}
	go func() {
		err := lr.daemon.Wait()
		if err != nil {
			err = fmt.Errorf("criu lazy-pages: %w: %s%s", err, strings.TrimSpace(stderr.String()), criuErrors(filepath.Join(lr.dir, "lazy-pages.log")))
		}
		lr.exited <- err
	}()
	sock := filepath.Join(lr.dir, "lazy-pages.socket")
	// Polled every millisecond: it listens 5-13 ms after its start, in the frozen phase.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-lr.exited:
			lr.exited <- err
			return fmt.Errorf("criu lazy-pages ended before it listened: %v", err)
		case <-ctx.Done():
			return context.Cause(ctx)
		default:
		}
		if time.Now().After(deadline) {
			return errors.New("criu lazy-pages did not listen within 10 s")
		}
	}
	ml, release, err := prepareMasks(lr.name, lr.dir)
	if err != nil {
		return err
	}
	lr.releaseMasks = release
	lines := append([]string{"lazy-pages", "images-dir " + lr.dir, "work-dir " + lr.dir}, ml...)
	if lr.gate != nil {
		lr.gate.open(lines)
		return nil
	}
	return writeCRIUConfig(lr.name, lines...)
}

// startPostcopyServer answers the daemon from this agent: the pages arrive from the
// source while it asks.
func (lr *lazyRestore) startPostcopyServer() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("lazy page server: %w", err)
	}
	lr.serverDone = make(chan error, 1)
	done := make(chan struct{})
	goSafe("post-copy ticker", func() { lr.postcopy.ticker(done) }, nil)
	goSafe("post-copy page server", func() {
		defer close(done)
		defer ln.Close()
		conn, err := ln.Accept()
		if err != nil {
			lr.serverDone <- err
			return
		}
		defer conn.Close()
		lr.serverDone <- pageserver.Serve(context.Background(), conn, lr.postcopy, pageserver.ServeOptions{})
	}, nil)
	lr.closeServer = func() { ln.Close() }
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), nil
}

// startServer starts the process that answers the daemon (migrate lazy-serve, in its
// own session so that it outlives this agent) and returns its port.
func (lr *lazyRestore) startServer(deadline time.Duration) (string, error) {
	index := filepath.Join(lr.dir, "lazy-index")
	if !lr.streamed {
		if err := writeLazyIndex(index, &lr.mem, lr.a.store); err != nil {
			return "", fmt.Errorf("lazy page index: %w", err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("lazy page server: %w", err)
	}
	defer ln.Close()
	lf, err := ln.(*net.TCPListener).File()
	if err != nil {
		return "", err
	}
	defer lf.Close()
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	logDir := filepath.Join(lr.a.cfg.StateDir, "logs")
	os.MkdirAll(logDir, 0o755)
	logf, err := os.Create(filepath.Join(logDir, "lazy-serve-"+lr.name+".log"))
	if err != nil {
		return "", err
	}
	defer logf.Close()
	lr.server = exec.Command(exe, "lazy-serve", "--index", index, "--store", lr.a.store.Dir(), "--deadline", deadline.String())
	var pr *os.File
	if lr.streamed {
		lr.server.Args = []string{exe, "lazy-serve", "--follow", "--hold", "--store", lr.a.store.Dir(), "--deadline", deadline.String()}
		if pr, lr.indexW, err = os.Pipe(); err != nil {
			return "", err
		}
		defer pr.Close()
		lr.server.Stdin = pr
	}
	lr.server.ExtraFiles = []*os.File{lf}
	lr.server.Stdout, lr.server.Stderr = logf, logf
	lr.server.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := lr.server.Start(); err != nil {
		return "", fmt.Errorf("lazy page server: %w", err)
	}
	if lr.streamed {
		if lr.index, err = newLazyIndexWriter(lr.indexW); err != nil {
			return "", fmt.Errorf("lazy page server: %w", err)
		}
	}
	lr.serverDone = make(chan error, 1)
	go func() { lr.serverDone <- lr.server.Wait() }()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), nil
}

// restored: podman has answered. The configuration file goes at once; on success the
// daemon fills the memory in the background and everything is cleaned up when it ends.
func (lr *lazyRestore) restored(ok bool) {
	lr.removeConfig()
	if lr.releaseMasks != nil {
		lr.releaseMasks()
	}
	if !ok {
		lr.stop(true)
		return
	}
	goSafe("lazy fill", func() {
		d := lazyFillDeadline(lr.mem.Bytes())
		if lr.postcopy != nil {
			// Pages cross the link: its stall watchdog ends a fill that stops, not this.
			d = time.Hour
		}
		select {
		case err := <-lr.exited:
			if err != nil {
				// Pages it never filled would read as zeros now: the container must not
				// go on with them.
				slog.Error("lazy fill failed; the container is stopped", "container", lr.name, "err", err, "logs", lr.dir)
				if rerr := lr.a.podman.Remove(context.Background(), lr.name); rerr != nil {
					slog.Error("stop the container after a failed lazy fill", "container", lr.name, "err", rerr)
				}
				lr.stop(true)
				return
			}
			slog.Info("lazy fill done", "container", lr.name, "bytes", lr.mem.Bytes(), "since_restore_began", time.Since(lr.start))
			lr.stop(false)
		case <-time.After(d):
			// The container goes first: once its daemon ends, pages it never filled
			// would read as zeros.
			slog.Error("lazy fill did not end in time; the container and its daemon are stopped", "container", lr.name, "deadline", d)
			if rerr := lr.a.podman.Remove(context.Background(), lr.name); rerr != nil {
				slog.Error("stop the container after a lazy fill that did not end", "container", lr.name, "err", rerr)
			}
			lr.stop(true)
		}
	}, nil)
}

// lazyFillDeadline bounds the background fill: pages come from the local store.
func lazyFillDeadline(memBytes int64) time.Duration {
	return 2*time.Minute + time.Duration(memBytes/(20<<20))*time.Second
}

// stop ends the daemon (if it still runs: it is ours, by PID), the server and the pin,
// and removes the directory; keep (a failure) keeps the logs first.
func (lr *lazyRestore) stop(keep bool) {
	lr.removeConfig()
	if lr.releaseMasks != nil {
		lr.releaseMasks()
	}
	if lr.daemon != nil && lr.daemon.Process != nil {
		select {
		case err := <-lr.exited:
			lr.exited <- err
		default:
			lr.daemon.Process.Kill()
		}
	}
	if lr.closeServer != nil {
		lr.closeServer()
	}
	if lr.indexW != nil {
		lr.indexW.Close() // an index without its end: the server fails what waits
	}
	if lr.postcopy != nil {
		lr.a.mu.Lock()
		if lr.a.postcopies[lr.name] == lr.postcopy {
			delete(lr.a.postcopies, lr.name)
		}
		lr.a.mu.Unlock()
	}
	if lr.server != nil && lr.server.Process != nil {
		// After a fill it ends when the daemon closes its transfer; if not soon, it is
		// stopped (ours, by PID). After a failure it is stopped at once: the daemon may
		// never have connected (podman failed before CRIU restored anything), and the
		// answer to the source, which brings the container back there, waits for this.
		wait := 5 * time.Second
		if keep {
			wait = 0
		}
		select {
		case <-lr.serverDone:
		case <-time.After(wait):
			lr.server.Process.Kill()
			<-lr.serverDone
		}
	}
	lr.unpin()
	if keep {
		if dir := lr.a.keepLogs(lr.name, lr.dir, "restore.log", "lazy-pages.log"); dir != "" {
			slog.Info("CRIU logs kept", "container", lr.name, "dir", dir)
		}
	}
	os.RemoveAll(lr.dir)
}

// extractCheckpoint writes the archive's checkpoint/ images (regular files, flat) into dir.
func extractCheckpoint(archive []byte, dir string) error {
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("checkpoint archive: %w", err)
		}
		d, base := path.Split(strings.TrimPrefix(path.Clean(hdr.Name), "./"))
		if strings.TrimSuffix(d, "/") != "checkpoint" || hdr.Typeflag != tar.TypeReg || base == "" || base == "." || base == ".." {
			continue
		}
		f, err := os.OpenFile(filepath.Join(dir, base), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("checkpoint image %s: %w", base, err)
		}
	}
}

// criuErrors quotes the error lines of a CRIU log (empty if none, no log, or CRIU says it
// finished successfully).
func criuErrors(log string) string {
	b, err := os.ReadFile(log)
	if err != nil {
		return ""
	}
	if bytes.Contains(b, []byte("Dumping finished successfully")) || bytes.Contains(b, []byte("Restore finished successfully")) {
		return "" // CRIU did its part; the error lines it logs on the way are not the cause
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "Error") || strings.Contains(l, "rror (") {
			out = append(out, strings.TrimSpace(l))
		}
	}
	if len(out) > 5 {
		out = out[len(out)-5:]
	}
	if len(out) == 0 {
		return ""
	}
	return "; " + log + ": " + strings.Join(out, " | ")
}

const annotationCRIUConfig = checkpoint.AnnotationCRIUConfig

// The streamed restore (layout 'S' of a "stream" restore): the source sends CRIU's images
// as they are when its lazy page server listens, then the frozen memory. The target
// restores from the images at once, with a page server that is told of each page as it
// arrives (lazy-serve --follow) and makes a page the container touches before it has
// arrived wait for it. The restore's answer waits for the memory's end, so that the
// move is decided only once every page is here: afterwards the container never needs
// the source, as in every default-mode move.

// prepareStreamed decodes the images (returned as the archive podman imports), sets them
// up for a lazy restore and starts the page server and CRIU's lazy-pages daemon. The
// memory is then taken by receiveMemory.
//
// After a prelude (gate.go), podman imports it already and CRIU waits in gate: the
// images must carry the descriptors the prelude did (runc read those), and setUp opens
// the gate.
func (a *Agent) prepareStreamed(ctx context.Context, name string, br *bufio.Reader, sess *pages.Session, st *pages.Stats, gate *criuGate, descriptors []byte) (*lazyRestore, []byte, error) {
	lr := &lazyRestore{a: a, name: name, dir: a.lazyDir(name), exited: make(chan error, 1), unpin: a.store.Pin(), start: time.Now(), streamed: true, gate: gate}
	lr.mem.Counted = true // the index takes the names (receiveMemory)
	var archive bytes.Buffer
	var err error
	if *st, err = pages.Decode(br, &archive, sess, a.store, maxArchive()); err != nil {
		lr.unpin()
		return nil, nil, err
	}
	began := time.Now()
	slog.Debug("CRIU's images received", "container", name, "took", began.Sub(lr.start), "bytes", archive.Len())
	if gate != nil {
		if got, ok := tarFile(archive.Bytes(), "checkpoint/"+descriptorsFile); !ok || !bytes.Equal(got, descriptors) {
			lr.unpin()
			return nil, nil, fmt.Errorf("the images' %s is not the prelude's, which runc restores with", descriptorsFile)
		}
	}
	if err := lr.setUp(ctx, archive.Bytes(), lazyFillDeadline(int64(sess.Len())*pages.Size+64<<20)); err != nil {
		lr.stop(true) // a failed set-up: its logs are kept
		return nil, nil, err
	}
	lr.setupTook = time.Since(began)
	return lr, archive.Bytes(), nil
}

// receiveMemory takes the frozen memory from br while podman restores: each lazy page is
// filed with the page server as it arrives. The index is ended by release, once podman's
// import has returned too.
func (lr *lazyRestore) receiveMemory(br *bufio.Reader, sess *pages.Session, st *pages.Stats) error {
	filed := false
	mst, err := pages.DecodeMemoryFunc(br, io.Discard, sess, lr.a.store, maxArchive(), &lr.mem,
		func(kind int, id uint64, flags uint32, vaddr uint64, _ []pages.Hash, locs []pages.PageLoc) error {
			if kind != pages.KindProcess || flags&pages.FlagLazy == 0 {
				return nil // in the images already
			}
			if err := lr.index.run(id, vaddr, locs); err != nil {
				return err
			}
			if !filed {
				filed = true
				return fault("target-stream") // podman restores meanwhile
			}
			return nil
		})
	st.AddPages(mst)
	if err != nil {
		return fmt.Errorf("the memory: %w", err)
	}
	if mst.ArchiveBytes != 0 {
		return fmt.Errorf("the memory: an archive of %d bytes after it, where none belongs", mst.ArchiveBytes)
	}
	return nil
}

// release ends the index of a streamed restore whose memory is complete and whose
// import returned: CRIU's background fill is answered from then on, and the page server
// needs nothing more of this agent.
func (lr *lazyRestore) release() error {
	if err := lr.index.end(); err != nil {
		return fmt.Errorf("the memory's index: %w", err)
	}
	return lr.indexW.Close() // twice is harmless (stop closes it too)
}
