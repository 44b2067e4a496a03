package transfer

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"time"
)

// The target's deadline on a restore's body. The source watches its side of the transfer
// (its stall watchdog), but a cut link may deliver neither its reset nor its FIN: the
// target would wait on the body until TCP's keepalive gives up, minutes later, with a
// half-restored container (in a streamed restore, a mute copy that already runs). The
// guard fails a read of the body that waits for a byte longer than twice the source's
// stall timeout, once the first byte has come, and the restore is undone as for any
// failure.

// Bounds of the stall timeout a source asks for (PrepareRequest.StallTimeout).
const (
	minBodyStall     = time.Second
	maxBodyStall     = 10 * time.Minute
	defaultBodyStall = 60 * time.Second
)

// bodyStall is the target's stall timeout for a move the source prepared with stall (0:
// the default): twice the source's, since the source's watchdog, on the same rule, fails
// the move first, and held within bounds: a peer does not make this host wait for ever.
func bodyStall(stall time.Duration) time.Duration {
	stall *= 2
	switch {
	case stall <= 0:
		return defaultBodyStall
	case stall < minBodyStall:
		return minBodyStall
	case stall > maxBodyStall:
		return maxBodyStall
	}
	return stall
}

// rcKey carries a request's http.ResponseController in its context (set by handle).
type rcKey struct{}

func withResponseController(r *http.Request, w http.ResponseWriter) *http.Request {
	return r.WithContext(context.WithValue(r.Context(), rcKey{}, http.NewResponseController(w)))
}

// guardedBody times the reads of the body it wraps. Only a read that waits counts: a
// consumer that pauses (podman restoring between its reads) is no stall of the link.
type guardedBody struct {
	io.ReadCloser
	stall   time.Duration
	waiting atomic.Int64 // UnixNano since a read waits, 0 when none does
	started atomic.Bool  // its first byte arrived: before it the source waits for podman (its first-byte deadline)
	ended   atomic.Bool  // the body reached its end (or failed)
	stalled atomic.Bool  // the guard cut it
}

func (g *guardedBody) Read(p []byte) (int, error) {
	if g.started.Load() {
		g.waiting.Store(time.Now().UnixNano())
	}
	n, err := g.ReadCloser.Read(p)
	g.waiting.Store(0)
	if n > 0 {
		g.started.Store(true)
	}
	if err != nil {
		g.ended.Store(true)
		if g.stalled.Load() {
			err = fmt.Errorf("no byte of the transfer arrived for %s (link cut?): %w", g.stall, err)
		}
	}
	return n, err
}

// guardBody replaces r's body by one whose reads fail once one has waited stall for a byte;
// stop ends the guard (call it when the handler returns). Without a response controller
// in r's context it guards nothing.
func guardBody(r *http.Request, stall time.Duration) (stop func()) {
	rc, _ := r.Context().Value(rcKey{}).(*http.ResponseController)
	if rc == nil || r.Body == nil {
		return func() {}
	}
	g := &guardedBody{ReadCloser: r.Body, stall: stall}
	r.Body = g
	done := make(chan struct{})
	tick := min(stall/4, time.Second)
	goSafe("restore body's stall guard", func() {
		tickUntil(done, tick, func() bool {
			// After the body's end the server reads the connection in the background
			// (to notice a client that goes away): a deadline then would cancel the
			// request, so the guard stops at the end.
			if g.ended.Load() {
				return true
			}
			if w := g.waiting.Load(); w != 0 && time.Since(time.Unix(0, w)) > stall {
				g.stalled.Store(true)
				rc.SetReadDeadline(time.Now()) // the pending read fails at once
				return true
			}
			return false
		})
	})
	return func() { close(done) }
}

// tickUntil calls fn every period until done closes or fn returns true.
func tickUntil(done <-chan struct{}, every time.Duration, fn func() (stop bool)) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			if fn() {
				return
			}
		}
	}
}
