package main

import (
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
