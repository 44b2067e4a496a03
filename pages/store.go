package pages

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// packPages is how many pages one pack file holds (64 MiB): eviction drops whole packs,
// oldest first.
const packPages = 16384

// ErrMissing is returned for a page the store does not hold.
var ErrMissing = errors.New("page not in the store")

type loc struct {
	pack uint32
	page uint32
}

type pack struct {
	id    uint32
	f     *os.File
	pages uint32
}

// Store keeps pages by hash in append-only pack files under a directory, bounded in size.
// A page enters the store only under the hash the store computed itself, and the store
// re-hashes every page when it opens, so a page read back always matches its name.
type Store struct {
	dir      string
	maxPages int

	mu      sync.RWMutex
	idx     map[Hash]loc
	packs   []*pack // oldest first; the last one is appended to
	pins    int
	evicted int64
}

// StoreStats describes a store.
type StoreStats struct {
	Pages    int   `json:"pages"`
	Bytes    int64 `json:"bytes"`
	MaxBytes int64 `json:"max_bytes"`
	Packs    int   `json:"packs"`
	Evicted  int64 `json:"evicted_pages"`
}

// OpenStore opens (or creates) the store in dir, holding at most maxBytes of pages. Pages
// already there are verified and indexed; a damaged tail is cut off.
func OpenStore(dir string, maxBytes int64) (*Store, error) {
	if maxBytes < packPages*Size {
		return nil, fmt.Errorf("page store %s: a size of %d bytes is below one pack (%d)", dir, maxBytes, packPages*Size)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("page store: %w", err)
	}
	s := &Store{dir: dir, maxPages: int(maxBytes / Size), idx: map[Hash]loc{}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("page store: %w", err)
	}
	var ids []int
	for _, e := range ents {
		if id, ok := strings.CutPrefix(e.Name(), "pack-"); ok {
			if n, err := strconv.Atoi(id); err == nil {
				ids = append(ids, n)
			}
		}
	}
	sort.Ints(ids)
	buf := make([]byte, 256*Size)
	hs := make([]Hash, 256)
	for _, id := range ids {
		f, err := os.OpenFile(s.packPath(uint32(id)), os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("page store: %w", err)
		}
		p := &pack{id: uint32(id), f: f}
		for {
			n, err := io.ReadFull(f, buf)
			n -= n % Size
			SumAll(buf[:n], hs[:n/Size])
			for i := 0; i < n/Size; i++ {
				if _, dup := s.idx[hs[i]]; !dup {
					s.idx[hs[i]] = loc{pack: p.id, page: p.pages}
				}
				p.pages++
			}
			if err != nil {
				break
			}
		}
		if err := f.Truncate(int64(p.pages) * Size); err != nil {
			return nil, fmt.Errorf("page store: %w", err)
		}
		s.packs = append(s.packs, p)
	}
	s.evict()
	return s, nil
}

func (s *Store) packPath(id uint32) string { return PackPath(s.dir, id) }

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// PageLoc is where the store keeps a page: its pack file and the page's place in it.
type PageLoc struct {
	Pack uint32
	Page uint32
}

// Locate returns where the store keeps each of hs.
func (s *Store) Locate(hs []Hash) ([]PageLoc, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]PageLoc, len(hs))
	for i, h := range hs {
		l, ok := s.idx[h]
		if !ok {
			return nil, fmt.Errorf("page %s: %w", h, ErrMissing)
		}
		out[i] = PageLoc{Pack: l.pack, Page: l.page}
	}
	return out, nil
}

// locatePrefix returns where the store keeps hs's first pages, up to the first it lacks.
func (s *Store) locatePrefix(hs []Hash) []PageLoc {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]PageLoc, 0, len(hs))
	for _, h := range hs {
		l, ok := s.idx[h]
		if !ok {
			break
		}
		out = append(out, PageLoc{Pack: l.pack, Page: l.page})
	}
	return out
}

// PackPath is the file of pack id in the store in dir.
func PackPath(dir string, id uint32) string { return filepath.Join(dir, fmt.Sprintf("pack-%08d", id)) }

// Has reports which of hs the store holds.
func (s *Store) Has(hs []Hash) []bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]bool, len(hs))
	for i, h := range hs {
		_, out[i] = s.idx[h]
	}
	return out
}

// Add stores the pages in buf (a whole number of pages) under the hashes the store
// computes, and returns those hashes. Pages it holds already are not written again.
func (s *Store) Add(buf []byte) ([]Hash, error) {
	if len(buf)%Size != 0 {
		return nil, fmt.Errorf("page store: %d bytes is not a whole number of pages", len(buf))
	}
	hs := make([]Hash, len(buf)/Size)
	SumAll(buf, hs)
	return hs, s.AddTrusted(hs, buf)
}

// AddTrusted stores pages whose hashes the caller has just computed itself.
func (s *Store) AddTrusted(hs []Hash, buf []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := 0; i < len(hs); {
		p, err := s.current()
		if err != nil {
			return err
		}
		// Gather the new pages that fit the current pack and write them at once, from buf
		// itself (one iovec per run of them: no copy; copying into a growing run made
		// AddTrusted a pre-copy round's largest cost); each is indexed as it joins, so a
		// page repeated in buf is written once.
		var iov [][]byte
		var added []Hash
		next := -1 // the page of buf that would continue the last iovec
		for ; i < len(hs) && p.pages+uint32(len(added)) < packPages; i++ {
			if _, ok := s.idx[hs[i]]; ok {
				continue
			}
			if i != next && len(iov) == maxIOV {
				break
			}
			s.idx[hs[i]] = loc{pack: p.id, page: p.pages + uint32(len(added))}
			added = append(added, hs[i])
			if k := len(iov) - 1; i == next {
				iov[k] = iov[k][:len(iov[k])+Size]
			} else {
				iov = append(iov, buf[i*Size:(i+1)*Size:len(buf)])
			}
			next = i + 1
		}
		if len(added) == 0 {
			continue
		}
		n, err := unix.Pwritev(int(p.f.Fd()), iov, int64(p.pages)*Size)
		if err == nil && n != len(added)*Size {
			err = io.ErrShortWrite
		}
		if err != nil {
			for _, h := range added {
				delete(s.idx, h)
			}
			return fmt.Errorf("page store %s: %w", s.dir, err)
		}
		// Written back now rather than when the kernel's flusher finds the pages old
		// (30 s): a pre-copy writes the container's whole memory here, and left dirty it
		// was written back in the frozen phase, where every fsync (podman's database on
		// the target, the journals) queued behind it: the target's import then stood idle
		// for 0.4 s at 1 GiB here. This starts the write and does not wait for it.
		if err := unix.SyncFileRange(int(p.f.Fd()), int64(p.pages)*Size, int64(n), unix.SYNC_FILE_RANGE_WRITE); err != nil {
			slog.Debug("page store: write-back", "err", err)
		}
		p.pages += uint32(len(added))
	}
	s.evict()
	return nil
}

// maxIOV is the most iovecs one write takes (Linux's IOV_MAX).
const maxIOV = 1024

// current returns the pack to append to, starting a new one when it is full.
func (s *Store) current() (*pack, error) {
	if n := len(s.packs); n > 0 && s.packs[n-1].pages < packPages {
		return s.packs[n-1], nil
	}
	var id uint32
	if n := len(s.packs); n > 0 {
		id = s.packs[n-1].id + 1
	}
	f, err := os.OpenFile(s.packPath(id), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("page store: %w", err)
	}
	p := &pack{id: id, f: f}
	s.packs = append(s.packs, p)
	return p, nil
}

// Read copies the pages named hs, in order, into dst (len(hs)*Size bytes). Pages that lie
// next to each other in a pack are read at once.
func (s *Store) Read(hs []Hash, dst []byte) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for i := 0; i < len(hs); {
		l, ok := s.idx[hs[i]]
		if !ok {
			return fmt.Errorf("page %s: %w", hs[i], ErrMissing)
		}
		j := i + 1
		for j < len(hs) {
			m, ok := s.idx[hs[j]]
			if !ok || m.pack != l.pack || m.page != l.page+uint32(j-i) {
				break
			}
			j++
		}
		p := s.pack(l.pack)
		if p == nil {
			return fmt.Errorf("page %s: pack %d gone: %w", hs[i], l.pack, ErrMissing)
		}
		if _, err := p.f.ReadAt(dst[i*Size:j*Size], int64(l.page)*Size); err != nil {
			return fmt.Errorf("page store %s: %w", s.dir, err)
		}
		i = j
	}
	return nil
}

// ErrDamaged: a page in the store no longer holds the content its hash names (the disk
// changed it, or something wrote into a pack).
var ErrDamaged = errors.New("page damaged in the store")

// ReadVerified is Read that re-hashes every page it read: a page whose content no longer
// matches its hash is dropped from the index (so that it can be sent again) and the read
// fails with ErrDamaged. What restores a container reads through it.
func (s *Store) ReadVerified(hs []Hash, dst []byte) error {
	if err := s.Read(hs, dst); err != nil {
		return err
	}
	var got [256]Hash
	for i := 0; i < len(hs); i += len(got) {
		n := min(len(hs)-i, len(got))
		SumAll(dst[i*Size:(i+n)*Size], got[:n])
		for j := 0; j < n; j++ {
			if got[j] != hs[i+j] {
				s.mu.Lock()
				delete(s.idx, hs[i+j])
				s.mu.Unlock()
				return fmt.Errorf("page %s: %w", hs[i+j], ErrDamaged)
			}
		}
	}
	return nil
}

// Verify re-reads and re-hashes the pages named hs (ReadVerified), a group at a time.
func (s *Store) Verify(hs []Hash) error {
	buf := make([]byte, min(len(hs), 256)*Size)
	for i := 0; i < len(hs); i += 256 {
		n := min(len(hs)-i, 256)
		if err := s.ReadVerified(hs[i:i+n], buf[:n*Size]); err != nil {
			return err
		}
	}
	return nil
}

// FlipBit flips one bit of the stored page h, as a failing disk would: for fault
// injection (MIGRATE_FAULT=damage:target-store) and tests only.
func (s *Store) FlipBit(h Hash) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	l, ok := s.idx[h]
	if !ok {
		return fmt.Errorf("page %s: %w", h, ErrMissing)
	}
	p := s.pack(l.pack)
	if p == nil {
		return fmt.Errorf("page %s: %w", h, ErrMissing)
	}
	var b [1]byte
	off := int64(l.page)*Size + 100
	if _, err := p.f.ReadAt(b[:], off); err != nil {
		return err
	}
	b[0] ^= 0x04
	_, err := p.f.WriteAt(b[:], off)
	return err
}

func (s *Store) pack(id uint32) *pack {
	i := sort.Search(len(s.packs), func(i int) bool { return s.packs[i].id >= id })
	if i < len(s.packs) && s.packs[i].id == id {
		return s.packs[i]
	}
	return nil
}

// Pin keeps every page in the store until the returned function is called: a migration
// that counts on pages the target announced it holds must find them at restore time.
func (s *Store) Pin() (unpin func()) {
	s.mu.Lock()
	s.pins++
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.pins--
			s.evict()
			s.mu.Unlock()
		})
	}
}

// evict drops the oldest packs while the store is over its size and nothing is pinned.
// Called with mu held.
func (s *Store) evict() {
	total := 0
	for _, p := range s.packs {
		total += int(p.pages)
	}
	if s.pins > 0 || total <= s.maxPages {
		return
	}
	drop := map[uint32]bool{}
	for total > s.maxPages && len(s.packs) > 1 {
		p := s.packs[0]
		s.packs = s.packs[1:]
		total -= int(p.pages)
		s.evicted += int64(p.pages)
		drop[p.id] = true
		p.f.Close()
		if err := os.Remove(s.packPath(p.id)); err != nil {
			slog.Warn("page store eviction", "err", err)
		}
	}
	for h, l := range s.idx {
		if drop[l.pack] {
			delete(s.idx, h)
		}
	}
}

// Stats describes the store now.
func (s *Store) Stats() StoreStats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	st := StoreStats{Pages: len(s.idx), MaxBytes: int64(s.maxPages) * Size, Packs: len(s.packs), Evicted: s.evicted}
	for _, p := range s.packs {
		st.Bytes += int64(p.pages) * Size
	}
	return st
}

// Close closes the pack files.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, p := range s.packs {
		errs = append(errs, p.f.Close())
	}
	return errors.Join(errs...)
}
