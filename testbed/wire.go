package testbed

// The wire is the underlay: a learning Ethernet switch in the underlay namespace that
// forwards frames between the hosts' links through AF_PACKET sockets and emulates each link
// on the way — rate (token bucket), one-way delay, random loss and a bounded queue.
//
// Why not tc netem: kernels without sch_netem (and without sch_fq, so no EDT delays) exist,
// this VM's among them; a userspace wire behaves the same on every kernel. It runs as a
// re-exec of the current binary (see MaybeRunWire) and re-reads its link settings on SIGHUP.

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// wireEnv names the testbed whose wire this process must run.
const wireEnv = "MIGRATE_TESTBED_WIRE"

// queueLimit bounds how long a frame may wait for a link's rate (a router's buffer): past
// it, frames are dropped, so TCP sees congestion instead of ever-growing delay.
const queueLimit = 100 * time.Millisecond

// MaybeRunWire runs the wire and exits if this process was started as one. Programs that
// start testbeds (the migrate binary, test binaries) call it first thing in main/TestMain.
func MaybeRunWire() {
	name := os.Getenv(wireEnv)
	if name == "" {
		return
	}
	if err := runWire(name); err != nil {
		fmt.Fprintf(os.Stderr, "wire %s: %v\n", name, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func linksFile(tb string) string { return filepath.Join(stateDir(tb), "links.json") }

// shaper is one direction of one link.
type shaper struct {
	mu   sync.Mutex
	busy time.Time // when the link finishes sending what it has accepted
	link Link
}

// admit returns when a frame of n bytes that reaches the link at t arrives at the far end,
// or false if it is lost or the queue is full.
func (s *shaper) admit(t time.Time, n int) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.link
	if l.Loss > 0 && rand.Float64()*100 < l.Loss {
		return t, false
	}
	start := t
	if s.busy.After(start) {
		start = s.busy
	}
	if start.Sub(t) > queueLimit {
		return t, false
	}
	if l.RateMbit > 0 {
		start = start.Add(time.Duration(float64(n*8) / (l.RateMbit * 1e6) * float64(time.Second)))
		s.busy = start
	}
	return start.Add(l.Delay), true
}

type frame struct {
	at   time.Time
	data []byte
}

type port struct {
	name     string
	fd       int
	up, down shaper // up: host -> switch; down: switch -> host
	out      chan frame
	// What crossed the link: bytes (whole Ethernet frames) and frames, taken by the
	// switch from the host (up) and delivered to it (down).
	upBytes, upFrames, downBytes, downFrames atomic.Int64
}

// LinkCount is what crossed one host's link, in each direction, as the wire counted it:
// whole Ethernet frames (headers included), dropped frames excluded.
type LinkCount struct {
	UpBytes    int64 `json:"up_bytes"` // from the host
	UpFrames   int64 `json:"up_frames"`
	DownBytes  int64 `json:"down_bytes"` // to the host
	DownFrames int64 `json:"down_frames"`
}

// Sub is c minus an earlier count: what crossed in between.
func (c LinkCount) Sub(before LinkCount) LinkCount {
	return LinkCount{c.UpBytes - before.UpBytes, c.UpFrames - before.UpFrames, c.DownBytes - before.DownBytes, c.DownFrames - before.DownFrames}
}

func countsSocket(tb string) string { return filepath.Join(stateDir(tb), "wire.sock") }

// serveCounts answers every connection to the wire's socket with the counts, as JSON.
func (w *wire) serveCounts(path string) error {
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("counts socket: %w", err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				slog.Error("wire: counts socket", "err", err)
				return
			}
			counts := map[string]LinkCount{}
			for _, p := range w.ports {
				counts[p.name] = LinkCount{p.upBytes.Load(), p.upFrames.Load(), p.downBytes.Load(), p.downFrames.Load()}
			}
			json.NewEncoder(c).Encode(counts)
			c.Close()
		}
	}()
	return nil
}

// WireCounts returns what crossed each host's link since the testbed came up, counted by
// the wire: the bytes that really crossed, beside what the programs say they sent.
func (tb *Testbed) WireCounts(ctx context.Context) (map[string]LinkCount, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", countsSocket(tb.Name))
	if err != nil {
		return nil, fmt.Errorf("the wire of testbed %s: %w", tb.Name, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(10 * time.Second))
	}
	var counts map[string]LinkCount
	if err := json.NewDecoder(io.LimitReader(c, 1<<20)).Decode(&counts); err != nil {
		return nil, fmt.Errorf("the wire of testbed %s: counts: %w", tb.Name, err)
	}
	return counts, nil
}

type wire struct {
	mu    sync.RWMutex
	ports []*port
	macs  map[[6]byte]int
}

func runWire(tb string) error {
	var links map[string]Link
	b, err := os.ReadFile(linksFile(tb))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, &links); err != nil {
		return err
	}
	w := &wire{macs: map[[6]byte]int{}}
	for host, l := range links {
		fd, err := packetSocket("v-" + host)
		if err != nil {
			return err
		}
		p := &port{name: host, fd: fd, out: make(chan frame, 8192)}
		p.up.link, p.down.link = l, l
		w.ports = append(w.ports, p)
	}
	if err := w.serveCounts(countsSocket(tb)); err != nil {
		return err
	}
	for i, p := range w.ports {
		go w.send(p)
		go w.receive(i, p)
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	for range hup {
		b, err := os.ReadFile(linksFile(tb))
		if err == nil {
			err = json.Unmarshal(b, &links)
		}
		if err != nil {
			slog.Error("wire: reload links", "err", err)
			continue
		}
		for _, p := range w.ports {
			l := links[p.name]
			p.up.mu.Lock()
			p.up.link = l
			p.up.mu.Unlock()
			p.down.mu.Lock()
			p.down.link = l
			p.down.mu.Unlock()
		}
	}
	return nil
}

// packetSocket opens a raw AF_PACKET socket on the interface, ignoring frames it sends.
func packetSocket(ifname string) (int, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return -1, fmt.Errorf("interface %s: %w", ifname, err)
	}
	proto := htons(syscall.ETH_P_ALL)
	fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(proto))
	if err != nil {
		return -1, fmt.Errorf("packet socket: %w", err)
	}
	const packetIgnoreOutgoing = 23 // PACKET_IGNORE_OUTGOING, Linux >= 4.20
	if err := syscall.SetsockoptInt(fd, syscall.SOL_PACKET, packetIgnoreOutgoing, 1); err != nil {
		return -1, fmt.Errorf("PACKET_IGNORE_OUTGOING: %w", err)
	}
	syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<20)
	syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4<<20)
	if err := syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
		return -1, fmt.Errorf("bind packet socket to %s: %w", ifname, err)
	}
	return fd, nil
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

func (w *wire) receive(idx int, p *port) {
	buf := make([]byte, 65536)
	for {
		n, err := syscall.Read(p.fd, buf)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			slog.Error("wire: read", "port", p.name, "err", err)
			return
		}
		if n < 14 {
			continue
		}
		now := time.Now()
		at, ok := p.up.admit(now, n)
		if !ok {
			continue
		}
		p.upBytes.Add(int64(n))
		p.upFrames.Add(1)
		var dst, src [6]byte
		copy(dst[:], buf[0:6])
		copy(src[:], buf[6:12])
		w.mu.Lock()
		w.macs[src] = idx
		out, known := w.macs[dst]
		w.mu.Unlock()
		data := append([]byte(nil), buf[:n]...)
		if known && dst[0]&1 == 0 {
			if out != idx {
				w.forward(w.ports[out], at, data)
			}
			continue
		}
		for i, q := range w.ports { // broadcast, multicast, unknown: flood
			if i != idx {
				w.forward(q, at, data)
			}
		}
	}
}

func (w *wire) forward(q *port, at time.Time, data []byte) {
	at, ok := q.down.admit(at, len(data))
	if !ok {
		return
	}
	select {
	case q.out <- frame{at, data}:
	default: // the port's queue is full: drop, like a switch would
	}
}

// send delivers frames in order, each at its time.
func (w *wire) send(p *port) {
	for f := range p.out {
		if d := time.Until(f.at); d > 0 {
			time.Sleep(d)
		}
		for {
			_, err := syscall.Write(p.fd, f.data)
			if err == nil {
				p.downBytes.Add(int64(len(f.data)))
				p.downFrames.Add(1)
			}
			if err != syscall.EINTR {
				break
			}
		}
	}
}
