// Package volumes moves the content of a named volume between hosts, content-addressed:
// a volume is a tree of entries (directories, files, symbolic links) whose file content
// is named page by page (4 KiB, SHA-256, the page store's names), so that only pages the
// target's store lacks cross the link, and a second pass sends only the files that
// changed since the first (by size, times and inode, then by content).
package volumes

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/migrate-project/migrate/pages"
)

// Entry types.
const (
	TypeDir     = "d"
	TypeFile    = "f"
	TypeSymlink = "l"
)

// Entry is one file, directory or symbolic link of a volume.
type Entry struct {
	Path  string `json:"p"` // relative to the volume's root, slash-separated, never "." or ".."
	Type  string `json:"t"`
	Mode  uint32 `json:"m"` // permission bits with setuid, setgid, sticky
	UID   int    `json:"u"`
	GID   int    `json:"g"`
	Size  int64  `json:"s,omitempty"`
	Mtime int64  `json:"mt"` // nanoseconds since the epoch
	Link  string `json:"l,omitempty"`
	// Hashes names the file's content page by page (32 bytes each; the last page is
	// padded with zeros).
	Hashes []byte `json:"h,omitempty"`

	// What tells a changed file on the host that scanned it (not sent).
	ctime, ino int64
}

// Tree is a volume's content, its entries sorted by path.
type Tree struct {
	Entries []Entry `json:"entries"`
	// Skipped lists what cannot move (sockets, devices, FIFOs); the owner recreates them.
	Skipped []string `json:"skipped,omitempty"`
}

// Bytes is the size of the tree's file content.
func (t *Tree) Bytes() int64 {
	var n int64
	for _, e := range t.Entries {
		n += e.Size
	}
	return n
}

// Digest names the whole tree: every entry's path, type, mode, owner, size, time, link
// and content hashes.
func (t *Tree) Digest() string {
	h := sha256.New()
	var b [8]byte
	for _, e := range t.Entries {
		io.WriteString(h, e.Path)
		h.Write([]byte{0})
		io.WriteString(h, e.Type)
		for _, v := range []int64{int64(e.Mode), int64(e.UID), int64(e.GID), e.Size, e.Mtime} {
			binary.LittleEndian.PutUint64(b[:], uint64(v))
			h.Write(b[:])
		}
		io.WriteString(h, e.Link)
		h.Write([]byte{0})
		h.Write(e.Hashes)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// pagesOf is how many pages a file of size bytes has.
func pagesOf(size int64) int64 { return (size + pages.Size - 1) / pages.Size }

// Limits on a tree from a peer.
const (
	MaxEntries  = 4 << 20
	MaxPath     = 4096
	MaxFileSize = 1 << 40
	// MaxManifest bounds an encoded tree: the hashes of MaxFileSize bytes and more.
	MaxManifest = 1 << 30
)

// Validate checks a tree received from a peer: clean relative paths, sorted and unique,
// every parent a directory of the tree, sizes matching their hashes. Apply relies on it.
func (t *Tree) Validate() error {
	if len(t.Entries) > MaxEntries {
		return fmt.Errorf("volume: %d entries, at most %d", len(t.Entries), MaxEntries)
	}
	dirs := map[string]bool{"": true}
	var total int64
	for i, e := range t.Entries {
		if e.Path == "" || len(e.Path) > MaxPath || path.Clean(e.Path) != e.Path || strings.HasPrefix(e.Path, "/") ||
			e.Path == "." || e.Path == ".." || strings.HasPrefix(e.Path, "../") || strings.ContainsRune(e.Path, 0) {
			return fmt.Errorf("volume: bad path %q", e.Path)
		}
		if i > 0 && t.Entries[i-1].Path >= e.Path {
			return fmt.Errorf("volume: entries not sorted at %q", e.Path)
		}
		parent := path.Dir(e.Path)
		if parent == "." {
			parent = ""
		}
		if !dirs[parent] {
			return fmt.Errorf("volume: %q is not inside a directory of the volume", e.Path)
		}
		if e.Mode&^uint32(fs.ModePerm|0o7000) != 0 {
			return fmt.Errorf("volume: %q: mode %o", e.Path, e.Mode)
		}
		if e.UID < 0 || e.GID < 0 || e.UID > 1<<31 || e.GID > 1<<31 {
			return fmt.Errorf("volume: %q: owner %d:%d", e.Path, e.UID, e.GID)
		}
		switch e.Type {
		case TypeDir:
			dirs[e.Path] = true
			if e.Size != 0 || len(e.Hashes) != 0 || e.Link != "" {
				return fmt.Errorf("volume: directory %q with content", e.Path)
			}
		case TypeFile:
			if e.Size < 0 || e.Size > MaxFileSize || int64(len(e.Hashes)) != pagesOf(e.Size)*32 || e.Link != "" {
				return fmt.Errorf("volume: file %q: %d bytes, %d hash bytes", e.Path, e.Size, len(e.Hashes))
			}
			total += e.Size
		case TypeSymlink:
			if e.Link == "" || len(e.Link) > MaxPath || strings.ContainsRune(e.Link, 0) || e.Size != 0 || len(e.Hashes) != 0 {
				return fmt.Errorf("volume: symbolic link %q", e.Path)
			}
		default:
			return fmt.Errorf("volume: %q: type %q", e.Path, e.Type)
		}
	}
	return nil
}

// Encode writes the tree as JSON.
func (t *Tree) Encode(w io.Writer) error { return json.NewEncoder(w).Encode(t) }

// Decode reads and validates a tree of at most MaxManifest bytes.
func Decode(r io.Reader) (*Tree, error) {
	var t Tree
	if err := decodeJSON(r, &t, "volume manifest"); err != nil {
		return nil, err
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return &t, nil
}

// PageSink takes the content of files as the scan reads it: hs names the pages of buf.
type PageSink func(hs []pages.Hash, buf []byte) error

// batchPages is how many pages the scan reads and hashes at once.
const batchPages = 1024

// Scan reads the volume at root. Files that prev (an earlier scan of the same root) holds
// with the same size, times and inode keep their hashes unread; every other file is read,
// its pages hashed and handed to sink. It returns the tree and the content bytes read.
func Scan(root string, prev *Tree, sink PageSink) (*Tree, int64, error) {
	old := map[string]*Entry{}
	if prev != nil {
		for i := range prev.Entries {
			old[prev.Entries[i].Path] = &prev.Entries[i]
		}
	}
	t := &Tree{}
	var read int64
	buf := make([]byte, batchPages*pages.Size)
	hs := make([]pages.Hash, batchPages)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		rel = filepath.ToSlash(rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("%s: no stat", p)
		}
		e := Entry{Path: rel, Mode: uint32(info.Mode().Perm()) | setBits(info.Mode()), UID: int(st.Uid), GID: int(st.Gid),
			Mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano(), ino: int64(st.Ino)}
		switch {
		case d.IsDir():
			e.Type = TypeDir
		case d.Type()&fs.ModeSymlink != 0:
			e.Type = TypeSymlink
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case d.Type().IsRegular():
			e.Type, e.Size = TypeFile, info.Size()
			if o := old[rel]; o != nil && o.Type == TypeFile && o.Size == e.Size && o.Mtime == e.Mtime && o.ctime == e.ctime && o.ino == e.ino {
				e.Hashes = o.Hashes
				break
			}
			n, hashes, err := readFile(p, e.Size, buf, hs, sink)
			if err != nil {
				return err
			}
			read += n
			e.Hashes = hashes
			e.Size = n // what was read: a file growing meanwhile is read again next pass
		default:
			t.Skipped = append(t.Skipped, rel)
			return nil
		}
		t.Entries = append(t.Entries, e)
		return nil
	})
	if err != nil {
		return nil, read, fmt.Errorf("scan volume %s: %w", root, err)
	}
	sort.Slice(t.Entries, func(i, j int) bool { return t.Entries[i].Path < t.Entries[j].Path })
	return t, read, nil
}

func setBits(m fs.FileMode) uint32 {
	var b uint32
	if m&fs.ModeSetuid != 0 {
		b |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		b |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		b |= 0o1000
	}
	return b
}

// readFile reads a file page by page, hashing each batch and handing it to sink.
func readFile(p string, size int64, buf []byte, hs []pages.Hash, sink PageSink) (int64, []byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return 0, nil, err
	}
	defer f.Close()
	hashes := make([]byte, 0, pagesOf(size)*32)
	var n int64
	for {
		k, err := io.ReadFull(f, buf)
		if k > 0 {
			np := (k + pages.Size - 1) / pages.Size
			clear(buf[k : np*pages.Size])
			pages.SumAll(buf[:np*pages.Size], hs[:np])
			if sink != nil {
				if err := sink(hs[:np], buf[:np*pages.Size]); err != nil {
					return n, nil, err
				}
			}
			for _, h := range hs[:np] {
				hashes = append(hashes, h[:]...)
			}
			n += int64(k)
		}
		if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
			return n, hashes, nil
		}
		if err != nil {
			return n, nil, err
		}
	}
}

// Size is the content of the regular files under root (what a first Scan reads); errors
// count as nothing (it is for progress only).
func Size(root string) int64 {
	var n int64
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// Changed lists the files of t whose content prev lacks (new or different), and the
// paths of prev that t no longer has.
func Changed(prev, t *Tree) (files []int, gone []string) {
	old := map[string]*Entry{}
	if prev != nil {
		for i := range prev.Entries {
			old[prev.Entries[i].Path] = &prev.Entries[i]
		}
	}
	seen := map[string]bool{}
	for i, e := range t.Entries {
		seen[e.Path] = true
		o := old[e.Path]
		if e.Type == TypeFile && (o == nil || o.Type != TypeFile || o.Size != e.Size || string(o.Hashes) != string(e.Hashes)) {
			files = append(files, i)
		}
	}
	if prev != nil {
		for _, e := range prev.Entries {
			if !seen[e.Path] {
				gone = append(gone, e.Path)
			}
		}
	}
	return files, gone
}

// Patch turns one tree into the next: the entries that are new or differ in anything,
// and the paths that went. A pass over a volume that changed little sends a small patch.
type Patch struct {
	Entries []Entry  `json:"entries,omitempty"`
	Removed []string `json:"removed,omitempty"`
	// Digest is the tree the patch leads to: the receiver checks its result against it.
	Digest string `json:"digest"`
	// Skipped as in Tree.
	Skipped []string `json:"skipped,omitempty"`
}

func sameEntry(a, b *Entry) bool {
	return a.Path == b.Path && a.Type == b.Type && a.Mode == b.Mode && a.UID == b.UID && a.GID == b.GID &&
		a.Size == b.Size && a.Mtime == b.Mtime && a.Link == b.Link && string(a.Hashes) == string(b.Hashes)
}

// Diff is the patch from prev (nil: empty) to t.
func Diff(prev, t *Tree) *Patch {
	p := &Patch{Digest: t.Digest(), Skipped: t.Skipped}
	old := map[string]*Entry{}
	if prev != nil {
		for i := range prev.Entries {
			old[prev.Entries[i].Path] = &prev.Entries[i]
		}
	}
	seen := make(map[string]bool, len(t.Entries))
	for i := range t.Entries {
		e := &t.Entries[i]
		seen[e.Path] = true
		if o := old[e.Path]; o == nil || !sameEntry(o, e) {
			p.Entries = append(p.Entries, *e)
		}
	}
	if prev != nil {
		for _, e := range prev.Entries {
			if !seen[e.Path] {
				p.Removed = append(p.Removed, e.Path)
			}
		}
	}
	return p
}

// Apply returns the tree the patch makes of prev (nil: empty), validated and checked
// against the patch's digest.
func (p *Patch) Apply(prev *Tree) (*Tree, error) {
	if len(p.Entries) > MaxEntries || len(p.Removed) > MaxEntries {
		return nil, fmt.Errorf("volume patch: more than %d entries", MaxEntries)
	}
	byPath := map[string]Entry{}
	if prev != nil {
		for _, e := range prev.Entries {
			byPath[e.Path] = e
		}
	}
	for _, r := range p.Removed {
		delete(byPath, r)
	}
	for _, e := range p.Entries {
		byPath[e.Path] = e
	}
	if len(byPath) > MaxEntries {
		return nil, fmt.Errorf("volume patch: more than %d entries", MaxEntries)
	}
	t := &Tree{Entries: make([]Entry, 0, len(byPath)), Skipped: p.Skipped}
	for _, e := range byPath {
		t.Entries = append(t.Entries, e)
	}
	sort.Slice(t.Entries, func(i, j int) bool { return t.Entries[i].Path < t.Entries[j].Path })
	if err := t.Validate(); err != nil {
		return nil, err
	}
	if d := t.Digest(); d != p.Digest {
		return nil, fmt.Errorf("volume patch: it leads to a tree of digest %s, not %s (the two sides' views of the volume differ)", d, p.Digest)
	}
	return t, nil
}

// Encode writes the patch as JSON.
func (p *Patch) Encode(w io.Writer) error { return json.NewEncoder(w).Encode(p) }

// DecodePatch reads a patch of at most MaxManifest bytes.
func DecodePatch(r io.Reader) (*Patch, error) {
	var p Patch
	if err := decodeJSON(r, &p, "volume patch"); err != nil {
		return nil, err
	}
	if len(p.Skipped) > MaxEntries {
		return nil, fmt.Errorf("volume patch: %d skipped entries", len(p.Skipped))
	}
	return &p, nil
}

// decodeJSON reads one JSON value of at most MaxManifest bytes.
func decodeJSON(r io.Reader, v any, what string) error {
	lr := &io.LimitedReader{R: r, N: MaxManifest + 1}
	if err := json.NewDecoder(lr).Decode(v); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if lr.N <= 0 {
		return fmt.Errorf("%s: more than %d bytes", what, MaxManifest)
	}
	return nil
}
