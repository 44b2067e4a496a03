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
	"log/slog"
	"net"
	"os"
	"sort"
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
	context.AfterFunc(ctx, func() { ln.Close() })
	conn, err := ln.Accept()
	if err != nil {
		return fmt.Errorf("no lazy-pages daemon connected: %w", err)
	}
	ln.Close()
	defer conn.Close()
	served := 0
	t0 := time.Now()
	err = pageserver.Serve(ctx, conn, src, pageserver.ServeOptions{Served: func(n int) { served += n }})
	slog.Info("lazy pages served", "pages", served, "of", total, "took", time.Since(t0), "err", err)
	// Fewer than all is fine: the daemon skips what the process unmapped meanwhile.
	return err
}
