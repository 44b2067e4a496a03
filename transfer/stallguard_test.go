package transfer

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// guardServer answers with what reading the whole body gave: its bytes, or its error.
// pause is how long the handler waits between its reads (a slow consumer).
func guardServer(t *testing.T, stall, pause time.Duration) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r = withResponseController(r, w)
		defer guardBody(r, stall)()
		var got []byte
		buf := make([]byte, 4)
		for {
			n, err := r.Body.Read(buf)
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			time.Sleep(pause)
		}
		w.Write(got)
	}))
	t.Cleanup(s.Close)
	return s
}

// post sends the body that write produces into the pipe and returns the answer.
func post(t *testing.T, url string, write func(w *io.PipeWriter)) (int, string) {
	t.Helper()
	pr, pw := io.Pipe()
	go write(pw)
	// A deadline of its own: without the guard a stopped body would hang the test
	// rather than fail it.
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Post(url, "application/octet-stream", pr)
	pw.Close() // the writer may still wait on a body the server gave up
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestStallGuardCutsABodyThatStops(t *testing.T) {
	s := guardServer(t, 200*time.Millisecond, 0)
	start := time.Now()
	block := make(chan struct{})
	defer close(block)
	code, body := post(t, s.URL, func(w *io.PipeWriter) {
		w.Write([]byte("first bytes"))
		<-block // the link is cut: neither more bytes nor an end
	})
	if code != http.StatusBadGateway || !strings.Contains(body, "link cut") {
		t.Fatalf("a body that stopped: %d %q, want the guard's error", code, body)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("the guard cut the body after %s, want about 200ms", took)
	}
}

func TestStallGuardSparesSlowReadersAndALateFirstByte(t *testing.T) {
	// The consumer pauses longer than the stall between reads: no stall of the link.
	s := guardServer(t, 100*time.Millisecond, 150*time.Millisecond)
	code, body := post(t, s.URL, func(w *io.PipeWriter) {
		w.Write([]byte("0123456789ab"))
		w.Close()
	})
	if code != http.StatusOK || body != "0123456789ab" {
		t.Fatalf("slow reader: %d %q", code, body)
	}
	// The first byte comes later than the stall (the source waits for podman), the rest
	// at once.
	s = guardServer(t, 100*time.Millisecond, 0)
	code, body = post(t, s.URL, func(w *io.PipeWriter) {
		time.Sleep(400 * time.Millisecond)
		w.Write([]byte("late"))
		w.Write([]byte(" but whole"))
		w.Close()
	})
	if code != http.StatusOK || body != "late but whole" {
		t.Fatalf("late first byte: %d %q", code, body)
	}
}

func TestBodyStallBounds(t *testing.T) {
	for _, c := range []struct{ in, want time.Duration }{
		{0, defaultBodyStall}, {-time.Second, defaultBodyStall}, {100 * time.Millisecond, minBodyStall},
		{5 * time.Second, 10 * time.Second}, {time.Hour, maxBodyStall},
	} {
		if got := bodyStall(c.in); got != c.want {
			t.Errorf("bodyStall(%s) = %s, want %s", c.in, got, c.want)
		}
	}
}
