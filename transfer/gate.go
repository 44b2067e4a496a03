package transfer

// The gated import of a streamed restore: the target's podman starts restoring while CRIU
// still dumps on the source.
//
// Of the target's part of the frozen phase, podman's import before CRIU (the archive
// unpacked, the container created in podman's database and storage, its network, conmon,
// runc and its CRIU version check, runc's mounts) needs none of CRIU's images: only
// podman's own files (config.dump, spec.dump, written when its checkpoint begins), the
// container's log and the descriptors runc records before CRIU dumps
// (checkpoint/descriptors.json, which runc reads before it calls CRIU; the agent reads
// them as runc does). All of them are here about 8 ms after the freeze, while CRIU's dump
// runs for another 100 ms. So the source sends them first, as a prelude, and the
// target starts podman's import at once; CRIU on the target then waits for its images
// in the one place where it reads something of this agent's before any image: the
// CRIU configuration file runc names to it (the container's org.criu.config
// annotation), which CRIU opens and reads to its end when it starts (criu/config.c,
// parse_config: fopen and getline). The agent puts a FIFO there: CRIU's open waits
// until a writer comes, and the agent writes the file's lines only once the images are
// set up for the lazy restore (or a line CRIU rejects, which fails the restore, if they
// never come). Podman, runc and CRIU are never driven directly: podman's restore runs
// as always and only reads its configuration file later than it would.
//
// The prelude is sent only where the target would restore early anyway (the early check
// answered before it: nothing in the root file system or /dev/shm that podman's archive
// would carry). A source that sent one and then cannot stream the images fails the move
// (the container runs on here) rather than have the target switch paths.

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// descriptorsFile is runc's record of the container's standard descriptors, written into
// the images directory before CRIU dumps and read by runc before CRIU restores.
const descriptorsFile = "descriptors.json"

// maxPrelude bounds a prelude (podman's two files, the descriptors and the container's
// log): the target holds it in memory.
const maxPrelude = 64 << 20

// preludeWait bounds the wait for podman's files once its checkpoint began, and
// preludeCheckWait the early check's answer after them: the prelude is only worth
// sending well before CRIU listens, and the hand-over waits for it (a podman that
// writes its files late costs at most preludeWait, and then goes without a prelude).
const (
	preludeWait      = 300 * time.Millisecond // podman wrote its files ~7 ms after the freeze here
	preludeCheckWait = 40 * time.Millisecond
)

// statMtime is the modification time of path (zero if it does not exist).
func statMtime(path string) time.Time {
	if fi, err := os.Stat(path); err == nil {
		return fi.ModTime()
	}
	return time.Time{}
}

// stdDescriptors is what runc writes as descriptors.json before CRIU dumps the
// container whose first process is pid (libcontainer's getPipeFds): where its
// descriptors 0, 1 and 2 lead, as /proc tells, "" for one it may not read. Taken here,
// while the container is frozen, it need not wait for runc: the target compares it with
// runc's own, which the images carry, and a difference fails the restore.
func stdDescriptors(pid int) ([]byte, error) {
	if pid <= 0 {
		return nil, errors.New("the container's first process is not known")
	}
	fds := make([]string, 3)
	for i := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, i))
		if errors.Is(err, fs.ErrPermission) {
			continue
		}
		if err != nil {
			return nil, err
		}
		fds[i] = target
	}
	return json.Marshal(fds)
}

// waitFresh waits for podman to write path (a file whose modification time is not
// before's, which is what an earlier checkpoint left, or zero) as a whole JSON document:
// podman writes config.dump and then spec.dump before it calls the runtime. It gives up
// when podman's checkpoint ended (exported), ctx ends or preludeWait has passed.
func waitFresh(ctx context.Context, path string, before time.Time, exported <-chan struct{}) error {
	deadline := time.Now().Add(preludeWait)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Size() > 0 && (before.IsZero() || !fi.ModTime().Equal(before)) {
			if b, err := os.ReadFile(path); err == nil && json.Valid(b) {
				return nil
			}
		}
		select {
		case <-exported:
			return fmt.Errorf("podman's checkpoint ended before it wrote %s", filepath.Base(path))
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(500 * time.Microsecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("podman wrote no %s within %s", filepath.Base(path), preludeWait)
		}
	}
}

// prelude is the archive the target's podman imports before CRIU's images exist:
// podman's config.dump and spec.dump, the container's log, runc's descriptors and an
// empty checkpoint/inventory.img (podman only checks that it exists; CRIU reads the
// images from the lazy restore's directory, which the configuration file names, and
// an empty inventory fails a CRIU that looked here instead).
func (d *lazyDump) prelude(descriptors []byte) ([]byte, error) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	put := func(name string, data []byte) error { return tarPut(tw, name, data) }
	for _, f := range []string{"config.dump", "spec.dump", logFile} {
		data, err := os.ReadFile(filepath.Join(d.static, f))
		if f == logFile && errors.Is(err, fs.ErrNotExist) {
			continue // no k8s-file log
		}
		if err == nil {
			err = put(f, data)
		}
		if err != nil {
			return nil, fmt.Errorf("prelude: %w", err)
		}
	}
	if err := tw.WriteHeader(&tar.Header{Name: "checkpoint/", Mode: 0o700, Typeflag: tar.TypeDir}); err != nil {
		return nil, err
	}
	if err := put("checkpoint/"+descriptorsFile, descriptors); err != nil {
		return nil, err
	}
	if err := put("checkpoint/inventory.img", nil); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if b.Len() > maxPrelude {
		return nil, fmt.Errorf("prelude of %d bytes (the container's log?), over %d", b.Len(), maxPrelude)
	}
	return b.Bytes(), nil
}

// sendPrelude writes the gated import's prelude to w (and flushes it out of the link's
// compressor) once runc wrote its descriptors and the early check found nothing that
// podman's archive would carry. Not sent, it says why; err is a failed write.
func (a *Agent) sendPrelude(ctx context.Context, ld *lazyDump, before time.Time, exported <-chan struct{}, check *earlyCheck, w io.Writer) (sent bool, why string, err error) {
	desc, err := stdDescriptors(ld.pid)
	if err != nil {
		return false, "runc's descriptors: " + err.Error(), nil
	}
	if err := waitFresh(ctx, filepath.Join(ld.static, "spec.dump"), before, exported); err != nil {
		return false, err.Error(), nil
	}
	if p, ok := check.within(preludeCheckWait); !ok {
		return false, "the early check had not answered when runc had written its descriptors", nil
	} else if p != "" {
		return false, p, nil
	}
	archive, err := ld.prelude(desc)
	if err != nil {
		return false, err.Error(), nil
	}
	if err := writePrelude(w, archive); err != nil {
		return true, "", err
	}
	return true, "", flushLink(w)
}

// writePrelude frames a prelude in a streamed body: 'P', its length (u32, big-endian),
// the archive and its SHA-256.
func writePrelude(w io.Writer, archive []byte) error {
	var hdr [5]byte
	hdr[0] = 'P'
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(archive)))
	sum := sha256.Sum256(archive)
	for _, b := range [][]byte{hdr[:], archive, sum[:]} {
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// readPrelude reads a prelude's length, archive and digest after its 'P'. Its length is
// bounded (maxPrelude) and memory grows only with what arrives.
func readPrelude(r io.Reader) ([]byte, error) {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return nil, fmt.Errorf("prelude: %w", err)
	}
	size := binary.BigEndian.Uint32(n[:])
	if size > maxPrelude {
		return nil, fmt.Errorf("prelude of %d bytes, over %d", size, maxPrelude)
	}
	var b bytes.Buffer
	if _, err := io.CopyN(&b, r, int64(size)); err != nil {
		return nil, fmt.Errorf("prelude: %w", noEOF(err))
	}
	var sum [sha256.Size]byte
	if _, err := io.ReadFull(r, sum[:]); err != nil {
		return nil, fmt.Errorf("prelude: %w", noEOF(err))
	}
	if sha256.Sum256(b.Bytes()) != sum {
		return nil, fmt.Errorf("prelude: %w", errDigest)
	}
	return b.Bytes(), nil
}

// noEOF turns a clean end where more was due into an unexpected one.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// tarFile returns the regular file name of a tar archive (nil, false if it has none).
func tarFile(archive []byte, name string) ([]byte, bool) {
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		hdr, err := tr.Next()
		if err != nil {
			return nil, false
		}
		if hdr.Typeflag == tar.TypeReg && strings.TrimPrefix(hdr.Name, "./") == name {
			b, err := io.ReadAll(io.LimitReader(tr, maxPrelude))
			return b, err == nil
		}
	}
}

// gateRefusal is what a gate that will not open gives CRIU: an option CRIU does not
// know, so that its restore fails at once (and podman's with it).
const gateRefusal = "migrate-restore-withdrawn"

// criuGate is the FIFO at a container's CRIU configuration path that holds CRIU on the
// target until its images are set up (see the top of this file). Once decided, the
// content replaces the FIFO as a regular file (CRIU may read its configuration more
// than once; a later read must neither wait nor find the lines twice), and the one
// reader that waits in the FIFO, if any, is answered through it: by the FIFO's own
// inode, held open with O_PATH, so that a reader that looked the path up just before
// the file replaced it is answered too. A FIFO is answered once: a second writer
// would join a reader still reading.
type criuGate struct {
	name    string
	path    string
	fifo    int // O_PATH descriptor of the FIFO
	mu      sync.Mutex
	content []byte        // what a reader reads, once decided
	decided chan struct{} // closed by open or refuse
	stop    chan struct{} // closed by close
	done    chan struct{} // the server ended
	waited  bool          // a reader waited in the FIFO and was answered
	once    sync.Once
}

// newCRIUGate puts a FIFO at the container's CRIU configuration path and serves it.
func newCRIUGate(name string) (*criuGate, error) { return newGateAt(name, CRIUConfigPath(name)) }

func newGateAt(name, path string) (*criuGate, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("CRIU configuration: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("CRIU configuration: %w", err)
	}
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return nil, fmt.Errorf("CRIU configuration gate: %w", err)
	}
	fd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("CRIU configuration gate: %w", err)
	}
	g := &criuGate{name: name, path: path, fifo: fd, decided: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	goSafe("CRIU configuration gate", g.serve, func(any) { close(g.done) })
	return g, nil
}

// open lets CRIU go on with these configuration lines (and criuNetworkLock, as every
// file the agent writes).
func (g *criuGate) open(lines []string) {
	g.decide([]byte(strings.Join(append(lines, criuNetworkLock), "\n") + "\n"))
}

// refuse fails the restore: CRIU reads an option it rejects.
func (g *criuGate) refuse() { g.decide([]byte(gateRefusal + "\n")) }

func (g *criuGate) decide(content []byte) {
	g.once.Do(func() {
		if err := replaceFile(g.path, 0o644, func(w io.Writer) error { _, err := w.Write(content); return err }); err != nil {
			slog.Warn("CRIU configuration gate: the file", "container", g.name, "err", err)
		}
		g.mu.Lock()
		g.content = content
		g.mu.Unlock()
		close(g.decided)
	})
}

// serve answers the reader waiting in the FIFO, once it is decided, until close. It
// opens the FIFO for writing without blocking: that succeeds only while a reader
// (CRIU) waits in its open, so it is tried every millisecond.
func (g *criuGate) serve() {
	defer close(g.done)
	select {
	case <-g.decided:
	case <-g.stop:
		return
	}
	for !g.serveOnce() {
		select {
		case <-g.stop:
			return
		case <-time.After(time.Millisecond):
		}
	}
}

// serveOnce writes the content to a reader waiting in the FIFO, if there is one.
func (g *criuGate) serveOnce() bool {
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", g.fifo), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return false // ENXIO: nobody waits
	}
	g.mu.Lock()
	content := g.content
	g.waited = true
	g.mu.Unlock()
	// Blocking from here: the content is small, and the reader reads it to its end (a
	// reader that died meanwhile makes it fail, not wait).
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return true
	}
	f := os.NewFile(uintptr(fd), g.path)
	if _, err := f.Write(content); err != nil {
		slog.Warn("CRIU configuration gate: write", "container", g.name, "err", err)
	}
	f.Close()
	return true
}

// readerWaited says whether CRIU waited in the gate (it came before the images).
func (g *criuGate) readerWaited() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waited
}

// close refuses if nothing was decided, stops serving and removes the file. Called once
// podman's import has returned (CRIU has ended), or when it never started.
func (g *criuGate) close() {
	g.refuse() // no-op once decided
	select {
	case <-g.stop:
	default:
		close(g.stop)
	}
	<-g.done
	if !g.readerWaited() {
		g.serveOnce() // one who came at the last moment
	}
	unix.Close(g.fifo)
	if err := os.Remove(g.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		slog.Warn("CRIU configuration gate", "container", g.name, "err", err)
	}
}

// releaseGate is an agent's start's answer to a gate an earlier agent left: the FIFO
// becomes a file that refuses, and a CRIU that waits in it is refused through its
// inode (its restore fails, and the move is undone as any other).
func releaseGate(path string) {
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
		return
	}
	fifo, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(fifo)
	replaceFile(path, 0o644, func(w io.Writer) error { _, err := io.WriteString(w, gateRefusal+"\n"); return err })
	for end := time.Now().Add(100 * time.Millisecond); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fifo), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if errors.Is(err, syscall.ENXIO) {
			continue
		}
		if err != nil {
			return
		}
		unix.Write(fd, []byte(gateRefusal+"\n"))
		unix.Close(fd)
		slog.Warn("refused a CRIU restore that waited in a gate an earlier agent left", "file", path)
		return
	}
}

// releaseLazyDump is an agent's start's answer to a lazy dump an earlier agent left
// behind between podman's checkpoint and its connection to CRIU's lazy page server (the
// configuration file at path names its port): CRIU would wait for that connection for
// ever, the container frozen and podman's checkpoint with it. The agent connects and
// resets the connection (linger 0), as a failing move does: CRIU fails the dump, the
// container runs on, and the recovery that follows finds it as after any failed dump.
// It waits for CRIU's listening at most wait, and only while criuRuns.
func releaseLazyDump(path string, wait time.Duration, criuRuns func() bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	var port string
	lazy, local := false, false
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 1 && f[0] == "lazy-pages":
			lazy = true
		case len(f) == 2 && f[0] == "address" && f[1] == "127.0.0.1":
			local = true
		case len(f) == 2 && f[0] == "port":
			port = f[1]
		}
	}
	if !lazy || !local || port == "" {
		return // not a lazy dump's (a restore's names its images instead)
	}
	for end := time.Now().Add(wait); time.Now().Before(end) && criuRuns(); time.Sleep(20 * time.Millisecond) {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 200*time.Millisecond)
		if err != nil {
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
		slog.Warn("reset the lazy dump an earlier agent left waiting: CRIU fails it and the container runs on", "file", path, "port", port)
		return
	}
}

// criuRuns says whether a process named criu runs on this host.
func criuRuns() bool {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return true // cannot tell: try
	}
	for _, e := range ents {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		if comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm")); err == nil && strings.TrimSpace(string(comm)) == "criu" {
			return true
		}
	}
	return false
}
