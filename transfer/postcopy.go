package transfer

// Post-copy (push --postcopy): the container resumes on the target before the pages it
// changed since the last pre-copy round have crossed. CRIU dumps it with lazy pages (the
// container's CRIU configuration file says `lazy-pages` and a loopback port): once the
// rest of its state is written, CRIU serves its memory on that port and waits, the
// container frozen, until every page has been fetched. The source agent sends the target
// the images as they are then (the archive podman would write only at the very end),
// and after the target restored the container, pumps every page from CRIU to the target
// (references to pages it holds, deltas, new pages), the pages the target's daemon waits
// for first. A source or link failure in that phase loses the container: the target
// stops it rather than let it run on pages it never got.

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/overlaynet"
	"github.com/migrate-project/migrate/pages"
	"github.com/migrate-project/migrate/pageserver"
)

// postcopyStall: a target whose daemon waits this long without a page arriving gives the
// container up.
const postcopyStall = 30 * time.Second

// pcRun is a run of a process's lazy pages, as its pagemap image lists them.
type pcRun struct {
	pid, vaddr, n uint64
}

// lazyRunsIn reads the lazy entries (lazy, not in the pages images) of a checkpoint's
// process pagemaps.
func lazyRunsIn(dir string) ([]pcRun, error) {
	ms, err := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	if err != nil {
		return nil, err
	}
	var out []pcRun
	for _, m := range ms {
		pid, ok := pages.IsPageMap("checkpoint/" + filepath.Base(m))
		if !ok {
			continue // pagemap-shmem-*: not lazy
		}
		img, err := os.ReadFile(m)
		if err != nil {
			return nil, err
		}
		es, err := pages.PageMapEntries(pid, img)
		if err != nil {
			return nil, err
		}
		for _, e := range es {
			if e.Flags&pages.FlagLazy != 0 && e.Flags&pages.FlagPresent == 0 {
				out = append(out, pcRun{uint64(pid), e.Vaddr, e.Pages})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].pid != out[j].pid {
			return out[i].pid < out[j].pid
		}
		return out[i].vaddr < out[j].vaddr
	})
	return out, nil
}

// lazyDump is the source's side: CRIU's lazy page server for one dump.
type lazyDump struct {
	name   string
	port   int
	dir    string // the checkpoint's images (the container's userdata/checkpoint)
	static string // the container's userdata
	pid    int    // the container's first process (the gated import's prelude)
	conn   net.Conn
	pc     *pageserver.Client
	runs   []pcRun

	store *pages.Store // every page fetched goes here too (a rollback restores from it)
	// listened, if set, runs once CRIU's lazy page server answers (the read hand-over):
	// every image is written then.
	listened func()
	// deferEnd, set by listened: the hand-over leaves CRIU's transfer open, and keeps
	// the memory beside the target's restore (kept is closed once it has, keptErr and
	// keptIn then set); endDump closes it once the target restored (handover.go).
	deferEnd bool
	kept     chan struct{}
	keptErr  error
	keptIn   time.Duration
	// decided: the move is committed; the post-copy phase proper has begun.
	decided atomic.Bool
	pumpMu  sync.Mutex // one pump at a time on CRIU's connection

	mu     sync.Mutex
	hashes map[pageAddr]pages.Hash // pages fetched, by address
	wants  []pcRun
	wake   chan struct{}
}

func startLazyDump(name, staticDir string, store *pages.Store, extra []string) (*lazyDump, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close() // CRIU listens there
	if err := writeCRIUConfig(name, append([]string{"lazy-pages", "address 127.0.0.1", "port " + strconv.Itoa(port)}, extra...)...); err != nil {
		return nil, err
	}
	return &lazyDump{name: name, port: port, static: staticDir, dir: filepath.Join(staticDir, "checkpoint"), store: store,
		hashes: map[pageAddr]pages.Hash{}, wake: make(chan struct{}, 1)}, nil
}

// connect waits for CRIU's page server: the rest of the dump is then written.
func (d *lazyDump) connect(ctx context.Context, exported <-chan struct{}) error {
	defer removeCRIUConfig(d.name)
	addr := "127.0.0.1:" + strconv.Itoa(d.port)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			d.conn, d.pc = c, pageserver.NewClient(c)
			break
		}
		select {
		case <-exported:
			return errors.New("CRIU's lazy page server never listened: the runtime ignored the container's CRIU configuration file, or the dump failed")
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(5 * time.Millisecond):
		}
	}
	runs, err := lazyRunsIn(d.dir)
	if err != nil {
		return fmt.Errorf("lazy pagemaps: %w", err)
	}
	d.runs = runs
	return nil
}

// archive is what podman would export, as it is while CRIU waits: config.dump, spec.dump,
// the checkpoint images and the container's log. (Podman writes its own archive only after every page was
// fetched; what it adds then, the root file system's changes, does not travel: a
// container that writes to its root file system must not move with --postcopy.)
// After a prelude (gate.go) the target has podman's files and the log already: imagesOnly
// leaves them out.
func (d *lazyDump) archive(imagesOnly bool) ([]byte, error) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	add := func(path, name string) error {
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return tarPut(tw, name, data)
	}
	if !imagesOnly {
		for _, f := range []string{"config.dump", "spec.dump"} {
			if err := add(filepath.Join(d.static, f), f); err != nil {
				return nil, fmt.Errorf("post-copy archive: %w", err)
			}
		}
		// The container's log, where it has one (k8s-file), as podman's archive carries it.
		if err := add(filepath.Join(d.static, logFile), logFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("checkpoint archive: %w", err)
		}
	}
	ents, err := os.ReadDir(d.dir)
	if err != nil {
		return nil, err
	}
	tw.WriteHeader(&tar.Header{Name: "checkpoint/", Mode: 0o700, Typeflag: tar.TypeDir})
	for _, e := range ents {
		if e.Type().IsRegular() {
			if err := add(filepath.Join(d.dir, e.Name()), "checkpoint/"+e.Name()); err != nil {
				return nil, fmt.Errorf("post-copy archive: %w", err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// tarPut writes a regular file of an archive the agent builds.
func tarPut(tw *tar.Writer, name string, data []byte) error {
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}

// want asks for pages first (the target's daemon waits for them).
func (d *lazyDump) want(r pcRun) {
	d.mu.Lock()
	if len(d.wants) < 4096 {
		d.wants = append(d.wants, r)
	}
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// pump fetches every lazy page from CRIU not fetched yet, wanted ones first, keeps it in
// the store and hands it to batch in batches of entries (each a run of pages fetched at
// once). Once all are fetched it closes CRIU's transfer, which lets the dump finish.
func (d *lazyDump) pump(ctx context.Context, batch func(entries []pcRun, data []byte) error) error {
	d.pumpMu.Lock()
	defer d.pumpMu.Unlock()
	const maxBatch = 4096 // pages
	buf := make([]byte, 512*pages.Size)
	hs := make([]pages.Hash, 512)
	var entries []pcRun
	var data []byte
	flush := func() error {
		if len(entries) == 0 {
			return nil
		}
		err := batch(entries, data)
		entries, data = entries[:0], data[:0]
		return err
	}
	fetched := func(pid, at uint64) bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		_, ok := d.hashes[pageAddr{int(pid), at}]
		return ok
	}
	// fetch gets the pages of r not fetched yet.
	fetch := func(r pcRun) error {
		for i := uint64(0); i < r.n; {
			at := r.vaddr + i*pages.Size
			if fetched(r.pid, at) {
				i++
				continue
			}
			j := i + 1 // the run of pages not fetched yet
			for j < r.n && j-i < 512 && !fetched(r.pid, r.vaddr+j*pages.Size) {
				j++
			}
			n, err := d.pc.Get(r.pid, at, buf[:(j-i)*pages.Size])
			if err != nil {
				return err
			}
			page := buf[:n*pages.Size]
			pages.SumAll(page, hs[:n])
			if err := d.store.AddTrusted(hs[:n], page); err != nil {
				return err
			}
			d.mu.Lock()
			for k := 0; k < n; k++ {
				d.hashes[pageAddr{int(r.pid), at + uint64(k)*pages.Size}] = hs[k]
			}
			d.mu.Unlock()
			entries = append(entries, pcRun{r.pid, at, uint64(n)})
			data = append(data, page...)
			i += uint64(n)
			if len(data)/pages.Size >= maxBatch {
				if err := flush(); err != nil {
					return err
				}
			}
		}
		return nil
	}
	nextWant := func() (pcRun, bool) {
		d.mu.Lock()
		defer d.mu.Unlock()
		if len(d.wants) == 0 {
			return pcRun{}, false
		}
		w := d.wants[0]
		d.wants = d.wants[1:]
		return w, true
	}
	// With a fault armed in the post-copy phase (tests), the pages the restore waits for
	// are served but the rest held until the decision, so that the fault lands after it.
	holdUntil := time.Time{}
	if len(faultsAt("source-postcopy")) > 0 {
		holdUntil = time.Now().Add(30 * time.Second)
	}
	for _, r := range d.runs {
		// A run in pieces, so that wanted pages overtake it.
		for off := uint64(0); off < r.n; {
			for {
				w, ok := nextWant()
				if !ok {
					break
				}
				if err := fetch(w); err != nil {
					return err
				}
				if err := flush(); err != nil { // wanted pages go at once
					return err
				}
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			if !d.decided.Load() && time.Now().Before(holdUntil) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			if err := fetch(pcRun{r.pid, r.vaddr + off*pages.Size, min(512, r.n-off)}); err != nil {
				return err
			}
			off += 512
			if d.decided.Load() {
				if err := fault("source-postcopy"); err != nil {
					return err
				}
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	err := d.pc.Close()
	// CRIU's page server waits for this side to hang up before its dump ends.
	d.conn.Close()
	return err
}

func (d *lazyDump) close() {
	removeCRIUConfig(d.name)
	if d.conn != nil {
		d.conn.Close()
	}
}

// sendPostcopyBatch sends pumped pages to the target as a memory stream: entries and
// their pages, by reference where the target holds them.
func (l *link) sendPostcopyBatch(ctx context.Context, p *Peer, container, move string, sess *pages.Session, seen *lastSent, store *pages.Store,
	entries []pcRun, data []byte) (int64, error) {
	body, enc, wait := l.body(ctx, func(w io.Writer) error {
		mw := pages.NewMemoryWriter(w, sess, pages.EncodeOptions{Base: seen.base, Sent: func(hs []pages.Hash, p []byte) {
			store.AddTrusted(hs, p)
		}})
		off := 0
		for _, e := range entries {
			if err := mw.Entry(pages.KindProcess, e.pid, e.vaddr, e.n, pages.FlagPresent|pages.FlagLazy); err != nil {
				return err
			}
			if err := mw.Pages(e.vaddr, data[off:off+int(e.n)*pages.Size]); err != nil {
				return err
			}
			off += int(e.n) * pages.Size
		}
		_, _, err := mw.Close()
		return err
	})
	var wire int64
	err := p.send(ctx, withQuery(PathPostcopyPages, "container", container, "move", move), body, encodingHeader(enc), nil, func(n int64) { wire = n; l.kick() }, &struct{}{})
	if werr := wait(); err == nil && werr != nil && werr != io.ErrClosedPipe {
		err = werr
	}
	return wire, err
}

// postcopyIn is the target's side: which lazy pages have arrived, for the daemon's
// requests, which wait for pages still on their way (and ask the source for them first).
type postcopyIn struct {
	a      *Agent
	name   string
	move   string
	source string
	sess   *pages.Session
	stall  time.Duration
	ep     overlaynet.Endpoint

	mu      sync.Mutex
	cond    *sync.Cond
	arrived map[pageAddr]pages.Hash
	last    time.Time // the last arrival
	failed  error
}

func newPostcopyIn(a *Agent, name, move, source string, ep overlaynet.Endpoint, sess *pages.Session, stall time.Duration) *postcopyIn {
	p := &postcopyIn{a: a, name: name, move: move, source: source, ep: ep, sess: sess, stall: stall, arrived: map[pageAddr]pages.Hash{}, last: time.Now()}
	p.cond = sync.NewCond(&p.mu)
	return p
}

// take records a batch of pages that arrived.
func (p *postcopyIn) take(m *pages.Memory) {
	p.mu.Lock()
	for _, mm := range m.Maps {
		for _, e := range mm.Entries {
			for k := uint64(0); k < e.Pages; k++ {
				p.arrived[pageAddr{int(mm.ID), e.Vaddr + k*pages.Size}] = m.Hashes[e.First+int(k)]
			}
		}
	}
	p.last = time.Now()
	p.mu.Unlock()
	p.cond.Broadcast()
}

// ReadPages answers the daemon: it waits for the first page (asking the source for it),
// then serves it and the pages after it that have arrived.
func (p *postcopyIn) ReadPages(pid, vaddr uint64, buf []byte) (int, error) {
	want := uint64(len(buf) / pages.Size)
	p.mu.Lock()
	_, ok := p.arrived[pageAddr{int(pid), vaddr}]
	p.mu.Unlock()
	if !ok {
		goSafe("post-copy want", func() {
			c, err := p.a.peer(p.source)
			if err == nil {
				err = c.Call(context.Background(), PathPostcopyWant, PostcopyWant{Container: p.name, Move: p.move, PID: pid, Vaddr: vaddr, Pages: want}, nil)
			}
			if err != nil {
				slog.Debug("post-copy want", "container", p.name, "err", err)
			}
		}, nil)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if p.failed != nil {
			return 0, p.failed
		}
		if _, ok := p.arrived[pageAddr{int(pid), vaddr}]; ok {
			break
		}
		if time.Since(p.last) > p.stall {
			p.failed = fmt.Errorf("post-copy: no page from %s for %s; %s is stopped (its memory cannot be completed)", p.source, p.stall, p.name)
			// The container goes before the daemon learns of the failure: once the
			// daemon ends, the kernel would give it zero pages instead of its memory.
			p.mu.Unlock()
			slog.Error("post-copy failed", "container", p.name, "err", p.failed)
			if err := p.a.podman.Remove(context.Background(), p.name); err != nil {
				slog.Error("post-copy: stop the container", "container", p.name, "err", err)
			} else if err := p.a.ovs.Unplumb(context.Background(), p.ep); err != nil {
				slog.Error("post-copy: remove the container's endpoint", "container", p.name, "err", err)
			}
			p.mu.Lock()
			return 0, p.failed
		}
		p.cond.Wait()
	}
	var hs []pages.Hash
	for k := uint64(0); k < want; k++ {
		h, ok := p.arrived[pageAddr{int(pid), vaddr + k*pages.Size}]
		if !ok {
			break
		}
		hs = append(hs, h)
	}
	if err := p.a.store.Read(hs, buf[:len(hs)*pages.Size]); err != nil {
		return 0, err
	}
	return len(hs), nil
}

// ticker wakes waiting requests so that they notice a stall.
func (p *postcopyIn) ticker(done <-chan struct{}) {
	tickUntil(done, 200*time.Millisecond, func() bool { p.cond.Broadcast(); return false })
}

// postcopyPages takes a batch of pumped pages (the source's call).
func (a *Agent) postcopyPages(r *http.Request) (any, error) {
	name := r.URL.Query().Get("container")
	a.mu.Lock()
	p := a.postcopies[name]
	a.mu.Unlock()
	if p == nil || p.move != r.URL.Query().Get("move") {
		return nil, badRequest{fmt.Errorf("no post-copy of %q under way on %s", name, a.cfg.Name)}
	}
	if err := mustBe(r.Context(), p.source, "send post-copy pages of "+name); err != nil {
		return nil, err
	}
	body, done, err := bodyReader(r)
	if err != nil {
		return nil, err
	}
	defer done()
	var m pages.Memory
	// A batch is at most 4096 pages; the limit bounds what a hostile one may claim.
	if _, err := pages.DecodeMemory(io.MultiReader(body, strings.NewReader("E")), io.Discard, p.sess, a.store, 64<<20, &m); err != nil {
		return nil, err
	}
	p.take(&m)
	return struct{}{}, nil
}

// postcopyWant: the target's daemon waits for these pages (the target's call).
func (a *Agent) postcopyWant(r *http.Request) (any, error) {
	var w PostcopyWant
	if err := decodeBody(r, &w); err != nil {
		return nil, err
	}
	a.mu.Lock()
	d := a.lazyDumps[w.Container]
	target := a.lazyTargets[w.Container]
	a.mu.Unlock()
	if d == nil {
		return nil, badRequest{fmt.Errorf("no post-copy of %q from %s", w.Container, a.cfg.Name)}
	}
	if err := mustBe(r.Context(), target, "ask for post-copy pages of "+w.Container); err != nil {
		return nil, err
	}
	if w.Pages == 0 || w.Pages > 1<<20 || w.Vaddr%pages.Size != 0 {
		return nil, badRequest{fmt.Errorf("want %d pages at %#x", w.Pages, w.Vaddr)}
	}
	d.want(pcRun{w.PID, w.Vaddr, w.Pages})
	return struct{}{}, nil
}

// PostcopyWant names pages a target's lazy-pages daemon waits for.
type PostcopyWant struct {
	Container string `json:"container"`
	Move      string `json:"move"`
	PID       uint64 `json:"pid"`
	Vaddr     uint64 `json:"vaddr"`
	Pages     uint64 `json:"pages"`
}

// exportCall is podman's checkpoint call of a post-copy move, running while CRIU serves
// the pages: it returns once CRIU's dump has ended, after the last page was fetched. Its
// result may be waited for more than once (the pump, then a rollback).
type exportCall struct {
	done chan struct{} // closed when podman returned
	err  error
}

func (e *exportCall) finish(err error) {
	e.err = err
	close(e.done)
}

// exportAfterPages bounds the wait for podman's checkpoint call once CRIU has handed
// over its last page (the dump's end, podman's archive of the rest).
const exportAfterPages = 2 * time.Minute

// wait waits for podman's checkpoint call to return, at most limit.
func (e *exportCall) wait(limit time.Duration) error {
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-e.done:
		return e.err
	case <-t.C:
		return fmt.Errorf("podman's checkpoint did not return within %s of CRIU's last page", limit)
	}
}

// postcopyCopy is the frozen phase of a post-copy move: CRIU dumps the container with
// lazy pages, the images go to the target, which restores it lazily. It returns once the
// target has restored it; the pages follow (pump). d is nil if the dump never got as far
// as its page server.
func (a *Agent) postcopyCopy(ctx context.Context, target *Peer, c *PostcopyContainer, l *link, sess *pages.Session, seen *lastSent,
	progress func(int64), sent func(int64), startPump func(*lazyDump, *exportCall)) (*RestoreResult, *pages.Stats, finalTimes, *lazyDump, *exportCall, error) {
	var ft finalTimes
	d, err := startLazyDump(c.Name, c.StaticDir, a.store, maskDumpLines(c.Name, c.PID))
	if err != nil {
		return nil, nil, ft, nil, nil, exportError{err}
	}
	exported := make(chan struct{})
	expDone := &exportCall{done: exported}
	go func() {
		// Podman returns once every page was fetched; its archive is not needed then.
		_, err := a.podman.Export(context.WithoutCancel(ctx), c.Name, io.Discard, checkpoint.Options{TCPEstablished: true, Keep: true})
		expDone.finish(err)
	}()
	if err := d.connect(ctx, exported); err != nil {
		d.close()
		return nil, nil, ft, nil, expDone, exportError{err}
	}
	ft.memoryDone = time.Now() // the dump (without its memory) is done
	a.mu.Lock()
	a.lazyDumps[c.Name], a.lazyTargets[c.Name] = d, target.Name
	a.mu.Unlock()
	archive, err := d.archive(false)
	if err != nil {
		return nil, nil, ft, d, expDone, exportError{err}
	}
	var st pages.Stats
	body, enc, wait := l.body(ctx, func(w io.Writer) error {
		var err error
		st, err = pages.Encode(bytes.NewReader(archive), w, sess, pages.EncodeOptions{Base: seen.base})
		return err
	})
	ft.firstByte = time.Now()
	digest := func() string {
		ft.lastByte = time.Now()
		sent(int64(len(archive)))
		// The pages start now: the restore itself may wait for some.
		startPump(d, expDone)
		sum := sha256.Sum256(archive)
		return "sha256:" + hex.EncodeToString(sum[:])
	}
	hdr := encodingHeader(enc)
	if len(c.Neighbors) > 0 {
		hdr.Set(neighborsHeader, overlaynet.FormatNeighbors(c.Neighbors))
	}
	var rr RestoreResult
	rerr := target.send(ctx, withQuery(PathRestore, "encoding", "pages", "container", c.Name, "move", c.Move, "memory", "postcopy"), body, hdr, digest, progress, &rr)
	if werr := wait(); rerr == nil && werr != nil && werr != io.ErrClosedPipe {
		rerr = werr
	}
	if rerr != nil {
		return nil, nil, ft, d, expDone, rerr
	}
	return &rr, &st, ft, d, expDone, nil
}

// PostcopyContainer is what postcopyCopy needs of the container.
type PostcopyContainer struct {
	Name, Move, StaticDir string
	PID                   int // its first process (masked paths: maskDumpLines)
	Neighbors             []overlaynet.Neighbor
}

// pumpToTarget sends every page to the target (the post-copy phase).
func (a *Agent) pumpToTarget(ctx context.Context, d *lazyDump, target *Peer, name, move string, l *link, sess *pages.Session, seen *lastSent) (int64, error) {
	var wire int64
	err := d.pump(ctx, func(entries []pcRun, data []byte) error {
		w, err := l.sendPostcopyBatch(ctx, target, name, move, sess, seen, a.store, entries, data)
		wire += w
		return err
	})
	return wire, err
}

// pumpHere fetches every page not fetched yet into this host's store (a rollback before
// the target restored the container: the dump then ends as a normal one) and keeps the
// complete memory for rebuildMemory.
func (a *Agent) pumpHere(ctx context.Context, d *lazyDump, name string) error {
	if err := d.pump(ctx, func([]pcRun, []byte) error { return nil }); err != nil {
		return err
	}
	d.mu.Lock()
	lazy := d.hashes
	d.mu.Unlock()
	mem, err := memoryOfCheckpoint(d.dir, lazy, a.store)
	if err != nil {
		return err
	}
	return a.saveMemory(name, mem)
}

// memoryOfCheckpoint describes a lazy dump's whole memory: its pagemaps, the pages of
// its page images (stored here) and the lazy pages fetched (named in lazy).
func memoryOfCheckpoint(dir string, lazy map[pageAddr]pages.Hash, store *pages.Store) (*pages.Memory, error) {
	mem := &pages.Memory{}
	ms, err := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	if err != nil {
		return nil, err
	}
	sort.Strings(ms)
	for _, m := range ms {
		base := filepath.Base(m)
		kind, idStr := pages.KindProcess, strings.TrimSuffix(strings.TrimPrefix(base, "pagemap-"), ".img")
		if s, ok := strings.CutPrefix(idStr, "shmem-"); ok {
			kind, idStr = pages.KindShmem, s
		}
		id, err := strconv.ParseUint(idStr, 10, 64)
		if err != nil {
			continue
		}
		img, err := os.ReadFile(m)
		if err != nil {
			return nil, err
		}
		pm, err := pages.ParsePageMap(int(id), img)
		if err != nil {
			return nil, err
		}
		es, err := pages.PageMapEntries(int(id), img)
		if err != nil {
			return nil, err
		}
		pf, err := os.Open(filepath.Join(dir, fmt.Sprintf("pages-%d.img", pm.PagesID)))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		mm := &pages.MemMap{Kind: kind, ID: id}
		buf := make([]byte, pages.Size)
		for _, e := range es {
			me := pages.MemEntry{Vaddr: e.Vaddr, Pages: e.Pages, Flags: e.Flags, First: len(mem.Hashes)}
			switch {
			case e.Flags&pages.FlagPresent != 0:
				if pf == nil {
					return nil, fmt.Errorf("%s: no pages-%d.img", base, pm.PagesID)
				}
				for k := uint64(0); k < e.Pages; k++ {
					if _, err := io.ReadFull(pf, buf); err != nil {
						pf.Close()
						return nil, fmt.Errorf("pages-%d.img: %w", pm.PagesID, err)
					}
					h, err := store.Add(buf)
					if err != nil {
						pf.Close()
						return nil, err
					}
					mem.Hashes = append(mem.Hashes, h[0])
				}
			case e.Flags&pages.FlagLazy != 0:
				me.Flags |= pages.FlagPresent
				for k := uint64(0); k < e.Pages; k++ {
					h, ok := lazy[pageAddr{int(id), e.Vaddr + k*pages.Size}]
					if !ok {
						return nil, fmt.Errorf("lazy page %#x of %d was not fetched", e.Vaddr+k*pages.Size, id)
					}
					mem.Hashes = append(mem.Hashes, h)
				}
			}
			mm.Entries = append(mm.Entries, me)
		}
		if pf != nil {
			pf.Close()
		}
		mem.Maps = append(mem.Maps, mm)
	}
	return mem, nil
}
