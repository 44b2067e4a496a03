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

// An index is its magic, then runs, each a header (pid, vaddr, pages, segments: 8 bytes
// each) and its segments (pack, page, count: 4 bytes each): the run's pages lie in the
// store's packs as segments of pages next to each other. A pre-copy stores a container's
// memory in address order, so a gigabyte's run is a segment or a few, not 262,144
// locations to write, read and hold while the container is frozen (MLZ1 had those).
const lazyIndexMagic = "MLZ2"

// lazyRun is a run of lazy pages of one process and where they are kept.
type lazyRun struct {
	pid, vaddr uint64
	n          int      // pages
	segs       []locSeg // where, in order; their counts add up to n
}

// locSeg is a segment of a run: count pages kept one after the other in a pack, from
// the run's page at (in memory only: the pages of the segments before it).
type locSeg struct {
	pack, page, count uint32
	at                int
}

// end is the address after the run.
func (r lazyRun) end() uint64 { return r.vaddr + uint64(r.n)*pages.Size }

// segmentsOf returns the segments of locs, appended to segs.
func segmentsOf(segs []locSeg, locs []pages.PageLoc) []locSeg {
	for i := 0; i < len(locs); {
		j := i + 1
		for j < len(locs) && locs[j].Pack == locs[i].Pack && locs[j].Page == locs[i].Page+uint32(j-i) {
			j++
		}
		segs = append(segs, locSeg{pack: locs[i].Pack, page: locs[i].Page, count: uint32(j - i)})
		i = j
	}
	return segs
}

// appendRun encodes a run of n pages of process pid from vaddr, kept in segs.
func appendRun(b []byte, pid, vaddr uint64, segs []locSeg, n int) []byte {
	b = binary.LittleEndian.AppendUint64(b, pid)
	b = binary.LittleEndian.AppendUint64(b, vaddr)
	b = binary.LittleEndian.AppendUint64(b, uint64(n))
	b = binary.LittleEndian.AppendUint64(b, uint64(len(segs)))
	for _, sg := range segs {
		b = binary.LittleEndian.AppendUint32(b, sg.pack)
		b = binary.LittleEndian.AppendUint32(b, sg.page)
		b = binary.LittleEndian.AppendUint32(b, sg.count)
	}
	return b
}

// runHeader is a run's header as read: it bounds what the run's segments take
// (maxFollowRun pages, at most a segment a page).
type runHeader struct {
	pid, vaddr uint64
	n, segs    uint64
}

func parseRunHeader(b []byte) runHeader {
	return runHeader{pid: binary.LittleEndian.Uint64(b), vaddr: binary.LittleEndian.Uint64(b[8:]),
		n: binary.LittleEndian.Uint64(b[16:]), segs: binary.LittleEndian.Uint64(b[24:])}
}

func (h runHeader) check() error {
	if h.n == 0 || h.n > maxFollowRun || h.segs == 0 || h.segs > h.n || h.vaddr%pages.Size != 0 || h.vaddr > ^uint64(0)-h.n*pages.Size {
		return fmt.Errorf("lazy index: run of %d pages in %d segments at %#x", h.n, h.segs, h.vaddr)
	}
	return nil
}

// parseRun reads a run's segments (h.segs of them, in b) and checks that they add up.
func parseRun(h runHeader, b []byte) (lazyRun, error) {
	r := lazyRun{pid: h.pid, vaddr: h.vaddr, n: int(h.n), segs: make([]locSeg, h.segs)}
	var total uint64
	for i := range r.segs {
		sg := locSeg{pack: binary.LittleEndian.Uint32(b[i*12:]), page: binary.LittleEndian.Uint32(b[i*12+4:]), count: binary.LittleEndian.Uint32(b[i*12+8:])}
		if sg.count == 0 || sg.page > ^uint32(0)-sg.count {
			return lazyRun{}, fmt.Errorf("lazy index: segment of %d pages at page %d of pack %d", sg.count, sg.page, sg.pack)
		}
		sg.at = int(total)
		total += uint64(sg.count)
		r.segs[i] = sg
	}
	if total != h.n {
		return lazyRun{}, fmt.Errorf("lazy index: run of %d pages whose segments hold %d", h.n, total)
	}
	return r, nil
}

// writeLazyIndex writes the index of mem's lazy pages (those a lazy-pages daemon asks for).
func writeLazyIndex(path string, mem *pages.Memory, store *pages.Store) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	w.WriteString(lazyIndexMagic)
	for _, mm := range mem.Maps {
		if mm.Kind != pages.KindProcess {
			continue
		}
		for _, e := range mm.Entries {
			if !e.Present() || !e.Lazy() {
				continue
			}
			for k := uint64(0); k < e.Pages; k += maxFollowRun {
				n := min(e.Pages-k, maxFollowRun)
				first := e.First + int(k)
				locs, err := store.Locate(mem.Hashes[first : first+int(n)])
				if err != nil {
					f.Close()
					return err
				}
				w.Write(appendRun(nil, mm.ID, e.Vaddr+k*pages.Size, segmentsOf(nil, locs), int(n)))
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
		if len(b) < 32 {
			return nil, errors.New("lazy index: truncated run")
		}
		h := parseRunHeader(b)
		b = b[32:]
		if err := h.check(); err != nil {
			return nil, err
		}
		if h.segs > uint64(len(b)/12) {
			return nil, fmt.Errorf("lazy index: run of %d segments in %d bytes", h.segs, len(b))
		}
		r, err := parseRun(h, b)
		if err != nil {
			return nil, err
		}
		b = b[h.segs*12:]
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
		return r.pid > pid || (r.pid == pid && r.end() > vaddr)
	})
	if i == len(s.runs) || s.runs[i].pid != pid || s.runs[i].vaddr > vaddr {
		return 0, fmt.Errorf("page %#x of process %d: not a lazy page of this restore", vaddr, pid)
	}
	r := s.runs[i]
	off := int((vaddr - r.vaddr) / pages.Size)
	n := min(len(buf)/pages.Size, r.n-off)
	k := 0 // pages read
	j := sort.Search(len(r.segs), func(j int) bool { return r.segs[j].at+int(r.segs[j].count) > off })
	if j == len(r.segs) {
		return 0, fmt.Errorf("page %#x of process %d: its run's segments end early", vaddr, pid)
	}
	off -= r.segs[j].at
	for _, sg := range r.segs[j:] {
		if k == n {
			break
		}
		// A segment's pages lie next to each other in one pack: one read.
		m := min(int(sg.count)-off, n-k)
		f := s.packs[sg.pack]
		if f == nil {
			return 0, fmt.Errorf("pack %d not open", sg.pack)
		}
		if _, err := f.ReadAt(buf[k*pages.Size:(k+m)*pages.Size], (int64(sg.page)+int64(off))*pages.Size); err != nil {
			return 0, fmt.Errorf("pack %d: %w", sg.pack, err)
		}
		k += m
		off = 0
	}
	if k != n {
		return 0, fmt.Errorf("page %#x of process %d: its run's segments end early", vaddr, pid)
	}
	return n, nil
}

// openPacks opens the packs of storeDir that segs name and packs lacks, into packs.
func openPacks(storeDir string, packs map[uint32]*os.File, segs []locSeg) error {
	for _, sg := range segs {
		if packs[sg.pack] != nil {
			continue
		}
		f, err := os.Open(pages.PackPath(storeDir, sg.pack))
		if err != nil {
			return fmt.Errorf("page store: %w", err)
		}
		packs[sg.pack] = f
	}
	return nil
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
	defer func() {
		for _, f := range src.packs {
			f.Close()
		}
	}()
	var total int
	for _, r := range runs {
		total += r.n
		if err := openPacks(storeDir, src.packs, r.segs); err != nil {
			return err
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
// ends it with an empty run (pid 0, vaddr 0, no pages, no segments) once the memory is complete; from
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

// maxFollowRun bounds one run of an index (the agent writes at most this many pages a
// run): what the server allocates for a run it reads (a segment a page at most).
const maxFollowRun = 1 << 20

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
	var hdr [32]byte
	var b []byte // a run's segments as read: one buffer for all
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return fmt.Errorf("lazy index ended before its end mark: %w", err)
		}
		h := parseRunHeader(hdr[:])
		if h.n == 0 {
			if h.pid != 0 || h.vaddr != 0 || h.segs != 0 {
				return fmt.Errorf("lazy index: empty run at %#x of %d", h.vaddr, h.pid)
			}
			return nil
		}
		if err := h.check(); err != nil {
			return err
		}
		if uint64(cap(b)) < h.segs*12 {
			b = make([]byte, h.segs*12)
		}
		b = b[:h.segs*12]
		if _, err := io.ReadFull(br, b); err != nil {
			return fmt.Errorf("lazy index ended before its end mark: %w", err)
		}
		r, err := parseRun(h, b)
		if err != nil {
			return err
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
	if err := openPacks(s.storeDir, s.packs, r.segs); err != nil {
		return err
	}
	rs := s.runs[r.pid]
	i := sort.Search(len(rs), func(i int) bool { return rs[i].vaddr >= r.vaddr })
	if i < len(rs) && rs[i].vaddr < r.end() || i > 0 && rs[i-1].end() > r.vaddr {
		return fmt.Errorf("lazy index: run at %#x of %d overlaps another", r.vaddr, r.pid)
	}
	s.runs[r.pid] = slices.Insert(rs, i, r)
	s.pages += r.n
	s.last = time.Now()
	s.cond.Broadcast()
	return nil
}

// find returns the run holding page vaddr of pid, if it has arrived. s.mu held.
func (s *followSource) find(pid, vaddr uint64) (lazyRun, bool) {
	rs := s.runs[pid]
	i := sort.Search(len(rs), func(i int) bool { return rs[i].end() > vaddr })
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
	w    io.Writer
	buf  []byte
	segs []locSeg
}

func newLazyIndexWriter(w io.Writer) (*lazyIndexWriter, error) {
	if _, err := io.WriteString(w, lazyIndexMagic); err != nil {
		return nil, err
	}
	return &lazyIndexWriter{w: w}, nil
}

// run writes the pages of process pid from vaddr, at locs in the store (at most
// maxFollowRun at a time).
func (x *lazyIndexWriter) run(pid, vaddr uint64, locs []pages.PageLoc) error {
	for len(locs) > 0 {
		n := min(len(locs), maxFollowRun)
		x.segs = segmentsOf(x.segs[:0], locs[:n])
		x.buf = appendRun(x.buf[:0], pid, vaddr, x.segs, n)
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
	_, err := x.w.Write(make([]byte, 32))
	return err
}
