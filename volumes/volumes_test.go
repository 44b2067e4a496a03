package volumes

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/migrate-project/migrate/pages"
)

// memStore is a page store in memory: what the scan hands over, Apply reads.
type memStore map[pages.Hash][]byte

func (m memStore) sink(hs []pages.Hash, buf []byte) error {
	for i, h := range hs {
		m[h] = append([]byte(nil), buf[i*pages.Size:(i+1)*pages.Size]...)
	}
	return nil
}

func (m memStore) read(hs []pages.Hash, dst []byte) error {
	for i, h := range hs {
		p, ok := m[h]
		if !ok {
			return errors.New("page not in store")
		}
		copy(dst[i*pages.Size:], p)
	}
	return nil
}

func write(t *testing.T, root, rel string, data []byte) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o640); err != nil {
		t.Fatal(err)
	}
}

func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// sameContent scans both roots and compares their digests (every path, mode, owner,
// size, time, link and page).
func sameContent(t *testing.T, a, b string) {
	t.Helper()
	ta, _, err := Scan(a, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	tb, _, err := Scan(b, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ta.Digest() != tb.Digest() {
		for i := range ta.Entries {
			if i >= len(tb.Entries) {
				t.Errorf("target lacks %s", ta.Entries[i].Path)
				break
			}
			ea, eb := ta.Entries[i], tb.Entries[i]
			ea.ctime, ea.ino, eb.ctime, eb.ino = 0, 0, 0, 0
			if !bytes.Equal(ea.Hashes, eb.Hashes) || ea.Path != eb.Path || ea.Mode != eb.Mode || ea.Mtime != eb.Mtime || ea.Size != eb.Size || ea.Link != eb.Link {
				t.Errorf("differ: %+v\n  vs %+v", ea, eb)
			}
		}
		t.Fatalf("the volumes differ (%d vs %d entries)", len(ta.Entries), len(tb.Entries))
	}
}

func TestScanApplyThenOnlyChangesTravel(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	big := random(3*pages.Size*batchPages + 1234) // several batches, a partial last page
	write(t, src, "db/base/16384/1259", big)
	write(t, src, "db/empty", nil)
	write(t, src, "sparse", make([]byte, 10*pages.Size))
	write(t, src, "conf/redis.conf", []byte("appendonly yes\n"))
	os.Symlink("../conf/redis.conf", filepath.Join(src, "db", "link"))
	os.Chmod(filepath.Join(src, "conf"), 0o1770)

	store := memStore{}
	t1, read, err := Scan(src, nil, store.sink)
	if err != nil {
		t.Fatal(err)
	}
	if read != int64(len(big))+10*pages.Size+15 {
		t.Errorf("first scan read %d bytes", read)
	}
	if err := t1.Validate(); err != nil {
		t.Fatal(err)
	}
	write(t, dst, "stale/file", []byte("not in the source")) // a fresh target holds nothing else
	ap, err := Apply(dst, t1, nil, store.read)
	if err != nil {
		t.Fatal(err)
	}
	if ap.Removed != 1 || ap.Files != 4 {
		t.Errorf("first apply: %+v", ap)
	}
	sameContent(t, src, dst)
	if fi, err := os.Stat(filepath.Join(dst, "sparse")); err != nil || fi.Sys() == nil {
		t.Fatal(err)
	}

	// Changes: a page in the middle of the big file, a file grows, one shrinks, one goes,
	// a new one, a link re-pointed, a directory becomes a file.
	f, _ := os.OpenFile(filepath.Join(src, "db/base/16384/1259"), os.O_WRONLY, 0)
	f.WriteAt([]byte("changed"), 5*pages.Size+10)
	f.Close()
	write(t, src, "conf/redis.conf", []byte("appendonly yes\nappendfsync always\n"))
	os.Truncate(filepath.Join(src, "sparse"), 3*pages.Size+7)
	os.Remove(filepath.Join(src, "db/empty"))
	write(t, src, "db/new", []byte("new"))
	os.Remove(filepath.Join(src, "db/link"))
	os.Symlink("/elsewhere", filepath.Join(src, "db/link"))

	var sent int
	t2, read, err := Scan(src, t1, func(hs []pages.Hash, buf []byte) error { sent += len(hs); return store.sink(hs, buf) })
	if err != nil {
		t.Fatal(err)
	}
	if read > int64(len(big))+4*pages.Size+100 {
		t.Errorf("the second scan read %d bytes: unchanged files were read again", read)
	}
	files, gone := Changed(t1, t2)
	if len(files) != 4 || len(gone) != 1 || gone[0] != "db/empty" {
		t.Errorf("changed files %v, gone %v", files, gone)
	}
	// What crosses for the second pass: only the entries that changed.
	patch := Diff(t1, t2)
	if len(patch.Entries) != 6 || len(patch.Removed) != 1 { // 4 files, the re-pointed link, db/ (its time)
		t.Errorf("patch: %d entries, removed %v", len(patch.Entries), patch.Removed)
	}
	var enc bytes.Buffer
	patch.Encode(&enc)
	dec, err := DecodePatch(&enc)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := dec.Apply(t1); err != nil || got.Digest() != t2.Digest() {
		t.Fatalf("patch applied: %v", err)
	}
	dec.Digest = t1.Digest()
	if _, err := dec.Apply(t1); err == nil {
		t.Error("a patch that does not lead to its digest was accepted")
	}
	ap, err = Apply(dst, t2, t1, store.read)
	if err != nil {
		t.Fatal(err)
	}
	if ap.Removed != 1 {
		t.Errorf("second apply: %+v", ap)
	}
	sameContent(t, src, dst)
	if err := Verify(dst, t2); err != nil {
		t.Fatal(err)
	}
	// Something changed on the target behind migrate's back is found.
	os.WriteFile(filepath.Join(dst, "db/new"), []byte("tampered"), 0o640)
	if err := Verify(dst, t2); err == nil {
		t.Error("Verify missed a changed file")
	}
}

func TestApplyNeverWritesThroughALink(t *testing.T) {
	outside, dst := t.TempDir(), t.TempDir()
	store := memStore{}
	// A tree that puts a file under a symbolic link is refused outright.
	evil := &Tree{Entries: []Entry{
		{Path: "a", Type: TypeSymlink, Link: outside},
		{Path: "a/passwd", Type: TypeFile, Size: 1, Hashes: make([]byte, 32)},
	}}
	if err := evil.Validate(); err == nil {
		t.Fatal("a file under a symbolic link was accepted")
	}
	// A link first, then the same path as a directory with a file: the link goes first.
	t1 := &Tree{Entries: []Entry{{Path: "a", Type: TypeSymlink, Link: outside}}}
	if _, err := Apply(dst, t1, nil, store.read); err != nil {
		t.Fatal(err)
	}
	h := pages.Sum(append([]byte("x"), make([]byte, pages.Size-1)...))
	store[h] = append([]byte("x"), make([]byte, pages.Size-1)...)
	t2 := &Tree{Entries: []Entry{{Path: "a", Type: TypeDir, Mode: 0o755}, {Path: "a/passwd", Type: TypeFile, Mode: 0o644, Size: 1, Hashes: h[:]}}}
	if err := t2.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := Apply(dst, t2, t1, store.read); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(outside, "passwd")); err == nil {
		t.Fatal("Apply wrote through a symbolic link")
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "a/passwd")); string(b) != "x" {
		t.Fatalf("a/passwd = %q", b)
	}
}

func TestValidateRefusesBadTrees(t *testing.T) {
	h := make([]byte, 32)
	for name, tr := range map[string]Tree{
		"dotdot":     {Entries: []Entry{{Path: "../x", Type: TypeFile, Size: 1, Hashes: h}}},
		"absolute":   {Entries: []Entry{{Path: "/etc", Type: TypeDir}}},
		"unclean":    {Entries: []Entry{{Path: "a//b", Type: TypeDir}}},
		"unsorted":   {Entries: []Entry{{Path: "b", Type: TypeDir}, {Path: "a", Type: TypeDir}}},
		"orphan":     {Entries: []Entry{{Path: "a/b", Type: TypeDir}}},
		"hashes":     {Entries: []Entry{{Path: "f", Type: TypeFile, Size: pages.Size + 1, Hashes: h}}},
		"device":     {Entries: []Entry{{Path: "d", Type: "c"}}},
		"mode":       {Entries: []Entry{{Path: "d", Type: TypeDir, Mode: 0o170000}}},
		"nul":        {Entries: []Entry{{Path: "a\x00b", Type: TypeDir}}},
		"empty link": {Entries: []Entry{{Path: "l", Type: TypeSymlink}}},
	} {
		if err := tr.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzDecodePatch(f *testing.F) {
	f.Add([]byte(`{"entries":[{"p":"a","t":"d","m":493}],"removed":["b"],"digest":"x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := DecodePatch(bytes.NewReader(b))
		if err != nil {
			return
		}
		base := &Tree{Entries: []Entry{{Path: "b", Type: TypeDir}}}
		if tr, err := p.Apply(base); err == nil {
			if err := tr.Validate(); err != nil {
				t.Fatalf("Apply returned an invalid tree: %v", err)
			}
		}
	})
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"entries":[{"p":"a","t":"d","m":493},{"p":"a/f","t":"f","s":1,"h":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}]}`))
	f.Add([]byte(`{"entries":[{"p":"l","t":"l","l":"/x"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		tr, err := Decode(bytes.NewReader(b))
		if err != nil {
			return
		}
		if err := tr.Validate(); err != nil {
			t.Fatalf("Decode returned an invalid tree: %v", err)
		}
		for _, e := range tr.Entries {
			if strings.Contains(e.Path, "..") && (e.Path == ".." || strings.HasPrefix(e.Path, "../")) {
				t.Fatalf("path %q escapes", e.Path)
			}
		}
	})
}
