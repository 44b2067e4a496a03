package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"sync"
	"time"
)

// The UDP modes test the hold port: UDP does not retransmit, so a datagram that reaches a
// frozen container arrives only if the source held it and delivered it after the move.
//
//	memload -udp-echo :7002                       (in the container: send every datagram back)
//	memload -udp-ping 10.88.0.10:7002 -udp-rate 200 -for 10s   (prints one JSON line)

// udpEcho sends every datagram back to its sender.
func udpEcho(addr string) error {
	c, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	buf := make([]byte, 2048)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		c.WriteTo(buf[:n], from)
	}
}

type udpResult struct {
	Sent       int   `json:"sent"`
	Echoed     int   `json:"echoed"` // distinct datagrams that came back
	Lost       int   `json:"lost"`
	Duplicates int   `json:"duplicates"`
	LargestGap int64 `json:"largest_gap_ns"` // between two echoes
}

// udpPing sends numbered datagrams to addr at rate a second for d, then waits two seconds
// for the last echoes, and returns what came back.
func udpPing(addr string, rate int, d time.Duration) (udpResult, error) {
	if rate <= 0 || rate > 100000 {
		return udpResult{}, fmt.Errorf("-udp-rate %d: want 1 to 100000", rate)
	}
	c, err := net.Dial("udp", addr)
	if err != nil {
		return udpResult{}, err
	}
	defer c.Close()
	var mu sync.Mutex
	got := map[uint64]bool{}
	var r udpResult
	var last time.Time
	go func() {
		buf := make([]byte, 2048)
		for {
			n, err := c.Read(buf)
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					continue
				}
				return
			}
			if n < 8 {
				continue
			}
			now := time.Now()
			seq := binary.BigEndian.Uint64(buf)
			mu.Lock()
			if got[seq] {
				r.Duplicates++
			} else {
				got[seq] = true
				r.Echoed++
			}
			if !last.IsZero() && int64(now.Sub(last)) > r.LargestGap {
				r.LargestGap = int64(now.Sub(last))
			}
			last = now
			mu.Unlock()
		}
	}()
	msg := make([]byte, 64)
	start := time.Now()
	every := time.Second / time.Duration(rate)
	for seq := uint64(0); time.Since(start) < d; seq++ {
		binary.BigEndian.PutUint64(msg, seq)
		if _, err := c.Write(msg); err == nil {
			mu.Lock()
			r.Sent++
			mu.Unlock()
		}
		if ahead := time.Duration(seq+1)*every - time.Since(start); ahead > 0 {
			time.Sleep(ahead)
		}
	}
	time.Sleep(2 * time.Second)
	mu.Lock()
	r.Lost = r.Sent - r.Echoed
	out := r
	mu.Unlock()
	return out, nil
}
