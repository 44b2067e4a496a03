package transfer

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
	"unsafe"

	"github.com/migrate-project/migrate/pages"
	"golang.org/x/sys/unix"
)

// fakeLazyCRIU is a lazy dump's page server: it answers GETs from mem (by address) and the
// close, then reports how the client left: nil for a hang-up after the close (CRIU's dump
// succeeds), an error otherwise (a reset: the dump fails and the container runs on).
func fakeLazyCRIU(t testing.TB, mem map[uint64][]byte) (port int, gets *int, left <-chan error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan error, 1)
	gets = new(int)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- err
			return
		}
		defer c.Close()
		var h [32]byte
		for {
			if _, err := io.ReadFull(c, h[:]); err != nil {
				ch <- err // a hang-up without the close, or a reset
				return
			}
			cmd, n, vaddr := binary.LittleEndian.Uint32(h[0:]), binary.LittleEndian.Uint64(h[8:]), binary.LittleEndian.Uint64(h[16:])
			switch cmd {
			case 7: // PS_IOV_GET: one page at a time, as CRIU may answer fewer
				page, ok := mem[vaddr]
				if !ok || n == 0 {
					ch <- errors.New("asked for a page it does not have")
					return
				}
				*gets++
				binary.LittleEndian.PutUint32(h[0:], 6|4<<16) // PS_IOV_ADD_F, PE_PRESENT
				binary.LittleEndian.PutUint64(h[8:], 1)
				c.Write(append(h[:], page...))
			case 0x1023: // PS_IOV_CLOSE
				c.Write([]byte{0, 0, 0, 0})
				var one [1]byte
				if n, err := c.Read(one[:]); n != 0 || err != io.EOF {
					ch <- errors.New("no plain hang-up after the close")
					return
				}
				ch <- nil
				return
			default:
				ch <- errors.New("unknown command")
				return
			}
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, gets, ch
}

// pageAligned returns n pages of memory of this process, page-aligned, filled from seed.
func pageAligned(n int, seed byte) []byte {
	raw := make([]byte, (n+1)*pages.Size)
	off := int(uintptr(pages.Size)-uintptr(unsafe.Pointer(&raw[0]))%uintptr(pages.Size)) % pages.Size
	b := raw[off : off+n*pages.Size]
	for i := range b {
		b[i] = seed + byte(i*13) + byte(i>>12)
	}
	return b
}

// The read hand-over rebuilds exactly the memory the page-server path would have named:
// the lazy pages from the process's memory (or, where it cannot be read, CRIU's page
// server), the others from the dump's pages images, every entry in order with the lazy
// ones present again. On success CRIU sees the close and a hang-up; when keeping the
// memory fails, a reset, which fails CRIU's dump (the container runs on).
func TestReadHandOverRebuildsTheDumpsMemory(t *testing.T) {
	store, err := pages.OpenStore(t.TempDir(), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	self := uint64(os.Getpid()) // the "container's" process: this test's own memory
	live := pageAligned(5, 3)
	liveAt := uint64(uintptr(unsafe.Pointer(&live[0])))
	// The memory as the page-server path would have named it.
	var want *pages.Memory
	{
		mw := pages.NewMemoryWriter(io.Discard, pages.NewSession(), pages.EncodeOptions{Sent: func(hs []pages.Hash, p []byte) { store.AddTrusted(hs, p) }})
		for _, e := range []struct {
			kind      int
			id, at, n uint64
			flags     uint32
			data      []byte
		}{
			{pages.KindProcess, self, 0x10000, 3, pages.FlagPresent, pageAligned(3, 1)},    // a written file mapping: in the image
			{pages.KindProcess, self, 0x20000, 2, 0, nil},                                  // not present
			{pages.KindProcess, self, liveAt, 5, pages.FlagPresent | pages.FlagLazy, live}, // lazy: in the process
			{pages.KindShmem, 3, 0, 2, pages.FlagPresent, pageAligned(2, 9)},               // shared memory: in its image
		} {
			if err := mw.Entry(e.kind, e.id, e.at, e.n, e.flags); err != nil {
				t.Fatal(err)
			}
			if e.data != nil {
				if err := mw.Pages(e.at, e.data); err != nil {
					t.Fatal(err)
				}
			}
		}
		if want, _, err = mw.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name     string
		readable bool
		keepErr  error
		deferEnd bool // a streamed restore: CRIU's end waits for the target's
	}{
		{"from the process", true, nil, false}, {"from CRIU", false, nil, false}, {"keeping fails", true, errors.New("disk full"), false},
		{"kept beside the restore", true, nil, true}, {"keeping beside the restore fails", true, errors.New("disk full"), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			static, dir, byAddr := lazyDumpOf(t, want, store, live)
			port, gets, left := fakeLazyCRIU(t, byAddr)
			d := &lazyDump{name: "t", port: port, dir: dir, static: static, store: store, deferEnd: c.deferEnd}
			init := os.Getpid()
			if !c.readable {
				init = 1 << 30 // no such process: every lazy page from CRIU
			}
			var got bytes.Buffer
			sess := pages.NewSession()
			mw := pages.NewMemoryWriter(&got, sess, pages.EncodeOptions{})
			mem, _, hs, err := readHandOver(context.Background(), d, init, mw, sess, nil, nil, func(*pages.Memory) error { return c.keepErr })
			if c.deferEnd {
				// The hand-over returns with CRIU's transfer open; the caller waits for the
				// memory kept, then closes it, or resets it if keeping failed (finalCopy).
				if err != nil {
					t.Fatal(err)
				}
				select {
				case err := <-left:
					t.Fatalf("CRIU's transfer ended (%v) before the target restored", err)
				case <-time.After(100 * time.Millisecond):
				}
				if kerr := d.waitKept(); c.keepErr != nil {
					if !errors.Is(kerr, c.keepErr) || !errors.Is(d.waitKept(), c.keepErr) {
						t.Fatalf("keeping failed: waitKept says %v", kerr)
					}
					d.failDump()
					if err := <-left; err == nil {
						t.Fatal("CRIU saw the close and a hang-up: its dump would end and the container go; want a reset")
					}
					return
				} else if kerr != nil {
					t.Fatal(kerr)
				}
				if _, err := d.endDump(); err != nil {
					t.Fatal(err)
				}
			}
			if c.keepErr != nil {
				if !errors.Is(err, c.keepErr) {
					t.Fatalf("keeping failed: got %v", err)
				}
				d.close()
				if err := <-left; err == nil {
					t.Fatal("CRIU saw the close and a hang-up: its dump would end and the container go; want a reset")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := <-left; err != nil {
				t.Fatalf("CRIU's end: %v", err)
			}
			if !reflect.DeepEqual(mem, want) {
				t.Errorf("memory handed over:\n%+v\nwant\n%+v", mem, want)
			}
			wantGets, wantMem := 0, int64(5)
			if !c.readable {
				wantGets, wantMem = 5, 0
			}
			if *gets != wantGets || hs.FromMemory != wantMem || hs.FromCRIU != int64(wantGets) || hs.FromImages != 5 {
				t.Errorf("read %+v with %d GETs: want %d pages from the process, %d from CRIU, 5 from images", hs, *gets, wantMem, wantGets)
			}
		})
	}
}

// The read hand-over's rate on this machine: 256 MiB of this process's memory as one lazy
// entry, every page known from a "last round" (the frozen phase's usual case), read and
// named through a memory writer to io.Discard. Its MB/s is the frozen cost per MiB of a
// default-mode move's memory.
func BenchmarkReadHandOver(b *testing.B) {
	const n = 65536 // 256 MiB
	store, err := pages.OpenStore(b.TempDir(), 64<<20)
	if err != nil {
		b.Fatal(err)
	}
	self := uint64(os.Getpid())
	live := pageAligned(n, 5)
	liveAt := uint64(uintptr(unsafe.Pointer(&live[0])))
	sess, seen := lastRound(store, int(self), live)
	mw := pages.NewMemoryWriter(io.Discard, pages.NewSession(), pages.EncodeOptions{})
	if err := mw.Entry(pages.KindProcess, self, liveAt, n, pages.FlagPresent|pages.FlagLazy); err != nil {
		b.Fatal(err)
	}
	if err := mw.Pages(liveAt, live); err != nil {
		b.Fatal(err)
	}
	want, _, err := mw.Close()
	if err != nil {
		b.Fatal(err)
	}
	dir := filepath.Join(b.TempDir(), "checkpoint")
	os.MkdirAll(dir, 0o700)
	if _, err := want.WriteImages(dir, store, true); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(n * pages.Size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		port, _, left := fakeLazyCRIU(b, nil)
		d := &lazyDump{name: "b", port: port, dir: dir, store: store}
		mw := pages.NewMemoryWriter(io.Discard, sess, pages.EncodeOptions{Known: seen.known, Base: seen.base})
		_, st, hs, err := readHandOver(context.Background(), d, os.Getpid(), mw, sess, nil, nil, func(*pages.Memory) error { return nil })
		if err != nil {
			b.Fatal(err)
		}
		if err := <-left; err != nil {
			b.Fatal(err)
		}
		if hs.FromMemory != n || st.PagesKnown != n || st.PagesCopied != n {
			b.Fatalf("read %+v, stats %+v: want all %d pages from memory, known and referenced", hs, st, n)
		}
	}
}

// A page without read permission (mprotect PROT_NONE after it was written) is not read by
// process_vm_readv; pages.ProcMem reads it through the mem file, so the hand-over need not ask
// CRIU for it.
func TestProcMemReadsPagesWithoutReadPermission(t *testing.T) {
	mem, err := unix.Mmap(-1, 0, 3*pages.Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	for i := range mem {
		mem[i] = byte(i*7 + i>>12)
	}
	want := bytes.Clone(mem)
	if err := unix.Mprotect(mem[pages.Size:2*pages.Size], unix.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	defer unix.Mprotect(mem[pages.Size:2*pages.Size], unix.PROT_READ|unix.PROT_WRITE)
	pm, err := pages.OpenProcMem(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	got := make([]byte, len(mem))
	if n := pm.ReadAt(got, int64(uintptr(unsafe.Pointer(&mem[0])))); n != len(got) {
		t.Fatalf("read %d of %d bytes", n, len(got))
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the pages read differ from the process's")
	}
}

// Pages named while CRIU dumped go by name, unread: a run of the dump whose every page is
// unchanged since the last round (its fingerprint) crosses as references though the
// process cannot be read any more; a run with a changed page is read (here from CRIU).
// The memory is the one the page-server path would have named.
func TestReadHandOverSendsPagesNamedAheadUnread(t *testing.T) {
	store, err := pages.OpenStore(t.TempDir(), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	self := os.Getpid()
	const n = 300 // two chunks of the hand-over: 256 and 44 pages
	live := pageAligned(n, 7)
	liveAt := uint64(uintptr(unsafe.Pointer(&live[0])))
	// The last round: every page named, in the session and the target's store.
	sess, seen := lastRound(store, self, live)
	if _, err := store.Add(live); err != nil {
		t.Fatal(err)
	}
	live[290*pages.Size+5] ^= 0xff // changed since, in the second chunk
	var want *pages.Memory
	{
		mw := pages.NewMemoryWriter(io.Discard, pages.NewSession(), pages.EncodeOptions{Sent: func(hs []pages.Hash, p []byte) { store.AddTrusted(hs, p) }})
		if err := mw.Entry(pages.KindProcess, uint64(self), liveAt, n, pages.FlagPresent|pages.FlagLazy); err != nil {
			t.Fatal(err)
		}
		if err := mw.Pages(liveAt, live); err != nil {
			t.Fatal(err)
		}
		if want, _, err = mw.Close(); err != nil {
			t.Fatal(err)
		}
	}
	static, dir, byAddr := lazyDumpOf(t, want, store, live)
	pre := startPreNaming(func() ([]int, error) { return []int{self}, nil }, seen)
	// Not waited for here: the hand-over finishes the naming once CRIU listens, with more
	// goroutines.
	port, gets, left := fakeLazyCRIU(t, byAddr)
	d := &lazyDump{name: "t", port: port, dir: dir, static: static, store: store}
	var wire bytes.Buffer
	mw := pages.NewMemoryWriter(&wire, sess, pages.EncodeOptions{Known: seen.known, Base: seen.base})
	// The process cannot be read by the hand-over (no such PID): what is not named ahead
	// comes from CRIU.
	mem, st, hs, err := readHandOver(context.Background(), d, 1<<30, mw, sess, pre, nil, func(*pages.Memory) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if err := <-left; err != nil {
		t.Fatalf("CRIU's end: %v", err)
	}
	if pre.pages != n-1 {
		t.Errorf("named ahead %d pages, want the %d unchanged", pre.pages, n-1)
	}
	if hs.NamedAhead != 256 || hs.FromCRIU != 44 || *gets == 0 {
		t.Errorf("read %+v with %d GETs: want the first 256 pages named ahead, the 44 of the run with the changed page from CRIU", hs, *gets)
	}
	if st.PagesCopied != n-1 || st.PagesSent != 1 {
		t.Errorf("stats %+v: want %d pages referenced, 1 sent", st, n-1)
	}
	if !reflect.DeepEqual(mem.Hashes, want.Hashes) {
		t.Error("the memory handed over differs from the page-server path's")
	}
}

// lastRound names the pages of live (process pid's memory) as a pre-copy round would
// have: all in a new session, each by its address in what the round read.
func lastRound(store *pages.Store, pid int, live []byte) (*pages.Session, *lastSent) {
	at := uint64(uintptr(unsafe.Pointer(&live[0])))
	sess := pages.NewSession()
	seen := newLastSent(sess, store)
	hs := make([]pages.Hash, len(live)/pages.Size)
	pages.SumAll(live, hs)
	sess.Append(hs...)
	for i := range hs {
		seen.put(pid, at+uint64(i)*pages.Size, hs[i], pages.FastSum(live[i*pages.Size:(i+1)*pages.Size]))
	}
	return sess, seen
}

// lazyDumpOf writes a lazy dump's images of mem (lazy entries without their pages) into a
// container's userdata directory (static) and returns it, the images' directory and the
// pages of live by address, for fakeLazyCRIU.
func lazyDumpOf(t *testing.T, mem *pages.Memory, store *pages.Store, live []byte) (static, dir string, byAddr map[uint64][]byte) {
	static = t.TempDir()
	dir = filepath.Join(static, "checkpoint")
	os.MkdirAll(dir, 0o700)
	if _, err := mem.WriteImages(dir, store, true); err != nil {
		t.Fatal(err)
	}
	at := uint64(uintptr(unsafe.Pointer(&live[0])))
	byAddr = map[uint64][]byte{}
	for i := 0; i < len(live)/pages.Size; i++ {
		byAddr[at+uint64(i)*pages.Size] = live[i*pages.Size : (i+1)*pages.Size]
	}
	return static, dir, byAddr
}
