package pageserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"os"
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

func pattern(n int, seed byte) []byte {
	b := make([]byte, n*PageSize)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>12)
	}
	return b
}

// CRIU's close waits corked in its send queue (200 ms, frozen): the page server answers
// it as soon as the dump goes quiet after CRIU has sent its last page (Ready: here, the
// fake's inventory flag; the agent looks for CRIU's inventory image). Never before: a
// pause mid-dump (between two processes, a page tail still corked) is not the end, and
// an agent that answered there and died would lose the container. The dump still sends
// everything, answers are read exactly (none twice), and once answered the end of ctx
// no longer cuts the transfer: CRIU may end its dump, the rest must arrive.
func TestCloseAnsweredWhileCRIUsRequestIsCorked(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ready bool // Ready given
		pause time.Duration
		early bool // want the close answered early
	}{
		{"answered early", true, 0, true},
		{"not in a pause mid-dump, then early", true, 30 * time.Millisecond, true},
		{"not early without Ready", false, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			one, two := pattern(37, 1), pattern(300, 9) // 300 pages: more than one chunk
			sink := &sumSink{h: map[uint64][]byte{}}
			answered, answeredBeforeReady := 0, false
			var inventory atomic.Bool // the fake's last page sent
			var ready func() bool
			if tc.ready {
				ready = inventory.Load
			}
			type result struct {
				at  time.Time
				err error
			}
			done := make(chan result, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					done <- result{err: err}
					return
				}
				defer c.Close()
				_, err = Receive(ctx, c, sink, ReceiveOptions{Quiet: 3 * time.Millisecond, Ready: ready, Answered: func() {
					answered++
					answeredBeforeReady = answeredBeforeReady || !inventory.Load()
					cancel() // a watchdog firing now must not lose the rest
				}})
				done <- result{time.Now(), err}
			}()
			d := dialDump(t, ln.Addr().String())
			defer d.conn.Close()
			d.image(1, one)
			time.Sleep(tc.pause)
			d.image(2, two)
			inventory.Store(true)
			d.send(header{cmd: cmdClose}, nil) // corked, as CRIU sends it
			d.read(4)
			statusAt := time.Now()
			// Nothing more: an answer given twice would desynchronise CRIU.
			d.conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if n, err := d.conn.Read(make([]byte, 8)); n > 0 || (err != nil && !errors.Is(err, os.ErrDeadlineExceeded) && err != io.EOF) {
				t.Fatalf("after the status: %d more bytes (%v): want none", n, err)
			}
			d.conn.Close() // CRIU closes at once: what was corked goes out
			r := <-done
			if r.err != nil {
				t.Fatalf("receive: %v", r.err)
			}
			if sha256.Sum256(sink.h[1]) != sha256.Sum256(one) || sha256.Sum256(sink.h[2]) != sha256.Sum256(two) || sink.pages != 337 {
				t.Fatalf("received %d pages, process 1 intact %v, process 2 intact %v: want 337, both intact", sink.pages,
					bytes.Equal(sink.h[1], one), bytes.Equal(sink.h[2], two))
			}
			// With the early answer CRIU has its status before its close request even
			// reached the server (the kernel holds it 200 ms); without, it waits for that.
			if (answered == 1) != tc.early || answeredBeforeReady || (tc.early && !statusAt.Before(r.at)) {
				t.Fatalf("answered early %d times (before the last page: %v), status read %s before the server saw the close; want early: %v",
					answered, answeredBeforeReady, r.at.Sub(statusAt), tc.early)
			}
		})
	}
}

// What a rollback needs is kept before CRIU's close is answered (the answer lets CRIU end
// the dump and podman kill the container): BeforeClose runs with every page taken and
// before the status goes out; if it fails, the close goes unanswered (CRIU's dump then
// fails and the container runs on) and Receive returns its error.
func TestCloseAnsweredOnlyAfterBeforeClose(t *testing.T) {
	for _, fail := range []bool{false, true} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		data := pattern(300, 5)
		sink := &sumSink{h: map[uint64][]byte{}}
		var keptPages atomic.Int64
		var keptAt atomic.Int64
		kept := errors.New("disk full")
		done := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			_, err = Receive(context.Background(), c, sink, ReceiveOptions{BeforeClose: func() error {
				time.Sleep(20 * time.Millisecond) // keeping takes a while: CRIU must wait
				keptPages.Store(int64(sink.pages))
				keptAt.Store(time.Now().UnixNano())
				if fail {
					return kept
				}
				return nil
			}})
			done <- err
		}()
		d := dialDump(t, ln.Addr().String())
		d.image(1, data)
		d.send(header{cmd: cmdClose}, nil)
		d.setsockopt(unix.TCP_NODELAY, 1) // as CRIU does after its close
		b := make([]byte, 4)
		d.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, rerr := io.ReadFull(d.conn, b)
		statusAt := time.Now().UnixNano()
		err = <-done
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
