package pageserver

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Client asks a page server for pages, as `criu lazy-pages --page-server` does: here, a
// lazy dump's CRIU, which serves the frozen container's memory until it is closed.
type Client struct {
	conn net.Conn
	br   *bufio.Reader
	hb   [headerSize]byte
}

// NewClient speaks to the page server on conn.
func NewClient(conn net.Conn) *Client {
	return &Client{conn: conn, br: bufio.NewReaderSize(conn, 1<<20)}
}

// Get reads process pid's pages from vaddr into buf (a whole number of pages) and returns
// how many the server sent: at least one, perhaps fewer than asked.
func (c *Client) Get(pid, vaddr uint64, buf []byte) (int, error) {
	want := uint64(len(buf) / PageSize)
	if want == 0 {
		return 0, fmt.Errorf("page server: no room for a page")
	}
	req := header{cmd: cmdGet, nrPages: want, vaddr: vaddr, dstID: pid}
	req.marshal(&c.hb)
	if _, err := c.conn.Write(c.hb[:]); err != nil {
		return 0, fmt.Errorf("page server: ask for %d pages of %d at %#x: %w", want, pid, vaddr, err)
	}
	h, err := readHeader(c.br, &c.hb)
	if err != nil {
		return 0, fmt.Errorf("page server: pages of %d at %#x: %w", pid, vaddr, noEOF(err))
	}
	if h.cmd&cmdMask != cmdAddF || h.vaddr != vaddr || h.dstID != pid || h.nrPages == 0 || h.nrPages > want {
		return 0, protoErr("answer %#x for %d pages of %d at %#x, asked %d of %d at %#x", h.cmd, h.nrPages, h.dstID, h.vaddr, want, pid, vaddr)
	}
	n := int(h.nrPages)
	if _, err := io.ReadFull(c.br, buf[:n*PageSize]); err != nil {
		return 0, fmt.Errorf("page server: pages of %d at %#x: %w", pid, vaddr, noEOF(err))
	}
	return n, nil
}

// Close ends the transfer (PS_IOV_CLOSE) and waits for the server's answer: a lazy
// dump's CRIU then finishes its dump.
func (c *Client) Close() error {
	req := header{cmd: cmdClose}
	req.marshal(&c.hb)
	if _, err := c.conn.Write(c.hb[:]); err != nil {
		return fmt.Errorf("page server: close: %w", err)
	}
	var st [4]byte
	if _, err := io.ReadFull(c.br, st[:]); err != nil {
		// CRIU's lazy page server ends its connection without an answer: fine.
		return nil
	}
	if v := int32(binary.LittleEndian.Uint32(st[:])); v != 0 {
		return fmt.Errorf("page server: close answered %d", v)
	}
	return nil
}

// Finish ends the transfer without waiting on CRIU's cork: it sends the close, shuts its
// own side for writing (CRIU, which waits for the hang-up before it finishes, sees it at
// once) and reads the server's answer and its end. A lazy page server answers the close
// through a corked socket, so waiting for the answer before hanging up would wait for
// the kernel's cork timer (about 200 ms) while the container is frozen.
func (c *Client) Finish(timeout time.Duration) error {
	req := header{cmd: cmdClose}
	req.marshal(&c.hb)
	if _, err := c.conn.Write(c.hb[:]); err != nil {
		return fmt.Errorf("page server: close: %w", err)
	}
	cw, ok := c.conn.(interface{ CloseWrite() error })
	if !ok {
		return errors.New("page server: close: the connection cannot be half-closed")
	}
	if err := cw.CloseWrite(); err != nil {
		return fmt.Errorf("page server: close: %w", err)
	}
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	var st [4]byte
	if _, err := io.ReadFull(c.br, st[:]); err != nil {
		return fmt.Errorf("page server: no answer to the close: %w", noEOF(err))
	}
	if v := int32(binary.LittleEndian.Uint32(st[:])); v != 0 {
		return fmt.Errorf("page server: close answered %d", v)
	}
	if n, err := io.Copy(io.Discard, c.br); err != nil || n != 0 {
		return fmt.Errorf("page server: %d bytes after the close's answer: %v", n, err)
	}
	return nil
}
