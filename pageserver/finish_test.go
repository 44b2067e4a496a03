package pageserver

import (
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeLazyServer is CRIU's lazy page server at the end of a dump: its socket corked, it
// answers the close (status 0) and then waits for the client to hang up, reporting what
// the wait read: 0 bytes (a hang-up, the dump succeeds) or an error (a reset, it fails).
func fakeLazyServer(t *testing.T) (addr string, hangUp <-chan error) {
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
		d := &fakeDump{t: t, conn: c.(*net.TCPConn)}
		d.setsockopt(unix.TCP_CORK, 1)
		var b [headerSize]byte
		h, err := readHeader(c, &b)
		if err != nil {
			ch <- err
			return
		}
		if h.cmd != cmdClose {
			ch <- protoErr("command %#x, want close", h.cmd)
			return
		}
		c.Write([]byte{0, 0, 0, 0}) // corked: it waits for the cork timer, or the close
		var one [1]byte
		n, err := c.Read(one[:])
		if err == io.EOF && n == 0 {
			err = nil
		} else if err == nil {
			err = protoErr("%d bytes after the close", n)
		}
		ch <- err
	}()
	return ln.Addr().String(), ch
}

// Finish hangs up after the close without waiting for the corked answer: CRIU sees the
// hang-up at once (its dump ends well) and its own close pushes the answer out, so the
// whole exchange takes no cork timer (about 200 ms with the answer waiting corked).
// Close, which reads the answer before hanging up, is the baseline that waits.
func TestFinishDoesNotWaitForTheCorkedAnswer(t *testing.T) {
	took := func(finish bool) time.Duration {
		addr, hangUp := fakeLazyServer(t)
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cl := NewClient(c)
		t0 := time.Now()
		if finish {
			err = cl.Finish(5 * time.Second)
		} else {
			err = cl.Close()
			c.Close()
		}
		d := time.Since(t0)
		if err != nil {
			t.Fatalf("finish=%v: %v", finish, err)
		}
		if err := <-hangUp; err != nil {
			t.Fatalf("finish=%v: the server saw %v, want a plain hang-up", finish, err)
		}
		return d
	}
	corked, finished := took(false), took(true)
	t.Logf("close then hang up: %s; Finish: %s", corked, finished)
	if corked < 100*time.Millisecond {
		t.Fatalf("the corked answer came after %s: the fake no longer holds it as CRIU's cork does", corked)
	}
	if finished > corked/4 {
		t.Errorf("Finish took %s, the corked close %s: want it well under the cork timer", finished, corked)
	}
}

// A server that answers the close with a failure, or not at all, is an error.
func TestFinishReportsABadAnswer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var b [headerSize]byte
		io.ReadFull(c, b[:])
		c.Write([]byte{0xff, 0xff, 0xff, 0xff}) // -1
		io.Copy(io.Discard, c)
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := NewClient(c).Finish(5 * time.Second); err == nil {
		t.Fatal("a close answered -1 must be an error")
	}
}
