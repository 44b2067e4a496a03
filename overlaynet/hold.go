package overlaynet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The hold port: while a container is frozen for a move, frames for it go to this port
// instead of being dropped, and the agent keeps them; once the container runs again
// (on the target, or here after a rollback) they are put back on the bridge and follow
// its flows. The clients' segments then arrive late rather than never: the restored
// sockets acknowledge them at once, instead of waiting for each client's retransmission
// timer, which backs off exponentially while the container is frozen.
const (
	HoldPort  = "mig-hold"  // the bridge's end
	holdQueue = "mig-holdq" // the agent's end
	holdBytes = 64 << 20    // at most this much is held; beyond, frames are dropped
)

// setupHold creates the hold port's veth pair (idempotent) and returns its OpenFlow port.
func (o *OVS) setupHold(ctx context.Context) (int, error) {
	if _, err := netlink.LinkByName(HoldPort); err != nil {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: HoldPort, MTU: 1500}, PeerName: holdQueue}
		if err := netlink.LinkAdd(veth); err != nil {
			return 0, fmt.Errorf("hold port: %w", err)
		}
	}
	for _, name := range []string{HoldPort, holdQueue} {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return 0, fmt.Errorf("hold port: %w", err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return 0, fmt.Errorf("hold port %s up: %w", name, err)
		}
	}
	if _, err := vsctl(ctx, "--may-exist", "add-port", o.cfg.Bridge, HoldPort); err != nil {
		return 0, err
	}
	return o.ofport(HoldPort)
}

// Holder keeps the frames the bridge sends to the hold port for the MACs it is told to
// hold, up to a bound, and puts them back on the bridge when released: frames to a
// container frozen for a move (on its source), and frames from a container restored here
// before it is told to run here (on its target: what its restored sockets send at once,
// chiefly replies to requests its dump held, which dropped would wait for their
// retransmission timer, a second on a restored socket).
type Holder struct {
	fd      int
	ifindex int
	max     int

	mu     sync.Mutex
	held   map[string]*kept // destination MAC -> what is kept for it
	from   map[string]*kept // source MAC -> what is kept of what it sent
	bytes  int
	closed bool
}

// kept is what the holder keeps under one MAC: its frames in arrival order, and how many
// the bound lost.
type kept struct {
	frames [][]byte
	lost   int
}

// OpenHolder listens on the hold port's agent end; max bounds the bytes kept.
func OpenHolder(max int) (*Holder, error) {
	ifc, err := net.InterfaceByName(holdQueue)
	if err != nil {
		return nil, fmt.Errorf("hold port: %w (is the overlay set up?)", err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return nil, fmt.Errorf("hold port socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("hold port bind: %w", err)
	}
	h := &Holder{fd: fd, ifindex: ifc.Index, max: max, held: map[string]*kept{}, from: map[string]*kept{}}
	go h.read()
	return h, nil
}

func (h *Holder) read() {
	buf := make([]byte, 65536)
	for {
		n, from, err := unix.Recvfrom(h.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			h.mu.Lock()
			closed := h.closed
			h.mu.Unlock()
			if !closed {
				slog.Warn("hold port", "err", err)
			}
			return
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue // what Release puts back
		}
		if n < 14 {
			continue
		}
		h.mu.Lock()
		if !h.keep(h.from, net.HardwareAddr(buf[6:12]).String(), buf[:n]) {
			h.keep(h.held, net.HardwareAddr(buf[:6]).String(), buf[:n])
		}
		h.mu.Unlock()
	}
}

// keep appends frame to m[mac] if mac is held there, within the bound, and reports
// whether it was held there (kept or lost to the bound).
func (h *Holder) keep(m map[string]*kept, mac string, frame []byte) bool {
	k, ok := m[mac]
	if !ok {
		return false
	}
	if h.bytes+len(frame) <= h.max {
		k.frames = append(k.frames, append([]byte(nil), frame...))
		h.bytes += len(frame)
	} else {
		k.lost++
	}
	return true
}

// Hold starts keeping frames for mac.
func (h *Holder) Hold(mac string) { h.start(h.held, mac) }

func (h *Holder) start(m map[string]*kept, mac string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := m[mac]; !ok {
		m[mac] = &kept{}
	}
}

// Release puts the frames kept for mac back on the bridge, in order, and stops keeping.
// It returns how many were put back and how many were lost to the bound.
func (h *Holder) Release(mac string) (int, int, error) {
	return h.release(h.held, mac, true)
}

// HoldFrom starts keeping the frames mac sends.
func (h *Holder) HoldFrom(mac string) { h.start(h.from, mac) }

// ReleaseFrom puts the frames kept from mac back on the bridge, in order, and stops
// keeping them.
func (h *Holder) ReleaseFrom(mac string) (int, int, error) {
	return h.release(h.from, mac, true)
}

// DropFrom forgets the frames kept from mac and stops keeping them.
func (h *Holder) DropFrom(mac string) {
	h.release(h.from, mac, false)
}

func (h *Holder) release(m map[string]*kept, mac string, send bool) (int, int, error) {
	h.mu.Lock()
	k, ok := m[mac]
	delete(m, mac)
	if !ok {
		h.mu.Unlock()
		return 0, 0, nil
	}
	frames, lost := k.frames, k.lost
	for _, f := range frames {
		h.bytes -= len(f)
	}
	h.mu.Unlock()
	if !send {
		return 0, lost, nil
	}
	to := &unix.SockaddrLinklayer{Ifindex: h.ifindex, Halen: 6}
	for i, f := range frames {
		copy(to.Addr[:], f[:6])
		if err := unix.Sendto(h.fd, f, 0, to); err != nil {
			return i, lost, fmt.Errorf("put back held frames of %s: %w", mac, err)
		}
	}
	return len(frames), lost, nil
}

// Close stops listening.
func (h *Holder) Close() error {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	return unix.Close(h.fd)
}
