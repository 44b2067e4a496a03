package transfer

// The lazy pages of a restored container are served by a process of their own
// (`migrate lazy-serve`, started by the target agent in its own session), not by the
// agent: if the agent dies while CRIU's lazy-pages daemon is still filling the
// container's memory, the daemon would lose its page server and close its userfaultfd,
// and the kernel would hand the container zero pages where its memory was: silent
// corruption. The server reads the pages straight from the page store's pack files,
// opened when it starts (a pack evicted meanwhile stays readable), through an index the
// agent writes: for each lazy run of pages, where the store keeps each page.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/migrate-project/migrate/pages"
	"github.com/migrate-project/migrate/pageserver"
)

const lazyIndexMagic = "MLZ1"

// lazyRun is a run of lazy pages of one process and where each page is kept.
type lazyRun struct {
	pid, vaddr uint64
	locs       []pages.PageLoc
}

// writeLazyIndex writes the index of mem's lazy pages (those a lazy-pages daemon asks for).
func writeLazyIndex(path string, mem *pages.Memory, store *pages.Store) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	w.WriteString(lazyIndexMagic)
	var b [8]byte
	put64 := func(v uint64) { binary.LittleEndian.PutUint64(b[:], v); w.Write(b[:]) }
	for _, mm := range mem.Maps {
		if mm.Kind != pages.KindProcess {
			continue
		}
		for _, e := range mm.Entries {
			if !e.Present() || !e.Lazy() {
				continue
			}
			locs, err := store.Locate(mem.Hashes[e.First : e.First+int(e.Pages)])
			if err != nil {
				f.Close()
				return err
			}
			put64(mm.ID)
			put64(e.Vaddr)
			put64(e.Pages)
			for _, l := range locs {
				binary.LittleEndian.PutUint32(b[:4], l.Pack)
				binary.LittleEndian.PutUint32(b[4:], l.Page)
				w.Write(b[:])
			}
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// readLazyIndex reads an index; its size bounds what it allocates.
func readLazyIndex(path string) ([]lazyRun, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) < 4 || string(b[:4]) != lazyIndexMagic {
		return nil, errors.New("lazy index: bad magic")
	}
	b = b[4:]
	var runs []lazyRun
	for len(b) > 0 {
		if len(b) < 24 {
			return nil, errors.New("lazy index: truncated run")
		}
		r := lazyRun{pid: binary.LittleEndian.Uint64(b), vaddr: binary.LittleEndian.Uint64(b[8:])}
		n := binary.LittleEndian.Uint64(b[16:])
		b = b[24:]
		if n == 0 || n > uint64(len(b)/8) {
			return nil, fmt.Errorf("lazy index: run of %d pages in %d bytes", n, len(b))
		}
		r.locs = make([]pages.PageLoc, n)
		for i := range r.locs {
			r.locs[i] = pages.PageLoc{Pack: binary.LittleEndian.Uint32(b[i*8:]), Page: binary.LittleEndian.Uint32(b[i*8+4:])}
		}
		b = b[n*8:]
		runs = append(runs, r)
	}
	sort.Slice(runs, func(i, j int) bool {
		if runs[i].pid != runs[j].pid {
			return runs[i].pid < runs[j].pid
		}
		return runs[i].vaddr < runs[j].vaddr
	})
	return runs, nil
}

// packSource serves lazy pages from pack files.
type packSource struct {
	runs  []lazyRun
	packs map[uint32]*os.File
}

func (s *packSource) ReadPages(pid, vaddr uint64, buf []byte) (int, error) {
	i := sort.Search(len(s.runs), func(i int) bool {
		r := s.runs[i]
		return r.pid > pid || (r.pid == pid && r.vaddr+uint64(len(r.locs))*pages.Size > vaddr)
	})
	if i == len(s.runs) || s.runs[i].pid != pid || s.runs[i].vaddr > vaddr {
		return 0, fmt.Errorf("page %#x of process %d: not a lazy page of this restore", vaddr, pid)
	}
	r := s.runs[i]
	off := int((vaddr - r.vaddr) / pages.Size)
	n := min(len(buf)/pages.Size, len(r.locs)-off)
	for k := 0; k < n; {
		l := r.locs[off+k]
		j := k + 1 // pages next to each other in one pack: one read
		for j < n && r.locs[off+j].Pack == l.Pack && r.locs[off+j].Page == l.Page+uint32(j-k) {
			j++
		}
		f := s.packs[l.Pack]
		if f == nil {
			return 0, fmt.Errorf("pack %d not open", l.Pack)
		}
		if _, err := f.ReadAt(buf[k*pages.Size:j*pages.Size], int64(l.Page)*pages.Size); err != nil {
			return 0, fmt.Errorf("pack %d: %w", l.Pack, err)
		}
		k = j
	}
	return n, nil
}

// ServeLazy is `migrate lazy-serve`: it answers the one lazy-pages daemon that connects
// to ln, from the pack files in storeDir the index names, until the daemon closes the
// transfer or the deadline passes.
func ServeLazy(ctx context.Context, index, storeDir string, ln net.Listener, deadline time.Duration) error {
	runs, err := readLazyIndex(index)
	if err != nil {
		return err
	}
	src := &packSource{runs: runs, packs: map[uint32]*os.File{}}
	var total int
	for _, r := range runs {
		total += len(r.locs)
		for _, l := range r.locs {
			if src.packs[l.Pack] != nil {
				continue
			}
			f, err := os.Open(pages.PackPath(storeDir, l.Pack))
			if err != nil {
				return fmt.Errorf("page store: %w", err)
			}
			defer f.Close()
			src.packs[l.Pack] = f
		}
	}
	ctx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	served, took, err := serveDaemon(ctx, ln, src)
	slog.Info("lazy pages served", "pages", served, "of", total, "took", took, "err", err)
	// Fewer than all is fine: the daemon skips what the process unmapped meanwhile.
	return err
}

// serveDaemon answers the one lazy-pages daemon that connects to ln from src, until it
// closes the transfer or ctx ends; it returns how many pages it served, and for how long.
func serveDaemon(ctx context.Context, ln net.Listener, src pageserver.Source) (int, time.Duration, error) {
	context.AfterFunc(ctx, func() { ln.Close() })
	conn, err := ln.Accept()
	if err != nil {
		return 0, 0, fmt.Errorf("no lazy-pages daemon connected: %w", err)
	}
	ln.Close()
	defer conn.Close()
	served := 0
	t0 := time.Now()
	err = pageserver.Serve(ctx, conn, src, pageserver.ServeOptions{Served: func(n int) { served += n }})
	return served, time.Since(t0), err
}

// The streamed restore (the read hand-over's default): the target restores while the
// frozen memory still crosses, so the server starts before the index is whole. The agent
// writes the index to the server's standard input as pages arrive, a run at a time, and
// ends it with an empty run (pid 0, vaddr 0, no pages) once the memory is complete; from
// then on the server needs nothing of the agent. A request for a page that has not
// arrived waits for it; the stream ending without that end (the agent died, the move
// failed) or no run arriving for stall fails the requests that wait.
//
// With hold (the agent's choice), a request for more than one page waits for the end,
// which the agent writes once the memory is complete and podman's import returned:
// CRIU's lazy-pages daemon asks for one page at a fault (uffd.c, handle_page_fault) and
// for runs of 16 pages and more when it fills the memory in the background, which it
// starts once the restore is done. Filling the memory earlier would compete for CPU with
// the frozen phase; nothing sees the container before the move is decided (its traffic
// is held), and the restore itself, which does fault, is answered as the pages arrive
// (every page it can ask for is a lazy one, so it arrives; holding every request until
// the import returned deadlocked).

// maxFollowRun bounds one run of a followed index (the agent writes at most
// followRunPages): what the server allocates for a run it reads.
const maxFollowRun = 1 << 20

// followRunPages is the longest run the agent writes to a followed index.
const followRunPages = 4096

// followSource serves lazy pages from an index that is still being written.
type followSource struct {
	storeDir string
	stall    time.Duration
	hold     bool // requests for more than one page wait for the index's end

	mu       sync.Mutex
	cond     *sync.Cond
	runs     map[uint64][]lazyRun // by process, sorted by address
	packs    map[uint32]*os.File
	pages    int
	complete bool
	failed   error
	last     time.Time // the last run arrived
}

func newFollowSource(storeDir string, stall time.Duration) *followSource {
	s := &followSource{storeDir: storeDir, stall: stall, runs: map[uint64][]lazyRun{}, packs: map[uint32]*os.File{}, last: time.Now()}
	s.cond = sync.NewCond(&s.mu)
	return s
}

// follow reads the index from r until its end; an index that ends otherwise fails the
// source.
func (s *followSource) follow(r io.Reader) {
	err := s.read(bufio.NewReaderSize(r, 1<<16))
	s.mu.Lock()
	if err != nil {
		s.failed = fmt.Errorf("the memory did not arrive whole: %w", err)
	} else {
		s.complete = true
	}
	s.mu.Unlock()
	s.cond.Broadcast()
}

func (s *followSource) read(br *bufio.Reader) error {
	var magic [4]byte
	if _, err := io.ReadFull(br, magic[:]); err != nil || string(magic[:]) != lazyIndexMagic {
		return fmt.Errorf("lazy index: bad magic (%v)", err)
	}
	var hdr [24]byte
	var b []byte // a run as read: one buffer for all (fresh memory is dear while frozen)
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return fmt.Errorf("lazy index ended before its end mark: %w", err)
		}
		r := lazyRun{pid: binary.LittleEndian.Uint64(hdr[:]), vaddr: binary.LittleEndian.Uint64(hdr[8:])}
		n := binary.LittleEndian.Uint64(hdr[16:])
		if n == 0 {
			if r.pid != 0 || r.vaddr != 0 {
				return fmt.Errorf("lazy index: empty run at %#x of %d", r.vaddr, r.pid)
			}
			return nil
		}
		if n > maxFollowRun || r.vaddr%pages.Size != 0 || r.vaddr > ^uint64(0)-n*pages.Size {
			return fmt.Errorf("lazy index: run of %d pages at %#x", n, r.vaddr)
		}
		if uint64(cap(b)) < n*8 {
			b = make([]byte, n*8)
		}
		b = b[:n*8]
		if _, err := io.ReadFull(br, b); err != nil {
			return fmt.Errorf("lazy index ended before its end mark: %w", err)
		}
		r.locs = make([]pages.PageLoc, n)
		for i := range r.locs {
			r.locs[i] = pages.PageLoc{Pack: binary.LittleEndian.Uint32(b[i*8:]), Page: binary.LittleEndian.Uint32(b[i*8+4:])}
		}
		if err := s.add(r); err != nil {
			return err
		}
	}
}

// add files a run: its packs open, in its process's runs by address.
func (s *followSource) add(r lazyRun) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range r.locs {
		if s.packs[l.Pack] != nil {
			continue
		}
		f, err := os.Open(pages.PackPath(s.storeDir, l.Pack))
		if err != nil {
			return fmt.Errorf("page store: %w", err)
		}
		s.packs[l.Pack] = f
	}
	rs := s.runs[r.pid]
	i := sort.Search(len(rs), func(i int) bool { return rs[i].vaddr >= r.vaddr })
	if i < len(rs) && rs[i].vaddr < r.vaddr+uint64(len(r.locs))*pages.Size || i > 0 && rs[i-1].vaddr+uint64(len(rs[i-1].locs))*pages.Size > r.vaddr {
		return fmt.Errorf("lazy index: run at %#x of %d overlaps another", r.vaddr, r.pid)
	}
	s.runs[r.pid] = slices.Insert(rs, i, r)
	s.pages += len(r.locs)
	s.last = time.Now()
	s.cond.Broadcast()
	return nil
}

// find returns the run holding page vaddr of pid, if it has arrived. s.mu held.
func (s *followSource) find(pid, vaddr uint64) (lazyRun, bool) {
	rs := s.runs[pid]
	i := sort.Search(len(rs), func(i int) bool { return rs[i].vaddr+uint64(len(rs[i].locs))*pages.Size > vaddr })
	if i == len(rs) || rs[i].vaddr > vaddr {
		return lazyRun{}, false
	}
	return rs[i], true
}

func (s *followSource) ReadPages(pid, vaddr uint64, buf []byte) (int, error) {
	s.mu.Lock()
	var r lazyRun
	for {
		var ok bool
		if r, ok = s.find(pid, vaddr); ok && (s.complete || !s.hold || len(buf) <= pages.Size) {
			break
		}
		switch {
		case s.complete:
			s.mu.Unlock()
			return 0, fmt.Errorf("page %#x of process %d: not a lazy page of this restore", vaddr, pid)
		case s.failed != nil:
			err := s.failed
			s.mu.Unlock()
			return 0, err
		case time.Since(s.last) > s.stall:
			s.mu.Unlock()
			return 0, fmt.Errorf("page %#x of process %d: no memory arrived for %s", vaddr, pid, s.stall)
		}
		s.cond.Wait()
	}
	src := packSource{runs: []lazyRun{r}, packs: s.packs}
	s.mu.Unlock()
	// The run and the packs it names do not change once filed.
	return src.ReadPages(pid, vaddr, buf)
}

// ticker wakes waiting requests so that they notice a stall.
func (s *followSource) ticker(ctx context.Context) {
	tickUntil(ctx.Done(), 100*time.Millisecond, func() bool { s.cond.Broadcast(); return false })
}

func (s *followSource) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.packs {
		f.Close()
	}
}

// ServeLazyFollow is `migrate lazy-serve --follow`: ServeLazy for an index that arrives
// on index (the agent's pipe) while the daemon already asks.
func ServeLazyFollow(ctx context.Context, index io.Reader, storeDir string, ln net.Listener, deadline, stall time.Duration, hold bool) error {
	src := newFollowSource(storeDir, stall)
	src.hold = hold
	defer src.close()
	ctx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	go src.follow(index)
	go src.ticker(ctx)
	served, took, err := serveDaemon(ctx, ln, src)
	src.mu.Lock()
	total, complete := src.pages, src.complete
	src.mu.Unlock()
	slog.Info("lazy pages served", "pages", served, "of", total, "index complete", complete, "took", took, "err", err)
	if err == nil && !complete {
		err = errors.New("the daemon ended before the memory was complete")
	}
	return err
}

// lazyIndexWriter writes a followed index: runs as pages arrive, then its end.
type lazyIndexWriter struct {
	w   io.Writer
	buf []byte
}

func newLazyIndexWriter(w io.Writer) (*lazyIndexWriter, error) {
	if _, err := io.WriteString(w, lazyIndexMagic); err != nil {
		return nil, err
	}
	return &lazyIndexWriter{w: w}, nil
}

// run writes the pages of process pid from vaddr, at locs in the store (at most
// followRunPages at a time).
func (x *lazyIndexWriter) run(pid, vaddr uint64, locs []pages.PageLoc) error {
	for len(locs) > 0 {
		n := min(len(locs), followRunPages)
		x.buf = x.buf[:0]
		x.buf = binary.LittleEndian.AppendUint64(x.buf, pid)
		x.buf = binary.LittleEndian.AppendUint64(x.buf, vaddr)
		x.buf = binary.LittleEndian.AppendUint64(x.buf, uint64(n))
		for _, l := range locs[:n] {
			x.buf = binary.LittleEndian.AppendUint32(x.buf, l.Pack)
			x.buf = binary.LittleEndian.AppendUint32(x.buf, l.Page)
		}
		if _, err := x.w.Write(x.buf); err != nil {
			return err
		}
		locs = locs[n:]
		vaddr += uint64(n) * pages.Size
	}
	return nil
}

// end marks the index whole.
func (x *lazyIndexWriter) end() error {
	_, err := x.w.Write(make([]byte, 24))
	return err
}
