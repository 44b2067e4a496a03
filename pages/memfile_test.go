package pages

import (
	"errors"
	"reflect"
	"testing"
)

func sampleMemory() *Memory {
	m := &Memory{}
	m.Maps = []*MemMap{
		{Kind: KindProcess, ID: 1, Entries: []MemEntry{{Vaddr: 0x400000, Pages: 3, Flags: FlagPresent | FlagLazy, First: 0}, {Vaddr: 0x7f0000000000, Pages: 2, Flags: FlagPresent, First: 3}}},
		{Kind: KindShmem, ID: 9, Entries: []MemEntry{{Vaddr: 0, Pages: 1, Flags: FlagPresent, First: 5}}},
	}
	for i := 0; i < 6; i++ {
		var h Hash
		h[0], h[31] = byte(i), byte(100+i)
		m.Hashes = append(m.Hashes, h)
	}
	return m
}

// The memory a source keeps for a rollback reads back as it was written, and a file cut
// short or damaged fails with an error instead of a wrong memory.
func TestMemoryFileRoundTripsAndRefusesDamage(t *testing.T) {
	m := sampleMemory()
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var got Memory
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&got, m) {
		t.Fatalf("read back %+v, want %+v", got, *m)
	}
	for cut := 0; cut < len(b); cut++ {
		var x Memory
		if err := x.UnmarshalBinary(b[:cut]); !errors.Is(err, errMemFile) {
			t.Fatalf("cut at %d of %d: %v", cut, len(b), err)
		}
	}
	// An entry naming more hashes than the file holds.
	m.Maps[1].Entries[0].First = 6
	b, _ = m.MarshalBinary()
	var x Memory
	if err := x.UnmarshalBinary(b); !errors.Is(err, errMemFile) {
		t.Fatalf("an entry past the hashes: %v", err)
	}
}

// FuzzMemoryFile: the kept memory's reader returns errors for what it cannot read, never
// panics, and allocates no more than its input allows.
func FuzzMemoryFile(f *testing.F) {
	b, _ := sampleMemory().MarshalBinary()
	f.Add(b)
	f.Add([]byte(memMagic + "\xff\xff\xff\xff\x0f"))
	f.Fuzz(func(t *testing.T, in []byte) {
		var m Memory
		if err := m.UnmarshalBinary(in); err != nil {
			return
		}
		if len(m.Hashes)*len(Hash{}) > len(in) {
			t.Fatalf("%d hashes from %d bytes", len(m.Hashes), len(in))
		}
		again, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var m2 Memory
		if err := m2.UnmarshalBinary(again); err != nil || !reflect.DeepEqual(m, m2) {
			t.Fatalf("what was read does not read back: %v", err)
		}
	})
}
