package transfer

// Naming a frozen container's memory while CRIU dumps it (the read hand-over).
//
// From the cgroup freeze on, the container's processes run no instruction, so their
// private writable memory stays as it is until CRIU's dump ends: CRIU only reads it
// (its parasite lives in a mapping of its own, and its system calls are planted in an
// executable mapping and restored, which this scan skips). Yet the hand-over used to read
// the memory only once CRIU's lazy page server listened, 150-210 ms after the freeze,
// and reading and naming 1 GiB then took 0.6-0.8 s of the frozen time on this kind of
// machine. The agent now reads while CRIU dumps: a page whose fingerprint is the one the
// last pre-copy round took at its address is named by that round's hash, here, ahead.
// When CRIU listens the scan stops where it is, and the hand-over sends each run of its
// pagemap that was named ahead as references without reading it; the rest (changed
// pages, pages not reached) it reads as before. One goroutine: CRIU's dump has the other
// CPU.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/migrate-project/migrate/pages"
)

// preNamed holds the pages of a frozen container named ahead of CRIU's pagemaps.
type preNamed struct {
	cancel context.CancelFunc
	done   chan struct{}
	names  *lastSent // only hash and ok are set
	pages  int       // named ahead
	took   time.Duration

	mu     sync.Mutex
	err    error
	logged sync.Once
}

// startPreNaming starts naming the memory of the processes procs lists (the container's:
// preNamingOf), which must be frozen (their cgroup) until the dump ends.
func startPreNaming(procs func() ([]int, error), seen *lastSent) *preNamed {
	ctx, cancel := context.WithCancel(context.Background())
	p := &preNamed{cancel: cancel, done: make(chan struct{}), names: newLastSent(nil, nil)}
	goSafe("name the frozen memory ahead", func() {
		defer close(p.done)
		t0 := time.Now()
		defer func() { p.took = time.Since(t0) }()
		pids, err := procs()
		if err != nil {
			p.fail(err)
			return
		}
		var cache *lastBlock
		err = pages.ScanRaw(pids, 256, true, func(ch pages.Chunk) error {
			for i, a := range ch.Addrs {
				if h, ok := seen.knownWith(&cache, ch.NSPid, a, ch.Data[i*pages.Size:(i+1)*pages.Size]); ok {
					p.names.put(ch.NSPid, a, h, pages.Fast{})
					p.pages++
				}
			}
			return ctx.Err()
		})
		if err != nil && !errors.Is(err, context.Canceled) {
			p.fail(err)
		}
	}, func(v any) { p.fail(fmt.Errorf("internal error: %v", v)) })
	return p
}

func (p *preNamed) fail(err error) {
	p.mu.Lock()
	p.err = err
	p.mu.Unlock()
}

// stop ends the scan where it is and waits for it; from then on names may be called.
func (p *preNamed) stop() {
	p.cancel()
	<-p.done
	p.logged.Do(func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.err != nil {
			// Not fatal: the hand-over reads what was not named.
			slog.Warn("naming the frozen memory ahead", "err", p.err)
		}
	})
}

// named returns the names of process pid's n pages from vaddr if every one was named
// ahead and the session names it (so that it can go as a reference), else nil.
func (p *preNamed) named(pid int, vaddr uint64, n int, sess *pages.Session, last **lastBlock) []pages.Hash {
	if p == nil || p.pages == 0 {
		return nil
	}
	hs := make([]pages.Hash, n)
	for i := range hs {
		key, k := pageKey(pid, vaddr+uint64(i)*pages.Size)
		b := p.names.block(key, last, false)
		if b == nil || !b.pages[k].ok {
			return nil
		}
		hs[i] = b.pages[k].hash
	}
	// Every page the last round named is in the session; checked all the same, as the
	// writer (MemoryWriter.Named) would.
	for i, then := 0, -1; i < n; {
		at, k := sess.Run(then, hs[i:])
		if k == 0 {
			return nil
		}
		i, then = i+k, at+k
	}
	return hs
}

// preNamingOf lists the processes of the container whose first process is init.
func preNamingOf(init int) func() ([]int, error) {
	return func() ([]int, error) { return pages.Processes(init) }
}
