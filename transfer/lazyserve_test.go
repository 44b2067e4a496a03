package transfer

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/migrate-project/migrate/pages"
)

// The lazy page server answers from the store's pack files through its index, exactly
// what the memory holds, in runs no longer than an entry; it refuses pages that are not
// lazy pages of the restore.
func TestLazyIndexServesThePagesOfTheMemory(t *testing.T) {
	dir := t.TempDir()
	store, err := pages.OpenStore(filepath.Join(dir, "store"), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 20*pages.Size)
	rand.Read(data)
	hs, err := store.Add(data)
	if err != nil {
		t.Fatal(err)
	}
	// Process 1: 12 lazy pages, then 4 non-lazy; process 2: the last 4, lazy, in reverse.
	mem := &pages.Memory{Hashes: append(append([]pages.Hash{}, hs[:16]...), hs[19], hs[18], hs[17], hs[16])}
	mem.Maps = []*pages.MemMap{
		{Kind: pages.KindProcess, ID: 1, Entries: []pages.MemEntry{
			{Vaddr: 0x10000, Pages: 12, Flags: pages.FlagPresent | pages.FlagLazy, First: 0},
			{Vaddr: 0x40000, Pages: 4, Flags: pages.FlagPresent, First: 12}}},
		{Kind: pages.KindProcess, ID: 2, Entries: []pages.MemEntry{
			{Vaddr: 0x7000, Pages: 4, Flags: pages.FlagPresent | pages.FlagLazy, First: 16}}},
	}
	idx := filepath.Join(dir, "index")
	if err := writeLazyIndex(idx, mem, store); err != nil {
		t.Fatal(err)
	}
	runs, err := readLazyIndex(idx)
	if err != nil || len(runs) != 2 {
		t.Fatalf("index: %d runs, %v", len(runs), err)
	}
	src := &packSource{runs: runs, packs: map[uint32]*os.File{}}
	for _, r := range runs {
		for _, l := range r.locs {
			if src.packs[l.Pack] == nil {
				f, err := os.Open(pages.PackPath(store.Dir(), l.Pack))
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				src.packs[l.Pack] = f
			}
		}
	}
	buf := make([]byte, 32*pages.Size)
	n, err := src.ReadPages(1, 0x10000+10*pages.Size, buf)
	if err != nil || n != 2 || !bytes.Equal(buf[:2*pages.Size], data[10*pages.Size:12*pages.Size]) {
		t.Fatalf("process 1: %d pages, %v", n, err)
	}
	n, err = src.ReadPages(2, 0x7000, buf)
	if err != nil || n != 4 || !bytes.Equal(buf[:pages.Size], data[19*pages.Size:20*pages.Size]) || !bytes.Equal(buf[3*pages.Size:4*pages.Size], data[16*pages.Size:17*pages.Size]) {
		t.Fatalf("process 2: %d pages, %v", n, err)
	}
	for _, bad := range []struct{ pid, vaddr uint64 }{{1, 0x40000}, {3, 0x10000}, {2, 0x6000}} {
		if _, err := src.ReadPages(bad.pid, bad.vaddr, buf); err == nil {
			t.Errorf("page %#x of %d served: not a lazy page", bad.vaddr, bad.pid)
		}
	}
	// A damaged index is refused, not trusted.
	if err := os.WriteFile(idx, []byte("MLZ1\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\x7f"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readLazyIndex(idx); err == nil {
		t.Fatal("an index claiming 2^63 pages was read")
	}
}
