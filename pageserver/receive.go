package pageserver

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
)

// Sink takes what a dump sends, in the order CRIU sends it.
type Sink interface {
	// Entry is one pagemap entry of img: nrPages pages from vaddr with CRIU's flags.
	// For a present entry, Pages follows with its data.
	Entry(img Image, vaddr, nrPages uint64, flags uint32) error
	// Pages hands over the data of the present entry last named, in order, in pieces
	// of whole pages; data is reused once Pages returns.
	Pages(img Image, vaddr uint64, data []byte) error
}

// ReceiveOptions bound what a dump may send.
type ReceiveOptions struct {
	// MaxBytes is the most page data the dump may send in all (0: 64 GiB).
	MaxBytes int64
	// ChunkPages is how many pages Sink.Pages gets at most at a time (0: 256).
	ChunkPages int
	// BeforeClose, if set, is called when CRIU's close arrives, before it is answered:
	// once answered, CRIU ends the dump and the container with it, so whatever a
	// rollback needs must be kept by then. If it fails, the close goes unanswered,
	// CRIU's dump fails and the container runs on. (Answering the corked close in
	// advance would save 200 ms but opens a window in which a crash loses the container.)
	BeforeClose func() error
	// Uncork clears TCP_CORK on the sender's socket once the stream goes quiet (the
	// sender must be a process on this host's loopback; see uncork.go), so that CRIU's
	// corked close arrives at once instead of after the kernel's 200 ms cork ceiling.
	Uncork bool
	// Uncorked, if set, is told once whether the sender was uncorked (nil) or why not.
	Uncorked func(error)
}

// Receive serves one dump's connection: it answers CRIU's page-server requests as `criu
// page-server` does (no parent images) and hands the pagemaps and pages to sink. It
// returns nil once CRIU has closed the transfer (PS_IOV_CLOSE) and every byte it sent was
// taken; a connection that ends before that is an error, as is anything malformed. It
// returns the page bytes received.
func Receive(ctx context.Context, conn net.Conn, sink Sink, o ReceiveOptions) (int64, error) {
	if o.MaxBytes <= 0 {
		o.MaxBytes = 64 << 30
	}
	if o.ChunkPages <= 0 {
		o.ChunkPages = 256
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	var rw io.ReadWriter = conn
	if o.Uncork {
		u := newUncorker(conn, o.Uncorked)
		defer u.close()
		rw = u
	}
	n, err := receive(rw, sink, o)
	if ctx.Err() != nil {
		return n, fmt.Errorf("page server: %w", context.Cause(ctx))
	}
	return n, err
}

func receive(conn io.ReadWriter, sink Sink, o ReceiveOptions) (int64, error) {
	br := bufio.NewReaderSize(conn, 1<<20)
	buf := make([]byte, o.ChunkPages*PageSize)
	var hb [headerSize]byte
	var total int64
	var cur Image
	opened := false
	for {
		h, err := readHeader(br, &hb)
		if err == io.EOF {
			return total, protoErr("the dump ended without closing the transfer")
		}
		if err != nil {
			return total, fmt.Errorf("page server: read request: %w", err)
		}
		switch cmd := h.cmd & cmdMask; cmd {
		case cmdOpen, cmdOpen2:
			img, err := decodeImage(h.dstID)
			if err != nil {
				return total, err
			}
			cur, opened = img, true
			if cmd == cmdOpen2 {
				if _, err := conn.Write([]byte{0}); err != nil { // no parent
					return total, fmt.Errorf("page server: answer open: %w", err)
				}
			}
		case cmdParent:
			if _, err := decodeImage(h.dstID); err != nil {
				return total, err
			}
			var no [4]byte
			if _, err := conn.Write(no[:]); err != nil {
				return total, fmt.Errorf("page server: answer parent: %w", err)
			}
		case cmdAdd, cmdAddF, cmdHole:
			img, err := decodeImage(h.dstID)
			if err != nil {
				return total, err
			}
			if !opened || img != cur {
				// Old CRIUs wrote without opening first: the image is the one named.
				cur, opened = img, true
			}
			var flags uint32
			switch cmd {
			case cmdAdd:
				flags = FlagPresent
			case cmdHole:
				flags = FlagParent
			default:
				flags = h.cmd >> cmdBits
			}
			if h.nrPages == 0 || h.nrPages > uint64(o.MaxBytes/PageSize) {
				return total, protoErr("entry of %d pages at %#x", h.nrPages, h.vaddr)
			}
			if h.vaddr%PageSize != 0 || h.vaddr > ^uint64(0)-h.nrPages*PageSize {
				return total, protoErr("entry at %#x (%d pages)", h.vaddr, h.nrPages)
			}
			if err := sink.Entry(cur, h.vaddr, h.nrPages, flags); err != nil {
				return total, err
			}
			if flags&FlagPresent == 0 {
				continue
			}
			size := int64(h.nrPages) * PageSize
			if size > o.MaxBytes-total {
				return total, protoErr("the dump sends more than %d bytes of pages", o.MaxBytes)
			}
			vaddr := h.vaddr
			for left := h.nrPages; left > 0; {
				k := min(left, uint64(o.ChunkPages))
				if _, err := io.ReadFull(br, buf[:k*PageSize]); err != nil {
					return total, fmt.Errorf("page server: read pages at %#x: %w", vaddr, noEOF(err))
				}
				if err := sink.Pages(cur, vaddr, buf[:k*PageSize]); err != nil {
					return total, err
				}
				total += int64(k) * PageSize
				vaddr += k * PageSize
				left -= k
			}
		case cmdClose, cmdForceClose:
			if o.BeforeClose != nil {
				if err := o.BeforeClose(); err != nil {
					return total, err
				}
			}
			var ok [4]byte
			if _, err := conn.Write(ok[:]); err != nil {
				return total, fmt.Errorf("page server: answer close: %w", err)
			}
			return total, nil
		case cmdGet:
			return total, protoErr("a page request (GET) during a dump")
		default:
			return total, protoErr("unknown command %#x", h.cmd)
		}
	}
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Source answers a lazy-pages daemon's requests.
type Source interface {
	// ReadPages fills buf (a whole number of pages) with process pid's pages from vaddr on,
	// and returns how many it filled: at least one, fewer where its memory ends sooner.
	ReadPages(pid, vaddr uint64, buf []byte) (int, error)
}

// ServeOptions bound what Serve answers.
type ServeOptions struct {
	// MaxPages is the most pages one answer carries (0: 512); CRIU asks again for the rest.
	MaxPages int
	// Served, if set, sees every answer's size in pages.
	Served func(pages int)
}

// Serve answers one lazy-pages daemon's connection: each PS_IOV_GET with the pages from
// src, in order. It returns nil when the daemon closes the transfer, an error otherwise.
func Serve(ctx context.Context, conn net.Conn, src Source, o ServeOptions) error {
	if o.MaxPages <= 0 {
		o.MaxPages = 512
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	err := serve(conn, src, o)
	if ctx.Err() != nil {
		return fmt.Errorf("page server: %w", context.Cause(ctx))
	}
	return err
}

func serve(conn io.ReadWriter, src Source, o ServeOptions) error {
	br := bufio.NewReaderSize(conn, 64<<10)
	bw := bufio.NewWriterSize(conn, 1<<20)
	buf := make([]byte, o.MaxPages*PageSize)
	var hb [headerSize]byte
	for {
		h, err := readHeader(br, &hb)
		if err == io.EOF {
			return nil // the daemon went away after its last answer
		}
		if err != nil {
			return fmt.Errorf("page server: read request: %w", err)
		}
		switch h.cmd & cmdMask {
		case cmdGet:
			if h.nrPages == 0 || h.vaddr%PageSize != 0 {
				return protoErr("request for %d pages at %#x", h.nrPages, h.vaddr)
			}
			k := int(min(h.nrPages, uint64(o.MaxPages)))
			n, err := src.ReadPages(h.dstID, h.vaddr, buf[:k*PageSize])
			if err != nil {
				return fmt.Errorf("page server: pages of %d at %#x: %w", h.dstID, h.vaddr, err)
			}
			if n < 1 || n > k {
				return fmt.Errorf("page server: pages of %d at %#x: source filled %d of %d pages", h.dstID, h.vaddr, n, k)
			}
			ans := header{cmd: cmdAddF | FlagPresent<<cmdBits, nrPages: uint64(n), vaddr: h.vaddr, dstID: h.dstID}
			ans.marshal(&hb)
			if _, err := bw.Write(hb[:]); err != nil {
				return err
			}
			if _, err := bw.Write(buf[:n*PageSize]); err != nil {
				return err
			}
			// Answer now unless another request is already waiting: the daemon may be
			// blocked on a page fault.
			if br.Buffered() < headerSize {
				if err := bw.Flush(); err != nil {
					return fmt.Errorf("page server: answer: %w", err)
				}
			}
			if o.Served != nil {
				o.Served(n)
			}
		case cmdClose, cmdForceClose:
			var ok [4]byte
			binary.LittleEndian.PutUint32(ok[:], 0)
			bw.Write(ok[:])
			return bw.Flush()
		default:
			return protoErr("unexpected command %#x from a lazy-pages daemon", h.cmd)
		}
	}
}
