package pageserver_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migrate-project/migrate/internal/testenv"
	"github.com/migrate-project/migrate/pages"
	"github.com/migrate-project/migrate/pageserver"
)

// sink feeds a MemoryWriter.
type sink struct{ mw *pages.MemoryWriter }

func (s sink) Entry(img pageserver.Image, vaddr, n uint64, flags uint32) error {
	return s.mw.Entry(int(img.Kind), img.ID, vaddr, n, flags)
}
func (s sink) Pages(img pageserver.Image, vaddr uint64, data []byte) error {
	return s.mw.Pages(vaddr, data)
}

type source struct {
	mem   *pages.Memory
	store *pages.Store
}

func (s source) ReadPages(pid, vaddr uint64, buf []byte) (int, error) {
	return s.mem.ReadPages(s.store, pid, vaddr, buf)
}

// TestCRIUDumpsToUsAndRestoresLazilyFromUs runs the real CRIU against both halves of the
// protocol on a plain process (not a container): the dump sends its memory to Receive,
// and a lazy restore gets it back through `criu lazy-pages` asking Serve. The process's
// own checksum of its memory proves every page came back right.
func TestCRIUDumpsToUsAndRestoresLazilyFromUs(t *testing.T) {
	testenv.Root(t, "criu")
	dir := t.TempDir()
	memload := testenv.Memload(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	port := freePort(t)
	logf, _ := os.Create(filepath.Join(dir, "memload.out"))
	defer logf.Close()
	cmd := exec.Command(memload, "-size", "32", "-rate", "200", "-listen", "127.0.0.1:"+strconv.Itoa(port))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	restored := false
	t.Cleanup(func() {
		syscall.Kill(pid, syscall.SIGKILL)
		if !restored {
			cmd.Wait()
		}
	})
	status(t, port) // up and answering

	// Dump: CRIU sends the memory here.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	store, err := pages.OpenStore(filepath.Join(dir, "store"), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	sess := pages.NewSession()
	var wire bytes.Buffer
	mw := pages.NewMemoryWriter(&wire, sess, pages.EncodeOptions{Sent: func(hs []pages.Hash, p []byte) { store.AddTrusted(hs, p) }})
	recv := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			recv <- err
			return
		}
		defer conn.Close()
		// As the agent receives: the memory kept before CRIU's close is answered. The
		// checksum after the restore shows that no page was lost.
		var kept bool
		uncorked := errors.New("not told")
		_, err = pageserver.Receive(ctx, conn, sink{mw}, pageserver.ReceiveOptions{BeforeClose: func() error { kept = true; return nil },
			Uncork: true, Uncorked: func(err error) { uncorked = err }})
		if err == nil && !kept {
			err = errors.New("the close was answered without BeforeClose")
		}
		if err == nil && uncorked != nil {
			err = fmt.Errorf("CRIU's socket was not uncorked: %w", uncorked)
		}
		recv <- err
	}()
	img := filepath.Join(dir, "img")
	os.MkdirAll(img, 0o755)
	lport := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	runCRIU(t, img, "dump", "-t", strconv.Itoa(pid), "-D", img, "-o", "dump.log", "-v4", "--tcp-established",
		"--page-server", "--address", "127.0.0.1", "--port", lport)
	if err := <-recv; err != nil {
		t.Fatalf("page server: %v", err)
	}
	// How long CRIU waited for its close's answer: without the uncork, at least the
	// kernel's 200 ms cork timer; with it, how far the receiver lags behind CRIU.
	if gap, err := closeGap(filepath.Join(img, "dump.log")); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("CRIU waited %s for its close to be answered", gap)
	}
	cmd.Wait() // the dumped process is gone
	mem, st, err := mw.Close()
	if err != nil {
		t.Fatal(err)
	}
	if mem.Bytes() < 32<<20 || st.PagesSent == 0 {
		t.Fatalf("received %d bytes of memory (%d pages sent): want at least memload's 32 MiB", mem.Bytes(), st.PagesSent)
	}
	if m, _ := filepath.Glob(filepath.Join(img, "pages-*.img")); len(m) != 0 {
		t.Fatalf("CRIU wrote page images itself: %v", m)
	}
	// The memory crosses (here: into the same store) and becomes lazy images.
	var got pages.Memory
	if _, err := pages.DecodeMemory(bytes.NewReader(wire.Bytes()), &bytes.Buffer{}, pages.NewSession(), store, 1<<30, &got); err == nil {
		t.Fatal("decoded memory without the session that names its pages")
	}
	got = pages.Memory{}
	dsess := pages.NewSession()
	if _, err := pages.DecodeMemory(bytes.NewReader(append(wire.Bytes(), 'E')), &bytes.Buffer{}, dsess, store, 1<<30, &got); err != nil {
		t.Fatal(err)
	}
	written, err := got.WriteImages(img, store, true)
	if err != nil {
		t.Fatal(err)
	}
	if written > 4<<20 {
		t.Fatalf("%d bytes written into non-lazy page images: memload's memory should be lazy", written)
	}

	// Lazy restore: the daemon asks us.
	gl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer gl.Close()
	served := 0
	srv := make(chan error, 1)
	go func() {
		conn, err := gl.Accept()
		if err != nil {
			srv <- err
			return
		}
		defer conn.Close()
		srv <- pageserver.Serve(ctx, conn, source{&got, store}, pageserver.ServeOptions{Served: func(n int) { served += n }})
	}()
	lazy := exec.CommandContext(ctx, "criu", "lazy-pages", "-D", img, "-W", img, "-o", "lazy-pages.log", "-v4",
		"--page-server", "--address", "127.0.0.1", "--port", strconv.Itoa(gl.Addr().(*net.TCPAddr).Port))
	if err := lazy.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { lazy.Process.Kill(); lazy.Wait() }()
	waitFile(t, filepath.Join(img, "lazy-pages.socket"))
	runCRIU(t, img, "restore", "-D", img, "-W", img, "-o", "restore.log", "--tcp-established", "--lazy-pages", "-d")
	restored = true
	if err := lazy.Wait(); err != nil {
		t.Fatalf("lazy-pages daemon: %v\n%s", err, tail(filepath.Join(img, "lazy-pages.log")))
	}
	if err := <-srv; err != nil {
		t.Fatalf("serving lazy pages: %v", err)
	}
	if served*pages.Size < 32<<20 {
		t.Fatalf("served %d pages: want memload's 32 MiB", served)
	}
	line := status(t, port)
	if !strings.Contains(line, "ok=true") {
		t.Fatalf("memory damaged after the lazy restore: %s", line)
	}
}

func runCRIU(t *testing.T, dir string, args ...string) {
	t.Helper()
	out, err := exec.Command("criu", args...).CombinedOutput()
	if err != nil {
		log := filepath.Join(dir, args[0]+".log")
		t.Fatalf("criu %s: %v\n%s\n%s", args[0], err, out, tail(log))
	}
}

// closeGap reads from CRIU's log how long it waited between starting to close the page
// transfer and its next step (the answer arrived in between).
func closeGap(log string) (time.Duration, error) {
	b, err := os.ReadFile(log)
	if err != nil {
		return 0, err
	}
	stamp := func(l string) (time.Duration, bool) {
		// "(00.123456) ..."
		if len(l) < 12 || l[0] != '(' || l[10] != ')' {
			return 0, false
		}
		f, err := strconv.ParseFloat(l[1:10], 64)
		return time.Duration(f * float64(time.Second)), err == nil
	}
	var at time.Duration
	seen := false
	for _, l := range strings.Split(string(b), "\n") {
		ts, ok := stamp(l)
		switch {
		case !ok:
		case seen:
			return ts - at, nil
		case strings.Contains(l, "Disconnect from the page server"):
			at, seen = ts, true
		}
	}
	return 0, fmt.Errorf("%s: no page-server disconnect followed by another line", log)
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(string(b), "\n")
	var errs []string
	for _, l := range lines {
		if strings.Contains(l, "Error") || strings.Contains(l, "rror (") {
			errs = append(errs, l)
		}
	}
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(append(errs, lines...), "\n")
}

func waitFile(t *testing.T, path string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
	}
	t.Fatalf("%s did not appear within 10 s", path)
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// status asks memload for its status line.
func status(t *testing.T, port int) string {
	t.Helper()
	var last error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
		if err != nil {
			last = err
			continue
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err == nil {
			return line
		}
		last = err
	}
	t.Fatalf("memload does not answer: %v", last)
	return ""
}
