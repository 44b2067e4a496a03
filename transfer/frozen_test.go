package transfer

import (
	"encoding/binary"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"unsafe"

	"github.com/migrate-project/migrate/pages"
)

// BenchmarkFrozenNaming is the frozen phase's naming of a read hand-over: every page of a
// container's memory passes MemoryWriter with the last round's fingerprints (Known) and
// bases (Base), a few percent of them changed since. MIGRATE_BENCH_MIB sets the memory
// size (256 MiB unless set).
func BenchmarkFrozenNaming(b *testing.B) {
	mib := 256
	if s := os.Getenv("MIGRATE_BENCH_MIB"); s != "" {
		mib, _ = strconv.Atoi(s)
	}
	n := mib << 20 / pages.Size
	mem := make([]byte, n*pages.Size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(mem); i += 8 {
		binary.LittleEndian.PutUint64(mem[i:], rng.Uint64())
	}
	store, err := pages.OpenStore(b.TempDir(), 8<<30)
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	sess, seen := lastRound(store, 1, mem)
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	hs, err := sess.Slice(0, n)
	if err != nil {
		b.Fatal(err)
	}
	if err := store.AddTrusted(hs, mem); err != nil {
		b.Fatal(err)
	}
	// 3% of the pages changed since, in a few bytes each (as memload writes).
	for k := 0; k < n*3/100; k++ {
		p := rng.IntN(n)
		binary.LittleEndian.PutUint64(mem[p*pages.Size+rng.IntN(pages.Size/8)*8:], rng.Uint64())
	}
	b.SetBytes(int64(len(mem)))
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		b.StopTimer()
		s := pages.NewSession()
		s.Append(hs...)
		seen.sess = s
		b.StartTimer()
		mw := pages.NewMemoryWriter(io.Discard, s, pages.EncodeOptions{Base: seen.base, Known: seen.known, Sent: func(h []pages.Hash, p []byte) { store.AddTrusted(h, p) }})
		if err := mw.Entry(pages.KindProcess, 1, base, uint64(n), pages.FlagPresent); err != nil {
			b.Fatal(err)
		}
		for off := 0; off < n; off += 256 {
			end := min(off+256, n)
			if err := mw.Pages(base+uint64(off)*pages.Size, mem[off*pages.Size:end*pages.Size]); err != nil {
				b.Fatal(err)
			}
		}
		if _, _, err := mw.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// lastSent finds what a round read at an address across its blocks' edges and per
// process, and nothing where no round read.
func TestLastSentByAddressAndProcess(t *testing.T) {
	seen := newLastSent(pages.NewSession(), nil)
	page := func(b byte) []byte { p := make([]byte, pages.Size); p[7] = b; return p }
	edge := uint64(blockPages * pages.Size * 3) // a block's first page
	addrs := []uint64{edge - pages.Size, edge, edge + pages.Size, 1 << 40}
	for i, a := range addrs {
		p := page(byte(i))
		if old := seen.put(1, a, pages.Sum(p), pages.FastSum(p)); old != (pages.Hash{}) {
			t.Fatalf("a first put at %#x returned %s", a, old)
		}
	}
	for i, a := range addrs {
		p := page(byte(i))
		if h, ok := seen.known(1, a, p); !ok || h != pages.Sum(p) {
			t.Fatalf("page at %#x: known %v %s", a, ok, h)
		}
		if _, ok := seen.known(1, a, page(99)); ok {
			t.Fatalf("changed page at %#x taken as known", a)
		}
		if _, ok := seen.known(2, a, p); ok {
			t.Fatalf("page at %#x known for another process", a)
		}
		if _, ok := seen.get(1, a+2*pages.Size*uint64(blockPages)); ok && i < 3 {
			t.Fatalf("an address no round read (%#x) is known", a+2*pages.Size*uint64(blockPages))
		}
	}
	if old := seen.put(1, edge, pages.Sum(page(50)), pages.FastSum(page(50))); old != pages.Sum(page(1)) {
		t.Fatalf("put returned %s, want the round before's %s", old, pages.Sum(page(1)))
	}
}

// The frozen phase's pages reach the store in batches, all of them by flush, though the
// encoder hands them over in a buffer it reuses.
func TestPageKeeperStoresEveryPageByFlush(t *testing.T) {
	store, err := pages.OpenStore(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	k := newPageKeeper(store)
	var all []pages.Hash
	buf := make([]byte, 2*pages.Size)
	for i := 0; i < keepBatch+10; i++ { // runs of two pages, the encoder's buffer reused
		binary.LittleEndian.PutUint64(buf, uint64(i))
		binary.LittleEndian.PutUint64(buf[pages.Size:], uint64(i)<<32)
		hs := []pages.Hash{pages.Sum(buf[:pages.Size]), pages.Sum(buf[pages.Size:])}
		k.add(hs, buf)
		all = append(all, hs...)
	}
	if err := k.flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(all)*pages.Size)
	if err := store.ReadVerified(all, got); err != nil {
		t.Fatalf("after flush: %v", err)
	}
	store.Close()
}
