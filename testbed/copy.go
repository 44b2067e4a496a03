package testbed

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
)

// The stock sequence's copies: a file from one host to another over the underlay (through
// the wire, so shaped and counted like the agents' traffic), on a port the system chooses,
// with the receiver listening before the sender dials and both byte counts checked.

// inNetNS runs fn on a thread inside the network namespace at path. Sockets fn creates
// stay in that namespace.
func inNetNS(path string, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := netns.GetFromPath(path)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread stays locked: it dies with the goroutine instead of serving others
		// in the wrong namespace.
		return fmt.Errorf("leave netns %s: %w", path, err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// CopyFile sends the file src from host from to the file dst, written on host to (both
// paths on this machine's filesystem, which the hosts share), over TCP on the underlay.
// It returns the bytes that arrived, which equal the file's size or it fails.
func (tb *Testbed) CopyFile(ctx context.Context, from, to, src, dst string) (int64, error) {
	hf, err := tb.Host(from)
	if err != nil {
		return 0, err
	}
	ht, err := tb.Host(to)
	if err != nil {
		return 0, err
	}
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return 0, err
	}
	out, err := os.Create(dst)
	if err != nil {
		return 0, err
	}
	defer out.Close()
	var ln net.Listener
	if err := inNetNS(ht.NetNS, func() (err error) {
		ln, err = net.Listen("tcp4", net.JoinHostPort(ht.UnderlayIP.String(), "0"))
		return err
	}); err != nil {
		return 0, fmt.Errorf("listen on %s: %w", to, err)
	}
	defer ln.Close()
	type result struct {
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{0, err}
			return
		}
		defer c.Close()
		n, err := io.Copy(out, c)
		got <- result{n, err}
	}()
	var conn net.Conn
	if err := inNetNS(hf.NetNS, func() (err error) {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "tcp4", ln.Addr().String())
		return err
	}); err != nil {
		return 0, fmt.Errorf("connect %s -> %s: %w", from, to, err)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close(); ln.Close() })
	defer stop()
	sent, err := io.Copy(conn, in)
	if err == nil {
		err = conn.(*net.TCPConn).CloseWrite()
	}
	if err != nil {
		conn.Close()
		return 0, fmt.Errorf("send %s -> %s: %w", from, to, err)
	}
	r := <-got
	conn.Close()
	if r.err != nil {
		return r.n, fmt.Errorf("receive on %s: %w", to, r.err)
	}
	if sent != st.Size() || r.n != sent {
		return r.n, fmt.Errorf("copy %s -> %s: file %d bytes, sent %d, received %d", from, to, st.Size(), sent, r.n)
	}
	return r.n, out.Sync()
}
