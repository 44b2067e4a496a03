package transfer

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// readAsCRIU opens and reads path to its end as CRIU reads its configuration file
// (fopen, getline), in the background.
func readAsCRIU(path string) <-chan string {
	ch := make(chan string, 1)
	go func() {
		b, err := os.ReadFile(path)
		if err != nil {
			ch <- "error: " + err.Error()
			return
		}
		ch <- string(b)
	}()
	return ch
}

// A reader waits in the gate until it opens, and then reads the whole configuration,
// as often as it opens it (CRIU may parse it more than once); closed, the FIFO is gone.
func TestGateHoldsCRIUUntilItOpens(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.conf")
	g, err := newGateAt("c", path)
	if err != nil {
		t.Fatal(err)
	}
	defer g.close()
	first := readAsCRIU(path)
	select {
	case got := <-first:
		t.Fatalf("the reader went on before the gate opened: %q", got)
	case <-time.After(100 * time.Millisecond):
	}
	g.open([]string{"lazy-pages", "images-dir /x"})
	want := "lazy-pages\nimages-dir /x\n" + criuNetworkLock + "\n"
	for i, ch := range []<-chan string{first, readAsCRIU(path)} {
		select {
		case got := <-ch:
			if got != want {
				t.Fatalf("read %d: %q, want %q", i, got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("read %d: the open gate did not answer", i)
		}
	}
	if !g.readerWaited() {
		t.Error("the gate does not know that a reader waited")
	}
	g.close()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the gate is still there after close: %v", err)
	}
}

// A gate closed without opening refuses the reader waiting in it (CRIU fails on the
// option it does not know) rather than leave it waiting for ever.
func TestGateClosedUnopenedRefusesTheWaitingReader(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.conf")
	g, err := newGateAt("c", path)
	if err != nil {
		t.Fatal(err)
	}
	ch := readAsCRIU(path)
	time.Sleep(20 * time.Millisecond) // the reader waits in its open
	done := make(chan struct{})
	go func() { g.close(); close(done) }()
	select {
	case got := <-ch:
		if got != gateRefusal+"\n" {
			t.Fatalf("a refused reader read %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the reader still waits after the gate closed")
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("close did not return")
	}
}

// A gate an earlier agent left: the starting agent refuses the CRIU that waits in it.
func TestReleaseGateRefusesWhatWaits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.conf")
	g, err := newGateAt("c", path)
	if err != nil {
		t.Fatal(err)
	}
	// The earlier agent is gone: its server stops without answering, the FIFO stays.
	close(g.stop)
	<-g.done
	defer unix.Close(g.fifo)
	ch := readAsCRIU(path)
	time.Sleep(20 * time.Millisecond)
	releaseGate(path)
	select {
	case got := <-ch:
		if got != gateRefusal+"\n" {
			t.Fatalf("read %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("releaseGate left the reader waiting")
	}
	if b, _ := os.ReadFile(path); string(b) != gateRefusal+"\n" {
		t.Errorf("after the release the file holds %q", b)
	}
	// A regular file is not a gate: left alone.
	reg := filepath.Join(t.TempDir(), "r.conf")
	os.WriteFile(reg, []byte("x\n"), 0o600)
	releaseGate(reg)
	if b, _ := os.ReadFile(reg); string(b) != "x\n" {
		t.Errorf("releaseGate changed a regular file: %q", b)
	}
}

// The prelude crosses whole; a damaged, cut or oversized one is refused, and a length
// alone allocates nothing.
func TestPreludeRefusesDamage(t *testing.T) {
	archive := []byte(strings.Repeat("podman's files ", 100))
	var b bytes.Buffer
	if err := writePrelude(&b, archive); err != nil {
		t.Fatal(err)
	}
	framed := b.Bytes()
	if framed[0] != 'P' {
		t.Fatalf("layout %q", framed[0])
	}
	got, err := readPrelude(bytes.NewReader(framed[1:]))
	if err != nil || !bytes.Equal(got, archive) {
		t.Fatalf("round trip: %v", err)
	}
	flipped := bytes.Clone(framed)
	flipped[20] ^= 1
	if _, err := readPrelude(bytes.NewReader(flipped[1:])); !errors.Is(err, errDigest) {
		t.Errorf("damaged: %v, want the digest mismatch", err)
	}
	for _, n := range []int{0, 3, 10, len(framed) - 2} {
		if _, err := readPrelude(bytes.NewReader(framed[1 : 1+n])); err == nil {
			t.Errorf("cut after %d bytes: accepted", n)
		}
	}
	var huge [4]byte
	binary.BigEndian.PutUint32(huge[:], maxPrelude+1)
	if _, err := readPrelude(bytes.NewReader(huge[:])); err == nil || !strings.Contains(err.Error(), "over") {
		t.Errorf("oversized: %v", err)
	}
	// A big length with little behind it fails without taking the length's memory.
	binary.BigEndian.PutUint32(huge[:], maxPrelude)
	if _, err := readPrelude(io.MultiReader(bytes.NewReader(huge[:]), bytes.NewReader(make([]byte, sha256.Size)))); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("short: %v", err)
	}
}

// The prelude carries what podman and runc read before CRIU: podman's files, the log,
// runc's descriptors and an (empty) inventory for podman's check; no image of CRIU's.
func TestPreludeCarriesWhatPodmanAndRuncReadBeforeCRIU(t *testing.T) {
	static := t.TempDir()
	dir := filepath.Join(static, "checkpoint")
	os.MkdirAll(dir, 0o700)
	for name, data := range map[string]string{"config.dump": "{}", "spec.dump": "{\"a\":1}", logFile: "hello\n"} {
		os.WriteFile(filepath.Join(static, name), []byte(data), 0o600)
	}
	os.WriteFile(filepath.Join(dir, "pstree.img"), []byte("image"), 0o600)
	d := &lazyDump{static: static, dir: dir}
	desc := []byte(`["/dev/null","pipe:[1]","pipe:[2]"]`)
	archive, err := d.prelude(desc)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"config.dump": "{}", "spec.dump": "{\"a\":1}", logFile: "hello\n", "checkpoint/" + descriptorsFile: string(desc), "checkpoint/inventory.img": ""} {
		if got, ok := tarFile(archive, name); !ok || string(got) != want {
			t.Errorf("%s: %q (present %v), want %q", name, got, ok, want)
		}
	}
	if _, ok := tarFile(archive, "checkpoint/pstree.img"); ok {
		t.Error("the prelude carries a CRIU image")
	}
}

// Podman's spec.dump is waited for until this checkpoint's is there: an earlier
// checkpoint's file does not count, an empty or partial one is read again.
func TestWaitFreshTakesThisCheckpoints(t *testing.T) {
	path := filepath.Join(t.TempDir(), "spec.dump")
	os.WriteFile(path, []byte(`{"old":1}`), 0o600)
	old := time.Now().Add(-time.Hour)
	os.Chtimes(path, old, old)
	before := statMtime(path)
	written := make(chan time.Time, 1)
	go func() {
		time.Sleep(30 * time.Millisecond)
		os.WriteFile(path, []byte(`{"new":`), 0o600) // partial
		time.Sleep(30 * time.Millisecond)
		written <- time.Now()
		os.WriteFile(path, []byte(`{"new":1}`), 0o600)
	}()
	if err := waitFresh(t.Context(), path, before, nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-written:
	default:
		t.Fatal("took an earlier or partial file")
	}
	exported := make(chan struct{})
	close(exported)
	if err := waitFresh(t.Context(), filepath.Join(t.TempDir(), "x"), time.Time{}, exported); err == nil {
		t.Error("waited on after podman's checkpoint ended")
	}
}

// The descriptors are read as runc reads them (libcontainer's getPipeFds): where a
// process's descriptors 0, 1 and 2 lead, as JSON.
func TestStdDescriptorsAsRuncRecordsThem(t *testing.T) {
	got, err := stdDescriptors(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for i := 0; i < 3; i++ {
		l, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", i))
		want = append(want, l)
	}
	var fds []string
	if err := json.Unmarshal(got, &fds); err != nil || !slices.Equal(fds, want) {
		t.Fatalf("%s, want %q", got, want)
	}
	if _, err := stdDescriptors(0); err == nil {
		t.Error("no process: no error")
	}
}

// A lazy dump an earlier agent left waiting for its page server's client: the starting
// agent connects and resets the connection (CRIU then fails the dump); a restore's
// configuration, or no CRIU running, is left alone.
func TestReleaseLazyDumpResetsCRIUsWait(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	dir := t.TempDir()
	dump := filepath.Join(dir, "web.conf")
	os.WriteFile(dump, []byte("lazy-pages\naddress 127.0.0.1\nport "+port+"\n"+criuNetworkLock+"\n"), 0o644)
	got := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- err
			return
		}
		defer c.Close()
		_, err = c.Read(make([]byte, 1))
		got <- err
	}()
	releaseLazyDump(dump, 2*time.Second, func() bool { return true })
	select {
	case err := <-got:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("CRIU's connection ended with %v, want a reset", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nobody connected to CRIU's lazy page server")
	}
	// No CRIU: no wait at all.
	t0 := time.Now()
	releaseLazyDump(dump, 2*time.Second, func() bool { return false })
	if time.Since(t0) > 100*time.Millisecond {
		t.Errorf("waited %s with no CRIU running", time.Since(t0))
	}
	// A restore's configuration names no page server to reset.
	rest := filepath.Join(dir, "r.conf")
	os.WriteFile(rest, []byte("lazy-pages\nimages-dir /x\nwork-dir /x\n"), 0o644)
	t0 = time.Now()
	releaseLazyDump(rest, 2*time.Second, func() bool { return true })
	if time.Since(t0) > 100*time.Millisecond {
		t.Errorf("waited %s on a restore's configuration", time.Since(t0))
	}
}
