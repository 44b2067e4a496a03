package transfer

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

func TestLinkBodyCompressesAndRespectsTheCap(t *testing.T) {
	data := make([]byte, 768<<10)
	rand.Read(data[:len(data)/2]) // half random, half zeros
	for _, tc := range []struct {
		compress string
		mbit     float64
		wantEnc  string
	}{
		{"none", 0, ""},
		{"auto", 0, "zstd"},
		{"best", 0, "zstd"},
		{"fastest", 8, "zstd"}, // 1 MB/s
	} {
		l, err := newLink(tc.compress, tc.mbit)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		body, enc, wait := l.body(context.Background(), func(w io.Writer) error { _, err := w.Write(data); return err })
		if enc != tc.wantEnc {
			t.Fatalf("%s: encoding %q, want %q", tc.compress, enc, tc.wantEnc)
		}
		wire, err := io.ReadAll(body)
		if err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		if err := wait(); err != nil && err != io.ErrClosedPipe {
			t.Fatal(err)
		}
		got := wire
		if enc == "zstd" {
			zr, _ := zstd.NewReader(bytes.NewReader(wire))
			got, err = io.ReadAll(zr)
			zr.Close()
			if err != nil {
				t.Fatal(err)
			}
			if len(wire) > len(data)*6/10 {
				t.Errorf("%s: %d bytes on the wire for %d bytes, half of them zeros", tc.compress, len(wire), len(data))
			}
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("%s: the data did not survive", tc.compress)
		}
		// The cap: a burst of 256 KiB, then 1 MB/s.
		if tc.mbit > 0 {
			if min := time.Duration(float64(len(wire)-256<<10) / 1e6 * float64(time.Second)); took < min {
				t.Errorf("capped at %g Mbit/s, %d bytes took %s (at least %s)", tc.mbit, len(wire), took, min)
			}
		}
	}
	if _, err := newLink("zip", 0); err == nil {
		t.Error("an unknown compression was accepted")
	}
}

// TestLinkBodyFlushSendsWhatCameBefore: the streamed restore's images reach the target
// while the producer goes on (the memory follows), not when a compressed block fills.
func TestLinkBodyFlushSendsWhatCameBefore(t *testing.T) {
	images := make([]byte, 100<<10)
	rand.Read(images[:len(images)/4])
	for _, compress := range []string{"none", "auto", "best"} {
		l, err := newLink(compress, 0)
		if err != nil {
			t.Fatal(err)
		}
		more := make(chan struct{})
		body, enc, wait := l.body(context.Background(), func(w io.Writer) error {
			if _, err := w.Write(images); err != nil {
				return err
			}
			if err := flushLink(w); err != nil {
				return err
			}
			<-more // the memory, later
			_, err := w.Write([]byte("memory"))
			return err
		})
		var r io.Reader = body
		if enc == "zstd" {
			zr, err := zstd.NewReader(body)
			if err != nil {
				t.Fatal(err)
			}
			defer zr.Close()
			r = zr
		}
		got := make([]byte, len(images))
		read := make(chan error, 1)
		go func() { _, err := io.ReadFull(r, got); read <- err }()
		select {
		case err := <-read:
			if err != nil || !bytes.Equal(got, images) {
				t.Fatalf("%s: the images before the rest: %v", compress, err)
			}
		case <-time.After(10 * time.Second):
			close(more)
			t.Fatalf("%s: the images did not arrive while the producer waited", compress)
		}
		close(more)
		if rest, err := io.ReadAll(r); err != nil || string(rest) != "memory" {
			t.Fatalf("%s: after them %q, %v", compress, rest, err)
		}
		if err := wait(); err != nil && err != io.ErrClosedPipe {
			t.Fatal(err)
		}
	}
}

func TestPushRequestValidate(t *testing.T) {
	for _, r := range []PushRequest{{Mode: "fast"}, {Compress: "zip"}, {BWLimitMbit: -1}, {MaxRounds: -1}} {
		if r.Validate() == nil {
			t.Errorf("%+v was accepted", r)
		}
	}
	if err := (PushRequest{Mode: ModeStopCopy, Compress: "none", BWLimitMbit: 50}).Validate(); err != nil {
		t.Errorf("valid request refused: %v", err)
	}
}

func TestFinalCopyEstimatePricesPagesAsTheRoundSentThem(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    Round
		want time.Duration
	}{
		// Round 1 sends every page whole: 9,449 pages at 92 Mbit/s.
		{"first round", Round{N: 1, Dirty: 9449, WireBytes: 38e6, Bandwidth: 92}, 3365 * time.Millisecond},
		// Later rounds send changed pages as deltas: 9,449 pages in 346,859 bytes.
		{"deltas", Round{N: 2, Dirty: 9449, WireBytes: 346859, Bandwidth: 92}, 30 * time.Millisecond},
		// Pages that cost more than a page on the wire (announcements) are priced as pages.
		{"at most a page", Round{N: 3, Dirty: 100, WireBytes: 1e6, Bandwidth: 92}, 36 * time.Millisecond},
		{"nothing dirty", Round{N: 3, Bandwidth: 92}, 0},
		{"no bandwidth yet", Round{N: 2, Dirty: 5}, 0},
	} {
		got := finalCopyEstimate(tc.r).Round(time.Millisecond)
		if got != tc.want {
			t.Errorf("%s: estimate %s, want %s", tc.name, got, tc.want)
		}
	}
}

// One more round follows the target's verification when it took longer than the downtime
// goal (the container changed pages meanwhile), within the operator's round limit.
func TestCatchUpAfterALongVerification(t *testing.T) {
	ms := time.Millisecond
	for _, tc := range []struct {
		name   string
		req    PushRequest
		rounds int
		took   time.Duration
		want   bool
	}{
		{"quick verification", PushRequest{}, 2, 60 * ms, false},
		{"at the default goal", PushRequest{}, 2, 200 * ms, false},
		{"longer than the default goal", PushRequest{}, 2, 1400 * ms, true},
		{"within --max-downtime", PushRequest{MaxDowntime: 2 * time.Second}, 2, 1400 * ms, false},
		{"--max-rounds reached", PushRequest{MaxRounds: 2}, 2, 1400 * ms, false},
		{"--max-rounds not reached", PushRequest{MaxRounds: 3}, 2, 1400 * ms, true},
	} {
		if got := catchUp(tc.req, tc.rounds, tc.took); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// Pre-copy stops for the documented reasons and no other: converged (from round 2), the
// dirty set not shrinking by 10%, the round limit; otherwise it goes on.
func TestPrecopyStopReasons(t *testing.T) {
	ms := time.Millisecond
	round := func(dirty, dedup int64, est time.Duration) Round {
		return Round{Dirty: dirty, Deduplicated: dedup, Estimate: est}
	}
	for _, tc := range []struct {
		name   string
		rounds []Round
		down   time.Duration
		max    int
		want   string // prefix of the reason; "" to go on
	}{
		{"round 1 never converges on its estimate", []Round{round(1000, 0, 10*ms)}, 200 * ms, 8, ""},
		{"round 1 that found everything goes on", []Round{round(1000, 1000, 10*ms)}, 200 * ms, 8, ""},
		{"converged", []Round{round(1000, 0, 5000*ms), round(100, 0, 150*ms)}, 200 * ms, 8, "converged: final copy estimated 150ms, goal 200ms"},
		{"converged at the goal exactly", []Round{round(1000, 0, 5000*ms), round(100, 0, 200*ms)}, 200 * ms, 8, "converged"},
		{"shrinking goes on", []Round{round(1000, 0, 5000*ms), round(899, 0, 4000*ms)}, 200 * ms, 8, ""},
		{"not shrinking by 10%", []Round{round(1000, 0, 5000*ms), round(900, 0, 4500*ms)}, 200 * ms, 8, "dirty set stopped shrinking (900 pages, 1000 before)"},
		{"growing", []Round{round(1000, 0, 5000*ms), round(1500, 0, 7000*ms)}, 200 * ms, 8, "dirty set stopped shrinking"},
		{"--max-rounds 1", []Round{round(1000, 1000, 10*ms)}, 200 * ms, 1, "round limit 1"},
		{"--max-rounds 3 reached while shrinking", []Round{round(1000, 0, 5000*ms), round(500, 0, 2500*ms), round(250, 0, 1200*ms)}, 200 * ms, 3, "round limit 3; final copy estimated 1.2s"},
		{"--max-downtime larger converges earlier", []Round{round(1000, 0, 5000*ms), round(500, 0, 2500*ms)}, 3 * time.Second, 8, "converged: final copy estimated 2.5s, goal 3s"},
	} {
		got := stopReason(tc.rounds, tc.down, tc.max)
		if (tc.want == "") != (got == "") || !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}
