package transfer

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// Fuzz tests of the agent's decoders of untrusted bytes (scripts/fuzz.sh).

// FuzzJournalEntry: a journal file may be damaged (a disk, a hand edit); reading it back
// is an error, never a panic, and never more than maxJournalEntry bytes.
func FuzzJournalEntry(f *testing.F) {
	f.Add([]byte(`{"prepare":{"container":"web","move":"1","source":"a"},"state":"restored"}`))
	f.Add([]byte(`{"move":"1","container":"web","target":"b","state":"committed","acked":true}`))
	f.Add([]byte(`{"state":`))
	dir := f.TempDir()
	j := journal{dir}
	f.Fuzz(func(t *testing.T, in []byte) {
		if err := os.WriteFile(filepath.Join(dir, "web.json"), in, 0o600); err != nil {
			t.Fatal(err)
		}
		var in1 incomingMove
		var out1 outgoingMove
		j.get("web", &in1)
		j.get("web", &out1)
	})
}

// FuzzBodyReader: a zstd body from a peer decodes within the bounds set for it (window,
// memory), or fails.
func FuzzBodyReader(f *testing.F) {
	enc, _ := zstd.NewWriter(nil)
	f.Add(enc.EncodeAll(bytes.Repeat([]byte("page"), 4096), nil))
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := &http.Request{Header: http.Header{"Content-Encoding": {"zstd"}}, Body: io.NopCloser(bytes.NewReader(in))}
		body, done, err := bodyReader(r)
		if err != nil {
			return
		}
		defer done()
		io.Copy(io.Discard, io.LimitReader(body, 64<<20))
	})
}

// FuzzPushEvents: the operator's side reads a push's event stream from an agent.
func FuzzPushEvents(f *testing.F) {
	f.Add([]byte(`{"event":"phase","phase":"inspect"}` + "\n" + `{"event":"result","result":{"ok":true}}` + "\n"))
	f.Add([]byte(`{"event":"result"}` + "\n"))
	f.Add(bytes.Repeat([]byte("x"), 2<<20))
	f.Fuzz(func(t *testing.T, in []byte) {
		readEvents(bytes.NewReader(in), "fuzz", func(Event) {})
	})
}

// FuzzLazyIndex: lazy-serve reads the index the agent writes (a file, or a pipe it
// follows); a damaged one is an error, never a panic or an allocation beyond its bounds,
// and a page of an index it accepted is served or refused, never read out of its run.
func FuzzLazyIndex(f *testing.F) {
	ok := append([]byte(lazyIndexMagic), appendRun(nil, 1, 0x10000, []locSeg{{pack: 0, page: 0, count: 2}, {pack: 0, page: 7, count: 1}}, 3)...)
	f.Add(ok)
	f.Add(append(append([]byte{}, ok...), make([]byte, 32)...))
	f.Add([]byte(lazyIndexMagic))
	dir := f.TempDir()
	path := filepath.Join(dir, "index")
	f.Fuzz(func(t *testing.T, in []byte) {
		if err := os.WriteFile(path, in, 0o600); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4*4096)
		if runs, err := readLazyIndex(path); err == nil {
			src := &packSource{runs: runs, packs: map[uint32]*os.File{}}
			for _, r := range runs {
				src.ReadPages(r.pid, r.vaddr+uint64(r.n-1)*4096, buf) // no pack open: an error
			}
		}
		s := newFollowSource(dir, 0)
		s.follow(bytes.NewReader(in))
		for _, rs := range s.runs {
			for _, r := range rs {
				if got, ok := s.find(r.pid, r.end()-1); !ok || got.vaddr != r.vaddr {
					t.Fatalf("run at %#x of %d not found by its last byte", r.vaddr, r.pid)
				}
			}
		}
	})
}

// The prelude's framing from a peer: bounded, never a panic.
func FuzzPrelude(f *testing.F) {
	var b bytes.Buffer
	writePrelude(&b, []byte("archive"))
	f.Add(b.Bytes()[1:])
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := readPrelude(bytes.NewReader(data))
		if err == nil && len(got) > maxPrelude {
			t.Fatalf("accepted %d bytes", len(got))
		}
		tarFile(got, "checkpoint/"+descriptorsFile)
	})
}
