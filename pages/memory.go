package pages

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/pagemap"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// CRIU's pagemap flags (criu/include/pagemap.h).
const (
	FlagParent  = 1 << 0
	FlagLazy    = 1 << 1
	FlagPresent = 1 << 2
)

// Kinds of pagemap (as pageserver.Kind).
const (
	KindProcess = 1 // pagemap-ID.img
	KindShmem   = 2 // pagemap-shmem-ID.img
)

// Memory is a dumped container's memory as a list of pagemaps whose pages are named by
// hash: what CRIU's pagemap and pages images say, without the pages themselves. The
// pages are in a store.
type Memory struct {
	Maps   []*MemMap
	Hashes []Hash // every present page, in the order of Maps and their entries

	// Counted, set before decoding, keeps no names: a streamed restore hands each page to
	// its index as it arrives (DecodeMemoryFunc's Arrived) and needs only their number.
	// A gigabyte's names are 8 MiB that the frozen phase would otherwise fill with fresh
	// memory (40 ms of the target's CPU here, where fresh pages are dear). Its entries'
	// First then means nothing.
	Counted bool
	counted int
}

// MemMap is one pagemap image.
type MemMap struct {
	Kind    int
	ID      uint64
	Entries []MemEntry
}

// MemEntry is one pagemap entry; a present entry's pages are Hashes[First:First+Pages].
type MemEntry struct {
	Vaddr uint64
	Pages uint64
	Flags uint32
	First int
}

// Present reports whether the entry carries pages.
func (e MemEntry) Present() bool { return e.Flags&FlagPresent != 0 }

// Lazy reports whether CRIU may restore the entry's pages on demand.
func (e MemEntry) Lazy() bool { return e.Flags&FlagLazy != 0 }

// Bytes is the size of the memory's present pages.
func (m *Memory) Bytes() int64 { return int64(len(m.Hashes)+m.counted) * Size }

// keep records the names of the next present pages.
func (m *Memory) keep(hs []Hash) {
	if m.Counted {
		m.counted += len(hs)
		return
	}
	m.Hashes = append(m.Hashes, hs...)
}

// add appends an entry to the map of (kind, id), which becomes the current map.
func (m *Memory) add(kind int, id, vaddr, n uint64, flags uint32) (*MemEntry, error) {
	var mm *MemMap
	if k := len(m.Maps); k > 0 && m.Maps[k-1].Kind == kind && m.Maps[k-1].ID == id {
		mm = m.Maps[k-1]
	} else {
		for _, o := range m.Maps {
			if o.Kind == kind && o.ID == id {
				return nil, fmt.Errorf("memory: pagemap %d/%d opened twice", kind, id)
			}
		}
		mm = &MemMap{Kind: kind, ID: id}
		m.Maps = append(m.Maps, mm)
	}
	if k := len(mm.Entries); k > 0 {
		last := mm.Entries[k-1]
		if vaddr < last.Vaddr+last.Pages*Size {
			return nil, fmt.Errorf("memory: pagemap %d/%d: entry at %#x overlaps the one before", kind, id, vaddr)
		}
	}
	mm.Entries = append(mm.Entries, MemEntry{Vaddr: vaddr, Pages: n, Flags: flags, First: len(m.Hashes)})
	return &mm.Entries[len(mm.Entries)-1], nil
}

// MemoryWriter writes a dump's memory into an encoded archive stream, before the archive
// itself: each pagemap entry, and each present entry's pages as references to pages the
// receiver holds, deltas against what the page's address held when last sent, or whole.
type MemoryWriter struct {
	ow   *opWriter
	sess *Session
	o    EncodeOptions
	st   Stats
	run  *pendingRun
	mem  Memory

	hs   []Hash
	idx  []int // scratch: the pages of a chunk still to hash
	base []byte
	left uint64 // pages of the current entry still to come
	kind int
	id   uint64
	next uint64 // address of the next page
	then int    // the session's place after the last reference sent, -1 if none
}

// NewMemoryWriter writes to w; follow it with Encode of the archive on the same w.
func NewMemoryWriter(w io.Writer, sess *Session, o EncodeOptions) *MemoryWriter {
	ow := &opWriter{w: newBufWriter(w)}
	m := &MemoryWriter{ow: ow, sess: sess, o: o, hs: make([]Hash, chunk), idx: make([]int, 0, chunk), base: make([]byte, Size), then: -1}
	m.run = &pendingRun{ow: ow, st: &m.st, sent: o.Sent}
	m.mem.Hashes = o.Room[:0:cap(o.Room)]
	return m
}

// Entry starts a pagemap entry; a present one's pages follow through Pages.
func (m *MemoryWriter) Entry(kind int, id, vaddr, n uint64, flags uint32) error {
	if m.left != 0 {
		return fmt.Errorf("memory: entry at %#x begins before the %d pages of the one before arrived", vaddr, m.left)
	}
	e, err := m.mem.add(kind, id, vaddr, n, flags)
	if err != nil {
		return err
	}
	if err := m.ow.op(opEntry, uint64(kind), id, vaddr, n, uint64(flags)); err != nil {
		return err
	}
	if e.Present() {
		m.left, m.kind, m.id, m.next = n, kind, id, vaddr
		m.mem.Hashes = slices.Grow(m.mem.Hashes, int(n)) // once, not by doubling
	}
	return nil
}

// Pages takes the next pages of the current present entry (a whole number of pages).
func (m *MemoryWriter) Pages(vaddr uint64, data []byte) error {
	if len(data)%Size != 0 || vaddr != m.next || uint64(len(data)/Size) > m.left {
		return fmt.Errorf("memory: %d bytes at %#x do not continue the entry (next %#x, %d pages left)", len(data), vaddr, m.next, m.left)
	}
	for len(data) > 0 {
		n := min(len(data)/Size, chunk)
		buf := data[:n*Size]
		m.name(buf, m.hs[:n])
		m.mem.Hashes = append(m.mem.Hashes, m.hs[:n]...)
		for i := 0; i < n; {
			// A page the session names goes as a reference, with the pages after it that
			// follow it in the session (Session.Run).
			if at, k := m.sess.Run(m.then, m.hs[i:n]); k > 0 {
				if err := m.run.flush(); err != nil {
					return err
				}
				if err := m.ow.op(opCopy, uint64(at), uint64(k)); err != nil {
					return err
				}
				m.st.PagesCopied += int64(k)
				m.then = at + k
				i += k
				continue
			}
			m.then = -1
			page := buf[i*Size : (i+1)*Size]
			m.sess.Append(m.hs[i])
			if m.o.Base != nil && m.kind == KindProcess {
				if place, ok := m.o.Base(int(m.id), m.next+uint64(i)*Size, m.base); ok {
					if err := m.run.delta(m.hs[i], page, place, m.base); err != nil {
						return err
					}
					i++
					continue
				}
			}
			if err := m.run.literal(m.hs[i], page); err != nil {
				return err
			}
			i++
		}
		if err := m.run.flush(); err != nil {
			return err
		}
		m.next += uint64(n) * Size
		m.left -= uint64(n)
		data = data[n*Size:]
	}
	return nil
}

// Named takes the next pages of the current present entry by their names alone: pages
// named while frozen before this writer saw them (the read hand-over names a frozen
// container's memory while CRIU dumps it), each one the session names. They go as
// references. A page the session does not name is an error, and nothing of the call is
// written then.
func (m *MemoryWriter) Named(vaddr uint64, hs []Hash) error {
	if vaddr != m.next || uint64(len(hs)) > m.left {
		return fmt.Errorf("memory: %d pages at %#x do not continue the entry (next %#x, %d pages left)", len(hs), vaddr, m.next, m.left)
	}
	type ref struct{ at, n int }
	var refs []ref
	then := m.then
	for i := 0; i < len(hs); {
		at, k := m.sess.Run(then, hs[i:])
		if k == 0 {
			return fmt.Errorf("memory: page %s at %#x: the session does not name it", hs[i], vaddr+uint64(i)*Size)
		}
		refs = append(refs, ref{at, k})
		then = at + k
		i += k
	}
	if err := m.run.flush(); err != nil {
		return err
	}
	for _, r := range refs {
		if err := m.ow.op(opCopy, uint64(r.at), uint64(r.n)); err != nil {
			return err
		}
	}
	m.mem.Hashes = append(m.mem.Hashes, hs...)
	m.st.PagesCopied += int64(len(hs))
	m.st.PagesKnown += int64(len(hs))
	m.then = then
	m.next += uint64(len(hs)) * Size
	m.left -= uint64(len(hs))
	return nil
}

// name fills hs with the names of the pages in buf (the current entry's, from m.next):
// those Known vouches for without hashing them, the others by their SHA-256.
func (m *MemoryWriter) name(buf []byte, hs []Hash) {
	if m.o.Known == nil || m.kind != KindProcess {
		SumAll(buf, hs)
		return
	}
	m.idx = m.idx[:0]
	for i := range hs {
		h, ok := m.o.Known(int(m.id), m.next+uint64(i)*Size, buf[i*Size:(i+1)*Size])
		if ok {
			hs[i] = h
			m.st.PagesKnown++
		} else {
			m.idx = append(m.idx, i)
		}
	}
	sumPages(buf, hs, m.idx)
}

// Close ends the memory part and returns what it holds and what it sent.
func (m *MemoryWriter) Close() (*Memory, Stats, error) {
	if m.left != 0 {
		return nil, m.st, fmt.Errorf("memory: the dump ended %d pages into an entry", m.left)
	}
	if err := m.run.flush(); err != nil {
		return nil, m.st, err
	}
	if err := m.ow.op(opMemoryEnd); err != nil {
		return nil, m.st, err
	}
	return &m.mem, m.st, m.ow.w.Flush()
}

// ReadPages fills buf with the pages of process pid from vaddr, from the store: at least
// one page, fewer than asked where the entry ends. It answers a lazy-pages daemon. Every
// page is checked against its hash: a damaged one is never served.
func (m *Memory) ReadPages(store *Store, pid, vaddr uint64, buf []byte) (int, error) {
	for _, mm := range m.Maps {
		if mm.Kind != KindProcess || mm.ID != pid {
			continue
		}
		i := sort.Search(len(mm.Entries), func(i int) bool {
			e := mm.Entries[i]
			return e.Vaddr+e.Pages*Size > vaddr
		})
		if i == len(mm.Entries) || mm.Entries[i].Vaddr > vaddr || !mm.Entries[i].Present() {
			return 0, fmt.Errorf("page %#x of process %d: not in its memory", vaddr, pid)
		}
		e := mm.Entries[i]
		off := (vaddr - e.Vaddr) / Size
		n := min(uint64(len(buf)/Size), e.Pages-off)
		if n == 0 {
			return 0, errors.New("no room for a page")
		}
		first := e.First + int(off)
		if err := store.ReadVerified(m.Hashes[first:first+int(n)], buf[:n*Size]); err != nil {
			return 0, err
		}
		return int(n), nil
	}
	return 0, fmt.Errorf("process %d: no memory dumped for it", pid)
}

// WriteImages writes the memory as CRIU's images into dir (pagemap-*.img and pages-*.img)
// reading pages from store, each checked against its hash. With lazy, entries CRIU may restore lazily keep only their
// lazy flag and their pages stay out of the pages images: a lazy-pages daemon serves them.
// It returns the bytes of pages written.
func (m *Memory) WriteImages(dir string, store *Store, lazy bool) (int64, error) {
	var written int64
	buf := make([]byte, chunk*Size)
	for i, mm := range m.Maps {
		pagesID := uint32(i + 1)
		name := fmt.Sprintf("pagemap-%d.img", mm.ID)
		if mm.Kind == KindShmem {
			name = fmt.Sprintf("pagemap-shmem-%d.img", mm.ID)
		}
		img := pagemapHeader(pagesID)
		pf, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("pages-%d.img", pagesID)), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			return written, err
		}
		for _, e := range mm.Entries {
			flags := e.Flags
			if lazy && mm.Kind == KindProcess && e.Lazy() && e.Present() {
				flags &^= FlagPresent
			}
			img = appendPagemapEntry(img, e.Vaddr, e.Pages, flags)
			if flags&FlagPresent == 0 {
				continue
			}
			for k := 0; k < int(e.Pages); k += chunk {
				n := min(int(e.Pages)-k, chunk)
				if err := store.ReadVerified(m.Hashes[e.First+k:e.First+k+n], buf[:n*Size]); err != nil {
					pf.Close()
					return written, err
				}
				if _, err := pf.Write(buf[:n*Size]); err != nil {
					pf.Close()
					return written, err
				}
				written += int64(n) * Size
			}
		}
		if err := pf.Close(); err != nil {
			return written, err
		}
		if err := os.WriteFile(filepath.Join(dir, name), img, 0o600); err != nil {
			return written, err
		}
	}
	return written, nil
}

func pagemapHeader(pagesID uint32) []byte {
	mg := magic.LoadMagic()
	b := binary.LittleEndian.AppendUint32(nil, uint32(mg.ByName["IMG_COMMON"]))
	b = binary.LittleEndian.AppendUint32(b, uint32(mg.ByName["PAGEMAP"]))
	raw, _ := proto.Marshal(&pagemap.PagemapHead{PagesId: proto.Uint32(pagesID)})
	b = binary.LittleEndian.AppendUint32(b, uint32(len(raw)))
	return append(b, raw...)
}

// appendPagemapEntry writes an entry as CRIU 4 does: compat_nr_pages 0 and the 64-bit
// count in field 5, which go-criu's generated type lacks.
func appendPagemapEntry(b []byte, vaddr, n uint64, flags uint32) []byte {
	e := &pagemap.PagemapEntry{Vaddr: proto.Uint64(vaddr), NrPages: proto.Uint32(0), Flags: proto.Uint32(flags)}
	raw, _ := proto.Marshal(e)
	raw = protowire.AppendTag(raw, 5, protowire.VarintType)
	raw = protowire.AppendVarint(raw, n)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(raw)))
	return append(b, raw...)
}
