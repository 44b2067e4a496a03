package transfer

import (
	"context"
	"errors"
	"sync"
	"time"
)

// watchdog cancels its context when what it watches makes no progress (kick) for the
// current stage's period: a cut link may send no reset. A transfer goes through stages
// with their own periods and reasons (podman's work before its first byte, the link
// carrying bytes, the target's restore after the last one). kick and expect may be called
// from any goroutine.
type watchdog struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	mu     sync.Mutex
	t      *time.Timer
	d      time.Duration
	why    string
}

// newWatchdog watches a stage of period d; ctx ends with why as its cause if it fires.
func newWatchdog(ctx context.Context, d time.Duration, why string) *watchdog {
	w := &watchdog{d: d, why: why}
	w.ctx, w.cancel = context.WithCancelCause(ctx)
	w.t = time.AfterFunc(d, func() {
		w.mu.Lock()
		why := w.why
		w.mu.Unlock()
		w.cancel(errors.New(why))
	})
	return w
}

// kick records progress: the current stage's period starts again.
func (w *watchdog) kick() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.t.Reset(w.d)
}

// expect starts a new stage: period d from now on, why if it passes without progress.
func (w *watchdog) expect(d time.Duration, why string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.d, w.why = d, why
	w.t.Reset(d)
}

// done stops the watchdog and returns err, replaced by the reason the context ended (the
// watchdog fired, or its parent was cancelled) when there is one.
func (w *watchdog) done(err error) error {
	w.t.Stop()
	if cause := context.Cause(w.ctx); cause != nil && err != nil {
		err = cause
	}
	w.cancel(nil)
	return err
}
