package volumes

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migrate-project/migrate/pages"
)

// PageReader fills dst with the pages hs names (from the page store).
type PageReader func(hs []pages.Hash, dst []byte) error

// zeroPage names a page of zeros: such pages are left as holes.
var zeroPage = pages.Sum(make([]byte, pages.Size))

// Applied says what Apply did.
type Applied struct {
	Files   int   `json:"files"`   // files written
	Bytes   int64 `json:"bytes"`   // content bytes written
	Removed int   `json:"removed"` // entries removed
}

// Apply makes the directory root hold exactly the (validated) tree t. prev is the tree
// an earlier Apply left in root: only what differs from it is written or removed; with
// prev nil everything in root that t lacks goes. Parents are checked to be directories
// on the way down (never a symbolic link), so nothing is written outside root.
func Apply(root string, t, prev *Tree, read PageReader) (Applied, error) {
	var ap Applied
	want := make(map[string]*Entry, len(t.Entries))
	for i := range t.Entries {
		want[t.Entries[i].Path] = &t.Entries[i]
	}
	// 1. What goes: entries t lacks or whose type changed, children first.
	var gone []string
	if prev == nil {
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || p == root {
				return err
			}
			rel := filepath.ToSlash(strings.TrimPrefix(p, root+string(filepath.Separator)))
			if e := want[rel]; e == nil || e.Type != typeOf(d.Type()) {
				gone = append(gone, rel)
				if d.IsDir() {
					return filepath.SkipDir
				}
			}
			return nil
		})
		if err != nil {
			return ap, fmt.Errorf("volume %s: %w", root, err)
		}
	} else {
		for _, e := range prev.Entries {
			if n := want[e.Path]; n == nil || n.Type != e.Type {
				gone = append(gone, e.Path)
			}
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(gone)))
	for _, rel := range gone {
		p, err := safePath(root, rel)
		if errors.Is(err, fs.ErrNotExist) {
			continue // its parent went already
		}
		if err != nil {
			return ap, err
		}
		if err := os.RemoveAll(p); err != nil {
			return ap, fmt.Errorf("volume: remove %s: %w", rel, err)
		}
		ap.Removed++
	}
	old := map[string]*Entry{}
	if prev != nil {
		for i := range prev.Entries {
			old[prev.Entries[i].Path] = &prev.Entries[i]
		}
	}
	// 2. What comes or changes, parents first.
	buf := make([]byte, batchPages*pages.Size)
	for i := range t.Entries {
		e := &t.Entries[i]
		p, err := safePath(root, e.Path)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return ap, err
		}
		o := old[e.Path]
		cur, lerr := os.Lstat(p)
		switch e.Type {
		case TypeDir:
			if lerr != nil {
				if err := os.Mkdir(p, 0o700); err != nil {
					return ap, fmt.Errorf("volume: %w", err)
				}
			}
		case TypeSymlink:
			if lerr == nil && o != nil && o.Link == e.Link {
				break
			}
			if lerr == nil {
				if err := os.Remove(p); err != nil {
					return ap, fmt.Errorf("volume: %w", err)
				}
			}
			if err := os.Symlink(e.Link, p); err != nil {
				return ap, fmt.Errorf("volume: %w", err)
			}
		case TypeFile:
			if lerr == nil && o != nil && o.Size == e.Size && string(o.Hashes) == string(e.Hashes) && cur.Size() == e.Size {
				break
			}
			var had []byte // pages the file on disk holds already (it is the one prev names)
			if lerr == nil && o != nil && o.Type == TypeFile && cur.Mode().IsRegular() && cur.Size() == o.Size {
				had = o.Hashes
			}
			if err := writeFile(p, e, had, buf, read); err != nil {
				return ap, fmt.Errorf("volume: write %s: %w", e.Path, err)
			}
			ap.Files++
			ap.Bytes += e.Size
		}
		if err := os.Lchown(p, e.UID, e.GID); err != nil {
			return ap, fmt.Errorf("volume: %w", err)
		}
		if e.Type != TypeSymlink {
			if err := os.Chmod(p, fileMode(e.Mode)); err != nil {
				return ap, fmt.Errorf("volume: %w", err)
			}
		}
	}
	// 3. Times last, children before their directory (writing into a directory
	// changes its time).
	for i := len(t.Entries) - 1; i >= 0; i-- {
		e := &t.Entries[i]
		ts := []unix.Timespec{unix.NsecToTimespec(e.Mtime), unix.NsecToTimespec(e.Mtime)}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(root, filepath.FromSlash(e.Path)), ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return ap, fmt.Errorf("volume: times of %s: %w", e.Path, err)
		}
	}
	return ap, nil
}

func typeOf(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return TypeDir
	case m&fs.ModeSymlink != 0:
		return TypeSymlink
	case m.IsRegular():
		return TypeFile
	}
	return "?"
}

func fileMode(m uint32) fs.FileMode {
	fm := fs.FileMode(m & 0o777)
	if m&0o4000 != 0 {
		fm |= fs.ModeSetuid
	}
	if m&0o2000 != 0 {
		fm |= fs.ModeSetgid
	}
	if m&0o1000 != 0 {
		fm |= fs.ModeSticky
	}
	return fm
}

// safePath joins rel to root after checking that every parent on the way is a real
// directory, not a symbolic link (a tree may hold links that point anywhere).
func safePath(root, rel string) (string, error) {
	dir := root
	parts := strings.Split(rel, "/")
	for _, part := range parts[:len(parts)-1] {
		dir = filepath.Join(dir, part)
		fi, err := os.Lstat(dir)
		if err != nil {
			return "", err
		}
		if !fi.IsDir() {
			return "", fmt.Errorf("volume: %s: %s is not a directory", rel, path.Join(parts[:len(parts)-1]...))
		}
	}
	return filepath.Join(dir, parts[len(parts)-1]), nil
}

// writeFile writes a file's pages from the store. had names the pages the file holds
// already (nil: write it whole): only pages that differ are written. A new file's pages
// of zeros stay holes.
func writeFile(p string, e *Entry, had, buf []byte, read PageReader) error {
	flags := os.O_WRONLY | os.O_CREATE | unix.O_NOFOLLOW
	if had == nil {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(p, flags, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if had != nil && e.Size < int64(len(had)/32)*pages.Size {
		if err := f.Truncate(e.Size); err != nil { // shrunk: pages past the end go first
			return err
		}
	}
	skip := func(i int) bool {
		h := e.Hashes[i*32 : (i+1)*32]
		if had == nil {
			return string(h) == string(zeroPage[:])
		}
		// Unchanged, or a page of the old file's tail that Truncate cut (the last
		// page may then hold the old bytes past the new end: rewrite it).
		return (i+1)*32 <= len(had) && string(had[i*32:(i+1)*32]) == string(h) && int64(i+1)*pages.Size <= e.Size
	}
	n := int(pagesOf(e.Size))
	hs := make([]pages.Hash, 0, batchPages)
	idx := make([]int, 0, batchPages)
	for first := 0; first < n; first += batchPages {
		hs, idx = hs[:0], idx[:0]
		for i := first; i < min(first+batchPages, n); i++ {
			if skip(i) {
				continue
			}
			var h pages.Hash
			copy(h[:], e.Hashes[i*32:(i+1)*32])
			hs = append(hs, h)
			idx = append(idx, i)
		}
		if len(hs) == 0 {
			continue
		}
		if err := read(hs, buf[:len(hs)*pages.Size]); err != nil {
			return err
		}
		// Write runs of consecutive pages.
		for i := 0; i < len(hs); {
			j := i + 1
			for j < len(hs) && idx[j] == idx[j-1]+1 {
				j++
			}
			if _, err := f.WriteAt(buf[i*pages.Size:j*pages.Size], int64(idx[i])*pages.Size); err != nil {
				return err
			}
			i = j
		}
	}
	if err := f.Truncate(e.Size); err != nil {
		return err
	}
	return f.Sync()
}

// Verify checks root against t by metadata: every entry present with its type, size,
// link and modification time as Apply set them. Content was checked page by page on
// arrival (each page's hash); this finds anything changed on disk since.
func Verify(root string, t *Tree) error {
	for _, e := range t.Entries {
		fi, err := os.Lstat(filepath.Join(root, filepath.FromSlash(e.Path)))
		if err != nil {
			return fmt.Errorf("volume check: %w", err)
		}
		if typeOf(fi.Mode()) != e.Type {
			return fmt.Errorf("volume check: %s is not a %s", e.Path, e.Type)
		}
		if e.Type == TypeFile && (fi.Size() != e.Size || fi.ModTime().UnixNano() != e.Mtime) {
			return fmt.Errorf("volume check: %s: %d bytes of %s, want %d of %s", e.Path, fi.Size(), fi.ModTime(), e.Size, time.Unix(0, e.Mtime))
		}
	}
	return nil
}
