package pages

import (
	"bytes"
	"encoding/binary"
	"os"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/pagemap"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// pagemapImage writes a pagemap image as CRIU does: the common magic, PAGEMAP, the head,
// then one entry per run.
func pagemapImage(t testing.TB, pagesID uint32, entries ...*pagemap.PagemapEntry) []byte {
	m := magic.LoadMagic()
	b := binary.LittleEndian.AppendUint32(nil, uint32(m.ByName["IMG_COMMON"]))
	b = binary.LittleEndian.AppendUint32(b, uint32(m.ByName["PAGEMAP"]))
	for _, msg := range append([]proto.Message{&pagemap.PagemapHead{PagesId: proto.Uint32(pagesID)}}, protos(entries)...) {
		raw, err := proto.Marshal(msg)
		if err != nil {
			t.Fatal(err)
		}
		b = binary.LittleEndian.AppendUint32(b, uint32(len(raw)))
		b = append(b, raw...)
	}
	return b
}

func protos(es []*pagemap.PagemapEntry) []proto.Message {
	out := make([]proto.Message, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

func entry(vaddr uint64, n uint32, flags uint32) *pagemap.PagemapEntry {
	return &pagemap.PagemapEntry{Vaddr: proto.Uint64(vaddr), NrPages: proto.Uint32(n), Flags: proto.Uint32(flags)}
}

// entry4 is an entry as CRIU 4 writes it: compat_nr_pages 0, the count in field 5.
func entry4(vaddr uint64, n uint64, flags uint32) *pagemap.PagemapEntry {
	e := entry(vaddr, 0, flags)
	raw := protowire.AppendTag(nil, 5, protowire.VarintType)
	e.ProtoReflect().SetUnknown(protowire.AppendVarint(raw, n))
	return e
}

func TestParsePageMapKeepsOnlyPresentPages(t *testing.T) {
	img := pagemapImage(t, 3, entry4(0x10000, 2, pePresent), entry(0x20000, 5, 1 /* PE_PARENT */), entry(0x30000, 1, pePresent|2 /* PE_LAZY */))
	pm, err := ParsePageMap(9, img)
	if err != nil {
		t.Fatal(err)
	}
	want := []uint64{0x10000, 0x11000, 0x30000}
	if got := pm.Addrs(); pm.PagesID != 3 || pm.PID != 9 || len(got) != 3 || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("parsed %+v, addrs %x", pm, got)
	}
	if _, err := ParsePageMap(9, img[:len(img)-3]); err == nil {
		t.Fatal("a truncated pagemap parsed")
	}
	if _, err := ParsePageMap(9, []byte("not an image")); err == nil {
		t.Fatal("garbage parsed as a pagemap")
	}
}

// The frozen phase sends a page that changed since the last round as its XOR with what
// its address held then, which the receiver has: CRIU's pagemap gives the addresses.
func TestEncodeSendsChangedPagesAsDeltasByAddress(t *testing.T) {
	const pid = 7
	mem := randomPages(t, 300)
	// 100 pages at 0x10000, a run in a parent image (no data here), 200 pages at 0x800000.
	pm := pagemapImage(t, 1, entry4(0x10000, 100, pePresent), entry(0x400000, 50, 1), entry4(0x800000, 200, pePresent))
	addrs := []uint64{}
	for i := 0; i < 100; i++ {
		addrs = append(addrs, 0x10000+uint64(i)*Size)
	}
	for i := 0; i < 200; i++ {
		addrs = append(addrs, 0x800000+uint64(i)*Size)
	}
	// The rounds sent all 300 pages and remember each address's content.
	src, dst := NewSession(), NewSession()
	store, err := OpenStore(t.TempDir(), 4*packPages*Size)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	hs := make([]Hash, 300)
	SumAll(mem, hs)
	src.Append(hs...)
	dst.Append(hs...)
	if err := store.AddTrusted(hs, mem); err != nil {
		t.Fatal(err)
	}
	last := map[uint64]Hash{}
	for i, a := range addrs {
		last[a] = hs[i]
	}
	// Since then 40 pages changed in a few bytes; 10 of them at addresses the rounds
	// never saw (they go whole).
	for i := 50; i < 90; i++ {
		binary.LittleEndian.PutUint64(mem[i*Size+128:], uint64(i))
	}
	for i := 180; i < 190; i++ {
		delete(last, addrs[i])
		mem[i*Size] ^= 0xff
	}
	files := map[string][]byte{"checkpoint/pagemap-7.img": pm, "checkpoint/pages-1.img": mem, "config.dump": []byte("{}")}
	archive := tarOf(t, files, []string{"checkpoint/pagemap-7.img", "checkpoint/pages-1.img", "config.dump"})

	base := func(p int, vaddr uint64, into []byte) (int, bool) {
		h, ok := last[vaddr]
		if !ok || p != pid {
			return 0, false
		}
		place, ok := src.Index(h)
		if !ok || store.Read([]Hash{h}, into) != nil {
			return 0, false
		}
		return place, true
	}
	var enc bytes.Buffer
	est, err := Encode(bytes.NewReader(archive), &enc, src, EncodeOptions{Base: base})
	if err != nil {
		t.Fatal(err)
	}
	if est.PagesSent != 50 || est.PagesDelta != 40 || est.PagesCopied != 250 {
		t.Fatalf("encode stats %+v, want 50 sent of which 40 as deltas, 250 referenced", est)
	}
	var out bytes.Buffer
	dstats, err := Decode(&enc, &out, dst, store, 1<<40)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), archive) {
		t.Fatal("the rebuilt archive differs from the original")
	}
	if dstats.PagesDelta != 40 || src.Len() != dst.Len() {
		t.Fatalf("decode stats %+v; sessions %d vs %d", dstats, src.Len(), dst.Len())
	}
	for i := 50; i < 90; i++ {
		if !store.Has([]Hash{Sum(mem[i*Size : (i+1)*Size])})[0] {
			t.Fatalf("the rebuilt page %d is not in the store", i)
		}
	}

	// A pagemap that does not account for the pages image: no deltas, still exact.
	files["checkpoint/pagemap-7.img"] = pagemapImage(t, 1, entry(0x10000, 100, pePresent))
	archive = tarOf(t, files, []string{"checkpoint/pagemap-7.img", "checkpoint/pages-1.img", "config.dump"})
	enc.Reset()
	out.Reset()
	est, err = Encode(bytes.NewReader(archive), &enc, NewSession(), EncodeOptions{Base: base})
	if err != nil || est.PagesDelta != 0 || est.PagesSent != 300 {
		t.Fatalf("mismatched pagemap: %v, %+v", err, est)
	}
	if _, err := Decode(&enc, &out, NewSession(), store, 1<<40); err != nil || !bytes.Equal(out.Bytes(), archive) {
		t.Fatalf("mismatched pagemap: rebuilt %v, equal %t", err, bytes.Equal(out.Bytes(), archive))
	}
}

func TestNSPidOfThisProcess(t *testing.T) {
	// This test runs in the host's PID namespace (or a container's): either way its
	// innermost PID is what getpid says.
	if got, err := NSPid(os.Getpid()); err != nil || got != os.Getpid() {
		t.Fatalf("NSPid = %d, %v; want %d", got, err, os.Getpid())
	}
}
