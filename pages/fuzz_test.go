package pages

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"testing"
)

// Fuzz tests of every decoder of bytes that come from another host. Each must return an
// error for what it cannot read, never panic, and never allocate or write more than its
// bounds allow. CI runs each for a few seconds (scripts/fuzz.sh 5s); run them longer by
// hand with scripts/fuzz.sh 10m. Inputs that once broke a decoder are in testdata/fuzz.

// countingWriter counts what a decoder writes, and fails past a bound.
type countingWriter struct{ n, max int64 }

var errWroteTooMuch = errors.New("decoder wrote past its limit")

func (w *countingWriter) Write(b []byte) (int, error) {
	w.n += int64(len(b))
	if w.n > w.max {
		return 0, errWroteTooMuch
	}
	return len(b), nil
}

// fuzzSession is a session of n known pages, all in store.
func fuzzSession(t testing.TB, store *Store, mem []byte) *Session {
	hs := make([]Hash, len(mem)/Size)
	SumAll(mem, hs)
	if err := store.AddTrusted(hs, mem); err != nil {
		t.Fatal(err)
	}
	s := NewSession()
	s.Append(hs...)
	return s
}

func FuzzDecode(f *testing.F) {
	mem := make([]byte, 8*Size)
	for i := range mem {
		mem[i] = byte(i * 7)
	}
	// A real encoding: an archive with a page image, half its pages known.
	archive := tarOf(f, map[string][]byte{"config.dump": []byte("{}"), "checkpoint/pages-1.img": mem}, []string{"config.dump", "checkpoint/pages-1.img"})
	src := NewSession()
	hs := make([]Hash, 4)
	SumAll(mem[:4*Size], hs)
	src.Append(hs...)
	var enc bytes.Buffer
	if _, err := Encode(bytes.NewReader(archive), &enc, src, EncodeOptions{}); err != nil {
		f.Fatal(err)
	}
	f.Add(enc.Bytes())
	f.Add([]byte{opCopy, 0, 4, opEnd})
	f.Add(binary.AppendUvarint(binary.AppendUvarint([]byte{opDelta}, 1), math.MaxInt64))    // place overflows int
	f.Add(binary.AppendUvarint(binary.AppendUvarint([]byte{opCopy}, 0), 1<<40))             // 4 PiB of references
	f.Add(binary.AppendUvarint(binary.AppendUvarint([]byte{opCopy}, math.MaxInt64>>13), 8)) // at+n overflows
	f.Add([]byte{opRaw, 0xff, 0xff, 0xff, 0xff, 0x0f})
	store, err := OpenStore(f.TempDir(), 4*packPages*Size)
	if err != nil {
		f.Fatal(err)
	}
	defer store.Close()
	known := fuzzSession(f, store, mem[:4*Size])
	const limit = 64 * Size
	f.Fuzz(func(t *testing.T, in []byte) {
		sess := NewSession()
		names, _ := known.Slice(0, known.Len())
		sess.Append(names...)
		w := &countingWriter{max: limit}
		_, err := Decode(bytes.NewReader(in), w, sess, store, limit)
		if errors.Is(err, errWroteTooMuch) {
			t.Fatalf("Decode wrote %d bytes past its limit %d", w.n, limit)
		}
	})
}

func FuzzDecodeRecords(f *testing.F) {
	mem := make([]byte, 4*Size)
	for i := range mem {
		mem[i] = byte(i * 13)
	}
	rec := AppendLiteral(nil, mem[:Size])
	rec = AppendDelta(rec, 1, mem[2*Size:3*Size], mem[Size:2*Size])
	f.Add(rec)
	f.Add(binary.AppendUvarint([]byte{recDelta}, math.MaxUint64))
	f.Add(binary.AppendUvarint([]byte{recDelta}, math.MaxInt64))
	f.Add([]byte{recLiteral, 1, 2, 3})
	store, err := OpenStore(f.TempDir(), 4*packPages*Size)
	if err != nil {
		f.Fatal(err)
	}
	defer store.Close()
	known := fuzzSession(f, store, mem)
	f.Fuzz(func(t *testing.T, in []byte) {
		pages := 0
		n, err := DecodeRecords(bytes.NewReader(in), known, store, func(hs []Hash, buf []byte) error {
			if len(buf) != len(hs)*Size {
				t.Fatalf("%d bytes for %d pages", len(buf), len(hs))
			}
			pages += len(hs)
			return nil
		})
		// Every page costs at least one byte of input and a whole page more.
		if n > len(in)/Size+1 || (err == nil && pages != n) {
			t.Fatalf("%d pages (%d handed over) from %d bytes: %v", n, pages, len(in), err)
		}
	})
}

func FuzzParsePageMap(f *testing.F) {
	f.Add(pagemapImage(f, 1, entry(0x1000, 4, pePresent), entry4(0x10000, 3, pePresent)))
	f.Add(pagemapImage(f, 1, entry4(0x1000, 1<<40, pePresent)))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		pm, err := ParsePageMap(1, in)
		if err != nil {
			return
		}
		// What Encode does with it: Len first, Addrs only if it matches an image.
		if n := pm.Len(); n < 0 || n > 1<<36 {
			t.Fatalf("%d pages", n)
		}
	})
}

func FuzzParseHashes(f *testing.F) {
	f.Add(AppendHashes(nil, []Hash{{1}, {2}}))
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, in []byte) {
		hs, err := ParseHashes(in)
		if err == nil && !bytes.Equal(AppendHashes(nil, hs), in) {
			t.Fatal("hash list does not round-trip")
		}
	})
}

// FuzzDecodeMemory: a stream that begins with a dump's memory (pagemap entries and their
// pages) is decoded within its limit, memory included, or refused; never a panic.
func FuzzDecodeMemory(f *testing.F) {
	mem := make([]byte, 8*Size)
	for i := range mem {
		mem[i] = byte(i * 11)
	}
	src := NewSession()
	hs := make([]Hash, 4)
	SumAll(mem[:4*Size], hs)
	src.Append(hs...)
	var enc bytes.Buffer
	mw := NewMemoryWriter(&enc, src, EncodeOptions{})
	mw.Entry(KindProcess, 1, 0x10000, 8, FlagPresent|FlagLazy)
	mw.Pages(0x10000, mem)
	mw.Close()
	archive := tarOf(f, map[string][]byte{"checkpoint/core-1.img": []byte("core")}, []string{"checkpoint/core-1.img"})
	Encode(bytes.NewReader(archive), &enc, src, EncodeOptions{})
	f.Add(enc.Bytes())
	f.Add(binary.AppendUvarint(binary.AppendUvarint(binary.AppendUvarint(binary.AppendUvarint(binary.AppendUvarint([]byte{opEntry}, KindProcess), 1), 0), 1<<36), FlagPresent))
	store, err := OpenStore(f.TempDir(), 4*packPages*Size)
	if err != nil {
		f.Fatal(err)
	}
	defer store.Close()
	known := fuzzSession(f, store, mem[:4*Size])
	const limit = 64 * Size
	f.Fuzz(func(t *testing.T, in []byte) {
		sess := NewSession()
		names, _ := known.Slice(0, known.Len())
		sess.Append(names...)
		w := &countingWriter{max: limit}
		var m Memory
		_, err := DecodeMemory(bytes.NewReader(in), w, sess, store, limit, &m)
		if errors.Is(err, errWroteTooMuch) {
			t.Fatalf("DecodeMemory wrote %d bytes past its limit %d", w.n, limit)
		}
		if m.Bytes()+w.n > limit && err == nil {
			t.Fatalf("memory %d + archive %d bytes decoded past the limit %d", m.Bytes(), w.n, limit)
		}
	})
}
