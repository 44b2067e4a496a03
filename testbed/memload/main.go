// Command memload is the testbed's memory workload: it keeps -size MiB resident and dirties
// -rate pages per second, and reports a checksum of its memory that proves whether that
// memory survived a migration intact.
//
// Memory is a deterministic function of the write counter: page i starts filled from a
// seeded generator, and write number n stores n in the first 8 bytes of page n mod pages.
// So from the counter alone memload computes the checksum its memory must have ("expect")
// and compares it with the checksum of what is there ("sum").
//
// Status: one line on stdout at start, on SIGUSR1, and every -report interval:
//
//	memload counter=N pages=P sum=HEX expect=HEX ok=true
//
// With -listen ADDR it also answers every TCP connection with that line.
package main

import (
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"hash/crc64"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

const pageSize = 4096

var table = crc64.MakeTable(crc64.ECMA)

// seed varies the memory's content between runs: two memloads with different seeds share
// no page (a page store cannot carry one's pages over to the other).
var seed uint64

type workload struct {
	mu      sync.Mutex
	mem     []byte
	pages   uint64
	counter uint64
}

func fillPage(p []byte, i uint64) {
	x := (i+seed<<40)*0x9E3779B97F4A7C15 + 1
	for off := 0; off < len(p); off += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(p[off:], x)
	}
}

func (w *workload) dirty(n uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for k := uint64(0); k < n; k++ {
		p := w.counter % w.pages
		binary.LittleEndian.PutUint64(w.mem[p*pageSize:], w.counter)
		w.counter++
	}
}

// status computes the actual and the expected checksum.
func (w *workload) status() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	sum := crc64.Update(0, table, w.mem)
	page := make([]byte, pageSize)
	var expect uint64
	for i := uint64(0); i < w.pages; i++ {
		fillPage(page, i)
		if w.counter > i {
			last := i + w.pages*((w.counter-1-i)/w.pages)
			binary.LittleEndian.PutUint64(page, last)
		}
		expect = crc64.Update(expect, table, page)
	}
	return fmt.Sprintf("memload counter=%d pages=%d sum=%016x expect=%016x ok=%t",
		w.counter, w.pages, sum, expect, sum == expect)
}

func main() {
	size := flag.Int("size", 64, "resident memory in MiB")
	rate := flag.Int("rate", 100, "pages dirtied per second")
	report := flag.Duration("report", 0, "print the status line at this interval (0: only at start and on SIGUSR1)")
	listen := flag.String("listen", "", "answer TCP connections on this address with the status line")
	streamServeAddr := flag.String("stream-serve", "", "instead: send -bytes bytes of a checkable pattern to every connection on this address")
	streamConnectAddr := flag.String("stream-connect", "", "instead: receive a -stream-serve stream and check every byte")
	streamBytes := flag.Int64("bytes", 100<<20, "stream length in bytes")
	flag.Uint64Var(&seed, "seed", 0, "vary the memory content (runs with different seeds share no page)")
	streamRate := flag.Float64("stream-rate", 0, "pace the stream to this many Mbit/s (0: as fast as the connection goes)")
	redisIncrAddr := flag.String("redis-incr", "", "instead: INCR -key at this Redis address on one connection for -for, then print the count acknowledged")
	redisCmdAddr := flag.String("redis-cmd", "", "instead: send the arguments as one command to this Redis address and print the reply")
	redisKey := flag.String("key", "counter", "the key -redis-incr increments")
	redisFor := flag.Duration("for", 10*time.Second, "how long -redis-incr and -udp-ping run")
	udpEchoAddr := flag.String("udp-echo", "", "instead: send every UDP datagram that arrives on this address back")
	udpPingAddr := flag.String("udp-ping", "", "instead: send numbered UDP datagrams to this address for -for and print how many came back")
	udpRate := flag.Int("udp-rate", 200, "datagrams a second for -udp-ping")
	flag.Parse()
	if *udpEchoAddr != "" || *udpPingAddr != "" {
		var err error
		if *udpEchoAddr != "" {
			err = udpEcho(*udpEchoAddr)
		} else {
			var r udpResult
			if r, err = udpPing(*udpPingAddr, *udpRate, *redisFor); err == nil {
				err = json.NewEncoder(os.Stdout).Encode(r)
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "memload:", err)
			os.Exit(1)
		}
		return
	}
	if *redisIncrAddr != "" || *redisCmdAddr != "" {
		var err error
		if *redisIncrAddr != "" {
			err = redisIncr(*redisIncrAddr, *redisKey, *redisFor)
		} else {
			err = redisCmd(*redisCmdAddr, flag.Args())
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "memload:", err)
			os.Exit(1)
		}
		return
	}
	if *streamServeAddr != "" {
		if err := streamServe(*streamServeAddr, *streamBytes, *streamRate); err != nil {
			fmt.Fprintln(os.Stderr, "memload:", err)
			os.Exit(1)
		}
		return
	}
	if *streamConnectAddr != "" {
		if err := streamConnect(*streamConnectAddr, *streamBytes); err != nil {
			fmt.Fprintln(os.Stderr, "memload:", err)
			os.Exit(1)
		}
		return
	}
	if *size <= 0 || *rate < 0 {
		fmt.Fprintln(os.Stderr, "memload: -size must be > 0 and -rate >= 0")
		os.Exit(2)
	}
	w := &workload{pages: uint64(*size) << 20 / pageSize}
	w.mem = make([]byte, w.pages*pageSize)
	for i := uint64(0); i < w.pages; i++ {
		fillPage(w.mem[i*pageSize:(i+1)*pageSize], i)
	}
	fmt.Println(w.status())

	if *listen != "" {
		ln, err := listenTCP(*listen)
		if err != nil {
			fmt.Fprintln(os.Stderr, "memload:", err)
			os.Exit(1)
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					continue
				}
				fmt.Fprintln(c, w.status())
				c.Close()
			}
		}()
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
	var reportC <-chan time.Time
	if *report > 0 {
		reportC = time.NewTicker(*report).C
	}
	const tick = 10 * time.Millisecond
	t := time.NewTicker(tick)
	start, done := time.Now(), uint64(0)
	for {
		select {
		case <-t.C:
			want := uint64(time.Since(start).Seconds() * float64(*rate))
			if want > done+uint64(*rate) {
				// More than a second behind: the process was frozen (a checkpoint).
				// Resume the rate instead of writing the backlog in one burst.
				done = want - uint64(*rate)/100
			}
			if want > done {
				w.dirty(want - done)
				done = want
			}
		case <-sig:
			fmt.Println(w.status())
		case <-reportC:
			fmt.Println(w.status())
		}
	}
}
