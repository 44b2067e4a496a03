package pages

import (
	"bufio"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"io"
)

// A batch of pages for the receiver's store is a sequence of records:
//
//	'L' page                 a page as it is
//	'D' place page^base      a page as its XOR with the page at place in the session
//
// A page that changed since the last round usually differs from its previous version in
// a few bytes: its XOR is mostly zeros and compresses to almost nothing (the idea of
// QEMU's XBZRLE). The receiver rebuilds each page and names it by the hash it computes.
const (
	recLiteral = 'L'
	recDelta   = 'D'
)

// AppendLiteral appends a literal record.
func AppendLiteral(dst, page []byte) []byte {
	dst = append(dst, recLiteral)
	return append(dst, page...)
}

// AppendDelta appends page as a delta against base, which lies at place in the session.
func AppendDelta(dst []byte, place int, page, base []byte) []byte {
	dst = append(dst, recDelta)
	dst = binary.AppendUvarint(dst, uint64(place))
	return appendXOR(dst, page, base)
}

// appendXOR appends the page a^b to dst (vectorised: crypto/subtle).
func appendXOR(dst, a, b []byte) []byte {
	n := len(dst)
	dst = append(dst, make([]byte, Size)...)
	subtle.XORBytes(dst[n:], a[:Size], b[:Size])
	return dst
}

// DecodeRecords rebuilds the pages of a batch and hands them to fn in groups, with the
// hashes it computed. Delta bases come from the session and the store.
func DecodeRecords(r io.Reader, sess *Session, store *Store, fn func(hs []Hash, buf []byte) error) (int, error) {
	// Buffers grow with the batch, up to a group of pages: a batch of a few pages (or a
	// hostile one that ends early) costs a few pages of memory, not megabytes.
	br := bufio.NewReaderSize(r, 64<<10)
	const group = 256
	var buf []byte
	base := make([]byte, Size)
	hs := make([]Hash, group)
	n := 0
	flush := func() error {
		k := len(buf) / Size
		if k == 0 {
			return nil
		}
		SumAll(buf, hs[:k])
		err := fn(hs[:k], buf)
		n += k
		buf = buf[:0]
		return err
	}
	for {
		code, err := br.ReadByte()
		if err == io.EOF {
			return n, flush()
		}
		if err != nil {
			return n, err
		}
		at := len(buf)
		buf = append(buf, make([]byte, Size)...)
		switch code {
		case recLiteral:
			if _, err := io.ReadFull(br, buf[at:]); err != nil {
				return n, fmt.Errorf("page %d: %w", n+at/Size, noEOF(err))
			}
		case recDelta:
			place, err := binary.ReadUvarint(br)
			if err != nil {
				return n, fmt.Errorf("page %d: %w", n+at/Size, noEOF(err))
			}
			if place >= uint64(sess.Len()) {
				return n, fmt.Errorf("page %d: delta base %d: the session names only %d pages", n+at/Size, place, sess.Len())
			}
			names, err := sess.Slice(int(place), 1)
			if err != nil {
				return n, fmt.Errorf("page %d: delta base: %w", n+at/Size, err)
			}
			if err := store.ReadVerified(names, base); err != nil {
				return n, fmt.Errorf("page %d: delta base: %w", n+at/Size, err)
			}
			if _, err := io.ReadFull(br, buf[at:]); err != nil {
				return n, fmt.Errorf("page %d: %w", n+at/Size, noEOF(err))
			}
			subtle.XORBytes(buf[at:at+Size], buf[at:at+Size], base)
		default:
			return n, fmt.Errorf("page %d: unknown record %q", n+at/Size, code)
		}
		if len(buf) == group*Size {
			if err := flush(); err != nil {
				return n, err
			}
		}
	}
}
