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
// The memory is named in parts (pages.ScanPart: aligned 2 MiB windows, one lastSent
// block each, so that each part keeps its own marks unlocked), by one goroutine while
// CRIU dumps. When CRIU listens, its images go to the target and more goroutines finish
// the parts meanwhile; then the hand-over sends each run of its pagemap that was named
// ahead as references without reading it, and reads the rest (changed pages) as before.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migrate-project/migrate/pages"
)

// preNamed holds the pages of a frozen container named ahead of CRIU's pagemaps.
type preNamed struct {
	cancel context.CancelFunc
	ctx    context.Context
	done   chan struct{}
	pids   []int
	seen   *lastSent
	parts  []map[blockKey]*namedBits // part i's pages named ahead: pages.Part{i, len(parts)}
	counts []int                     // pages named in part i
	next   atomic.Int64
	t0     time.Time
	pages  int // named ahead
	took   time.Duration
	waited time.Duration // by finish, after CRIU listened

	mu     sync.Mutex
	active int // goroutines at work
	err    error
	logged sync.Once
}

// namedBits marks the pages of a lastSent block named ahead: unchanged since the last
// round, whose hash (in the frozen phase's seen, which no round changes any more) names
// them. A bit a page, not a copy of the hash: a gigabyte's copies were 15 MB of fresh
// memory filled while frozen, dear on this kind of machine.
type namedBits [blockPages / 64]uint64

func (b *namedBits) has(k int) bool { return b != nil && b[k/64]&(1<<(k%64)) != 0 }

// preNamingParts is how many parts the memory is named in, each by one goroutine: one
// goroutine while CRIU dumps (a second one slowed CRIU's dump of 1 GiB by 50-80 ms here,
// more than it saved), more once CRIU listens (preNamingHelpers), beside the target's
// restore.
const preNamingParts = 8

func preNamingHelpers() int { return min(max(runtime.NumCPU()-1, 0), 3) }

// startPreNaming starts naming the memory of the processes procs lists (the container's:
// preNamingOf), which must be frozen (their cgroup) until the dump ends.
func startPreNaming(procs func() ([]int, error), seen *lastSent) *preNamed {
	ctx, cancel := context.WithCancel(context.Background())
	p := &preNamed{cancel: cancel, ctx: ctx, done: make(chan struct{}), seen: seen,
		parts: make([]map[blockKey]*namedBits, preNamingParts), counts: make([]int, preNamingParts), t0: time.Now()}
	for i := range p.parts {
		p.parts[i] = map[blockKey]*namedBits{}
	}
	var err error
	if p.pids, err = procs(); err != nil {
		p.fail(err)
		close(p.done)
		return p
	}
	p.active = 1
	goSafe("name the frozen memory ahead", p.work, func(v any) { p.fail(fmt.Errorf("internal error: %v", v)) })
	return p
}

// work names parts, one after the other, until none is left.
func (p *preNamed) work() {
	defer func() {
		p.mu.Lock()
		p.active--
		last := p.active == 0
		p.mu.Unlock()
		if last {
			for _, c := range p.counts {
				p.pages += c
			}
			p.took = time.Since(p.t0)
			close(p.done)
		}
	}()
	var cache *lastBlock
	for {
		i := int(p.next.Add(1) - 1)
		if i >= len(p.parts) || p.ctx.Err() != nil {
			return
		}
		names := p.parts[i]
		var bits *namedBits
		var bitsKey blockKey
		err := pages.ScanPart(p.pids, true, pages.Part{Index: i, Of: len(p.parts)}, func(ch pages.Chunk) error {
			for k, a := range ch.Addrs {
				if _, ok := p.seen.knownWith(&cache, ch.NSPid, a, ch.Data[k*pages.Size:(k+1)*pages.Size]); ok {
					key, j := pageKey(ch.NSPid, a)
					if bits == nil || key != bitsKey {
						if bits, bitsKey = names[key], key; bits == nil {
							bits = new(namedBits)
							names[key] = bits
						}
					}
					bits[j/64] |= 1 << (j % 64)
					p.counts[i]++
				}
			}
			return p.ctx.Err()
		})
		if err != nil && !errors.Is(err, context.Canceled) {
			p.fail(err)
			return
		}
	}
}

// help adds k goroutines to the naming, if it is still at work.
func (p *preNamed) help(k int) {
	p.mu.Lock()
	if p.active == 0 || k <= 0 {
		p.mu.Unlock()
		return
	}
	p.active += k
	p.mu.Unlock()
	for range k {
		goSafe("name the frozen memory ahead", p.work, func(v any) { p.fail(fmt.Errorf("internal error: %v", v)) })
	}
}

func (p *preNamed) fail(err error) {
	p.mu.Lock()
	p.err = err
	p.mu.Unlock()
}

// finish waits for the scan to end (or ctx, which stops it where it is); from then on
// named may be called. The pages it has not named yet the hand-over would read and name
// itself, one goroutine beside the one that sends; the scan's goroutines do it faster.
func (p *preNamed) finish(ctx context.Context) {
	t0 := time.Now()
	p.help(preNamingHelpers())
	select {
	case <-p.done:
	case <-ctx.Done():
	}
	p.waited = time.Since(t0)
	p.stop()
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

// named returns the names of process pid's len(hs) pages from vaddr, in hs, if every one
// was named ahead and the session names it (so that it can go as a reference), else nil.
func (p *preNamed) named(pid int, vaddr uint64, hs []pages.Hash, sess *pages.Session, last **lastBlock) []pages.Hash {
	if p == nil || p.pages == 0 {
		return nil
	}
	n := len(hs)
	var bits *namedBits
	var bitsKey blockKey
	for i := range hs {
		key, k := pageKey(pid, vaddr+uint64(i)*pages.Size)
		if i == 0 || key != bitsKey {
			bits, bitsKey = p.parts[key.block%uint64(len(p.parts))][key], key
		}
		if !bits.has(k) {
			return nil
		}
		// Named ahead by the hash the last round gave it (knownWith).
		b := p.seen.block(key, last, false)
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
