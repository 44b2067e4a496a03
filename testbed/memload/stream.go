package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// The stream modes prove that a TCP connection survived a move without losing, repeating
// or corrupting a byte: the server sends exactly -bytes bytes of a pattern that depends on
// the position, and closes; the client checks every byte and the count, and measures the
// longest time it waited for data.
//
//	memload -stream-serve :7000 -bytes N [-rate Mbit]
//	memload -stream-connect 10.88.0.10:7000 -bytes N   (prints one JSON line)

// patternByte is the stream's byte at position i: a mix of its 8-byte word's index, so
// that no stretch of the stream repeats another (a duplicated or swapped block shows).
func patternByte(i int64) byte {
	x := uint64(i>>3) * 0x9E3779B97F4A7C15
	x ^= x >> 29
	x *= 0xBF58476D1CE4E5B9
	x ^= x >> 32
	return byte(x >> (8 * (i & 7)))
}

// checker checks a received stream against the pattern: the position of its first wrong
// byte (-1: none yet) and how many bytes it has seen.
type checker struct {
	received  int64
	corruptAt int64
}

func newChecker() *checker { return &checker{corruptAt: -1} }

func (c *checker) feed(b []byte) {
	for j := 0; j < len(b) && c.corruptAt < 0; j++ {
		if b[j] != patternByte(c.received+int64(j)) {
			c.corruptAt = c.received + int64(j)
		}
	}
	c.received += int64(len(b))
}

// intact reports whether exactly n bytes arrived, each right.
func (c *checker) intact(n int64) bool { return c.corruptAt < 0 && c.received == n }

// listenTCP listens without MPTCP: Go >= 1.24 uses MPTCP for listeners by default, and
// CRIU cannot checkpoint MPTCP sockets ("Unsupported proto 262").
func listenTCP(addr string) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	return lc.Listen(context.Background(), "tcp", addr)
}

func streamServe(addr string, n int64, mbit float64) error {
	ln, err := listenTCP(addr)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func(c net.Conn) {
			defer c.Close()
			buf := make([]byte, 64<<10)
			start := time.Now()
			for off := int64(0); off < n; {
				k := min(int64(len(buf)), n-off)
				for j := int64(0); j < k; j++ {
					buf[j] = patternByte(off + j)
				}
				w, err := c.Write(buf[:k])
				off += int64(w)
				if err != nil {
					return
				}
				if mbit > 0 { // pace to the rate
					if ahead := time.Duration(float64(off*8)/(mbit*1e6)*float64(time.Second)) - time.Since(start); ahead > 0 {
						time.Sleep(ahead)
					}
				}
			}
		}(c)
	}
}

type streamResult struct {
	Expected   int64  `json:"expected"`
	Received   int64  `json:"received"`
	CorruptAt  int64  `json:"corrupt_at"` // -1: every byte right
	LargestGap int64  `json:"largest_gap_ns"`
	Duration   int64  `json:"duration_ns"`
	Error      string `json:"error,omitempty"`
}

func streamConnect(addr string, n int64) error {
	r := streamResult{Expected: n, CorruptAt: -1}
	ck := newChecker()
	start := time.Now()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		r.Error = err.Error()
	} else {
		defer c.Close()
		buf := make([]byte, 64<<10)
		last := time.Now()
		for {
			k, err := c.Read(buf)
			now := time.Now()
			if k > 0 {
				if g := now.Sub(last); int64(g) > r.LargestGap {
					r.LargestGap = int64(g)
				}
				last = now
				ck.feed(buf[:k])
				r.Received, r.CorruptAt = ck.received, ck.corruptAt
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				r.Error = err.Error()
				break
			}
		}
	}
	r.Duration = int64(time.Since(start))
	json.NewEncoder(os.Stdout).Encode(r)
	if r.Error != "" || !ck.intact(n) {
		return fmt.Errorf("stream: received %d of %d bytes, corrupt at %d, error %q", r.Received, n, r.CorruptAt, r.Error)
	}
	return nil
}
