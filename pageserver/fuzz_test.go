package pageserver

import (
	"bytes"
	"io"
	"testing"
)

type nopSink struct{ n int }

func (s *nopSink) Entry(Image, uint64, uint64, uint32) error { s.n++; return nil }
func (s *nopSink) Pages(Image, uint64, []byte) error         { return nil }

// rw is a connection made of what the peer sent and what we answer.
type rw struct {
	io.Reader
	out bytes.Buffer
}

func (c *rw) Write(b []byte) (int, error) { return c.out.Write(b) }

func msg(cmd uint32, nr, vaddr, dst uint64) []byte {
	var b [headerSize]byte
	(&header{cmd: cmd, nrPages: nr, vaddr: vaddr, dstID: dst}).marshal(&b)
	return b[:]
}

// FuzzReceive: whatever a dump's connection carries, Receive returns (an error or nil)
// without panicking or allocating what the bytes claim.
func FuzzReceive(f *testing.F) {
	var ok []byte
	ok = append(ok, msg(cmdOpen2, 0, 0, encodeImage(Image{KindProcess, 1}))...)
	ok = append(ok, msg(cmdAddF|(FlagPresent|FlagLazy)<<cmdBits, 1, 0x1000, encodeImage(Image{KindProcess, 1}))...)
	ok = append(ok, make([]byte, PageSize)...)
	ok = append(ok, msg(cmdClose, 0, 0, 0)...)
	f.Add(ok)
	f.Add(msg(cmdAddF|FlagPresent<<cmdBits, 1<<40, 0, 1))
	f.Add(msg(cmdGet, 1, 0, 1))
	f.Fuzz(func(t *testing.T, b []byte) {
		receive(&rw{Reader: bytes.NewReader(b)}, &nopSink{}, ReceiveOptions{MaxBytes: 1 << 20, ChunkPages: 4})
	})
}

type zeroSource struct{}

func (zeroSource) ReadPages(pid, vaddr uint64, buf []byte) (int, error) {
	return len(buf) / PageSize, nil
}

// FuzzServe: whatever a lazy-pages daemon asks, Serve answers or fails, never panics.
func FuzzServe(f *testing.F) {
	f.Add(append(msg(cmdGet, 3, 0x1000, 1), msg(cmdClose, 0, 0, 0)...))
	f.Add(msg(cmdGet, 1<<62, 0x1000, 1))
	f.Fuzz(func(t *testing.T, b []byte) {
		serve(&rw{Reader: bytes.NewReader(b)}, zeroSource{}, ServeOptions{MaxPages: 8})
	})
}
