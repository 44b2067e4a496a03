package pages

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func randomPages(t testing.TB, n int) []byte {
	b := make([]byte, n*Size)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestStoreKeepsPagesByContentAndSurvivesReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenStore(dir, 4*packPages*Size)
	if err != nil {
		t.Fatal(err)
	}
	buf := randomPages(t, 10)
	copy(buf[3*Size:4*Size], buf[0:Size]) // a duplicate is stored once
	hs, err := s.Add(buf)
	if err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Pages != 9 || st.Bytes != 9*Size {
		t.Fatalf("stats %+v, want 9 pages stored once each", st)
	}
	got := make([]byte, len(buf))
	if err := s.Read(hs, got); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back: %v, equal %t", err, bytes.Equal(got, buf))
	}
	var unknown Hash
	if err := s.Read([]Hash{unknown}, got[:Size]); !errors.Is(err, ErrMissing) {
		t.Fatalf("read unknown page: %v, want ErrMissing", err)
	}
	s.Close()

	// A damaged page on disk is found on reopen: it no longer answers to its name.
	p := filepath.Join(dir, "pack-00000000")
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	f.WriteAt([]byte{buf[5*Size] ^ 0xff}, 5*Size-Size) // page 4 in the pack is buf's page 5
	f.Close()
	s, err = OpenStore(dir, 4*packPages*Size)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	has := s.Has(hs)
	for i, ok := range has {
		if want := i != 5; ok != want {
			t.Errorf("after reopen page %d held=%t, want %t", i, ok, want)
		}
	}
}

func TestStoreEvictsOldestPacksUnlessPinned(t *testing.T) {
	s, err := OpenStore(t.TempDir(), 2*packPages*Size)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	unpin := s.Pin()
	var first []Hash
	for i := 0; i < 3; i++ {
		hs, err := s.Add(randomPages(t, packPages))
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = hs
		}
	}
	if st := s.Stats(); st.Pages != 3*packPages {
		t.Fatalf("pinned store evicted: %+v", st)
	}
	unpin()
	st := s.Stats()
	if st.Bytes > 2*packPages*Size || st.Evicted != packPages {
		t.Fatalf("after unpin: %+v, want at most 2 packs and one evicted", st)
	}
	if s.Has(first[:1])[0] {
		t.Fatal("the oldest pack's pages are still indexed")
	}
}

// tarOf builds a podman-like checkpoint archive.
func tarOf(t testing.TB, files map[string][]byte, order []string) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, name := range order {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: int64(len(files[name])), Typeflag: tar.TypeReg})
		tw.Write(files[name])
	}
	tw.Close()
	return b.Bytes()
}

func TestEncodeDecodeRebuildsTheArchiveAndSendsOnlyUnknownPages(t *testing.T) {
	mem := randomPages(t, 600)
	zero := make([]byte, 20*Size)
	pagesImg := append(append([]byte{}, mem...), zero...)
	files := map[string][]byte{
		"config.dump":              []byte(`{"id":"x"}`),
		"checkpoint/pagemap-1.img": []byte("pagemap"),
		"checkpoint/pages-1.img":   pagesImg,
		"checkpoint/core-1.img":    []byte("core"),
	}
	archive := tarOf(t, files, []string{"config.dump", "checkpoint/pagemap-1.img", "checkpoint/pages-1.img", "checkpoint/core-1.img"})

	// The target received the first 500 pages in pre-copy rounds; pages 100..109 changed
	// since (they will be sent).
	src, dst := NewSession(), NewSession()
	store, err := OpenStore(t.TempDir(), 4*packPages*Size)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	hs := make([]Hash, 500)
	SumAll(mem[:500*Size], hs)
	src.Append(hs...)
	dst.Append(hs...)
	if err := store.AddTrusted(hs, mem[:500*Size]); err != nil {
		t.Fatal(err)
	}
	for i := 100; i < 110; i++ {
		mem[i*Size] ^= 1
	}
	copy(pagesImg, mem)
	archive = tarOf(t, files, []string{"config.dump", "checkpoint/pagemap-1.img", "checkpoint/pages-1.img", "checkpoint/core-1.img"})

	var enc bytes.Buffer
	est, err := Encode(bytes.NewReader(archive), &enc, src, EncodeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Sent: 10 changed + 100 never seen + one zero page (the other 19 are references).
	if est.PagesSent != 111 || est.PagesCopied != 490+19 || est.ArchiveBytes != int64(len(archive)) {
		t.Fatalf("encode stats %+v", est)
	}
	if enc.Len() > 112*Size+4096 {
		t.Fatalf("encoded %d bytes for %d sent pages", enc.Len(), est.PagesSent)
	}
	var out bytes.Buffer
	before := store.Stats().Pages
	dstats, err := Decode(&enc, &out, dst, store, 1<<40)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), archive) {
		t.Fatal("the rebuilt archive differs from the original")
	}
	if kept := store.Stats().Pages - before; kept != 111 || dstats.PagesCopied != est.PagesCopied {
		t.Fatalf("decode stored %d new pages, stats %+v", kept, dstats)
	}
	if src.Len() != dst.Len() {
		t.Fatalf("sessions diverged: %d vs %d", src.Len(), dst.Len())
	}
}

func TestDecodeFailsOnTruncatedOrUnknownReferences(t *testing.T) {
	store, _ := OpenStore(t.TempDir(), packPages*Size)
	defer store.Close()
	archive := tarOf(t, map[string][]byte{"checkpoint/pages-1.img": randomPages(t, 4)}, []string{"checkpoint/pages-1.img"})
	var enc bytes.Buffer
	if _, err := Encode(bytes.NewReader(archive), &enc, NewSession(), EncodeOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := Decode(bytes.NewReader(enc.Bytes()[:enc.Len()-1]), io.Discard, NewSession(), store, 1<<40); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated: %v", err)
	}
	// A reference to a place the receiver's session does not have.
	if _, err := Decode(bytes.NewReader([]byte{opCopy, 5, 1, opEnd}), io.Discard, NewSession(), store, 1<<40); err == nil {
		t.Fatal("a dangling reference was accepted")
	}
}

func BenchmarkSumAll(b *testing.B) {
	buf := randomPages(b, 4096)
	hs := make([]Hash, 4096)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		SumAll(buf, hs)
	}
}

func BenchmarkStoreRead(b *testing.B) {
	s, _ := OpenStore(b.TempDir(), 4*packPages*Size)
	defer s.Close()
	buf := randomPages(b, 4096)
	hs, _ := s.Add(buf)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if err := s.Read(hs, buf); err != nil {
			b.Fatal(err)
		}
	}
}

// Baseline for the two above: copying the same bytes.
func BenchmarkMemcpy(b *testing.B) {
	src := randomPages(b, 4096)
	dst := make([]byte, len(src))
	b.SetBytes(int64(len(src)))
	for b.Loop() {
		copy(dst, src)
	}
}

func BenchmarkEncodeDecode(b *testing.B) {
	mem := randomPages(b, 4096)
	archive := tarOf(b, map[string][]byte{"checkpoint/pages-1.img": mem}, []string{"checkpoint/pages-1.img"})
	store, _ := OpenStore(b.TempDir(), 4*packPages*Size)
	defer store.Close()
	hs, _ := store.Add(mem)
	src, dst := NewSession(), NewSession()
	src.Append(hs...)
	dst.Append(hs...)
	b.SetBytes(int64(len(archive)))
	var enc bytes.Buffer
	for b.Loop() {
		enc.Reset()
		if _, err := Encode(bytes.NewReader(archive), &enc, src, EncodeOptions{}); err != nil {
			b.Fatal(err)
		}
		if _, err := Decode(&enc, io.Discard, dst, store, 1<<40); err != nil {
			b.Fatal(err)
		}
	}
}

func TestRecordsCarryDeltasAgainstEarlierPages(t *testing.T) {
	store, _ := OpenStore(t.TempDir(), packPages*Size)
	defer store.Close()
	old := randomPages(t, 2)
	hs, _ := store.Add(old)
	sess := NewSession()
	sess.Append(hs...)
	changed := append([]byte{}, old[Size:]...)
	changed[100] ^= 0xff // page 1 changed in one byte
	fresh := randomPages(t, 1)
	var rec []byte
	rec = AppendDelta(rec, 1, changed, old[Size:])
	rec = AppendLiteral(rec, fresh)
	var got [][]byte
	var names []Hash
	n, err := DecodeRecords(bytes.NewReader(rec), sess, store, func(h []Hash, buf []byte) error {
		for i := range h {
			got = append(got, append([]byte{}, buf[i*Size:(i+1)*Size]...))
			names = append(names, h[i])
		}
		return nil
	})
	if err != nil || n != 2 {
		t.Fatalf("decoded %d: %v", n, err)
	}
	if !bytes.Equal(got[0], changed) || !bytes.Equal(got[1], fresh) || names[0] != Sum(changed) {
		t.Fatal("pages not rebuilt")
	}
	// A delta against a place the session does not have is refused.
	bad := AppendDelta(nil, 9, changed, old[Size:])
	if _, err := DecodeRecords(bytes.NewReader(bad), sess, store, func([]Hash, []byte) error { return nil }); err == nil {
		t.Fatal("a delta against an unknown base was accepted")
	}
	// A delta against a base the store's disk damaged names the store, not the wire: the
	// sender must learn that the page is gone, not that the network damaged its batch.
	if err := store.FlipBit(hs[1]); err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeRecords(bytes.NewReader(rec), sess, store, func([]Hash, []byte) error { return nil }); !errors.Is(err, ErrDamaged) {
		t.Fatalf("a delta against a damaged base: %v", err)
	}
}

func TestHashListsOnTheWire(t *testing.T) {
	hs := make([]Hash, 3)
	SumAll(randomPages(t, 3), hs)
	b := AppendHashes(nil, hs)
	back, err := ParseHashes(b)
	if err != nil || len(back) != 3 || back[2] != hs[2] {
		t.Fatalf("round trip: %v %v", back, err)
	}
	if _, err := ParseHashes(b[:len(b)-1]); err == nil {
		t.Fatal("a truncated list was accepted")
	}
}

func TestEncodeHandsObservedFilesOverAndStillSendsThem(t *testing.T) {
	files := map[string][]byte{
		"config.dump":            []byte(`{"id":"x"}`),
		"stats-dump":             []byte("criu statistics"),
		"checkpoint/pages-1.img": randomPages(t, 3),
	}
	archive := tarOf(t, files, []string{"config.dump", "stats-dump", "checkpoint/pages-1.img"})
	var seen []byte
	var enc bytes.Buffer
	if _, err := Encode(bytes.NewReader(archive), &enc, NewSession(), EncodeOptions{
		Observe: map[string]func([]byte){"stats-dump": func(b []byte) { seen = append(seen, b...) }},
	}); err != nil {
		t.Fatal(err)
	}
	if string(seen) != "criu statistics" {
		t.Fatalf("observed %q", seen)
	}
	store, err := OpenStore(t.TempDir(), packPages*Size)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	var out bytes.Buffer
	if _, err := Decode(&enc, &out, NewSession(), store, 1<<40); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), archive) {
		t.Fatal("the rebuilt archive differs from the original")
	}
}

// A page that changed on the store's disk after it was stored is never handed out by what
// restores a container: ReadVerified and Verify refuse it (ErrDamaged) and forget it, so
// that it is sent again; the other pages read as before.
func TestStoreRefusesAPageDamagedOnDisk(t *testing.T) {
	s, err := OpenStore(t.TempDir(), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	buf := make([]byte, 300*Size)
	for i := range buf {
		buf[i] = byte(i*7 + i/Size)
	}
	hs, err := s.Add(buf)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(hs); err != nil {
		t.Fatalf("intact store: %v", err)
	}
	if err := s.FlipBit(hs[123]); err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(buf))
	if err := s.Read(hs, out); err != nil || bytes.Equal(out, buf) {
		t.Fatalf("the damage did not reach the disk: %v", err)
	}
	if err := s.Verify(hs); !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), hs[123].String()) {
		t.Fatalf("Verify of a damaged page: %v", err)
	}
	if s.Has(hs[123:124])[0] {
		t.Fatal("the damaged page is still held: the source would never send it again")
	}
	if err := s.ReadVerified(hs[:123], out[:123*Size]); err != nil || !bytes.Equal(out[:123*Size], buf[:123*Size]) {
		t.Fatalf("the intact pages: %v", err)
	}
	if err := s.ReadVerified(hs, out); !errors.Is(err, ErrMissing) {
		t.Fatalf("reading the forgotten page: %v", err)
	}
	// Sent again, it is held again.
	if _, err := s.Add(buf[123*Size : 124*Size]); err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(hs); err != nil {
		t.Fatalf("after the page came again: %v", err)
	}
}

// AddTrusted writes the new pages of a batch straight from it: scattered among pages the
// store holds (more runs than one write takes), repeated within the batch, and across the
// end of a pack. Every page reads back as it was.
func TestStoreAddsScatteredNewPagesAcrossPacks(t *testing.T) {
	store, err := OpenStore(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	fill := randomPages(t, packPages-5) // the first pack all but full
	if _, err := store.Add(fill); err != nil {
		t.Fatal(err)
	}
	n := 2*maxIOV + 50
	buf := randomPages(t, n)
	// Every other page is held already (from the first pack's pages): more runs of new
	// pages than one write takes.
	held := 0
	for i := 0; i < n; i += 2 {
		copy(buf[i*Size:(i+1)*Size], fill[i*Size:(i+1)*Size])
		held++
	}
	copy(buf[9*Size:10*Size], buf[5*Size:6*Size]) // a new page twice in the batch
	hs := make([]Hash, n)
	SumAll(buf, hs)
	if err := store.AddTrusted(hs, buf); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, n*Size)
	if err := store.ReadVerified(hs, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, buf) {
		t.Fatal("pages read back differ from those added")
	}
	if st, want := store.Stats(), packPages-5+n-held-1; st.Pages != want || st.Packs != 2 {
		t.Fatalf("the store holds %d pages in %d packs, want %d (no page twice) in 2", st.Pages, st.Packs, want)
	}
}

func TestSessionLocatesAheadWhatTheStoreHolds(t *testing.T) {
	store, err := OpenStore(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	other, err := OpenStore(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	buf := randomPages(t, 600)
	hs := make([]Hash, 600)
	SumAll(buf, hs)
	// The other store holds them in another order: other locations for the same names.
	for i := 599; i >= 0; i -= 100 {
		if err := other.AddTrusted(hs[i-99:i+1], buf[(i-99)*Size:(i+1)*Size]); err != nil {
			t.Fatal(err)
		}
	}
	sess := NewSession()
	sess.Append(hs...)
	sess.Append(hs[:10]...) // repeated pages: places of their own
	if err := store.AddTrusted(hs[:400], buf[:400*Size]); err != nil {
		t.Fatal(err)
	}
	if got := sess.LocateAhead(store); got != 400 {
		t.Fatalf("located %d places ahead, want the 400 the store holds", got)
	}
	check := func(s *Store, at, n int) {
		t.Helper()
		names, locs, err := sess.Locate(s, at, n)
		if err != nil {
			t.Fatalf("Locate(%d, %d): %v", at, n, err)
		}
		want, err := s.Locate(hs[at:][:n])
		if err != nil && at+n <= 600 {
			t.Fatal(err)
		}
		for i := range names {
			if names[i] != hs[(at+i)%600] {
				t.Fatalf("place %d: wrong name", at+i)
			}
			if at+n <= 600 && locs[i] != want[i] {
				t.Fatalf("place %d: located at %v, the store keeps it at %v", at+i, locs[i], want[i])
			}
		}
	}
	check(store, 0, 400)
	check(store, 123, 45)
	check(other, 0, 400) // not the locations found in store
	if _, _, err := sess.Locate(store, 390, 20); !errors.Is(err, ErrMissing) {
		t.Fatalf("places the store lacks: %v, want ErrMissing", err)
	}
	if _, _, err := sess.Locate(store, 605, 6); err == nil {
		t.Fatal("places beyond the session were located")
	}
	if err := store.AddTrusted(hs[400:], buf[400*Size:]); err != nil {
		t.Fatal(err)
	}
	if got := sess.LocateAhead(store); got != 610 {
		t.Fatalf("located %d places ahead, want all 610", got)
	}
	check(store, 350, 250)
	names, locs, err := sess.Locate(store, 600, 10)
	if err != nil {
		t.Fatal(err)
	}
	first, _ := store.Locate(hs[:10])
	for i := range names {
		if names[i] != hs[i] || locs[i] != first[i] {
			t.Fatalf("repeated page %d: %v at %v, want %v", i, names[i], locs[i], first[i])
		}
	}
}

// BenchmarkSessionLocate: the frozen phase's references of a 1 GiB container, located by
// hash (cold) or from the locations found ahead.
func BenchmarkSessionLocate(b *testing.B) {
	store, _ := OpenStore(b.TempDir(), 2<<30)
	const n = 262144
	buf := make([]byte, 1024*Size)
	sess := NewSession()
	for i := 0; i < n; i += 1024 {
		for k := 0; k < 1024; k++ {
			binary.LittleEndian.PutUint64(buf[k*Size:], uint64(i+k))
		}
		hs := make([]Hash, 1024)
		SumAll(buf, hs)
		if err := store.AddTrusted(hs, buf); err != nil {
			b.Fatal(err)
		}
		sess.Append(hs...)
	}
	for _, ahead := range []bool{false, true} {
		b.Run(map[bool]string{false: "by-hash", true: "ahead"}[ahead], func(b *testing.B) {
			if ahead {
				sess.LocateAhead(store)
			}
			for b.Loop() {
				for at := 0; at < n; at += 256 {
					if _, _, err := sess.Locate(store, at, 256); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
