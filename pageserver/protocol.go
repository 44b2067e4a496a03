// Package pageserver speaks CRIU's page-server protocol (criu/page-xfer.c) from Go, both
// ways round:
//
//   - Receive is the side `criu page-server` plays during a dump: CRIU, told by its
//     configuration file to use a page server, sends each process's pagemap and pages
//     here instead of writing them into its images.
//   - Serve is the side a dumping CRIU plays for `criu lazy-pages --page-server`: the
//     lazy-pages daemon asks for pages by process and address (PS_IOV_GET) and gets them
//     back, one request after the other, in order.
//
// Every message starts with the 32-byte page_server_iov header, in the host's byte order
// (CRIU and its page server run on the same kind of machine; here: little-endian amd64).
// Everything read from the connection is bounded and checked: a peer that sends nonsense
// gets an error, never a panic or a huge allocation.
package pageserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// PageSize is the size of the pages CRIU sends.
const PageSize = 4096

// Commands (criu/page-xfer.c). The high 16 bits of cmd carry the pagemap flags of an ADD_F.
const (
	cmdAdd        = 1
	cmdHole       = 2
	cmdOpen       = 3
	cmdOpen2      = 4
	cmdParent     = 5
	cmdAddF       = 6
	cmdGet        = 7
	cmdClose      = 0x1023
	cmdForceClose = 0x1024

	cmdBits  = 16
	cmdMask  = 1<<cmdBits - 1
	typeBits = 8
	typeMask = 1<<typeBits - 1
)

// Pagemap flags (criu/include/pagemap.h).
const (
	FlagParent  = 1 << 0 // the pages are in the parent snapshot
	FlagLazy    = 1 << 1 // the pages may be restored lazily
	FlagPresent = 1 << 2 // the pages' data follows (is in the pages image)
)

// Kind says which image a pagemap belongs to.
type Kind int

const (
	KindProcess Kind = 1 // pagemap-ID.img: a process's private memory, ID its PID in the container
	KindShmem   Kind = 2 // pagemap-shmem-ID.img: a shared anonymous memory segment
)

func (k Kind) String() string {
	if k == KindShmem {
		return "shmem"
	}
	return "process"
}

// Image names one pagemap: what kind, and its ID.
type Image struct {
	Kind Kind
	ID   uint64
}

func (i Image) String() string { return fmt.Sprintf("%s %d", i.Kind, i.ID) }

// header is struct page_server_iov: u32 cmd, 4 bytes of padding, u64 nr_pages, vaddr, dst_id.
type header struct {
	cmd     uint32
	nrPages uint64
	vaddr   uint64
	dstID   uint64
}

const headerSize = 32

func (h *header) marshal(b *[headerSize]byte) {
	binary.LittleEndian.PutUint32(b[0:], h.cmd)
	binary.LittleEndian.PutUint32(b[4:], 0)
	binary.LittleEndian.PutUint64(b[8:], h.nrPages)
	binary.LittleEndian.PutUint64(b[16:], h.vaddr)
	binary.LittleEndian.PutUint64(b[24:], h.dstID)
}

func readHeader(r io.Reader, b *[headerSize]byte) (header, error) {
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return header{}, err
	}
	return header{
		cmd:     binary.LittleEndian.Uint32(b[0:]),
		nrPages: binary.LittleEndian.Uint64(b[8:]),
		vaddr:   binary.LittleEndian.Uint64(b[16:]),
		dstID:   binary.LittleEndian.Uint64(b[24:]),
	}, nil
}

// decodeImage reads the pagemap a dst_id names (decode_pm, including the numbers older
// CRIUs used).
func decodeImage(dstID uint64) (Image, error) {
	id := dstID >> typeBits
	switch dstID & typeMask {
	case 1, 10, 11, 16, 17:
		return Image{KindProcess, id}, nil
	case 2, 27, 28, 29, 32, 33, 34:
		return Image{KindShmem, id}, nil
	}
	return Image{}, fmt.Errorf("page server: unknown pagemap type %d", dstID&typeMask)
}

func encodeImage(i Image) uint64 { return i.ID<<typeBits | uint64(i.Kind) }

// ErrProtocol is wrapped by every error about what the peer sent.
var ErrProtocol = errors.New("page server protocol")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}
