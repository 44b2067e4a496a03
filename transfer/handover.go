package transfer

// The frozen hand-over of the default mode, through a lazy dump: CRIU dumps the container
// with lazy pages (its configuration file says so), so that its dump holds no copy of the
// private anonymous memory: CRIU only pins those pages and waits, the processes frozen,
// for a client to fetch them. This agent does not fetch them through CRIU's socket. It
// reads them from the frozen processes themselves (/proc/PID/mem: one copy, no loopback
// TCP), where CRIU's pagemaps say they are, and hands them to the memory writer, which
// names the pages unchanged since the last pre-copy round by their fingerprint and sends
// the target only the others. Pages it cannot read there come from CRIU's page server.
// The pages CRIU did write (the non-lazy ones: written private file mappings, shared
// memory) come from its images. Once the memory is kept here for a rollback, the agent
// closes CRIU's transfer and the dump ends; until then a failure hangs up without the
// close, CRIU fails the dump, and the container runs on (CRIU then leaves the network
// locked: the rollback unlocks it, netunlock.go).
//
// It is the default wherever this host can dump lazily (fs.pipe-max-size, see
// lazyDumpProblem; elsewhere the page server is), and the target then restores from
// CRIU's images while podman finishes here (early.go). Measured beside the page server it
// held a 1 GiB container 1.81 s instead of 2.12 s and a 64 MiB one 0.58 s instead of
// 0.64 s before the early restore. A move after a failed read hand-over that was rolled
// back after its dump used to wait a minute for its local restore: the unlock left the
// connections without SO_REUSEADDR (fixed in netunlock.go).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/migrate-project/migrate/pages"
)

// HandOver names how the frozen phase's memory reaches this agent (PushRequest.HandOver).
const (
	HandOverAuto       = ""            // the read hand-over where this host can dump lazily, else the page server
	HandOverRead       = "read"        // lazy dump; the agent reads the frozen processes' memory
	HandOverPageServer = "page-server" // CRIU sends every page to the agent's page server
)

// handOverFor is the hand-over a move takes: the one asked for, or by default the read
// hand-over (with the early restore) where this host can dump lazily (lazyProblem, from
// lazyDumpProblem, is "") and the page server elsewhere. Asking for the read hand-over
// where the host cannot is an error.
func handOverFor(asked, lazyProblem string) (string, error) {
	switch {
	case asked == HandOverAuto && lazyProblem == "":
		return HandOverRead, nil
	case asked == HandOverAuto:
		return HandOverPageServer, nil
	case asked == HandOverRead && lazyProblem != "":
		return "", fmt.Errorf("--handover read: %s", lazyProblem)
	}
	return asked, nil
}

// lazyDumpProblem says why this host's CRIU cannot dump lazily ("" if it can): without
// CAP_SYS_RESOURCE its page pipes cannot grow past fs.pipe-max-size.
func lazyDumpProblem(noSysResource bool) string {
	if !noSysResource {
		return ""
	}
	b, err := os.ReadFile("/proc/sys/fs/pipe-max-size")
	if err != nil {
		return "fs.pipe-max-size: " + err.Error()
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || n < 64<<20 {
		return fmt.Sprintf("fs.pipe-max-size is %s, below the 64 MiB CRIU's lazy dump needs without CAP_SYS_RESOURCE (scripts/install.sh raises it)", strings.TrimSpace(string(b)))
	}
	return ""
}

// dumpMap is one pagemap image of a lazy dump, with every entry.
type dumpMap struct {
	kind    int
	id      uint64
	pagesID uint32
	entries []pages.MemEntry
}

// dumpMapsIn reads every pagemap image of the checkpoint in dir: the processes' (whose
// lazy entries are in their memory) and shared memory's (all in pages images).
func dumpMapsIn(dir string) ([]dumpMap, error) {
	ms, err := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	if err != nil {
		return nil, err
	}
	var out []dumpMap
	for _, m := range ms {
		base := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(m), "pagemap-"), ".img")
		kind := pages.KindProcess
		if s, ok := strings.CutPrefix(base, "shmem-"); ok {
			kind, base = pages.KindShmem, s
		}
		id, err := strconv.ParseUint(base, 10, 64)
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
		out = append(out, dumpMap{kind: kind, id: id, pagesID: pm.PagesID, entries: es})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].kind != out[j].kind {
			return out[i].kind < out[j].kind
		}
		return out[i].id < out[j].id
	})
	return out, nil
}

// hostPIDs maps the PIDs of the container's processes in its PID namespace (as CRIU's
// images name them) to their PIDs on this host.
func hostPIDs(init int) (map[uint64]int, error) {
	pids, err := pages.Processes(init)
	if err != nil {
		return nil, err
	}
	out := map[uint64]int{}
	for _, p := range pids {
		ns, err := pages.NSPid(p)
		if err != nil {
			continue // gone: CRIU would not have dumped it
		}
		out[uint64(ns)] = p
	}
	return out, nil
}

// handOverChunk is a run of one entry's pages, read and ready for the writer.
type handOverChunk struct {
	entry bool // starts an entry: kind, id, e
	kind  int
	id    uint64
	e     pages.MemEntry
	vaddr uint64
	data  []byte
	names []pages.Hash // instead of data: the pages were named ahead (prename.go)
	buf   *[]byte      // returned to the pool once written
	err   error
}

// handOverStats is what the hand-over read where.
type handOverStats struct {
	FromMemory, FromCRIU, FromImages int64     // pages
	NamedAhead                       int64     // pages named while CRIU dumped, not read
	Listening                        time.Time // CRIU's lazy page server answered the connection
	// Where the hand-over's time went: reading pages (the reader's own time), naming and
	// sending them (the writer's), keeping the memory, CRIU's end of the transfer.
	Read, Named, Kept, Finished time.Duration
	Listened                    time.Duration // what CRIU's listening set off (the images sent)
}

// readHandOver connects to the lazy dump's page server, reads every page of the dump in
// CRIU's pagemap order (lazy ones from the processes, others from the images), hands
// them to mw, keeps the memory (keep) and closes CRIU's transfer, which lets the dump end.
//
// pre, if not nil, names pages while CRIU dumps (prename.go): once CRIU listens (and its
// images are on their way) it is finished, and runs of the dump it named in full go by
// name, unread. After a streamed restore (d.deferEnd) the memory is kept beside the
// target's restore and CRIU's transfer left open: the caller waits for the one
// (waitKept) before it closes the other (endDump).
func readHandOver(ctx context.Context, d *lazyDump, init int, mw *pages.MemoryWriter, sess *pages.Session, pre *preNamed, exported <-chan struct{}, keep func(*pages.Memory) error) (_ *pages.Memory, _ pages.Stats, _ handOverStats, err error) {
	var hs handOverStats
	defer func() {
		// A failure resets CRIU's connection at once: its dump fails and podman's
		// checkpoint call, which the caller waits for, returns.
		if err != nil && d.conn != nil {
			d.conn.Close()
		}
	}()
	if err := d.connect(ctx, exported); err != nil {
		return nil, pages.Stats{}, hs, err
	}
	hs.Listening = time.Now()
	// Should this agent die before the memory is kept, its end of the connection must
	// reset rather than close: CRIU's lazy page server takes a plain hang-up for the end
	// of a successful dump (and podman would then kill the container, its pages lost),
	// a reset for a failed one (and the container runs on).
	if tc, ok := d.conn.(*net.TCPConn); ok {
		if err := tc.SetLinger(0); err != nil {
			return nil, pages.Stats{}, hs, fmt.Errorf("lazy page server connection: %w", err)
		}
	}
	// Only then: what listened does (it may send the images to the target) is covered.
	if d.listened != nil {
		t0 := time.Now()
		d.listened() // every image is written now
		hs.Listened = time.Since(t0)
	}
	if pre != nil {
		// The target restores from the images meanwhile.
		pre.finish(ctx)
	}
	if err := fault("source-handover"); err != nil {
		return nil, pages.Stats{}, hs, err
	}
	maps, err := dumpMapsIn(d.dir)
	if err != nil {
		return nil, pages.Stats{}, hs, fmt.Errorf("the lazy dump's pagemaps: %w", err)
	}
	host, err := hostPIDs(init)
	if err != nil {
		// Not fatal: every lazy page then comes from CRIU, slower but whole.
		slog.Warn("the container's processes: reading their memory through CRIU", "err", err)
	}
	// The reader fills buffers while the writer names and sends the ones before: reading
	// and fingerprinting overlap, on two CPUs.
	const chunkPages = 256
	pool := make(chan *[]byte, 4)
	for i := 0; i < cap(pool); i++ {
		b := make([]byte, chunkPages*pages.Size)
		pool <- &b
	}
	chunks := make(chan handOverChunk, cap(pool))
	// The names of runs named ahead, in buffers that go round too (a gigabyte is 1,024
	// runs: 8 MiB of fresh memory otherwise, while frozen): one more than can be queued
	// and written at once.
	namesPool := make(chan []pages.Hash, cap(chunks)+2)
	for range cap(namesPool) {
		namesPool <- make([]pages.Hash, chunkPages)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		defer close(chunks)
		err := d.readDump(rctx, maps, host, chunkPages, pool, chunks, &hs, func(pid uint64, vaddr uint64, n int, last **lastBlock) []pages.Hash {
			var buf []pages.Hash
			select {
			case buf = <-namesPool:
			case <-rctx.Done():
				return nil
			}
			names := pre.named(int(pid), vaddr, buf[:n], sess, last)
			if names == nil {
				namesPool <- buf
			}
			return names
		})
		if err != nil {
			select {
			case chunks <- handOverChunk{err: err}:
			case <-rctx.Done():
			}
		}
	}()
	for ch := range chunks {
		if ch.err != nil {
			return nil, pages.Stats{}, hs, ch.err
		}
		if ch.entry {
			if err := mw.Entry(ch.kind, ch.id, ch.e.Vaddr, ch.e.Pages, ch.e.Flags); err != nil {
				return nil, pages.Stats{}, hs, err
			}
			continue
		}
		t0 := time.Now()
		var err error
		if ch.names != nil {
			err = mw.Named(ch.vaddr, ch.names)
			namesPool <- ch.names[:cap(ch.names)]
		} else {
			err = mw.Pages(ch.vaddr, ch.data)
			pool <- ch.buf
		}
		hs.Named += time.Since(t0)
		if err != nil {
			return nil, pages.Stats{}, hs, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, pages.Stats{}, hs, context.Cause(ctx)
	}
	mem, st, err := mw.Close()
	if err != nil {
		return nil, pages.Stats{}, hs, err
	}
	if d.deferEnd {
		// CRIU's end waits for the target's restore (endDump, after waitKept): the
		// memory is kept meanwhile, beside the restore, instead of while the target
		// waits for the memory's end (60-80 ms at 1 GiB here).
		kept := make(chan struct{})
		d.kept = kept
		goSafe("keep the memory", func() {
			t0 := time.Now()
			d.keptErr = keep(mem)
			d.keptIn = time.Since(t0)
			close(kept)
		}, func(v any) { d.keptErr = fmt.Errorf("keep the memory: internal error: %v", v); close(kept) })
		if err := fault("source-handover-close"); err != nil {
			return nil, pages.Stats{}, hs, err
		}
		return mem, st, hs, nil
	}
	t0 := time.Now()
	if err := keep(mem); err != nil {
		return nil, pages.Stats{}, hs, err
	}
	hs.Kept = time.Since(t0)
	// Kept: CRIU may end the dump (and podman kill the container).
	if err := fault("source-handover-close"); err != nil {
		return nil, pages.Stats{}, hs, err
	}
	hs.Finished, err = d.endDump()
	if err != nil {
		return nil, pages.Stats{}, hs, err
	}
	return mem, st, hs, nil
}

// endDump closes CRIU's transfer: its dump ends, it kills the container's processes and
// podman's checkpoint call returns.
//
// After a streamed restore (deferEnd) the source calls it only once the target has
// restored: until then CRIU waits, the processes frozen, and podman's end (CRIU's, the
// runtime's, the archive, the clean-up: 0.2-0.4 s) does not compete with the target's
// restore. On this one-machine testbed, where both share two CPUs, it doubled the
// restore's podman import (256 MiB: 0.43 s beside it against 0.10 s alone). A failure
// before then resets the connection instead (linger 0): CRIU fails the dump and the
// container runs on here, the source's copy never lost, and the rollback removes the
// target's.
func (d *lazyDump) endDump() (time.Duration, error) {
	t0 := time.Now()
	err := d.pc.Finish(10 * time.Second)
	d.conn.Close()
	return time.Since(t0), err
}

// failDump ends CRIU's transfer as a failure once the memory kept beside the restore is
// (waitKept): the connection resets (linger 0, set by readHandOver), CRIU fails the dump
// and the container runs on here.
func (d *lazyDump) failDump() {
	d.waitKept() //nolint:errcheck // its end only: the move fails already
	d.conn.Close()
}

// waitKept waits for the memory kept beside the target's restore (deferEnd), if it is:
// before endDump, and before a rollback.
func (d *lazyDump) waitKept() error {
	if d.kept == nil {
		return nil
	}
	<-d.kept
	return d.keptErr
}

// readDump reads the dump's pages in order into chunks; a run of lazy pages that named
// gives the names of (all named ahead) goes by those names, unread.
func (d *lazyDump) readDump(ctx context.Context, maps []dumpMap, host map[uint64]int, chunkPages int, pool chan *[]byte, chunks chan<- handOverChunk, hs *handOverStats,
	named func(pid, vaddr uint64, n int, last **lastBlock) []pages.Hash) error {
	send := func(ch handOverChunk) error {
		select {
		case chunks <- ch:
			return nil
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	buffer := func() (*[]byte, error) {
		select {
		case b := <-pool:
			return b, nil
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
	for _, m := range maps {
		var img *os.File       // the pages image, read in order
		var mem *pages.ProcMem // the process's memory
		closeAll := func() {
			if img != nil {
				img.Close()
			}
			if mem != nil {
				mem.Close()
			}
		}
		if m.kind == pages.KindProcess {
			if p, ok := host[m.id]; ok {
				if pm, err := pages.OpenProcMem(p); err == nil {
					mem = pm
				}
			}
		}
		for _, e := range m.entries {
			lazy := e.Flags&pages.FlagLazy != 0 && e.Flags&pages.FlagPresent == 0 && m.kind == pages.KindProcess
			ent := e
			if lazy {
				ent.Flags |= pages.FlagPresent // as the page server would have named it
			}
			if err := send(handOverChunk{entry: true, kind: m.kind, id: m.id, e: ent}); err != nil {
				closeAll()
				return err
			}
			if ent.Flags&pages.FlagPresent == 0 {
				continue
			}
			if !lazy && img == nil {
				f, err := os.Open(filepath.Join(d.dir, fmt.Sprintf("pages-%d.img", m.pagesID)))
				if err != nil {
					closeAll()
					return fmt.Errorf("the lazy dump's pages image: %w", err)
				}
				img = f
			}
			var namedAt *lastBlock
			for off := uint64(0); off < e.Pages; {
				n := min(e.Pages-off, uint64(chunkPages))
				at := e.Vaddr + off*pages.Size
				if lazy {
					if names := named(m.id, at, int(n), &namedAt); names != nil {
						if err := send(handOverChunk{vaddr: at, names: names}); err != nil {
							closeAll()
							return err
						}
						hs.NamedAhead += int64(n)
						off += n
						continue
					}
				}
				b, err := buffer()
				if err != nil {
					closeAll()
					return err
				}
				buf := (*b)[:n*pages.Size]
				t0 := time.Now()
				if lazy {
					err = d.readLazy(mem, m.id, at, buf, hs)
					hs.Read += time.Since(t0)
				} else {
					_, err = io.ReadFull(img, buf)
					if err == nil {
						hs.FromImages += int64(n)
					} else {
						err = fmt.Errorf("pages-%d.img: %w", m.pagesID, err)
					}
				}
				if err != nil {
					pool <- b
					closeAll()
					return err
				}
				if err := send(handOverChunk{vaddr: at, data: buf, buf: b}); err != nil {
					closeAll()
					return err
				}
				off += n
			}
		}
		if img != nil {
			// Every page of the image was read, by the map's own present entries.
			at, err := img.Seek(0, io.SeekCurrent)
			var size int64
			if fi, serr := img.Stat(); serr == nil {
				size = fi.Size()
			} else {
				err = errors.Join(err, serr)
			}
			if err != nil || at != size {
				closeAll()
				return fmt.Errorf("pages-%d.img holds %d bytes, its pagemap's present entries %d (%v)", m.pagesID, size, at, err)
			}
		}
		closeAll()
	}
	return nil
}

// readLazy fills buf with process pid's pages from vaddr: from its memory where it can be
// read, the rest from CRIU's page server.
func (d *lazyDump) readLazy(mem *pages.ProcMem, pid, vaddr uint64, buf []byte, hs *handOverStats) error {
	got := 0
	if mem != nil {
		got = mem.ReadAt(buf, int64(vaddr))
		hs.FromMemory += int64(got / pages.Size)
	}
	for got < len(buf) {
		n, err := d.pc.Get(pid, vaddr+uint64(got), buf[got:])
		if err != nil {
			return fmt.Errorf("lazy pages of process %d at %#x: %w", pid, vaddr+uint64(got), err)
		}
		got += n * pages.Size
		hs.FromCRIU += int64(n)
	}
	if got != len(buf) {
		return errors.New("lazy pages: more than asked")
	}
	return nil
}
