package transfer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/time/rate"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/overlaynet"
	"github.com/migrate-project/migrate/pages"
)

// neighborsHeader carries the container's neighbour cache with its checkpoint.
const neighborsHeader = "X-Migrate-Neighbors"

// link is how a move sends: compression and a rate cap, with the bandwidth it measures.
type link struct {
	compress string        // auto, none, fastest, default, better, best
	limiter  *rate.Limiter // nil: no cap
	progress func()        // called as bytes go out (a stall watchdog's kick)

	mu   sync.Mutex
	sent int64         // wire bytes of timed sends
	took time.Duration // their duration
}

func (l *link) kick() {
	if l.progress != nil {
		l.progress()
	}
}

func newLink(compress string, mbit float64) (*link, error) {
	if compress == "" {
		compress = "auto"
	}
	if _, _, err := zstdLevel(compress, 0); err != nil {
		return nil, err
	}
	l := &link{compress: compress}
	if mbit > 0 {
		bps := mbit * 1e6 / 8
		l.limiter = rate.NewLimiter(rate.Limit(bps), 256<<10)
	}
	return l, nil
}

// zstdLevel maps --compress to a zstd level; auto fits it to the measured bandwidth:
// on a slow link the better ratio pays, on a fast one only the fastest level keeps up.
func zstdLevel(name string, mbit float64) (zstd.EncoderLevel, bool, error) {
	switch name {
	case "none":
		return 0, false, nil
	case "fastest":
		return zstd.SpeedFastest, true, nil
	case "default":
		return zstd.SpeedDefault, true, nil
	case "better":
		return zstd.SpeedBetterCompression, true, nil
	case "best":
		return zstd.SpeedBestCompression, true, nil
	case "auto":
		if mbit > 1000 {
			return zstd.SpeedFastest, true, nil
		}
		return zstd.SpeedDefault, true, nil
	}
	return 0, false, fmt.Errorf("--compress %q: want auto, none, fastest, default, better or best", name)
}

// Mbit is the bandwidth measured so far (0: not yet).
func (l *link) Mbit() float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.took < 10*time.Millisecond || l.sent < 64<<10 {
		return 0
	}
	return float64(l.sent) * 8 / l.took.Seconds() / 1e6
}

// limitedReader paces reads to the link's cap.
type limitedReader struct {
	ctx context.Context
	r   io.Reader
	l   *rate.Limiter
}

func (lr *limitedReader) Read(b []byte) (int, error) {
	if len(b) > lr.l.Burst() {
		b = b[:lr.l.Burst()]
	}
	n, err := lr.r.Read(b)
	if n > 0 {
		if werr := lr.l.WaitN(lr.ctx, n); werr != nil {
			return n, werr
		}
	}
	return n, err
}

// body turns a producer into a request body: produce writes into a (compressed) pipe in
// its own goroutine. It returns the body, the Content-Encoding and a wait for produce.
func (l *link) body(ctx context.Context, produce func(io.Writer) error) (io.Reader, string, func() error) {
	level, compress, _ := zstdLevel(l.compress, l.Mbit())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		var w io.Writer = pw
		var zw *zstd.Encoder
		if compress {
			zw, _ = zstd.NewWriter(pw, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
			w = zw
		}
		err := produce(w)
		if zw != nil {
			if cerr := zw.Close(); err == nil {
				err = cerr
			}
		}
		pw.CloseWithError(err)
		done <- err
	}()
	var r io.Reader = pr
	if l.limiter != nil {
		r = &limitedReader{ctx: ctx, r: pr, l: l.limiter}
	}
	enc := ""
	if compress {
		enc = "zstd"
	}
	return r, enc, func() error { pr.CloseWithError(io.ErrClosedPipe); return <-done }
}

// flushLink sends on what a body's writer (link.body) holds back: the compressor's
// unfinished block. Without compression there is nothing to flush.
func flushLink(w io.Writer) error {
	if f, ok := w.(interface{ Flush() error }); ok {
		return f.Flush()
	}
	return nil
}

func encodingHeader(enc string) http.Header {
	h := http.Header{"Content-Type": {"application/octet-stream"}}
	if enc != "" {
		h.Set("Content-Encoding", enc)
	}
	return h
}

// Announce names pages to the target and returns which it lacks.
func (p *Peer) Announce(ctx context.Context, container string, hs []pages.Hash) ([]bool, int64, error) {
	b := pages.AppendHashes(make([]byte, 0, len(hs)*32), hs)
	var res PagesAnnounce
	if err := p.send(ctx, withQuery(PathPagesAnnounce, "container", container), bytes.NewReader(b), encodingHeader(""), nil, nil, &res); err != nil {
		return nil, 0, err
	}
	missing := make([]bool, len(hs))
	for i := range hs {
		if i/8 < len(res.Missing) {
			missing[i] = res.Missing[i/8]&(1<<(i%8)) != 0
		}
	}
	return missing, int64(len(b)), nil
}

// PutPages sends page records (pages announced before, literal or as deltas) to the
// target's store and returns the bytes that crossed the link.
func (l *link) PutPages(ctx context.Context, p *Peer, container string, buf []byte) (int64, error) {
	t0 := time.Now()
	body, enc, wait := l.body(ctx, func(w io.Writer) error { _, err := w.Write(buf); return err })
	var wire int64
	err := p.send(ctx, withQuery(PathPagesPut, "container", container), body, encodingHeader(enc), nil, func(n int64) { wire = n; l.kick() }, &PagesPut{})
	if werr := wait(); err == nil && werr != nil && werr != io.ErrClosedPipe {
		err = werr
	}
	if err != nil {
		return wire, fmt.Errorf("send pages to %s: %w", p.Name, err)
	}
	if wire >= 256<<10 {
		l.mu.Lock()
		l.sent += wire
		l.took += time.Since(t0)
		l.mu.Unlock()
	}
	return wire, nil
}

// putter sends batches of page records one at a time in the background, so that the
// next batch is read, hashed and announced while this one crosses the link.
type putter struct {
	l    *link
	p    *Peer
	name string
	slot chan struct{} // one put in flight
	wg   sync.WaitGroup
	mu   sync.Mutex
	wire int64
	err  error
}

func newPutter(l *link, p *Peer, container string) *putter {
	return &putter{l: l, p: p, name: container, slot: make(chan struct{}, 1)}
}

// put starts sending buf once the put before it is done; buf must not change after.
func (pt *putter) put(ctx context.Context, buf []byte) error {
	select {
	case pt.slot <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	pt.mu.Lock()
	err := pt.err
	pt.mu.Unlock()
	if err != nil {
		<-pt.slot
		return err
	}
	pt.wg.Add(1)
	go func() {
		defer pt.wg.Done()
		w, err := pt.l.PutPages(ctx, pt.p, pt.name, buf)
		pt.mu.Lock()
		pt.wire += w
		if err != nil && pt.err == nil {
			pt.err = err
		}
		pt.mu.Unlock()
		<-pt.slot
	}()
	return nil
}

// wait waits for the puts under way and returns the wire bytes since the last wait and
// the first error.
func (pt *putter) wait() (int64, error) {
	pt.wg.Wait()
	pt.mu.Lock()
	defer pt.mu.Unlock()
	w := pt.wire
	pt.wire = 0
	return w, pt.err
}

// lastSent remembers, for each page address of the container's processes, the content
// last sent for it. The frozen phase sends a page that changed since as its delta against
// that content, which the target holds.
//
// It is kept in blocks of consecutive pages (blockPages, aligned), found through a map
// once per block: the frozen phase looks up every page of the container in address
// order, and a map keyed by page spread those lookups over memory (at 1 GiB, a cache miss
// a page made them cost more than the reading: 0.27 s/GiB of 0.49 s in
// BenchmarkFrozenNaming). put and known each keep the block they last used, so put is
// only for the pre-copy's goroutine and known for the frozen phase's; base may be called
// from several goroutines once put no longer is.
type lastSent struct {
	room   []pages.Hash // for the frozen phase's names (reserveRoom)
	blocks map[blockKey]*lastBlock
	sess   *pages.Session
	store  *pages.Store
	putAt  *lastBlock // put's last block
	knowAt *lastBlock // known's last block
}

// blockPages is the number of pages of a lastSent block: 2 MiB of address space, a
// window of pages.ScanPart.
const blockPages = pages.WindowPages

type blockKey struct {
	pid   int
	block uint64 // address / (blockPages*pages.Size)
}

type lastBlock struct {
	key   blockKey
	pages [blockPages]lastPage
}

// lastPage is what the last round read at an address: the page's hash and its
// fingerprint, taken from the same bytes. ok says whether a round read it.
type lastPage struct {
	hash pages.Hash
	fast pages.Fast
	ok   bool
}

// pageAddr is a page's address in a process, named by its PID in the container's
// namespace as CRIU's images name it.
type pageAddr struct {
	pid int
	at  uint64
}

// reserveRoom makes room for the frozen phase's names of the memory (the pages the last
// round read, and some), faulted in now, while the container runs: the memory writer
// fills it while frozen (pages.EncodeOptions.Room).
func (s *lastSent) reserveRoom() {
	n := 0
	for _, b := range s.blocks {
		for i := range b.pages {
			if b.pages[i].ok {
				n++
			}
		}
	}
	if n == 0 {
		return
	}
	room := make([]pages.Hash, 0, n+n/16+1024)
	full := room[:cap(room)]
	for i := 0; i < len(full); i += pages.Size / len(pages.Hash{}) {
		full[i][0] = 1 // a write: the page is the process's now
	}
	s.room = room
}

func newLastSent(sess *pages.Session, store *pages.Store) *lastSent {
	return &lastSent{blocks: map[blockKey]*lastBlock{}, sess: sess, store: store}
}

func pageKey(pid int, vaddr uint64) (blockKey, int) {
	p := vaddr / pages.Size
	return blockKey{pid, p / blockPages}, int(p % blockPages)
}

// block returns the block of key, through the cache at *last; nil if none (and add is
// false).
func (s *lastSent) block(key blockKey, last **lastBlock, add bool) *lastBlock {
	if b := *last; b != nil && b.key == key {
		return b
	}
	b := s.blocks[key]
	if b == nil && add {
		b = &lastBlock{key: key}
		s.blocks[key] = b
	}
	if b != nil {
		*last = b
	}
	return b
}

// put records what a round read at vaddr and returns what the round before had (zero if
// none).
func (s *lastSent) put(pid int, vaddr uint64, h pages.Hash, fast pages.Fast) pages.Hash {
	key, i := pageKey(pid, vaddr)
	b := s.block(key, &s.putAt, true)
	old := b.pages[i].hash
	b.pages[i] = lastPage{hash: h, fast: fast, ok: true}
	return old
}

// get returns what the last round read at vaddr, without a cache: for base.
func (s *lastSent) get(pid int, vaddr uint64) (lastPage, bool) {
	key, i := pageKey(pid, vaddr)
	b := s.blocks[key]
	if b == nil || !b.pages[i].ok {
		return lastPage{}, false
	}
	return b.pages[i], true
}

// known is pages.EncodeOptions.Known: a page whose fingerprint is the one the last round
// took at its address is named by the hash that round gave it. The frozen phase then
// hashes only the pages changed since (SHA-256 of a whole container's memory would cost
// about a second per GiB on this kind of machine).
func (s *lastSent) known(pid int, vaddr uint64, page []byte) (pages.Hash, bool) {
	return s.knownWith(&s.knowAt, pid, vaddr, page)
}

// knownWith is known with the caller's own cache of the last block: for a goroutine
// beside the one that calls known.
func (s *lastSent) knownWith(last **lastBlock, pid int, vaddr uint64, page []byte) (pages.Hash, bool) {
	return s.knownFast(last, pid, vaddr, pages.FastSum(page))
}

// knownFast is knownWith of a page whose fingerprint the caller took.
func (s *lastSent) knownFast(last **lastBlock, pid int, vaddr uint64, fast pages.Fast) (pages.Hash, bool) {
	key, i := pageKey(pid, vaddr)
	b := s.block(key, last, false)
	if b == nil || !b.pages[i].ok || fast != b.pages[i].fast {
		return pages.Hash{}, false
	}
	return b.pages[i].hash, true
}

// base is pages.EncodeOptions.Base.
func (s *lastSent) base(pid int, vaddr uint64, into []byte) (int, bool) {
	last, ok := s.get(pid, vaddr)
	if !ok {
		return 0, false
	}
	h := last.hash
	place, ok := s.sess.Index(h)
	if !ok || s.store.Read([]pages.Hash{h}, into) != nil {
		return 0, false
	}
	return place, true
}

// precopy copies the container's memory to the target in rounds while it runs, until the
// final copy is estimated to fit the downtime goal (maxDowntime), the dirty set stops
// shrinking, or the round limit. Every page joins the session; the final archive refers
// to them. first is the number of its first round: 1, or after the rounds before it (a
// round that catches up after the target's verification).
func (a *Agent) precopy(ctx context.Context, target *Peer, c *checkpoint.Container, req PushRequest, first int, l *link, sess *pages.Session, seen *lastSent, emit func(Event)) ([]Round, string, error) {
	maxDown := maxDowntime(req)
	maxRounds := req.MaxRounds
	if maxRounds <= 0 {
		maxRounds = 8
	}
	var rounds []Round
	pt := newPutter(l, target, c.Name)
	defer pt.wait()
	base := make([]byte, pages.Size)
	scanHs, scanFast, scanIdx := make([]pages.Hash, 256), make([]pages.Fast, 256), make([]int, 0, 256)
	for n := max(first, 1); ; n++ {
		if err := fault("source-round"); err != nil {
			return rounds, "", err
		}
		pids, err := pages.Processes(c.PID)
		if err != nil {
			return rounds, "", err
		}
		r := Round{N: n}
		t0 := time.Now()
		var batchH []pages.Hash
		var batchP []byte
		var batchB []pages.Hash // each page's previous content at its address (zero: none)
		inBatch := map[pages.Hash]bool{}
		flush := func() error {
			if len(batchH) == 0 {
				return nil
			}
			missing, wire, err := target.Announce(ctx, c.Name, batchH)
			if err != nil {
				return fmt.Errorf("announce pages to %s: %w", target.Name, err)
			}
			sess.Append(batchH...)
			l.kick()
			r.WireBytes += wire
			// This host keeps what it sends too: if the container comes back, little has
			// to cross the link; and the frozen phase refers to these pages by name in the
			// memory a rollback rebuilds from this store, so a page not kept fails the move
			// now, while the container runs.
			if err := a.store.AddTrusted(batchH, batchP); err != nil {
				return fmt.Errorf("keep the round's pages here: %w", err)
			}
			var send []byte
			var k int64
			for i, m := range missing {
				if !m {
					continue
				}
				k++
				page := batchP[i*pages.Size : (i+1)*pages.Size]
				if b := batchB[i]; b != (pages.Hash{}) {
					if place, ok := sess.Index(b); ok && a.store.Read([]pages.Hash{b}, base) == nil {
						send = pages.AppendDelta(send, place, page, base)
						r.Deltas++
						continue
					}
				}
				send = pages.AppendLiteral(send, page)
			}
			r.Sent += k
			r.Deduplicated += int64(len(batchH)) - k
			if len(send) > 0 {
				if err := pt.put(ctx, send); err != nil {
					return err
				}
			}
			batchH, batchP, batchB = batchH[:0], batchP[:0], batchB[:0]
			clear(inBatch)
			return nil
		}
		// A page whose fingerprint is the one the round before took at its address keeps
		// that round's hash: only the others are hashed (SHA-256 of all of 1 GiB took
		// about a second of each round here, while the container ran beside it).
		var at *lastBlock
		err = pages.ScanRaw(pids, 256, false, func(ch pages.Chunk) error {
			n := len(ch.Addrs)
			r.Scanned += int64(n)
			hs, fast, idx := scanHs[:n], scanFast[:n], scanIdx[:0]
			for i, a := range ch.Addrs {
				fast[i] = pages.FastSum(ch.Data[i*pages.Size : (i+1)*pages.Size])
				var ok bool
				if hs[i], ok = seen.knownFast(&at, ch.NSPid, a, fast[i]); !ok {
					idx = append(idx, i)
				}
			}
			pages.SumSome(ch.Data, hs, idx)
			for i, h := range hs {
				old := seen.put(ch.NSPid, ch.Addrs[i], h, fast[i])
				if inBatch[h] {
					continue
				}
				if _, ok := sess.Index(h); ok {
					continue
				}
				inBatch[h] = true
				batchH = append(batchH, h)
				batchP = append(batchP, ch.Data[i*pages.Size:(i+1)*pages.Size]...)
				batchB = append(batchB, old)
				r.Dirty++
			}
			if len(batchH) >= 2048 {
				return flush()
			}
			return ctx.Err()
		})
		if err == nil {
			err = flush()
		}
		// The round ends when its pages are stored on the target: the next round's deltas
		// refer to them.
		wire, perr := pt.wait()
		r.WireBytes += wire
		if err == nil {
			err = perr
		}
		if err != nil {
			return rounds, "", fmt.Errorf("pre-copy round %d: %w", n, err)
		}
		r.Duration = time.Since(t0)
		if n > 1 {
			r.DirtyRate = float64(r.Dirty) / r.Duration.Seconds()
		}
		r.Bandwidth = l.Mbit()
		r.Estimate = finalCopyEstimate(r)
		rounds = append(rounds, r)
		emit(Event{Kind: "round", Round: &r})
		slog.Info("pre-copy round", "container", c.Name, "round", n, "scanned", r.Scanned, "dirty", r.Dirty, "sent", r.Sent,
			"dedup", r.Deduplicated, "wire", r.WireBytes, "took", r.Duration, "estimate", r.Estimate)
		if why := stopReason(rounds, maxDown, maxRounds); why != "" {
			return rounds, why, nil
		}
	}
}

// catchUp says whether one more pre-copy round is to run after the target's verification
// of the pages it holds, which took took after rounds rounds: if it took longer than the
// downtime goal (the frozen phase would otherwise carry what changed meanwhile), unless
// the operator's round limit is reached.
func catchUp(req PushRequest, rounds int, took time.Duration) bool {
	return took > maxDowntime(req) && (req.MaxRounds <= 0 || rounds < req.MaxRounds)
}

// maxDowntime is pre-copy's goal for the final copy: the operator's, else 200 ms.
func maxDowntime(req PushRequest) time.Duration {
	if req.MaxDowntime > 0 {
		return req.MaxDowntime
	}
	return 200 * time.Millisecond
}

// stopReason says why pre-copy stops after the last of rounds, or "" to go on: the final
// copy is estimated to fit maxDown (from round 2: round 1's estimate knows no dirty
// rate), the dirty set stopped shrinking (a round dirtied at least 90% of the one before),
// or maxRounds were run. A first round that found everything on the target already goes on
// (one more round catches what changed), unless the limit is 1.
func stopReason(rounds []Round, maxDown time.Duration, maxRounds int) string {
	n := len(rounds)
	if n == 0 {
		return ""
	}
	r := rounds[n-1]
	switch {
	case n > 1 && r.Estimate <= maxDown:
		return fmt.Sprintf("converged: final copy estimated %s, goal %s", r.Estimate.Round(time.Millisecond), maxDown)
	case n == 1 && r.Dirty == r.Deduplicated:
	case n > 1 && float64(r.Dirty) >= 0.9*float64(rounds[n-2].Dirty):
		return fmt.Sprintf("dirty set stopped shrinking (%d pages, %d before)", r.Dirty, rounds[n-2].Dirty)
	}
	if n >= maxRounds {
		return fmt.Sprintf("round limit %d; final copy estimated %s", maxRounds, r.Estimate.Round(time.Millisecond))
	}
	return ""
}

// finalCopyEstimate is how long the frozen phase's page copy will take if as many pages
// change as did during round r: each costs what r's pages cost on the wire (a delta
// against the content the target holds, once a round has sent every address), at most a
// whole page, at the measured bandwidth. Podman's and CRIU's own work is not included.
func finalCopyEstimate(r Round) time.Duration {
	if r.Bandwidth <= 0 || r.Dirty == 0 {
		return 0
	}
	perPage := float64(pages.Size)
	if r.N > 1 && r.WireBytes > 0 {
		perPage = min(perPage, float64(r.WireBytes)/float64(r.Dirty))
	}
	return time.Duration(float64(r.Dirty) * perPage * 8 / (r.Bandwidth * 1e6) * float64(time.Second))
}

// finalCopy streams the frozen container's checkpoint archive to the target, encoded
// against the session: pages the target holds go as references. It returns when the
// target has restored it, with the times at which the archive started and ended.
type finalTimes struct {
	firstByte, lastByte time.Time
	memoryDone          time.Time // the memory path: CRIU closed the page server
	streamed            bool      // the read hand-over sent CRIU's images before the memory
	decidedOnExit       bool      // podmanDone is when the container's processes ended here
	endDeferred         bool      // CRIU's transfer closed only after the target restored
	lazyListening       time.Time // the read hand-over: CRIU's lazy page server listened
	// The read hand-over's early restore (early.go): whether it was taken ("" if so, else
	// why not), and when the target answered and podman's checkpoint returned here.
	early                *string
	restored, podmanDone time.Time
	memory               *pages.Stats // what the memory carried
	memoryBytes          int64
	dump                 *checkpoint.DumpStats // CRIU's own account of the dump, if the archive had it
}

// pageKeeper adds the pages the frozen phase sends to the store in batches: they come a
// run at a time (a changed page or two between unchanged ones), and a write per run cost
// 0.22 s of CPU for the 8,000 changed pages of a 1 GiB container. The first error stays;
// flush adds what is gathered and returns it.
type pageKeeper struct {
	store *pages.Store
	hs    []pages.Hash
	buf   []byte
	err   error
}

const keepBatch = 256 // pages

func newPageKeeper(store *pages.Store) *pageKeeper {
	return &pageKeeper{store: store, buf: make([]byte, 0, keepBatch*pages.Size)}
}

// add is pages.EncodeOptions.Sent: it copies the pages (the encoder reuses its buffer).
func (k *pageKeeper) add(hs []pages.Hash, p []byte) {
	if k.err != nil {
		return
	}
	k.hs = append(k.hs, hs...)
	k.buf = append(k.buf, p...)
	if len(k.hs) >= keepBatch {
		k.flush()
	}
}

func (k *pageKeeper) flush() error {
	if len(k.hs) > 0 && k.err == nil {
		k.err = k.store.AddTrusted(k.hs, k.buf)
	}
	k.hs, k.buf = k.hs[:0], k.buf[:0]
	return k.err
}

func (a *Agent) finalCopy(ctx context.Context, target *Peer, c *checkpoint.Container, move string, memory, mayStream bool, handOver string, neigh []overlaynet.Neighbor, l *link, sess *pages.Session, seen *lastSent,
	progress func(int64), sent func(archiveBytes int64)) (*RestoreResult, *pages.Stats, finalTimes, error) {
	var ft finalTimes
	var ps *dumpServer // the page-server hand-over
	var ld *lazyDump   // the read hand-over
	if memory {
		var err error
		if handOver == HandOverRead {
			ld, err = startLazyDump(c.Name, c.StaticDir, a.store, maskDumpLines(c.Name, c.PID))
			if err == nil {
				defer ld.close()
			}
		} else if ps, err = startDumpServer(c.Name, maskDumpLines(c.Name, c.PID)); err == nil {
			defer ps.close()
		}
		if err != nil {
			return nil, nil, ft, exportError{err}
		}
	}
	// The read hand-over: the memory is named while CRIU dumps (prename.go), where the
	// processes are frozen (their cgroup) and a pre-copy round named it before.
	var pre *preNamed
	if ld != nil && c.PID > 0 && len(seen.blocks) > 0 {
		if fz, err := freezerOf(c.PID); err == nil {
			if ok, err := fz.frozen(); err == nil && ok {
				pre = startPreNaming(preNamingOf(c.PID), seen)
				defer pre.stop()
			}
		}
	}
	// The read hand-over: the target may restore from CRIU's images as they are when its
	// lazy page server listens, instead of waiting for podman's archive (early.go).
	var check *earlyCheck
	var snapshot, earlyArchive []byte
	var snapErr error
	// The streamed restore: if the check has answered by the time CRIU listens, CRIU's
	// images go first and the target restores while the memory follows (layout 'S');
	// otherwise the memory goes first (layout 'M') and the check is waited for after it.
	var atListen *string // the check's answer, if it came by then
	var streamErr error  // sending the images at that moment failed
	var streamSt pages.Stats
	if ld != nil {
		check = a.startEarlyCheck(ctx, c)
	}
	exp, expW := io.Pipe()
	expDone := make(chan error, 1)
	exported := make(chan struct{})
	var podmanDone time.Time
	// Podman's checkpoint call ends with the move's context, unless the move was decided
	// on its processes' end (below): then it finishes in the background.
	xctx, xcancel := context.WithTimeout(context.WithoutCancel(ctx), exportLimit)
	detach := context.AfterFunc(ctx, xcancel)
	var exited <-chan time.Time // the container's processes ended here (read hand-over)
	if ld != nil && c.PID > 0 {
		var stopWatch func()
		exited, stopWatch = watchExit(c.PID)
		defer stopWatch()
	}
	// The gated import's prelude (gate.go) waits for podman's spec.dump of this
	// checkpoint: newer than what an earlier one left.
	var specBefore time.Time
	if ld != nil && mayStream {
		specBefore = statMtime(filepath.Join(ld.static, "spec.dump"))
		ld.pid = c.PID
	}
	go func() {
		defer xcancel()
		_, err := a.podman.Export(xctx, c.Name, expW, checkpoint.Options{TCPEstablished: true, Keep: true})
		podmanDone = time.Now()
		expW.CloseWithError(err)
		close(exported)
		expDone <- err
	}()
	h := sha256.New()
	src := &firstByteReader{r: io.TeeReader(exp, h), at: &ft.firstByte}

	var st pages.Stats
	// Every page the frozen phase sends is kept here too: a rollback rebuilds the memory
	// from this store.
	kept := newPageKeeper(a.store)
	keepSent := kept.add
	body, enc, wait := l.body(ctx, func(w io.Writer) error {
		// The gated import: the target's podman starts on the prelude while CRIU dumps
		// here. Once sent, the images must follow as layout 'S'.
		prelude := false
		if ld != nil && mayStream {
			p, why, err := a.sendPrelude(ctx, ld, specBefore, exported, check, w)
			if err != nil {
				return err
			}
			if p {
				prelude = true
			} else {
				slog.Debug("no prelude: the target's podman waits for CRIU's images", "container", c.Name, "why", why)
			}
		}
		if ld != nil {
			ld.listened = func() {
				t0 := time.Now()
				snapshot, snapErr = ld.archive(prelude) // after a prelude the target has podman's files
				t1 := time.Now()
				if p, ok := check.within(streamWait); ok {
					atListen = &p
				}
				slog.Debug("CRIU listened", "container", c.Name, "images read", t1.Sub(t0), "early check waited for", time.Since(t1), "images", len(snapshot))
				// Not after a stop-and-copy: its whole memory crosses now, and a link cut
				// meanwhile would leave a restored (if mute) copy on the target until it
				// learns the outcome.
				if !mayStream || snapErr != nil || atListen == nil || *atListen != "" {
					if prelude {
						// The target's podman imports the prelude and waits for these
						// images: without them the move fails (the container runs on here).
						streamErr = fmt.Errorf("CRIU's images cannot follow the prelude: %v", snapErr)
						return
					}
					_, streamErr = w.Write([]byte{'M'})
					return
				}
				ft.early, ft.streamed = atListen, true
				ld.deferEnd = true
				earlyArchive = snapshot
				goSafe("podman's archive, not needed", func() { io.Copy(io.Discard, exp) }, nil)
				ft.firstByte = time.Now()
				if _, streamErr = w.Write([]byte{'S'}); streamErr != nil {
					return
				}
				var in io.Reader = bytes.NewReader(earlyArchive)
				if damaged("checkpoint-stream") {
					in = &flipReader{r: in, at: 1024} // damage in transit, after the digest
				}
				// The pages it sends are kept here too, as the memory's are: the memory
				// that follows refers to them, and a rollback rebuilds it from this store.
				streamSt, streamErr = pages.Encode(in, w, sess, pages.EncodeOptions{Base: seen.base, Sent: keepSent})
				// Out of the compressor at once: the target restores from the images while
				// the memory follows, and zstd would hold their last block until the
				// memory's bytes pushed it out (30-110 ms at 1 GiB here).
				if streamErr == nil {
					streamErr = flushLink(w)
				}
			}
		}
		if ps != nil || ld != nil {
			// The memory first: CRIU hands it over while it dumps, before podman's
			// archive. It is kept here (its pages in the store, their names on disk)
			// before CRIU's transfer ends: a rollback rebuilds the page images from it.
			mw := pages.NewMemoryWriter(w, sess, pages.EncodeOptions{Base: seen.base, Known: seen.known, Sent: keepSent, Room: seen.room})
			keep := func(mem *pages.Memory) error {
				if err := kept.flush(); err != nil {
					return exportError{fmt.Errorf("keep the pages of %s here for a rollback: %w", c.Name, err)}
				}
				if err := a.saveMemory(c.Name, mem); err != nil {
					return exportError{fmt.Errorf("keep the memory of %s for a rollback: %w", c.Name, err)}
				}
				return nil
			}
			var mem *pages.Memory
			var mst pages.Stats
			var err error
			if ld != nil {
				var hs handOverStats
				mem, mst, hs, err = readHandOver(ctx, ld, c.PID, mw, sess, pre, exported, keep)
				ft.lazyListening = hs.Listening
				if pre != nil {
					slog.Debug("memory named while CRIU dumped", "container", c.Name, "pages", pre.pages, "parts", len(pre.parts), "took", pre.took, "waited after CRIU listened", pre.waited)
				}
				slog.Debug("memory handed over", "container", c.Name, "named ahead", hs.NamedAhead, "from memory", hs.FromMemory, "from CRIU", hs.FromCRIU, "from images", hs.FromImages,
					"images sent", hs.Listened, "read", hs.Read, "named and sent", hs.Named, "kept", hs.Kept, "CRIU's end", hs.Finished)
			} else {
				mem, mst, err = ps.receive(ctx, mw, exported, keep)
			}
			ft.memoryDone = time.Now()
			if err != nil {
				var ee exportError
				if errors.As(err, &ee) {
					return ee
				}
				return exportError{fmt.Errorf("memory of %s: %w", c.Name, err)}
			}
			ft.memory = &mst
			ft.memoryBytes = mem.Bytes()
		}
		if streamErr != nil {
			return streamErr
		}
		if ft.streamed {
			// The images went first; an empty archive ends the body.
			st = streamSt
			_, err := pages.Encode(bytes.NewReader(nil), w, sess, pages.EncodeOptions{})
			return err
		}
		if ld != nil {
			var problem string
			if atListen != nil {
				problem = *atListen
			} else {
				problem = check.answer()
			}
			if problem == "" && snapErr != nil {
				problem = "CRIU's images: " + snapErr.Error()
			}
			ft.early = &problem
			if problem == "" {
				// Podman's archive is not needed: it is read to its end meanwhile (its
				// checkpoint call returns once podman is done), and waited for below.
				earlyArchive = snapshot
				goSafe("podman's archive, not needed", func() { io.Copy(io.Discard, exp) }, nil)
				ft.firstByte = time.Now()
				var in io.Reader = bytes.NewReader(earlyArchive)
				if damaged("checkpoint-stream") {
					in = &flipReader{r: in, at: 1024} // damage in transit, after the digest
				}
				var err error
				st, err = pages.Encode(in, w, sess, pages.EncodeOptions{Base: seen.base})
				return err
			}
			slog.Info("the target waits for podman's archive", "container", c.Name, "why", problem)
		}
		var err error
		var in io.Reader = src
		if damaged("checkpoint-stream") {
			in = &flipReader{r: src, at: 1024} // damage in transit, after the digest
		}
		st, err = pages.Encode(in, w, sess, pages.EncodeOptions{Base: seen.base,
			Observe: map[string]func([]byte){checkpoint.DumpStatsFile: func(img []byte) {
				if ds, err := checkpoint.ParseDumpStats(img); err == nil {
					ft.dump = ds
				} else {
					slog.Debug("CRIU dump statistics", "err", err)
				}
			}}})
		return err
	})
	// At the end of the body: what follows (the target's restore) is not a transfer for
	// the stall watchdog to watch.
	digest := func() string {
		ft.lastByte = time.Now()
		if earlyArchive != nil {
			sent(int64(len(earlyArchive)))
			sum := sha256.Sum256(earlyArchive)
			return "sha256:" + hex.EncodeToString(sum[:])
		}
		sent(src.n)
		return "sha256:" + hex.EncodeToString(h.Sum(nil))
	}
	var rr RestoreResult
	q := []string{"encoding", "pages", "container", c.Name, "move", move}
	if ld != nil {
		q = append(q, "memory", "stream") // the body starts with its layout, 'S' or 'M'
	} else if memory {
		q = append(q, "memory", "lazy")
	}
	hdr := encodingHeader(enc)
	if len(neigh) > 0 {
		hdr.Set(neighborsHeader, overlaynet.FormatNeighbors(neigh))
	}
	rerr := target.send(ctx, withQuery(PathRestore, q...), body, hdr, digest, progress, &rr)
	ft.restored = time.Now()
	encErr := wait()
	reset := false // CRIU's transfer reset here: podman's checkpoint fails, by design
	if ld != nil && ld.deferEnd {
		// The target restored: CRIU's dump may end now (endDump says why not before).
		if rerr == nil && encErr == nil {
			rerr = fault("source-end-dump")
		}
		if rerr == nil && encErr == nil {
			rerr = ld.waitKept() // the memory, kept beside the restore
		}
		if rerr == nil && encErr == nil {
			var took time.Duration
			took, rerr = ld.endDump()
			ft.endDeferred = true
			slog.Debug("CRIU's transfer closed after the target restored", "container", c.Name, "took", took, "kept beside the restore in", ld.keptIn, "err", rerr)
		} else {
			// Reset (linger 0): CRIU fails the dump, the container runs on here, and
			// podman's checkpoint call, waited for below, returns (failed).
			ld.failDump()
			reset = true
		}
	}
	if rerr == nil && earlyArchive != nil {
		rerr = fault("source-early") // the target restored; podman may still be at work here
	}
	if earlyArchive == nil {
		exp.CloseWithError(fmt.Errorf("the target stopped reading"))
	}
	// An early restore: podman finishes here meanwhile, and the move is not decided before
	// its checkpoint returned (a rollback restores from the checkpoint it keeps), or the
	// container's processes ended here: CRIU kills them only once its dump succeeded
	// (cr_dump_finish), after which they cannot run here again; podman's own end
	// (runtime, network, storage) then goes on in the background, and the removal of
	// the source's copy waits for it.
	if earlyArchive != nil && rerr == nil && encErr == nil && exited != nil {
		// Or killed: each process gone, exiting or with SIGKILL pending (watchKilled).
		killed, stopKilled := watchKilled(c.PID, time.Millisecond)
		defer stopKilled()
		var at time.Time
		select {
		case err := <-expDone:
			if err != nil {
				return nil, nil, ft, exportError{err}
			}
			ft.podmanDone = podmanDone // written before expDone was sent
		case at = <-exited:
		case at = <-killed:
		}
		if !at.IsZero() {
			ft.podmanDone, ft.decidedOnExit = at, true
			detach()
			goSafe("podman's checkpoint after the decision", func() {
				if err := <-expDone; err != nil {
					slog.Warn("podman's checkpoint failed after the container's processes ended here; the move stands (CRIU had dumped them, the target runs the container)",
						"container", c.Name, "err", err)
				}
			}, nil)
		}
	} else {
		if err := <-expDone; err != nil && !reset {
			return nil, nil, ft, exportError{err}
		} else if err != nil {
			slog.Debug("podman's checkpoint failed as CRIU's transfer was reset; the container runs on here", "container", c.Name, "err", err)
		}
		ft.podmanDone = podmanDone // written before expDone was sent
	}
	var ee exportError
	if errors.As(encErr, &ee) {
		return nil, nil, ft, ee
	}
	if rerr != nil {
		return nil, nil, ft, rerr
	}
	if encErr != nil && encErr != io.ErrClosedPipe {
		return nil, nil, ft, encErr
	}
	if m := ft.memory; m != nil {
		// What the frozen phase carried: the memory and the archive together.
		st.AddPages(*m)
	}
	return &rr, &st, ft, nil
}

// exportError is a failure of the checkpoint itself (as opposed to the transfer).
type exportError struct{ error }

func (e exportError) Unwrap() error { return e.error }

type firstByteReader struct {
	r  io.Reader
	at *time.Time
	n  int64 // bytes read
}

func (f *firstByteReader) Read(b []byte) (int, error) {
	n, err := f.r.Read(b)
	f.n += int64(n)
	if n > 0 && f.at.IsZero() {
		*f.at = time.Now()
	}
	return n, err
}
