package transfer

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

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
	defer func() {
		for _, f := range src.packs {
			f.Close()
		}
	}()
	for _, r := range runs {
		if err := openPacks(store.Dir(), src.packs, r.segs); err != nil {
			t.Fatal(err)
		}
	}
	// Process 1's run is one segment (stored in order), process 2's four (in reverse).
	if len(runs[0].segs) != 1 || len(runs[1].segs) != 4 {
		t.Fatalf("segments: %d and %d, want 1 and 4", len(runs[0].segs), len(runs[1].segs))
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
	// From the middle of a run of segments.
	n, err = src.ReadPages(2, 0x7000+2*pages.Size, buf)
	if err != nil || n != 2 || !bytes.Equal(buf[:pages.Size], data[17*pages.Size:18*pages.Size]) || !bytes.Equal(buf[pages.Size:2*pages.Size], data[16*pages.Size:17*pages.Size]) {
		t.Fatalf("process 2 from its third page: %d pages, %v", n, err)
	}
	for _, bad := range []struct{ pid, vaddr uint64 }{{1, 0x40000}, {3, 0x10000}, {2, 0x6000}} {
		if _, err := src.ReadPages(bad.pid, bad.vaddr, buf); err == nil {
			t.Errorf("page %#x of %d served: not a lazy page", bad.vaddr, bad.pid)
		}
	}
	// A damaged index is refused, not trusted.
	if err := os.WriteFile(idx, append([]byte(lazyIndexMagic), runBytes(1, 0, 1<<63-1, 1)...), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readLazyIndex(idx); err == nil {
		t.Fatal("an index claiming 2^63 pages was read")
	}
}

// The streamed restore's page server: a page asked for before it arrived waits for it and
// is served as it arrived (the memory stream, decoded, files each lazy page through the
// index as it comes); once the index is whole, a page it does not name is refused; an
// index that ends without its end mark (the agent died) fails what waits.
func TestFollowedIndexServesPagesAsTheyArrive(t *testing.T) {
	dir := t.TempDir()
	store, err := pages.OpenStore(filepath.Join(dir, "store"), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	const lazyAt, imgAt = 0x7f0000000000, 0x400000
	data := pageAligned(300, 3)
	// The source's frozen memory: 300 lazy pages of process 7, 2 pages in the images.
	var stream bytes.Buffer
	mw := pages.NewMemoryWriter(&stream, pages.NewSession(), pages.EncodeOptions{})
	if err := mw.Entry(pages.KindProcess, 7, imgAt, 2, pages.FlagPresent); err != nil {
		t.Fatal(err)
	}
	if err := mw.Pages(imgAt, pageAligned(2, 4)); err != nil {
		t.Fatal(err)
	}
	if err := mw.Entry(pages.KindProcess, 7, lazyAt, 300, pages.FlagPresent|pages.FlagLazy); err != nil {
		t.Fatal(err)
	}
	if err := mw.Pages(lazyAt, data); err != nil {
		t.Fatal(err)
	}
	if _, _, err := mw.Close(); err != nil {
		t.Fatal(err)
	}
	stream.WriteString("E") // the empty archive after it

	src := newFollowSource(store.Dir(), 5*time.Second)
	defer src.close()
	pr, pw := io.Pipe()
	go src.follow(pr)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go src.ticker(ctx)

	// The daemon asks for the last pages first: they have not arrived.
	type answer struct {
		n   int
		err error
		buf []byte
	}
	early := make(chan answer, 1)
	go func() {
		buf := make([]byte, 8*pages.Size)
		n, err := src.ReadPages(7, lazyAt+290*pages.Size, buf)
		early <- answer{n, err, buf}
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case a := <-early:
		t.Fatalf("served before the page arrived: %d, %v", a.n, a.err)
	default:
	}
	x, err := newLazyIndexWriter(pw)
	if err != nil {
		t.Fatal(err)
	}
	var mem pages.Memory
	var filed int
	errc := make(chan error, 1)
	go func() {
		_, err := pages.DecodeMemoryFunc(&stream, io.Discard, pages.NewSession(), store, 1<<30, &mem,
			func(kind int, id uint64, flags uint32, vaddr uint64, hs []pages.Hash, locs []pages.PageLoc) error {
				if flags&pages.FlagLazy == 0 {
					return nil
				}
				filed += len(hs)
				return x.run(id, vaddr, locs)
			})
		if err == nil {
			err = x.end()
		}
		pw.Close()
		errc <- err
	}()
	a := <-early
	if a.err != nil || a.n != 8 || !bytes.Equal(a.buf, data[290*pages.Size:298*pages.Size]) {
		t.Fatalf("the waiting page: %d pages, %v", a.n, a.err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if filed != 300 {
		t.Fatalf("%d lazy pages filed, want 300 (the 2 in the images are not)", filed)
	}
	buf := make([]byte, 4*pages.Size)
	if n, err := src.ReadPages(7, lazyAt+298*pages.Size, buf); err != nil || n != 2 || !bytes.Equal(buf[:2*pages.Size], data[298*pages.Size:]) {
		t.Fatalf("the last pages: %d, %v", n, err)
	}
	if _, err := src.ReadPages(7, imgAt, buf); err == nil || !strings.Contains(err.Error(), "not a lazy page") {
		t.Fatalf("a page of the images, once the index is whole: %v", err)
	}

	// An index that ends without its end mark: what waits fails, at once.
	broken := newFollowSource(store.Dir(), time.Minute)
	defer broken.close()
	pr2, pw2 := io.Pipe()
	go broken.follow(pr2)
	waiting := make(chan error, 1)
	go func() {
		_, err := broken.ReadPages(7, lazyAt, buf)
		waiting <- err
	}()
	x2, _ := newLazyIndexWriter(pw2)
	if err := x2.run(7, imgAt, mustLocate(t, store, mem.Hashes[:1])); err != nil {
		t.Fatal(err)
	}
	pw2.Close()
	select {
	case err := <-waiting:
		if err == nil || !strings.Contains(err.Error(), "did not arrive whole") {
			t.Fatalf("a page of a broken index: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a page of a broken index still waits")
	}

	// Nothing arrives for the stall: what waits fails.
	stalled := newFollowSource(store.Dir(), 200*time.Millisecond)
	defer stalled.close()
	pr3, pw3 := io.Pipe()
	defer pw3.Close()
	go stalled.follow(pr3)
	go stalled.ticker(ctx)
	if _, err := stalled.ReadPages(7, lazyAt, buf); err == nil || !strings.Contains(err.Error(), "no memory arrived") {
		t.Fatalf("a stalled index: %v", err)
	}
}

// A damaged index is refused, not trusted: a run claiming more pages than the bound, or
// overlapping one before it.
func TestFollowedIndexRefusesDamage(t *testing.T) {
	seg := func(pack, page, count uint32) []byte {
		return binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, pack), page), count)
	}
	index := func(parts ...[]byte) []byte {
		return slices.Concat(append([][]byte{[]byte(lazyIndexMagic)}, parts...)...)
	}
	for name, in := range map[string][]byte{
		"bad magic":             []byte("XXXX"),
		"huge run":              index(runBytes(1, 0x1000, 1<<40, 1), seg(0, 0, 1)),
		"odd address":           index(runBytes(1, 0x1001, 1, 1), seg(0, 0, 1)),
		"stray end":             index(runBytes(1, 0, 0, 0)),
		"cut in a run":          index(runBytes(1, 0x1000, 4, 1)),
		"no segments":           index(runBytes(1, 0x1000, 4, 0)),
		"more segments":         index(runBytes(1, 0x1000, 1, 2), seg(0, 0, 1), seg(0, 1, 1)),
		"segments short":        index(runBytes(1, 0x1000, 4, 1), seg(0, 0, 3)),
		"segments long":         index(runBytes(1, 0x1000, 2, 2), seg(0, 0, 1), seg(0, 4, 5)),
		"empty segment":         index(runBytes(1, 0x1000, 2, 2), seg(0, 0, 2), seg(0, 4, 0)),
		"segment past the pack": index(runBytes(1, 0x1000, 2, 1), seg(0, 1<<32-1, 2)),
	} {
		s := newFollowSource(t.TempDir(), time.Minute)
		s.follow(bytes.NewReader(in))
		if s.failed == nil || s.complete {
			t.Errorf("%s: accepted", name)
		}
	}
}

// With hold, a fault (a one-page request) is answered as soon as its page arrived, while
// the background fill (longer runs) waits for the index's end.
func TestHeldIndexAnswersFaultsAtOnceAndTheFillOnceWhole(t *testing.T) {
	dir := t.TempDir()
	store, err := pages.OpenStore(filepath.Join(dir, "store"), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	data := pageAligned(16, 8)
	hs, err := store.Add(data)
	if err != nil {
		t.Fatal(err)
	}
	src := newFollowSource(store.Dir(), time.Minute)
	src.hold = true
	defer src.close()
	pr, pw := io.Pipe()
	go src.follow(pr)
	x, err := newLazyIndexWriter(pw)
	if err != nil {
		t.Fatal(err)
	}
	if err := x.run(3, 0x10000, mustLocate(t, store, hs)); err != nil {
		t.Fatal(err)
	}
	one := make([]byte, pages.Size)
	if n, err := src.ReadPages(3, 0x10000+5*pages.Size, one); err != nil || n != 1 || !bytes.Equal(one, data[5*pages.Size:6*pages.Size]) {
		t.Fatalf("a fault on an arrived page: %d, %v", n, err)
	}
	got := make(chan int, 1)
	go func() {
		buf := make([]byte, 16*pages.Size)
		n, err := src.ReadPages(3, 0x10000, buf)
		if err != nil || !bytes.Equal(buf, data) {
			n = -1
		}
		got <- n
	}()
	select {
	case n := <-got:
		t.Fatalf("the fill was answered (%d pages) before the index was whole", n)
	case <-time.After(100 * time.Millisecond):
	}
	if err := x.end(); err != nil {
		t.Fatal(err)
	}
	select {
	case n := <-got:
		if n != 16 {
			t.Fatalf("the fill got %d pages, want the 16 as stored", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the fill still waits once the index is whole")
	}
}

// runBytes is a run's header in an index.
func runBytes(pid, vaddr, n, segs uint64) []byte {
	b := binary.LittleEndian.AppendUint64(nil, pid)
	b = binary.LittleEndian.AppendUint64(b, vaddr)
	b = binary.LittleEndian.AppendUint64(b, n)
	return binary.LittleEndian.AppendUint64(b, segs)
}

func mustLocate(t *testing.T, store *pages.Store, hs []pages.Hash) []pages.PageLoc {
	t.Helper()
	locs, err := store.Locate(hs)
	if err != nil {
		t.Fatal(err)
	}
	return locs
}
