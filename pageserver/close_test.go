package pageserver

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeDump sends as CRIU 4 does: the socket corked from the start, TCP_NODELAY set
// after each open ("push the command now"), the close sent corked.
type fakeDump struct {
	t    *testing.T
	conn *net.TCPConn
}

func dialDump(t *testing.T, addr string) *fakeDump {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	d := &fakeDump{t: t, conn: c.(*net.TCPConn)}
	d.setsockopt(unix.TCP_CORK, 1)
	return d
}

func (d *fakeDump) setsockopt(opt, v int) {
	rc, err := d.conn.SyscallConn()
	if err != nil {
		d.t.Fatal(err)
	}
	var serr error
	rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, opt, v) })
	if serr != nil {
		d.t.Fatal(serr)
	}
}

func (d *fakeDump) send(h header, data []byte) {
	var b [headerSize]byte
	h.marshal(&b)
	if _, err := d.conn.Write(append(b[:], data...)); err != nil {
		d.t.Fatal(err)
	}
}

// read reads n bytes of answers; each must be zero (no parent, status OK).
func (d *fakeDump) read(n int) {
	b := make([]byte, n)
	d.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(d.conn, b); err != nil {
		d.t.Fatalf("read %d bytes of answer: %v", n, err)
	}
	if !bytes.Equal(b, make([]byte, n)) {
		d.t.Fatalf("answer %x: want zeros", b)
	}
}

// image opens process id's pagemap and sends its pages (one entry).
func (d *fakeDump) image(id uint64, data []byte) {
	d.send(header{cmd: cmdOpen2, dstID: encodeImage(Image{KindProcess, id})}, nil)
	d.setsockopt(unix.TCP_NODELAY, 1)
	d.read(1)
	d.send(header{cmd: cmdAddF | FlagPresent<<cmdBits, nrPages: uint64(len(data) / PageSize), vaddr: 0x10000, dstID: encodeImage(Image{KindProcess, id})}, data)
}

type sumSink struct {
	h     map[uint64][]byte
	pages int
}

func (s *sumSink) Entry(Image, uint64, uint64, uint32) error { return nil }
func (s *sumSink) Pages(img Image, _ uint64, data []byte) error {
	s.h[img.ID] = append(s.h[img.ID], data...)
	s.pages += len(data) / PageSize
	return nil
}

// serveOne receives one dump's connection on a loopback port; done carries Receive's error.
func serveOne(t *testing.T, sink Sink, o ReceiveOptions) (addr string, done <-chan error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- err
			return
		}
		defer c.Close()
		_, err = Receive(context.Background(), c, sink, o)
		ch <- err
	}()
	return ln.Addr().String(), ch
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n*PageSize)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>12)
	}
	return b
}

// What a rollback needs is kept before CRIU's close is answered (the answer lets CRIU end
// the dump and podman kill the container): BeforeClose runs with every page taken and
// before the status goes out; if it fails, the close goes unanswered (CRIU's dump then
// fails and the container runs on) and Receive returns its error.
func TestCloseAnsweredOnlyAfterBeforeClose(t *testing.T) {
	for _, fail := range []bool{false, true} {
		data := pattern(300, 5)
		sink := &sumSink{h: map[uint64][]byte{}}
		var keptPages atomic.Int64
		var keptAt atomic.Int64
		kept := errors.New("disk full")
		addr, done := serveOne(t, sink, ReceiveOptions{BeforeClose: func() error {
			time.Sleep(20 * time.Millisecond) // keeping takes a while: CRIU must wait
			keptPages.Store(int64(sink.pages))
			keptAt.Store(time.Now().UnixNano())
			if fail {
				return kept
			}
			return nil
		}})
		d := dialDump(t, addr)
		d.image(1, data)
		d.send(header{cmd: cmdClose}, nil)
		d.setsockopt(unix.TCP_NODELAY, 1) // pushes the corked close (CRIU does not: see the uncork test)
		b := make([]byte, 4)
		d.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, rerr := io.ReadFull(d.conn, b)
		statusAt := time.Now().UnixNano()
		err := <-done
		d.conn.Close()
		switch {
		case keptPages.Load() != 300:
			t.Fatalf("fail=%v: BeforeClose saw %d pages, want all 300", fail, keptPages.Load())
		case !fail && (rerr != nil || n != 4 || err != nil || statusAt < keptAt.Load()):
			t.Fatalf("status %d bytes (%v), receive %v, status read %d ns after keeping: want 4 bytes after keeping", n, rerr, err, statusAt-keptAt.Load())
		case fail && (n != 0 || !errors.Is(err, kept)):
			t.Fatalf("keeping failed: CRIU read %d bytes of status, receive returned %v; want no status and %v", n, err, kept)
		}
	}
}

// CRIU corks its socket and never uncorks it, so its close (and the end of its last
// pages) waits in the kernel for the cork's 200 ms timer while the container is frozen.
// With Uncork the page server clears the cork once the stream goes quiet: side by side,
// the close is answered in well under half the time, with every page received intact.
func TestUncorkAnswersTheCorkedCloseWithoutTheCorkTimer(t *testing.T) {
	closeTook := func(uncork bool) time.Duration {
		data := pattern(37, 9) // 37 pages: the stream's end is not a whole segment
		sink := &sumSink{h: map[uint64][]byte{}}
		told := errors.New("not told")
		addr, done := serveOne(t, sink, ReceiveOptions{Uncork: uncork, Uncorked: func(err error) { told = err }})
		d := dialDump(t, addr)
		defer d.conn.Close()
		d.image(1, data)
		time.Sleep(20 * time.Millisecond) // CRIU's other work between its last pages and its close
		start := time.Now()
		d.send(header{cmd: cmdClose}, nil)
		d.read(4)
		took := time.Since(start)
		if err := <-done; err != nil {
			t.Fatalf("uncork=%v: %v", uncork, err)
		}
		if uncork && told != nil {
			t.Fatalf("not uncorked: %v", told)
		}
		if !bytes.Equal(sink.h[1], data) {
			t.Fatalf("uncork=%v: %d bytes received, not the %d sent", uncork, len(sink.h[1]), len(data))
		}
		return took
	}
	corked, uncorked := closeTook(false), closeTook(true)
	t.Logf("close answered after %s corked, %s uncorked", corked, uncorked)
	if corked < 150*time.Millisecond {
		t.Fatalf("the corked close was answered after %s: the kernel did not hold it, so this test shows nothing", corked)
	}
	if uncorked*2 > corked {
		t.Fatalf("uncorked close answered after %s, corked %s: the cork was not cleared", uncorked, corked)
	}
}
