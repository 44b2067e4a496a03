package transfer

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
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
