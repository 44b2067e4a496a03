package transfer

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"
)

// The target's verifying reader hands podman the archive and turns its end into an error
// unless the digest the source sent matches: a damaged byte anywhere is never restored.
func TestVerifyingReaderRefusesADamagedArchive(t *testing.T) {
	archive := bytes.Repeat([]byte("checkpoint"), 10000)
	sum := sha256.Sum256(archive)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	read := func(b []byte, sent string) (int64, error) {
		v := &verifyingReader{src: bytes.NewReader(b), trailer: func() string { return sent }, h: sha256.New()}
		_, err := io.Copy(io.Discard, v)
		if err == nil {
			err = v.err
		}
		return v.n, err
	}
	if n, err := read(archive, digest); err != nil || n != int64(len(archive)) {
		t.Fatalf("intact archive: %d bytes, %v", n, err)
	}
	damaged := append([]byte{}, archive...)
	damaged[54321] ^= 1
	if _, err := read(damaged, digest); !errors.Is(err, errDigest) {
		t.Fatalf("a flipped bit was not caught: %v", err)
	}
	if _, err := read(archive[:len(archive)-1], digest); !errors.Is(err, errDigest) {
		t.Fatalf("a truncated archive was not caught: %v", err)
	}
	if _, err := read(archive, ""); !errors.Is(err, errDigest) {
		t.Fatalf("an archive without a digest was accepted: %v", err)
	}
}

// The operator's reader of a push's events: the result ends it; a bad line or a stream
// without a result is an error that says so.
func TestReadEvents(t *testing.T) {
	var kinds []string
	res, err := readEvents(strings.NewReader(`{"event":"phase","phase":"inspect"}`+"\n"+`{"event":"result","result":{"container":"web","ok":true}}`+"\n"),
		"a", func(ev Event) { kinds = append(kinds, ev.Kind) })
	if err != nil || !res.OK || res.Container != "web" || strings.Join(kinds, ",") != "phase,result" {
		t.Fatalf("%+v %v %v", res, err, kinds)
	}
	if _, err := readEvents(strings.NewReader("{\"event\":\"phase\"}\n"), "a", nil); !errors.Is(err, errNoResult) {
		t.Fatalf("no result: %v", err)
	}
	if _, err := readEvents(strings.NewReader(strings.Repeat("x", 5000)+"\n"), "a", nil); err == nil || len(err.Error()) > 400 {
		t.Fatalf("bad line: %v", err)
	}
}
