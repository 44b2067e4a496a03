package testbed_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migrate-project/migrate/testbed"
	"github.com/migrate-project/migrate/transfer"
)

// Synchronisation by events, not sleeps: a push's own event stream, a listening socket, a
// byte count on the wire. Every wait has a deadline.

// pushDeadline bounds a push started in the background.
const pushDeadline = 5 * time.Minute

// runningPush is `migrate --json push ...` running in the background, its events watched.
type runningPush struct {
	t      *testing.T
	cmd    *exec.Cmd
	cancel context.CancelFunc
	mu     sync.Mutex
	out    strings.Builder // everything it printed
	events []transfer.Event
	done   chan struct{}
}

// startPush starts `migrate --json ARGS` (a push) in the background, under pushDeadline.
func startPush(t *testing.T, tb *testbed.Testbed, args ...string) *runningPush {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pushDeadline)
	p := &runningPush{t: t, cancel: cancel, done: make(chan struct{})}
	p.cmd = tb.Migrate(ctx, testbed.ClientName, append([]string{"--json"}, args...)...)
	pr, pw := io.Pipe()
	p.cmd.Stdout, p.cmd.Stderr = pw, &lockedWriter{p}
	if err := p.cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.out.WriteString(line + "\n")
			if ev, err := testbed.ParseEvent([]byte(line)); err == nil {
				p.events = append(p.events, ev)
			}
			p.mu.Unlock()
		}
		io.Copy(io.Discard, pr)
	}()
	go func() {
		p.cmd.Wait()
		pw.Close()
		<-read // every line it printed is in events before done
		close(p.done)
	}()
	t.Cleanup(func() {
		cancel()
		<-p.done
	})
	return p
}

type lockedWriter struct{ p *runningPush }

func (w *lockedWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.p.out.Write(b)
}

// waitEvent waits until the push has emitted an event that match accepts, failing the
// test if the push ends first or limit passes.
func (p *runningPush) waitEvent(what string, limit time.Duration, match func(transfer.Event) bool) transfer.Event {
	p.t.Helper()
	deadline := time.After(limit)
	seen := 0
	// scan looks at the events not seen yet.
	scan := func() (transfer.Event, bool) {
		p.mu.Lock()
		defer p.mu.Unlock()
		for ; seen < len(p.events); seen++ {
			if match(p.events[seen]) {
				return p.events[seen], true
			}
		}
		return transfer.Event{}, false
	}
	for {
		if ev, ok := scan(); ok {
			return ev
		}
		select {
		case <-p.done:
			if ev, ok := scan(); ok { // its last lines
				return ev
			}
			p.mu.Lock()
			out := p.out.String()
			p.mu.Unlock()
			p.t.Fatalf("push ended before %s:\n%s", what, out)
		case <-deadline:
			p.t.Fatalf("no %s within %s", what, limit)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// transferred waits until the frozen phase's transfer has sent at least n bytes.
func (p *runningPush) transferred(n int64) {
	p.t.Helper()
	p.waitEvent(fmt.Sprintf("transfer of %d bytes", n), 2*time.Minute, func(ev transfer.Event) bool {
		return ev.Kind == "progress" && ev.Phase == "transfer" && ev.Bytes >= n
	})
}

// wait waits for the push to end and fails the test unless it exits with code.
func (p *runningPush) wait(code int) string {
	p.t.Helper()
	<-p.done
	got := -1
	if st := p.cmd.ProcessState; st != nil {
		got = st.ExitCode()
	}
	p.mu.Lock()
	out := p.out.String()
	p.mu.Unlock()
	if got != code {
		p.t.Fatalf("push: exit %d, want %d\n%s", got, code, out)
	}
	p.t.Logf("push: exit %d: %s", got, lastLine(out))
	return out
}

// result is the push's result (its last event), once it has ended.
func (p *runningPush) result() *transfer.PushResult {
	p.t.Helper()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := len(p.events); n > 0 && p.events[n-1].Kind == "result" && p.events[n-1].Result != nil {
		return p.events[n-1].Result
	}
	p.t.Fatalf("push printed no result:\n%s", p.out.String())
	return nil
}

// waitListen waits until a process in container name on host listens on each TCP port
// (read from the container's /proc/net/tcp: nothing connects to find out).
func waitListen(t *testing.T, tb *testbed.Testbed, host, name string, ports ...int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := tb.Run(context.Background(), host, "podman", "exec", name, "cat", "/proc/net/tcp", "/proc/net/tcp6")
		missing := ports
		if err == nil {
			missing = nil
			for _, p := range ports {
				if !listensOn(out, p) {
					missing = append(missing, p)
				}
			}
			if len(missing) == 0 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s on %s does not listen on %v after 30 s (%v)", name, host, missing, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// listensOn reports whether /proc/net/tcp{,6} text has a listening socket on port.
func listensOn(procNetTCP string, port int) bool {
	want := fmt.Sprintf(":%04X", port)
	for _, line := range strings.Split(procNetTCP, "\n") {
		f := strings.Fields(line)
		// sl local_address rem_address st ...; st 0A is LISTEN.
		if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
			return true
		}
	}
	return false
}

// wireCounts reads the wire's counts of every link.
func wireCounts(t *testing.T, tb *testbed.Testbed) map[string]testbed.LinkCount {
	t.Helper()
	c, err := tb.WireCounts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// waitWire waits until host's link has carried at least n more bytes in the direction
// (up: from the host; down: to it) than it had at before.
func waitWire(t *testing.T, tb *testbed.Testbed, host string, up bool, n int64, limit time.Duration) {
	t.Helper()
	get := func(c testbed.LinkCount) int64 {
		if up {
			return c.UpBytes
		}
		return c.DownBytes
	}
	start := get(wireCounts(t, tb)[host])
	deadline := time.Now().Add(limit)
	for {
		now := get(wireCounts(t, tb)[host])
		if now-start >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's link carried %d bytes (%s) in %s, want %d", host, now-start, map[bool]string{true: "up", false: "down"}[up], limit, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Bytes measured where they cross: the wire's count of what entered the target's link
// during a push, beside the agents' own figure. Framing costs a share (Ethernet, IP and
// TCP headers: 66 bytes per segment of at most 1,448, about 4.6%; TLS records: 22 bytes
// per 16 KiB), and the move's calls a fixed amount (TLS handshakes, prepare, verify,
// commit, the overlay's announcements, the client's acknowledgements once the target
// serves it). Margins: wireShare over the share, wireFixed over the fixed part.
const (
	wireShare = 1.08
	wireFixed = 512 << 10
)

// pushCounted runs `migrate --json push ARGS` for a move from one host to another and
// returns the result and the bytes that entered the target's link meanwhile, which must
// agree with what the source says it sent.
func pushCounted(t *testing.T, tb *testbed.Testbed, from, to string, args ...string) (*transfer.PushResult, int64) {
	t.Helper()
	before := wireCounts(t, tb)
	r := pushArgs(t, tb, args...)
	after := wireCounts(t, tb)
	in := after[to].Sub(before[to]).DownBytes
	out := after[from].Sub(before[from]).UpBytes
	own := r.Bytes + r.ImageBytes + r.VolumeBytes
	t.Logf("wire: %d bytes left %s, %d entered %s; the source says it sent %d (memory and checkpoint %d, image %d, volumes %d): wire/own %.3f",
		out, from, in, to, own, r.Bytes, r.ImageBytes, r.VolumeBytes, float64(in)/float64(max(own, 1)))
	if r.OK && (in < own || float64(in) > float64(own)*wireShare+wireFixed) {
		t.Errorf("%d bytes entered %s, the source says it sent %d: want between that and %.2fx + %d KiB",
			in, to, own, wireShare, wireFixed>>10)
	}
	return r, in
}
