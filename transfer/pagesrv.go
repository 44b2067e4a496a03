package transfer

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/migrate-project/migrate/pages"
	"github.com/migrate-project/migrate/volumes"
)

// incoming is the target's side of one migration's page session.
type incoming struct {
	sess    *pages.Session
	unpin   func()
	source  string                   // the host the move comes from: the only caller allowed
	touched time.Time                // the source's last call
	since   time.Time                // when the move arrived (prepare)
	trees   map[string]*volumes.Tree // volumes as applied so far
}

// openSession starts a fresh page session for an incoming move; the store keeps every
// page until the session ends.
func (a *Agent) openSession(req PrepareRequest) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if old := a.sessions[req.Container]; old != nil {
		old.unpin()
	}
	a.sessions[req.Container] = &incoming{sess: pages.NewSession(), unpin: a.store.Pin(), source: req.Source, touched: time.Now(), since: time.Now()}
}

func (a *Agent) closeSession(name string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if s := a.sessions[name]; s != nil {
		s.unpin()
		delete(a.sessions, name)
	}
}

// session returns the page session of an incoming move, if the caller is its source.
func (a *Agent) session(ctx context.Context, name string) (*pages.Session, error) {
	a.mu.Lock()
	s := a.sessions[name]
	if s != nil {
		s.touched = time.Now()
	}
	a.mu.Unlock()
	if s == nil {
		return nil, badRequest{fmt.Errorf("no move of %q is being prepared on %s", name, a.cfg.Name)}
	}
	if err := mustBe(ctx, s.source, "send pages of "+name); err != nil {
		return nil, err
	}
	return s.sess, nil
}

// maxAnnounce bounds one request's list of hashes (2 GiB of pages, 16 MiB of hashes);
// callers split longer lists.
const maxAnnounce = 1 << 19

// announcePages: the source names pages (their hashes, 32 bytes each) that this migration
// will refer to; they join the session, and the answer says which the store lacks.
func (a *Agent) announcePages(r *http.Request) (any, error) {
	sess, err := a.session(r.Context(), r.URL.Query().Get("container"))
	if err != nil {
		return nil, err
	}
	hs, err := readHashes(r)
	if err != nil {
		return nil, err
	}
	sess.Append(hs...)
	held := a.store.Has(hs)
	out := PagesAnnounce{Missing: make([]byte, (len(hs)+7)/8)}
	for i, ok := range held {
		if ok {
			out.Held++
		} else {
			out.Missing[i/8] |= 1 << (i % 8)
		}
	}
	if out.Held == len(hs) {
		// Every one held: their places can be located now (else after the pages come).
		sess.LocateAhead(a.store)
	}
	return out, nil
}

// readHashes reads a request body that lists page hashes (at most maxAnnounce).
func readHashes(r *http.Request) ([]pages.Hash, error) {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxAnnounce*32+1))
	if err != nil {
		return nil, fmt.Errorf("receive page hashes: %w", err)
	}
	if len(b) > maxAnnounce*32 {
		return nil, badRequest{fmt.Errorf("more than %d page hashes at once", maxAnnounce)}
	}
	hs, err := pages.ParseHashes(b)
	if err != nil {
		return nil, badRequest{err}
	}
	return hs, nil
}

// Bounds of what a zstd stream from a peer may make this side allocate: the encoders use
// windows of at most 8 MiB (SpeedBestCompression).
const (
	maxZstdWindow = 16 << 20
	maxZstdMemory = 64 << 20
)

// bodyReader undoes the request's Content-Encoding (zstd or none).
func bodyReader(r *http.Request) (io.Reader, func(), error) {
	switch enc := r.Header.Get("Content-Encoding"); enc {
	case "", "identity":
		return r.Body, func() {}, nil
	case "zstd":
		zr, err := zstd.NewReader(r.Body, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxZstdWindow), zstd.WithDecoderMaxMemory(maxZstdMemory))
		if err != nil {
			return nil, nil, err
		}
		return zr, zr.Close, nil
	default:
		return nil, nil, badRequest{fmt.Errorf("unknown Content-Encoding %q", enc)}
	}
}

// putPages stores pages the source sends in a pre-copy round, as records (literal pages,
// or deltas against pages of the session). Each must be one it announced: a page whose
// content does not match any announced hash was damaged.
func (a *Agent) putPages(r *http.Request) (any, error) {
	sess, err := a.session(r.Context(), r.URL.Query().Get("container"))
	if err != nil {
		return nil, err
	}
	body, done, err := bodyReader(r)
	if err != nil {
		return nil, err
	}
	defer done()
	var res PagesPut
	n, err := pages.DecodeRecords(body, sess, a.store, func(hs []pages.Hash, buf []byte) error {
		for i, h := range hs {
			if _, ok := sess.Index(h); !ok {
				return fmt.Errorf("page %d of the batch was damaged in transit: its content matches no announced hash", res.Pages+i)
			}
		}
		res.Pages += len(hs)
		if err := a.store.AddTrusted(hs, buf); err != nil {
			return err
		}
		if damaged("target-store") {
			var err error
			storeDamage.Do(func() {
				// A disk that changes a page after it was stored (once per agent): the
				// verification before the freeze must find it.
				err = a.store.FlipBit(hs[0])
			})
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("receive pages after %d: %w", n, err)
	}
	// Where the store keeps them, found now rather than while the container is frozen
	// (pages.Session.Locate).
	sess.LocateAhead(a.store)
	return res, nil
}

// maxArchive bounds the checkpoint archive a source may make this host rebuild: twice
// its memory and 16 GiB (the container's rootfs changes, its logs) more. A checkpoint of
// a container that fits this host is smaller.
func maxArchive() int64 {
	var si syscall.Sysinfo_t
	mem := int64(64 << 30)
	if syscall.Sysinfo(&si) == nil {
		mem = int64(si.Totalram) * int64(si.Unit)
	}
	return 2*mem + 16<<30
}

// decodeArchive rebuilds an encoded checkpoint archive from the request into a pipe the
// restore reads. The request is read to its end, so its trailer (the digest of the
// archive as the source read it) is there when the pipe ends.
func (a *Agent) decodeArchive(ctx context.Context, r *http.Request, sess *pages.Session, stats *pages.Stats) (io.Reader, error) {
	body, done, err := bodyReader(r)
	if err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	goSafe("decode archive", func() {
		defer done()
		st, err := pages.Decode(body, pw, sess, a.store, maxArchive())
		*stats = st
		if err == nil {
			_, err = io.Copy(io.Discard, r.Body)
		}
		if err == nil {
			err = io.EOF
		}
		pw.CloseWithError(err)
	}, func(p any) { pw.CloseWithError(fmt.Errorf("decode archive: internal error: %v", p)) })
	context.AfterFunc(ctx, func() { pr.CloseWithError(ctx.Err()) })
	return pr, nil
}

// storeDamage injects MIGRATE_FAULT=damage:target-store once.
var storeDamage sync.Once

// verifyPages re-reads and re-hashes every page of the move's session that this host
// holds: the source asks before it freezes the container, so that a page the store no
// longer holds intact fails the move while the container still runs on the source
// (what restores it later reads through ReadVerified too).
func (a *Agent) verifyPages(r *http.Request) (any, error) {
	sess, err := a.session(r.Context(), r.URL.Query().Get("container"))
	if err != nil {
		return nil, err
	}
	var res PagesVerify
	t0 := time.Now()
	for i := 0; i < sess.Len(); i += 4096 {
		hs, err := sess.Slice(i, min(4096, sess.Len()-i))
		if err != nil {
			return nil, err
		}
		if err := a.store.Verify(hs); err != nil {
			return nil, fmt.Errorf("verify the pages held for the move: %w", err)
		}
		res.Pages += len(hs)
		if err := r.Context().Err(); err != nil {
			return nil, err
		}
	}
	res.Took = time.Since(t0)
	return res, nil
}
