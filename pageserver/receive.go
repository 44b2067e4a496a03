package pageserver

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
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
	// Quiet, if set, answers CRIU's close before it arrives: once the dump has sent
	// nothing for Quiet, the answer goes out. (The agent does not use it: between the
	// early answer and the last page kept there is a window in which a crash of the
	// receiver loses the container, see BeforeClose.)
	//
	// CRIU corks its page-server socket and sends the close still corked, so the request
	// waits in CRIU's send queue until the kernel's probe timer flushes it, 200 ms later
	// (TCP_RTO_MIN; nothing the receiver does moves it), while CRIU, and the frozen
	// container, wait for the answer. Every answer this server gives is zero bytes (no
	// parent, status OK), so an answer that arrives early is still read right: a later
	// open takes one byte of it and its own answer refills it, the close takes the four.
	// The close itself then goes unanswered, so that CRIU reads exactly what was sent.
	//
	// From then on CRIU may end the dump as soon as it has sent the rest, and a
	// receiver that dies before it has kept the rest loses the container: so the answer
	// waits for Ready, which must say that CRIU has sent all its pages (CRIU writes its
	// inventory image just before its close), and the receiver takes the rest whatever
	// happens: ctx no longer ends the connection (IdleLimit bounds each wait instead),
	// and Answered tells the sink to keep what arrives even if it cannot pass it on.
	Quiet time.Duration
	// Ready is asked at each quiet moment; the close is answered early only once it
	// says yes (required with Quiet).
	Ready func() bool
	// Answered is called (once, before the answer is written) when Quiet answers early.
	Answered func()
	// IdleLimit bounds each wait for CRIU after an early answer (0: one minute).
	IdleLimit time.Duration
	// BeforeClose, if set, is called when CRIU's close arrives, before it is answered
	// (not with an early answer): once answered, CRIU ends the dump and the container
	// with it, so whatever a rollback needs must be kept by then. If it fails, the close
	// goes unanswered, CRIU's dump fails and the container runs on.
	BeforeClose func() error
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
	if o.IdleLimit <= 0 {
		o.IdleLimit = time.Minute
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	var rw io.ReadWriter = conn
	var early *quietConn
	if o.Quiet > 0 && o.Ready != nil {
		early = &quietConn{Conn: conn, quiet: o.Quiet, idle: o.IdleLimit, ready: o.Ready, answered: func() bool {
			if !stop() {
				return false // ctx ended the connection already
			}
			if o.Answered != nil {
				o.Answered()
			}
			return true
		}}
		rw = early
	}
	n, err := receive(rw, early, sink, o)
	if ctx.Err() != nil && (early == nil || !early.fired) {
		return n, fmt.Errorf("page server: %w", context.Cause(ctx))
	}
	return n, err
}

// quietConn answers CRIU's close when the dump goes quiet (see ReceiveOptions.Quiet).
type quietConn struct {
	net.Conn
	quiet, idle time.Duration
	ready       func() bool // CRIU has sent every page
	answered    func() bool // false: too late, the connection is ending
	fired       bool
}

func (q *quietConn) Read(b []byte) (int, error) {
	if q.fired {
		q.Conn.SetReadDeadline(time.Now().Add(q.idle))
		n, err := q.Conn.Read(b)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("CRIU sent nothing for %s after its pages were acknowledged: %w", q.idle, err)
		}
		return n, err
	}
	for {
		q.Conn.SetReadDeadline(time.Now().Add(q.quiet))
		n, err := q.Conn.Read(b)
		if n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return n, err
		}
		if q.ready() {
			break
		}
		// Quiet, but CRIU is still dumping (other state, or a pause between processes).
	}
	if !q.answered() {
		return 0, net.ErrClosed
	}
	q.fired = true
	var ok [4]byte
	if _, err := q.Conn.Write(ok[:]); err != nil {
		return 0, fmt.Errorf("page server: answer close: %w", err)
	}
	return q.Read(b)
}

func receive(conn io.ReadWriter, early *quietConn, sink Sink, o ReceiveOptions) (int64, error) {
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
			if early != nil && early.fired {
				return total, nil // answered already
			}
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
