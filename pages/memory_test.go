package pages

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestMemoryCrossesAsReferencesAndRebuildsLazyImages: a dump's memory goes before the
// archive; pages the receiver holds go as references, the rest whole; the receiver knows
// every page's name, serves lazy pages from its store and writes only the others.
func TestMemoryCrossesAsReferencesAndRebuildsLazyImages(t *testing.T) {
	dir := t.TempDir()
	src, err := OpenStore(filepath.Join(dir, "src"), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	dstStore, err := OpenStore(filepath.Join(dir, "dst"), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	mem := randomPages(t, 40)
	// The receiver already holds the first 30 pages (a pre-copy round), in both sessions.
	held, err := dstStore.Add(mem[:30*Size])
	if err != nil {
		t.Fatal(err)
	}
	sSess, dSess := NewSession(), NewSession()
	sSess.Append(held...)
	dSess.Append(held...)

	var wire bytes.Buffer
	mw := NewMemoryWriter(&wire, sSess, EncodeOptions{Sent: func(hs []Hash, p []byte) { src.AddTrusted(hs, p) }})
	// process 1: a lazy entry of 32 pages, a hole, a non-lazy entry of 4; shmem 7: 4 pages.
	steps := []struct {
		kind      int
		id, vaddr uint64
		n         int
		flags     uint32
		from      int
	}{
		{KindProcess, 1, 0x10000, 32, FlagPresent | FlagLazy, 0},
		{KindProcess, 1, 0x40000, 4, FlagPresent, 32},
		{KindShmem, 7, 0, 4, FlagPresent, 36},
	}
	for _, s := range steps {
		if err := mw.Entry(s.kind, s.id, s.vaddr, uint64(s.n), s.flags); err != nil {
			t.Fatal(err)
		}
		// In two pieces, as the page server hands them over.
		half := s.n / 2
		if err := mw.Pages(s.vaddr, mem[s.from*Size:(s.from+half)*Size]); err != nil {
			t.Fatal(err)
		}
		if err := mw.Pages(s.vaddr+uint64(half)*Size, mem[(s.from+half)*Size:(s.from+s.n)*Size]); err != nil {
			t.Fatal(err)
		}
	}
	sent, st, err := mw.Close()
	if err != nil {
		t.Fatal(err)
	}
	if st.PagesCopied != 30 || st.PagesSent != 10 {
		t.Fatalf("referenced %d, sent %d; want 30 and 10", st.PagesCopied, st.PagesSent)
	}
	archive := tarOf(t, map[string][]byte{"checkpoint/core-1.img": []byte("core")}, []string{"checkpoint/core-1.img"})
	if _, err := Encode(bytes.NewReader(archive), &wire, sSess, EncodeOptions{}); err != nil {
		t.Fatal(err)
	}
	if wire.Len() > 11*Size {
		t.Fatalf("%d bytes on the wire for 10 new pages", wire.Len())
	}

	// Without a memory to fill, the stream is refused.
	if _, err := Decode(bytes.NewReader(wire.Bytes()), &bytes.Buffer{}, NewSession(), dstStore, 1<<30); err == nil {
		t.Fatal("Decode took a stream with memory")
	}
	var got Memory
	var out bytes.Buffer
	if _, err := DecodeMemory(bytes.NewReader(wire.Bytes()), &out, dSess, dstStore, 1<<30, &got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), archive) {
		t.Fatal("the archive did not come out whole")
	}
	if len(got.Hashes) != 40 || len(got.Maps) != 2 || len(sent.Hashes) != 40 {
		t.Fatalf("memory: %d pages in %d maps", len(got.Hashes), len(got.Maps))
	}
	// A streamed restore's count: no names kept, each arriving page told with where the
	// store holds it, which is where its content is.
	counted := Memory{Counted: true}
	told := 0
	again := NewSession()
	again.Append(held...)
	if _, err := DecodeMemoryFunc(bytes.NewReader(wire.Bytes()), io.Discard, again, dstStore, 1<<30, &counted,
		func(kind int, id uint64, flags uint32, vaddr uint64, hs []Hash, locs []PageLoc) error {
			if len(locs) != len(hs) {
				return fmt.Errorf("%d locations for %d pages", len(locs), len(hs))
			}
			// Where the store holds them, as its own lookup says (lazy-serve reads there).
			want, err := dstStore.Locate(hs)
			if err != nil {
				return err
			}
			if !slices.Equal(locs, want) {
				return fmt.Errorf("pages at %#x: told %v, the store holds them at %v", vaddr, locs, want)
			}
			told += len(hs)
			return nil
		}); err != nil {
		t.Fatal(err)
	}
	if told != 40 || counted.Bytes() != 40*Size || len(counted.Hashes) != 0 {
		t.Fatalf("counted memory: %d told, %d bytes, %d names kept", told, counted.Bytes(), len(counted.Hashes))
	}
	if _, err := counted.WriteTo(io.Discard); err == nil {
		t.Fatal("a counted memory was written as if whole")
	}
	// Lazy pages come from the store, in pieces no longer than their entry.
	buf := make([]byte, 64*Size)
	n, err := got.ReadPages(dstStore, 1, 0x10000+30*Size, buf)
	if err != nil || n != 2 || !bytes.Equal(buf[:2*Size], mem[30*Size:32*Size]) {
		t.Fatalf("ReadPages: %d pages, %v", n, err)
	}
	if _, err := got.ReadPages(dstStore, 1, 0x30000, buf); err == nil {
		t.Fatal("a page outside every entry was served")
	}
	// The images: lazy pages out of the pages image, the others in it.
	img := t.TempDir()
	w, err := got.WriteImages(img, dstStore, true)
	if err != nil || w != 8*Size {
		t.Fatalf("WriteImages wrote %d bytes, %v", w, err)
	}
	pmBytes, _ := os.ReadFile(filepath.Join(img, "pagemap-1.img"))
	pm, err := ParsePageMap(1, pmBytes)
	if err != nil || pm.Len() != 4 {
		t.Fatalf("pagemap-1: %v, %v", pm, err)
	}
	p1, _ := os.ReadFile(filepath.Join(img, "pages-1.img"))
	if !bytes.Equal(p1, mem[32*Size:36*Size]) {
		t.Fatal("pages-1.img does not hold the non-lazy pages")
	}
	// The sender kept the pages it sent: it can rebuild the whole memory for a rollback.
	all := t.TempDir()
	if _, err := sent.WriteImages(all, src, false); err == nil {
		t.Fatal("the sender's store lacks the pre-copied pages here, yet WriteImages succeeded")
	}
	src.AddTrusted(held, mem[:30*Size])
	if w, err := sent.WriteImages(all, src, false); err != nil || w != 40*Size {
		t.Fatalf("rollback images: %d bytes, %v", w, err)
	}
}

func TestDecodeMemoryRefusesEntriesBeyondTheLimitAndStrayOps(t *testing.T) {
	store, _ := OpenStore(t.TempDir(), 1<<30)
	var wire bytes.Buffer
	mw := NewMemoryWriter(&wire, NewSession(), EncodeOptions{})
	mw.Entry(KindProcess, 1, 0, 1<<20, FlagPresent) // 4 GiB announced
	mw.ow.w.Flush()
	if _, err := DecodeMemory(bytes.NewReader(wire.Bytes()), &bytes.Buffer{}, NewSession(), store, 1<<30, &Memory{}); err == nil {
		t.Fatal("a 4 GiB entry passed a 1 GiB limit")
	}
	wire.Reset()
	mw = NewMemoryWriter(&wire, NewSession(), EncodeOptions{})
	mw.Entry(KindProcess, 1, 0, 2, FlagPresent)
	mw.ow.op(opEnd)
	mw.ow.w.Flush()
	if _, err := DecodeMemory(bytes.NewReader(wire.Bytes()), &bytes.Buffer{}, NewSession(), store, 1<<30, &Memory{}); err == nil {
		t.Fatal("the stream ended inside a memory entry without an error")
	}
}

// TestKnownPagesAreNamedWithoutHashingAndChangedOnesAreNot: in the frozen phase the writer
// takes the last round's name of a page whose fingerprint is unchanged, and hashes the
// others. A page changed since (its fingerprint differs) must cross with its new content,
// even though the last round's name of its address is one the receiver holds.
func TestKnownPagesAreNamedWithoutHashingAndChangedOnesAreNot(t *testing.T) {
	dir := t.TempDir()
	store, err := OpenStore(filepath.Join(dir, "dst"), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	const n, base = 300, uint64(0x7f0000000000)
	old := randomPages(t, n)
	// The last round: every page's name and fingerprint by address; the receiver holds them.
	names, err := store.Add(old)
	if err != nil {
		t.Fatal(err)
	}
	fast := map[uint64]Fast{}
	name := map[uint64]Hash{}
	for i := 0; i < n; i++ {
		a := base + uint64(i)*Size
		fast[a], name[a] = FastSum(old[i*Size:(i+1)*Size]), names[i]
	}
	sSess, dSess := NewSession(), NewSession()
	sSess.Append(names...)
	dSess.Append(names...)
	// Since then, 7 pages changed (one byte each).
	now := append([]byte(nil), old...)
	changed := []int{0, 1, 63, 64, 150, 298, 299}
	for _, i := range changed {
		now[i*Size+100] ^= 0x5a
	}
	asked := 0
	known := func(pid int, vaddr uint64, page []byte) (Hash, bool) {
		asked++
		if pid != 4 || FastSum(page) != fast[vaddr] {
			return Hash{}, false
		}
		return name[vaddr], true
	}
	var wire bytes.Buffer
	mw := NewMemoryWriter(&wire, sSess, EncodeOptions{Known: known})
	if err := mw.Entry(KindProcess, 4, base, n, FlagPresent|FlagLazy); err != nil {
		t.Fatal(err)
	}
	if err := mw.Pages(base, now); err != nil {
		t.Fatal(err)
	}
	sent, st, err := mw.Close()
	if err != nil {
		t.Fatal(err)
	}
	if asked != n || st.PagesKnown != int64(n-len(changed)) || st.PagesSent != int64(len(changed)) || st.PagesCopied != int64(n-len(changed)) {
		t.Fatalf("asked %d, stats %+v: want %d known and referenced, %d sent", asked, st, n-len(changed), len(changed))
	}
	for _, i := range changed {
		if sent.Hashes[i] != Sum(now[i*Size:(i+1)*Size]) {
			t.Fatalf("changed page %d named %s, not by its new content", i, sent.Hashes[i])
		}
	}
	if !bytes.Equal(rebuiltMemory(t, &wire, dSess, store, 4, base, n), now) {
		t.Fatal("the receiver's memory differs from the sender's")
	}
}

func BenchmarkMemoryWriterKnown(b *testing.B) {
	const n, base = 4096, uint64(0x7f0000000000)
	data := make([]byte, n*Size)
	for i := range data {
		data[i] = byte(i*7 + i>>12)
	}
	hs := make([]Hash, n)
	SumAll(data, hs)
	sess := NewSession()
	sess.Append(hs...)
	fast := map[uint64]Fast{}
	name := map[uint64]Hash{}
	for i := 0; i < n; i++ {
		a := base + uint64(i)*Size
		fast[a], name[a] = FastSum(data[i*Size:(i+1)*Size]), hs[i]
	}
	for _, mode := range []string{"sha256", "known"} {
		b.Run(mode, func(b *testing.B) {
			o := EncodeOptions{}
			if mode == "known" {
				o.Known = func(pid int, vaddr uint64, page []byte) (Hash, bool) {
					if FastSum(page) != fast[vaddr] {
						return Hash{}, false
					}
					return name[vaddr], true
				}
			}
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				mw := NewMemoryWriter(io.Discard, sess, o)
				mw.Entry(KindProcess, 1, base, n, FlagPresent)
				for off := 0; off < n; off += 256 {
					mw.Pages(base+uint64(off)*Size, data[off*Size:(off+256)*Size])
				}
				mw.Close()
			}
		})
	}
}

// Memory named in the order a round named it crosses as one reference, also where pages
// repeat (zero pages here): each page is looked for where the run before it ended, not
// only where the session first named it.
func TestUnchangedMemoryCrossesAsOneReferenceDespiteRepeatedPages(t *testing.T) {
	store, err := OpenStore(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	const n, base = 600, uint64(0x7f0000000000)
	mem := randomPages(t, n)
	for i := 0; i < n; i += 5 {
		clear(mem[i*Size : (i+1)*Size])
	}
	names, err := store.Add(mem)
	if err != nil {
		t.Fatal(err)
	}
	sSess, dSess := NewSession(), NewSession()
	sSess.Append(names...)
	dSess.Append(names...)
	var wire bytes.Buffer
	mw := NewMemoryWriter(&wire, sSess, EncodeOptions{})
	if err := mw.Entry(KindProcess, 4, base, n, FlagPresent); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < n; off += 100 { // in chunks, as the hand-over reads
		if err := mw.Pages(base+uint64(off)*Size, mem[off*Size:(off+100)*Size]); err != nil {
			t.Fatal(err)
		}
	}
	if _, st, err := mw.Close(); err != nil || st.PagesCopied != n || st.PagesSent != 0 {
		t.Fatalf("stats %+v, %v: want all %d pages referenced", st, err, n)
	}
	// An entry, one copy op (of up to 2 varints) and the end; a copy op per zero page
	// would be about 120 ops more.
	if wire.Len() > 64 {
		t.Fatalf("the memory took %d bytes on the wire: more than one reference", wire.Len())
	}
	if !bytes.Equal(rebuiltMemory(t, &wire, dSess, store, 4, base, n), mem) {
		t.Fatal("the receiver's memory differs from the sender's")
	}
}

// rebuiltMemory decodes a memory part the receiver got (with its end) and reads back
// process pid's n pages from base.
func rebuiltMemory(t *testing.T, wire *bytes.Buffer, sess *Session, store *Store, pid int, base uint64, n int) []byte {
	t.Helper()
	wire.WriteByte('E')
	var got Memory
	if _, err := DecodeMemory(bytes.NewReader(wire.Bytes()), &bytes.Buffer{}, sess, store, 1<<30, &got); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, n*Size)
	for off := 0; off < n; {
		k, err := got.ReadPages(store, uint64(pid), base+uint64(off)*Size, buf[off*Size:])
		if err != nil {
			t.Fatal(err)
		}
		off += k
	}
	return buf
}

// A memory writer keeps the names in the room it was given while it lasts (memory its
// caller faulted in before the freeze), and beyond it as before.
func TestMemoryWriterKeepsNamesInItsRoom(t *testing.T) {
	data := randomPages(t, 40)
	want := make([]Hash, 40)
	SumAll(data, want)
	for _, tc := range []struct {
		room   int
		inRoom bool
	}{{64, true}, {40, true}, {10, false}, {0, false}} {
		var room []Hash
		if tc.room > 0 {
			room = make([]Hash, 0, tc.room)
		}
		mw := NewMemoryWriter(io.Discard, NewSession(), EncodeOptions{Room: room})
		if err := mw.Entry(KindProcess, 1, 0x10000, 30, FlagPresent); err != nil {
			t.Fatal(err)
		}
		if err := mw.Pages(0x10000, data[:30*Size]); err != nil {
			t.Fatal(err)
		}
		if err := mw.Entry(KindProcess, 1, 0x80000, 10, FlagPresent); err != nil {
			t.Fatal(err)
		}
		if err := mw.Pages(0x80000, data[30*Size:]); err != nil {
			t.Fatal(err)
		}
		mem, _, err := mw.Close()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(mem.Hashes, want) {
			t.Fatalf("room %d: the names differ from the pages'", tc.room)
		}
		if in := cap(room) > 0 && &mem.Hashes[0] == &room[:1][0]; in != tc.inRoom {
			t.Fatalf("room %d: names kept in the room: %v, want %v", tc.room, in, tc.inRoom)
		}
	}
}
