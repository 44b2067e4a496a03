package pages

import (
	"archive/tar"
	"bufio"
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Session is the ordered list of pages named during one migration. Both ends build the
// same list, in the same order: the source from what it announces and sends, the target
// from what it is told and receives. The final archive then names a page by its place in
// the list, and a run of pages by its first place and a count: a few bytes for what would
// otherwise be 32 bytes a page.
type Session struct {
	mu   sync.Mutex
	list []Hash
	pos  map[Hash]int
	// Where locStore keeps the pages at places 0..len(locs)-1 (Locate, LocateAhead).
	locStore *Store
	locs     []PageLoc
}

// NewSession returns an empty session.
func NewSession() *Session { return &Session{pos: map[Hash]int{}} }

// Fresh returns the hashes of hs that the session does not name yet, each once.
func (s *Session) Fresh(hs []Hash) []Hash {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Hash
	seen := map[Hash]bool{}
	for _, h := range hs {
		if _, ok := s.pos[h]; !ok && !seen[h] {
			seen[h] = true
			out = append(out, h)
		}
	}
	return out
}

// Append adds hs to the list, in order, and returns the place of the first.
func (s *Session) Append(hs ...Hash) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	at := len(s.list)
	for i, h := range hs {
		if _, ok := s.pos[h]; !ok {
			s.pos[h] = at + i
		}
	}
	s.list = append(s.list, hs...)
	return at
}

// Index returns the place of h in the list.
func (s *Session) Index(h Hash) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i, ok := s.pos[h]
	return i, ok
}

// Run finds the longest run of hs's first pages that a copy from one place of the list
// stands for: from hint (where the last run ended, -1 if none) if the list holds hs[0]
// there, else from where the list first named hs[0]. n is 0 if the list does not name
// hs[0]. The frozen phase names a container's unchanged pages in the order a round named
// them, so a run mostly continues at the next place, found without a lookup by hash
// (and repeated pages, zero pages among them, do not break it).
func (s *Session) Run(hint int, hs []Hash) (at, n int) {
	if len(hs) == 0 {
		return 0, 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	at = hint
	if at < 0 || at >= len(s.list) || s.list[at] != hs[0] {
		var ok bool
		if at, ok = s.pos[hs[0]]; !ok {
			return 0, 0
		}
	}
	for n < len(hs) && at+n < len(s.list) && s.list[at+n] == hs[n] {
		n++
	}
	return at, n
}

// Slice returns the n hashes from place i.
func (s *Session) Slice(i, n int) ([]Hash, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.slice(i, n)
}

// slice is Slice with s.mu held.
func (s *Session) slice(i, n int) ([]Hash, error) {
	// Written so that no sum can overflow: i and n come from the network.
	if i < 0 || n < 0 || i > len(s.list) || n > len(s.list)-i {
		return nil, fmt.Errorf("pages %d..%d: the session names only %d pages", i, i+n, len(s.list))
	}
	return s.list[i : i+n : i+n], nil
}

// Locate returns the n names from place at and where store keeps them (both read-only),
// from the locations LocateAhead found before if it found them all. A streamed restore
// files each page the frozen phase refers to with its location while podman restores:
// 262,144 lookups by hash at 1 GiB, 35 ms of a CPU the import shares here. The locations
// stay right while store keeps its pages where they are: a target's store is pinned for
// the life of the session (nothing is evicted; a page once added stays in its place).
func (s *Session) Locate(store *Store, at, n int) ([]Hash, []PageLoc, error) {
	s.mu.Lock()
	names, err := s.slice(at, n)
	if err != nil {
		s.mu.Unlock()
		return nil, nil, err
	}
	if store != nil && store == s.locStore && n <= len(s.locs)-at {
		locs := s.locs[at : at+n : at+n]
		s.mu.Unlock()
		return names, locs, nil
	}
	s.mu.Unlock()
	locs, err := store.Locate(names)
	return names, locs, err
}

// LocateAhead finds where store keeps the pages the session names, from the first place
// it has not located to the first page store does not hold yet, so that Locate need not
// look them up. A target calls it as pre-copy rounds fill its store, before the freeze.
// It returns how many places are located.
func (s *Session) LocateAhead(store *Store) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.locStore != store {
		s.locStore, s.locs = store, nil
	}
	from := len(s.locs)
	if from == len(s.list) {
		return from
	}
	got := store.locatePrefix(s.list[from:])
	s.locs = append(s.locs, got...)
	return len(s.locs)
}

// Len is the number of pages named.
func (s *Session) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.list)
}

// IsPageImage reports whether a name in a podman checkpoint archive is one of CRIU's page
// images (checkpoint/pages-N.img), which hold nothing but whole pages.
func IsPageImage(name string) bool {
	dir, base := path.Split(strings.TrimPrefix(name, "./"))
	return strings.TrimSuffix(dir, "/") == "checkpoint" && strings.HasPrefix(base, "pages-") && strings.HasSuffix(base, ".img")
}

// The encoded archive is a sequence of operations:
//
//	'R' n bytes             n raw bytes of the archive
//	'C' i n                 the n pages at places i.. of the session
//	'P' n pages             n pages the receiver lacks
//	'D' n (place xor)*n     n pages the receiver lacks, each as its XOR with the page at
//	                        place in the session: the content its address had when it
//	                        was last sent (a pre-copy round)
//	'E'                     the end
//
// A dump whose memory came from CRIU's page server (MemoryWriter) puts it before the
// archive:
//
//	'A' kind id vaddr n flags   a pagemap entry; a present one's n pages follow as C, P
//	                            and D operations
//	'M'                         the memory's end; the archive follows
const (
	opRaw       = 'R'
	opCopy      = 'C'
	opPages     = 'P'
	opDelta     = 'D'
	opEnd       = 'E'
	opEntry     = 'A'
	opMemoryEnd = 'M'
)

func newBufWriter(w io.Writer) *bufio.Writer { return bufio.NewWriterSize(w, 1<<20) }

// Stats counts what an encoded archive carried.
type Stats struct {
	ArchiveBytes int64 `json:"archive_bytes"` // the archive as podman wrote it
	RawBytes     int64 `json:"raw_bytes"`     // sent as they are (headers, other images)
	PagesCopied  int64 `json:"pages_referenced"`
	PagesSent    int64 `json:"pages_sent"`  // sent whole or as deltas
	PagesDelta   int64 `json:"pages_delta"` // of those, sent as deltas
	// PagesKnown: pages of the memory part named without hashing them (unchanged since
	// the last pre-copy round read them, EncodeOptions.Known).
	PagesKnown int64 `json:"pages_known,omitempty"`
}

// AddPages adds o's page counts to s: the memory and the archive of one frozen phase
// are counted apart and reported together. (PagesKnown is only ever set by a sender.)
func (s *Stats) AddPages(o Stats) {
	s.PagesCopied += o.PagesCopied
	s.PagesSent += o.PagesSent
	s.PagesDelta += o.PagesDelta
	s.PagesKnown += o.PagesKnown
}

// EncodeOptions are Encode's optional parts.
type EncodeOptions struct {
	// Sent, if not nil, sees every page sent, with its hash.
	Sent func(h []Hash, pages []byte)
	// Base finds what a page's address held when it was last sent: its place in the
	// session, with the content copied into into. A page the session does not name then
	// goes as a delta against it. pid is the process's PID in its namespace, as CRIU's
	// images name it.
	Base func(pid int, vaddr uint64, into []byte) (place int, ok bool)
	// Known, if set, may name a process's page without hashing it (MemoryWriter): it
	// returns the page's SHA-256 when it can vouch that page's content is what it had
	// when that hash was taken (FastSum of the same address matches). pid is as for Base.
	Known func(pid int, vaddr uint64, page []byte) (Hash, bool)
	// Observe hands the content of the archive's small regular files (under 1 MiB) to
	// the function named by their base name (e.g. CRIU's stats-dump). They still go as
	// raw bytes.
	Observe map[string]func(data []byte)
	// Room, if not nil, is where a MemoryWriter keeps the names of the memory while its
	// capacity lasts: memory its caller faulted in before the container froze (fresh
	// memory is dear on some machines: a gigabyte's 8 MiB of names took 20 ms here).
	Room []Hash
}

// switchTee copies what is read through it to a buffer while on.
type switchTee struct {
	r   io.Reader
	on  bool
	buf bytes.Buffer
	n   int64
}

func (t *switchTee) Read(b []byte) (int, error) {
	n, err := t.r.Read(b)
	t.n += int64(n)
	if t.on {
		t.buf.Write(b[:n])
	}
	return n, err
}

type opWriter struct {
	w   *bufio.Writer
	tmp [2 * binary.MaxVarintLen64]byte
}

func (o *opWriter) op(code byte, args ...uint64) error {
	o.w.WriteByte(code)
	for _, a := range args {
		n := binary.PutUvarint(o.tmp[:], a)
		if _, err := o.w.Write(o.tmp[:n]); err != nil {
			return err
		}
	}
	return nil
}

// Encode reads a checkpoint archive (tar) from src and writes it to dst with the pages of
// its page images replaced by session references where the session names them. Pages it
// does not name are sent, as deltas where o.Base knows their address's earlier content,
// and join the session. The receiver's Decode rebuilds the archive byte for byte.
//
// CRIU's pagemap images give the address of each page; podman's archive lists them
// before the page images (pagemap-* sorts before pages-*).
func Encode(src io.Reader, dst io.Writer, sess *Session, o EncodeOptions) (Stats, error) {
	var st Stats
	tee := &switchTee{r: src, on: true}
	tr := tar.NewReader(tee)
	ow := &opWriter{w: bufio.NewWriterSize(dst, 1<<20)}
	flushRaw := func() error {
		if tee.buf.Len() == 0 {
			return nil
		}
		st.RawBytes += int64(tee.buf.Len())
		if err := ow.op(opRaw, uint64(tee.buf.Len())); err != nil {
			return err
		}
		_, err := ow.w.Write(tee.buf.Bytes())
		tee.buf.Reset()
		return err
	}
	maps := map[uint32]*PageMap{}
	buf := make([]byte, chunk*Size)
	hs := make([]Hash, chunk)
	run := &pendingRun{ow: ow, st: &st, sent: o.Sent}
	base := make([]byte, Size)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return st, fmt.Errorf("read checkpoint archive: %w", err)
		}
		if fn := o.Observe[path.Base(hdr.Name)]; fn != nil && hdr.Typeflag == tar.TypeReg && hdr.Size < 1<<20 {
			data, err := io.ReadAll(tr) // through the tee: it goes as raw bytes
			if err != nil {
				return st, fmt.Errorf("read %s: %w", hdr.Name, err)
			}
			fn(data)
			continue
		}
		if pid, ok := IsPageMap(hdr.Name); ok && o.Base != nil && hdr.Size < 64<<20 {
			img, err := io.ReadAll(tr) // through the tee: it goes as raw bytes
			if err != nil {
				return st, fmt.Errorf("read %s: %w", hdr.Name, err)
			}
			if pm, err := ParsePageMap(pid, img); err == nil {
				maps[pm.PagesID] = pm
			} // without it, that process's pages go whole
			continue
		}
		if hdr.Typeflag != tar.TypeReg || !IsPageImage(hdr.Name) || hdr.Size%Size != 0 {
			continue // its bytes go through the tee on the next read
		}
		if err := flushRaw(); err != nil {
			return st, err
		}
		// The addresses of this image's pages, if its pagemap accounts for all of them.
		var addrs []uint64
		pm := maps[pagesID(hdr.Name)]
		if pm != nil && int64(pm.Len()) == hdr.Size/Size {
			addrs = pm.Addrs()
		}
		tee.on = false
		done := 0
		for left := hdr.Size / Size; left > 0; {
			n := int(min(left, chunk))
			if _, err := io.ReadFull(tr, buf[:n*Size]); err != nil {
				return st, fmt.Errorf("read %s: %w", hdr.Name, err)
			}
			left -= int64(n)
			SumAll(buf[:n*Size], hs[:n])
			for i := 0; i < n; {
				if at, ok := sess.Index(hs[i]); ok {
					if err := run.flush(); err != nil {
						return st, err
					}
					j := i + 1
					for j < n {
						if k, ok := sess.Index(hs[j]); !ok || k != at+(j-i) {
							break
						}
						j++
					}
					if err := ow.op(opCopy, uint64(at), uint64(j-i)); err != nil {
						return st, err
					}
					st.PagesCopied += int64(j - i)
					i = j
					continue
				}
				// A page the session does not name joins it as it is sent, so a page
				// repeated later in the archive is sent once.
				page := buf[i*Size : (i+1)*Size]
				sess.Append(hs[i])
				if addrs != nil {
					if place, ok := o.Base(pm.PID, addrs[done+i], base); ok {
						if err := run.delta(hs[i], page, place, base); err != nil {
							return st, err
						}
						i++
						continue
					}
				}
				if err := run.literal(hs[i], page); err != nil {
					return st, err
				}
				i++
			}
			if err := run.flush(); err != nil {
				return st, err
			}
			done += n
		}
		tee.on = true
	}
	// The rest: the archive's end blocks and any padding.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return st, fmt.Errorf("read checkpoint archive: %w", err)
	}
	if err := flushRaw(); err != nil {
		return st, err
	}
	st.ArchiveBytes = tee.n
	if err := ow.op(opEnd); err != nil {
		return st, err
	}
	return st, ow.w.Flush()
}

// chunk is how many pages the codec handles at once.
const chunk = 256

// pagesID is the N of checkpoint/pages-N.img.
func pagesID(name string) uint32 {
	n, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(path.Base(name), "pages-"), ".img"), 10, 32)
	return uint32(n)
}

// pendingRun gathers consecutive pages sent the same way (whole or as deltas) into one
// operation.
type pendingRun struct {
	ow    *opWriter
	st    *Stats
	sent  func([]Hash, []byte)
	code  byte
	hs    []Hash
	pages []byte // the pages as they are
	body  []byte // what goes on the wire after the count
}

func (r *pendingRun) add(code byte, h Hash, page []byte) error {
	if r.code != code {
		if err := r.flush(); err != nil {
			return err
		}
		r.code = code
	}
	r.hs = append(r.hs, h)
	r.pages = append(r.pages, page...)
	return nil
}

func (r *pendingRun) literal(h Hash, page []byte) error {
	if err := r.add(opPages, h, page); err != nil {
		return err
	}
	r.body = append(r.body, page...)
	return nil
}

func (r *pendingRun) delta(h Hash, page []byte, place int, base []byte) error {
	if err := r.add(opDelta, h, page); err != nil {
		return err
	}
	r.body = binary.AppendUvarint(r.body, uint64(place))
	r.body = appendXOR(r.body, page, base)
	r.st.PagesDelta++
	return nil
}

func (r *pendingRun) flush() error {
	if len(r.hs) == 0 {
		return nil
	}
	if err := r.ow.op(r.code, uint64(len(r.hs))); err != nil {
		return err
	}
	if _, err := r.ow.w.Write(r.body); err != nil {
		return err
	}
	if r.sent != nil {
		r.sent(r.hs, r.pages)
	}
	r.st.PagesSent += int64(len(r.hs))
	r.hs, r.pages, r.body = r.hs[:0], r.pages[:0], r.body[:0]
	return nil
}

// ErrTooLarge: an encoded archive would rebuild to more than its receiver allows.
var ErrTooLarge = errors.New("encoded archive: larger than allowed")

// Decode rebuilds an archive that Encode wrote from src into dst, reading referenced pages
// from store. Every page received joins the session and the store, under the hash this
// side computes. The rebuilt archive may not exceed limit bytes (what a container on this
// host can hold): the encoding is untrusted input, and a reference of a few bytes stands
// for many pages.
func Decode(src io.Reader, dst io.Writer, sess *Session, store *Store, limit int64) (Stats, error) {
	return DecodeMemory(src, dst, sess, store, limit, nil)
}

// DecodeMemory is Decode for a stream that may begin with a dump's memory (MemoryWriter):
// its pagemaps and the names of its pages go to mem, its pages to the store, nothing of it
// to dst. Without mem, such a stream is an error. The memory counts against limit.
func DecodeMemory(src io.Reader, dst io.Writer, sess *Session, store *Store, limit int64, mem *Memory) (Stats, error) {
	return DecodeMemoryFunc(src, dst, sess, store, limit, mem, nil)
}

// Arrived is told of a memory entry's pages as they are decoded (in the store already):
// the pages of pagemap (kind, id) from vaddr, in an entry with flags, named hs, where the
// store keeps them locs (both valid only during the call). The decoder looks each page up
// once, for the check that the store holds it: a streamed restore files a gigabyte's
// 262,144 references while it restores, and a second lookup per page cost it 20-30 ms.
type Arrived func(kind int, id uint64, flags uint32, vaddr uint64, hs []Hash, locs []PageLoc) error

// DecodeMemoryFunc is DecodeMemory that tells arrived (if not nil) of the memory's pages
// as they come, so that a restore may serve them before the stream ends.
func DecodeMemoryFunc(src io.Reader, dst io.Writer, sess *Session, store *Store, limit int64, mem *Memory, arrived Arrived) (Stats, error) {
	var st Stats
	var memLeft uint64 // pages of the current memory entry still to come
	var cur *MemEntry  // the current memory entry, and the map it belongs to
	var curKind int
	var curID uint64
	var curNext uint64 // the address of its next page
	tell := func(hs []Hash, locs []PageLoc) error {
		if arrived == nil || cur == nil {
			return nil
		}
		at := curNext
		curNext += uint64(len(hs)) * Size
		if locs == nil {
			var err error
			if locs, err = store.Locate(hs); err != nil {
				return err
			}
		}
		return arrived(curKind, curID, cur.Flags, at, hs, locs)
	}
	var used int64 // memory bytes, towards limit
	grow := func(n int64) error {
		if n < 0 || n > limit-st.ArchiveBytes-used {
			return fmt.Errorf("%w: %d bytes after %d, limit %d", ErrTooLarge, n, st.ArchiveBytes+used, limit)
		}
		return nil
	}
	// inMemory takes n pages of the current memory entry, if one is open.
	inMemory := func(n int) (bool, error) {
		if memLeft == 0 {
			return false, nil
		}
		if uint64(n) > memLeft {
			return false, fmt.Errorf("encoded archive: %d pages for a memory entry that has %d left", n, memLeft)
		}
		memLeft -= uint64(n)
		return true, nil
	}
	br := bufio.NewReaderSize(src, 1<<20)
	buf := make([]byte, chunk*Size)
	hs := make([]Hash, chunk)
	arg := func() (int, error) {
		v, err := binary.ReadUvarint(br)
		if err != nil {
			return 0, fmt.Errorf("encoded archive: %w", noEOF(err))
		}
		if v > 1<<40 {
			return 0, fmt.Errorf("encoded archive: implausible count %d", v)
		}
		return int(v), nil
	}
	for {
		code, err := br.ReadByte()
		if err != nil {
			return st, fmt.Errorf("encoded archive: %w", noEOF(err))
		}
		if memLeft != 0 && code != opCopy && code != opPages && code != opDelta {
			return st, fmt.Errorf("encoded archive: operation %q inside a memory entry (%d pages left)", code, memLeft)
		}
		switch code {
		case opEnd:
			return st, nil
		case opEntry:
			if mem == nil {
				return st, fmt.Errorf("encoded archive: memory where none was expected")
			}
			var v [5]uint64
			for i := range v {
				x, err := binary.ReadUvarint(br)
				if err != nil {
					return st, fmt.Errorf("encoded archive: %w", noEOF(err))
				}
				v[i] = x
			}
			kind, id, vaddr, n, flags := int(v[0]), v[1], v[2], v[3], v[4]
			if (kind != KindProcess && kind != KindShmem) || vaddr%Size != 0 || n == 0 || n > 1<<36 || flags > 0xffff ||
				vaddr > ^uint64(0)-n*Size {
				return st, fmt.Errorf("encoded archive: memory entry %d/%d at %#x, %d pages, flags %#x", kind, id, vaddr, n, flags)
			}
			e, err := mem.add(kind, id, vaddr, n, uint32(flags))
			if err != nil {
				return st, err
			}
			cur, curKind, curID, curNext = e, kind, id, vaddr
			if e.Present() {
				if err := grow(int64(n) * Size); err != nil {
					return st, err
				}
				used += int64(n) * Size
				memLeft = n
				if !mem.Counted {
					// Once, not by doubling: n is within limit (grow).
					mem.Hashes = slices.Grow(mem.Hashes, int(n))
				}
			}
		case opMemoryEnd:
			if mem == nil {
				return st, fmt.Errorf("encoded archive: memory where none was expected")
			}
		case opRaw:
			n, err := arg()
			if err != nil {
				return st, err
			}
			if err := grow(int64(n)); err != nil {
				return st, err
			}
			if _, err := io.CopyN(dst, br, int64(n)); err != nil {
				return st, fmt.Errorf("encoded archive: %w", noEOF(err))
			}
			st.RawBytes += int64(n)
			st.ArchiveBytes += int64(n)
		case opCopy:
			at, err := arg()
			if err != nil {
				return st, err
			}
			n, err := arg()
			if err != nil {
				return st, err
			}
			if l := sess.Len(); at > l || n > l-at {
				return st, fmt.Errorf("encoded archive: pages %d+%d: the session names only %d pages", at, n, l)
			}
			if ok, err := inMemory(n); err != nil {
				return st, err
			} else if ok {
				names, locs, err := sess.Locate(store, at, n)
				if err != nil {
					return st, fmt.Errorf("encoded archive: memory %w", err)
				}
				mem.keep(names)
				st.PagesCopied += int64(n)
				if err := tell(names, locs); err != nil {
					return st, err
				}
				continue
			}
			if err := grow(int64(n) * Size); err != nil {
				return st, err
			}
			for n > 0 {
				k := min(n, chunk)
				names, err := sess.Slice(at, k)
				if err != nil {
					return st, err
				}
				if err := store.Read(names, buf[:k*Size]); err != nil {
					return st, err
				}
				if _, err := dst.Write(buf[:k*Size]); err != nil {
					return st, err
				}
				st.PagesCopied += int64(k)
				st.ArchiveBytes += int64(k) * Size
				at += k
				n -= k
			}
		case opPages, opDelta:
			n, err := arg()
			if err != nil {
				return st, err
			}
			toMem, err := inMemory(n)
			if err != nil {
				return st, err
			}
			if !toMem {
				if err := grow(int64(n) * Size); err != nil {
					return st, err
				}
			}
			for n > 0 {
				k := min(n, chunk)
				if code == opPages {
					if _, err := io.ReadFull(br, buf[:k*Size]); err != nil {
						return st, fmt.Errorf("encoded archive: %w", noEOF(err))
					}
				} else {
					if err := readDeltas(br, buf[:k*Size], sess, store); err != nil {
						return st, err
					}
					st.PagesDelta += int64(k)
				}
				SumAll(buf[:k*Size], hs[:k])
				sess.Append(hs[:k]...)
				if err := store.AddTrusted(hs[:k], buf[:k*Size]); err != nil {
					return st, err
				}
				st.PagesSent += int64(k)
				n -= k
				if toMem {
					mem.keep(hs[:k])
					if err := tell(hs[:k], nil); err != nil {
						return st, err
					}
					continue
				}
				if _, err := dst.Write(buf[:k*Size]); err != nil {
					return st, err
				}
				st.ArchiveBytes += int64(k) * Size
			}
		default:
			return st, fmt.Errorf("encoded archive: unknown operation %q", code)
		}
	}
}

// readDeltas reads len(out)/Size delta records (place, XOR) and rebuilds their pages
// into out from the pages at those places.
func readDeltas(br *bufio.Reader, out []byte, sess *Session, store *Store) error {
	names := make([]Hash, len(out)/Size)
	for i := range names {
		place, err := binary.ReadUvarint(br)
		if err != nil {
			return fmt.Errorf("encoded archive: %w", noEOF(err))
		}
		if place >= uint64(sess.Len()) {
			return fmt.Errorf("encoded archive: delta base %d: the session names only %d pages", place, sess.Len())
		}
		h, err := sess.Slice(int(place), 1)
		if err != nil {
			return fmt.Errorf("encoded archive: delta base: %w", err)
		}
		names[i] = h[0]
		if _, err := io.ReadFull(br, out[i*Size:(i+1)*Size]); err != nil {
			return fmt.Errorf("encoded archive: %w", noEOF(err))
		}
	}
	base := make([]byte, len(out))
	if err := store.ReadVerified(names, base); err != nil {
		return fmt.Errorf("encoded archive: delta base: %w", err)
	}
	subtle.XORBytes(out, out, base)
	return nil
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
