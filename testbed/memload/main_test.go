package main

import (
	"bytes"
	"net"
	"strings"
	"testing"
	"time"
)

func newWorkload(pages uint64) *workload {
	w := &workload{pages: pages, mem: make([]byte, pages*pageSize)}
	for i := uint64(0); i < pages; i++ {
		fillPage(w.mem[i*pageSize:(i+1)*pageSize], i)
	}
	return w
}

func TestChecksumFollowsCounter(t *testing.T) {
	w := newWorkload(7)
	for _, n := range []uint64{0, 3, 4, 10, 100} { // before, at and well past wrap-around
		w.dirty(n)
		if s := w.status(); !strings.Contains(s, "ok=true") {
			t.Fatalf("after %d more writes: %s", n, s)
		}
	}
}

func TestChecksumCatchesCorruption(t *testing.T) {
	w := newWorkload(4)
	w.dirty(9)
	w.mem[2*pageSize+100] ^= 1 // one flipped bit, as a broken restore would leave
	if s := w.status(); !strings.Contains(s, "ok=false") {
		t.Fatalf("corruption not detected: %s", s)
	}
	w = newWorkload(4)
	w.dirty(9)
	w.counter-- // a counter that went back (a restart) no longer matches memory
	if s := w.status(); !strings.Contains(s, "ok=false") {
		t.Fatalf("counter mismatch not detected: %s", s)
	}
}

func TestStreamCountsAndChecksEveryByte(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	go streamServe(addr, 1<<20+17, 0)
	var err2 error
	for i := 0; i < 50; i++ {
		if err2 = streamConnect(addr, 1<<20+17); err2 == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err2 != nil {
		t.Fatal(err2)
	}
	if err := streamConnect(addr, 1<<20+18); err == nil {
		t.Fatal("a short stream must fail the check")
	}
}

// The checker catches what TCP through a broken move could do to a stream: a flipped
// bit, a byte delivered twice, two bytes swapped, a byte lost, a block repeated; and
// counts exactly.
func TestStreamCheckerCatchesEveryDamage(t *testing.T) {
	const n = 3 << 20
	good := make([]byte, n)
	for i := range good {
		good[i] = patternByte(int64(i))
	}
	check := func(b []byte) *checker {
		c := newChecker()
		for len(b) > 0 { // in reads of odd sizes, as a socket delivers them
			k := min(len(b), 1000+len(b)%7919)
			c.feed(b[:k])
			b = b[k:]
		}
		return c
	}
	if c := check(good); !c.intact(n) {
		t.Fatalf("an intact stream: corrupt at %d, %d bytes", c.corruptAt, c.received)
	}
	const p = 1234567
	splice := func(parts ...[]byte) []byte {
		var out []byte
		for _, x := range parts {
			out = append(out, x...)
		}
		return out
	}
	flipped := append([]byte(nil), good...)
	flipped[p] ^= 0x10
	swapped := append([]byte(nil), good...)
	swapped[p], swapped[p+1] = swapped[p+1], swapped[p]
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"flipped bit", flipped},
		{"duplicated byte", splice(good[:p+1], good[p:])},
		{"reordered bytes", swapped},
		{"lost byte", splice(good[:p], good[p+1:])},
		{"repeated 64 KiB block, count made up", splice(good[:p], good[p-65536:p], good[p:n-65536])},
		{"two 8-byte words swapped", splice(good[:p], good[p+8:p+16], good[p:p+8], good[p+16:])},
	} {
		if tc.name == "two 8-byte words swapped" && bytes.Equal(good[p:p+8], good[p+8:p+16]) {
			t.Fatalf("two neighbouring words of the pattern are equal")
		}
		c := check(tc.b)
		if c.intact(n) {
			t.Errorf("%s: not caught", tc.name)
			continue
		}
		if c.corruptAt < p || c.corruptAt > p+16 {
			t.Errorf("%s: corrupt at %d, want near %d", tc.name, c.corruptAt, p)
		}
	}
	// A short stream of right bytes is not intact either.
	if c := check(good[:n-1]); c.intact(n) || c.corruptAt >= 0 {
		t.Errorf("a stream one byte short: intact %v, corrupt at %d", c.intact(n), c.corruptAt)
	}
}

// The UDP probe counts what came back: all of it through an echo, none without one.
func TestUDPPingCountsEchoes(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	pc.Close()
	go udpEcho(addr)
	time.Sleep(50 * time.Millisecond)
	r, err := udpPing(addr, 1000, 300*time.Millisecond)
	if err != nil || r.Sent < 250 || r.Echoed != r.Sent || r.Lost != 0 {
		t.Fatalf("through an echo: %+v %v", r, err)
	}
	// Nobody echoes on another port: everything is lost.
	pc2, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc2.Close()
	if r, err := udpPing(pc2.LocalAddr().String(), 1000, 100*time.Millisecond); err != nil || r.Echoed != 0 || r.Lost != r.Sent || r.Sent == 0 {
		t.Fatalf("without an echo: %+v %v", r, err)
	}
	if _, err := udpPing(addr, 0, time.Second); err == nil {
		t.Fatal("a rate of 0 was accepted")
	}
}
