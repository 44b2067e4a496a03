package transfer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// ErrUnreachable and ErrUnauthenticated classify failures to talk to an agent.
var (
	ErrUnreachable     = errors.New("unreachable")
	ErrUnauthenticated = errors.New("not authenticated")
)

// Peer is a client of one agent.
type Peer struct {
	Name string
	Addr string
	hc   *http.Client
}

// NewPeer returns a client for the agent at addr, authenticating with tlsConf.
func NewPeer(name, addr string, tlsConf *tls.Config) *Peer {
	p := &Peer{Name: name, Addr: addr}
	conf := tlsConf.Clone()
	conf.ServerName = name
	tr := &http.Transport{
		TLSClientConfig:     conf,
		ForceAttemptHTTP2:   false,
		TLSHandshakeTimeout: 10 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     60 * time.Second,
	}
	p.hc = &http.Client{Transport: tr}
	return p
}

func (p *Peer) url(path string) string { return "https://" + p.Addr + path }

// classify turns transport errors into ones that say what to do.
func (p *Peer) classify(err error) error {
	var cv *tls.CertificateVerificationError
	msg := err.Error()
	switch {
	case errors.As(err, &cv), strings.Contains(msg, "certificate"), strings.Contains(msg, "tls: "):
		return fmt.Errorf("host %s (%s): %w: %v (are both sides' certificates issued by the same `migrate certs` authority?)", p.Name, p.Addr, ErrUnauthenticated, err)
	case strings.Contains(msg, "connection refused"), strings.Contains(msg, "no route"), strings.Contains(msg, "timeout"),
		strings.Contains(msg, "deadline"), strings.Contains(msg, "unreachable"), strings.Contains(msg, "reset by peer"), strings.Contains(msg, "EOF"):
		return fmt.Errorf("host %s (%s): %w: %v (is `migrate serve` running there?)", p.Name, p.Addr, ErrUnreachable, err)
	}
	return fmt.Errorf("host %s (%s): %w", p.Name, p.Addr, err)
}

// Call sends in as JSON (nil: GET) and decodes the response into out. Without a deadline
// of ctx's own, it gives up after DefaultCallTimeout.
func (p *Peer) Call(ctx context.Context, path string, in, out any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCallTimeout)
		defer cancel()
	}
	method, body := http.MethodGet, io.Reader(nil)
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		method, body = http.MethodPost, bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, p.url(path), body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.hc.Do(req)
	if err != nil {
		return p.classify(err)
	}
	defer resp.Body.Close()
	return p.decode(resp, out)
}

// maxResponse bounds a JSON answer from an agent.
const maxResponse = 64 << 20

func (p *Peer) decode(resp *http.Response, out any) error {
	if resp.StatusCode != http.StatusOK {
		var e apiError
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return &AgentError{Host: p.Name, Code: resp.StatusCode, Msg: e.Error, Busy: e.Busy}
		}
		return &AgentError{Host: p.Name, Code: resp.StatusCode, Msg: resp.Status + ": " + strings.TrimSpace(string(b))}
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxResponse)).Decode(out); err != nil {
		return fmt.Errorf("host %s: bad response: %w", p.Name, err)
	}
	return nil
}

// digestTrailer carries the archive's SHA-256, sent after the archive itself.
const digestTrailer = "Migrate-Digest"

// sendReader counts what is sent and, at the end, runs onEOF (which fills in the
// request's trailer).
type sendReader struct {
	r      io.Reader
	n      int64
	onRead func(int64)
	onEOF  func()
}

func (d *sendReader) Read(b []byte) (int, error) {
	n, err := d.r.Read(b)
	d.n += int64(n)
	if d.onRead != nil && n > 0 {
		d.onRead(d.n)
	}
	if err == io.EOF && d.onEOF != nil {
		d.onEOF()
		d.onEOF = nil
	}
	return n, err
}

// LoadImage streams an image archive to the agent, which loads it only if it arrives whole
// and matches the digest.
func (p *Peer) LoadImage(ctx context.Context, r io.Reader, progress func(int64)) (*ImageResult, error) {
	var res ImageResult
	return &res, p.upload(ctx, PathImage, r, progress, &res)
}

// upload posts r with its SHA-256 as a trailer and decodes the answer into out.
func (p *Peer) upload(ctx context.Context, path string, r io.Reader, progress func(int64), out any) error {
	h := sha256.New()
	body := io.TeeReader(r, h)
	if path == PathImage && damaged("image-upload") {
		body = &flipReader{r: body, at: 4096} // damage in transit, after the digest
	}
	digest := func() string { return "sha256:" + hex.EncodeToString(h.Sum(nil)) }
	return p.send(ctx, path, body, http.Header{"Content-Type": {"application/x-tar"}}, digest, progress, out)
}

// send posts body with header; once body ends, digest (if any) fills in the digest
// trailer. progress sees the bytes sent.
func (p *Peer) send(ctx context.Context, path string, body io.Reader, header http.Header, digest func() string, progress func(int64), out any) error {
	trailer := http.Header{}
	sr := &sendReader{r: body, onRead: progress}
	if digest != nil {
		trailer[digestTrailer] = nil
		sr.onEOF = func() { trailer.Set(digestTrailer, digest()) }
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url(path), sr)
	if err != nil {
		return err
	}
	req.ContentLength = -1
	if digest != nil {
		req.Trailer = trailer
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := p.hc.Do(req)
	if err != nil {
		return p.classify(err)
	}
	defer resp.Body.Close()
	return p.decode(resp, out)
}

// flipReader flips one bit of the byte at offset at: a test's stand-in for a link that
// damages data (MIGRATE_FAULT=damage:image-upload).
type flipReader struct {
	r  io.Reader
	n  int64
	at int64
}

func (f *flipReader) Read(b []byte) (int, error) {
	n, err := f.r.Read(b)
	if f.at >= f.n && f.at < f.n+int64(n) {
		b[f.at-f.n] ^= 0x01
	}
	f.n += int64(n)
	return n, err
}

// Push asks the agent (the container's source) to move it, calling onEvent for each event
// of the progress stream, and returns the final result.
func (p *Peer) Push(ctx context.Context, req PushRequest, onEvent func(Event)) (*PushResult, error) {
	b, _ := json.Marshal(req)
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url(PathPush), bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	resp, err := p.hc.Do(hreq)
	if err != nil {
		return nil, p.classify(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, p.decode(resp, nil)
	}
	res, err := readEvents(resp.Body, p.Name, onEvent)
	if err != nil {
		// The move had started: whatever broke the stream, its outcome is the agents'
		// to settle, and this side does not know it.
		return nil, fmt.Errorf("%w: %w", ErrOutcomeUnknown, p.classify(err))
	}
	return res, nil
}

// ErrOutcomeUnknown: the source agent's answer broke off during a move. The agents settle
// the move from their journals; `migrate status` shows where the container runs.
var ErrOutcomeUnknown = errors.New("the move's outcome is not known here (the source agent stopped answering; the agents settle it from their journals: see `migrate status`)")

var errNoResult = errors.New("ended the push without a result (did its agent stop?)")

// readEvents reads a push's event stream (one JSON event a line, at most 1 MiB each) up to
// its result.
func readEvents(r io.Reader, host string, onEvent func(Event)) (*PushResult, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var ev Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			line := sc.Text()
			if len(line) > 200 {
				line = line[:200] + "..."
			}
			return nil, fmt.Errorf("host %s: bad event %q: %w", host, line, err)
		}
		if onEvent != nil {
			onEvent(ev)
		}
		if ev.Kind == "result" && ev.Result != nil {
			return ev.Result, nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("host %s %w", host, errNoResult)
}
