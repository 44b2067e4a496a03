package transfer

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/migrate-project/migrate/pages"
)

// RTTResult is an agent's measured round trip toward an address.
type RTTResult struct {
	Host string        `json:"host"`
	Addr string        `json:"addr"`
	RTT  time.Duration `json:"rtt_ns"`
}

// CostRequest asks a container's host what moving it to each of Hosts would take.
type CostRequest struct {
	Container string   `json:"container"`
	Hosts     []string `json:"hosts"`
}

// HostCost is what one candidate host lacks of a container, and the bandwidth to it.
type HostCost struct {
	Host          string  `json:"host"`
	Problem       string  `json:"problem,omitempty"`
	LayerBytes    int64   `json:"missing_layer_bytes"`
	MemoryBytes   int64   `json:"memory_bytes"`         // the container's resident memory (pages)
	MissingMemory int64   `json:"missing_memory_bytes"` // of those, bytes its page store lacks
	Mbit          float64 `json:"bandwidth_mbit"`
}

// rtt pings an address from this host: ping(8) with explicit arguments, its error output
// in the error.
func (a *Agent) rtt(r *http.Request) (any, error) {
	addr, err := netip.ParseAddr(r.URL.Query().Get("addr"))
	if err != nil {
		return nil, badRequest{fmt.Errorf("addr %q: want an IP address", r.URL.Query().Get("addr"))}
	}
	d, err := Ping(r.Context(), addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", a.cfg.Name, err)
	}
	return RTTResult{Host: a.cfg.Name, Addr: addr.String(), RTT: d}, nil
}

// Ping returns the mean round trip of three pings to addr.
func Ping(ctx context.Context, addr netip.Addr) (time.Duration, error) {
	cmd := exec.CommandContext(ctx, "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", addr.String())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("ping %s: %v: %s%s", addr, err, strings.TrimSpace(stderr.String()), lastLine(string(out)))
	}
	// rtt min/avg/max/mdev = 0.045/0.052/0.060/0.006 ms
	for _, l := range strings.Split(string(out), "\n") {
		if _, v, ok := strings.Cut(l, " = "); ok && strings.Contains(l, "min/avg/max") {
			f := strings.Split(strings.Fields(v)[0], "/")
			if len(f) >= 2 {
				ms, err := strconv.ParseFloat(f[1], 64)
				if err == nil {
					return time.Duration(ms * float64(time.Millisecond)), nil
				}
			}
		}
	}
	return 0, fmt.Errorf("ping %s: no round trip in its output: %q", addr, lastLine(string(out)))
}

// HavePages counts how many of hs the agent's page store holds, asking in batches of at
// most maxAnnounce hashes.
func (p *Peer) HavePages(ctx context.Context, hs []pages.Hash) (int, error) {
	held := 0
	for len(hs) > 0 {
		n := min(len(hs), maxAnnounce)
		var res PagesAnnounce
		if err := p.send(ctx, PathPagesHave, bytes.NewReader(pages.AppendHashes(nil, hs[:n])), encodingHeader(""), nil, nil, &res); err != nil {
			return 0, err
		}
		held += res.Held
		hs = hs[n:]
	}
	return held, nil
}

// havePages counts which of the pages named in the body the store holds.
func (a *Agent) havePages(r *http.Request) (any, error) {
	hs, err := readHashes(r)
	if err != nil {
		return nil, err
	}
	n := 0
	for _, ok := range a.store.Has(hs) {
		if ok {
			n++
		}
	}
	return PagesAnnounce{Held: n}, nil
}

// probe reads and counts the body: a peer measures its bandwidth to this host.
func (a *Agent) probe(r *http.Request) (any, error) {
	n, err := io.Copy(io.Discard, io.LimitReader(r.Body, 64<<20))
	return map[string]int64{"bytes": n}, err
}

// Bandwidth sends n random bytes to the peer and returns the rate, in Mbit/s.
func (p *Peer) Bandwidth(ctx context.Context, n int) (float64, error) {
	b := make([]byte, n)
	rand.Read(b)
	// Open the connection first: the handshake is not bandwidth.
	if err := p.Call(ctx, PathInfo, nil, &HostInfo{}); err != nil {
		return 0, err
	}
	t0 := time.Now()
	if err := p.send(ctx, PathProbe, bytes.NewReader(b), encodingHeader(""), nil, nil, &map[string]int64{}); err != nil {
		return 0, err
	}
	return float64(n) * 8 / time.Since(t0).Seconds() / 1e6, nil
}

// costs: what moving a container from here to each host would take.
func (a *Agent) costs(r *http.Request) (any, error) {
	var req CostRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	ctx := r.Context()
	c, err := a.podman.Inspect(ctx, req.Container)
	if err != nil {
		return nil, err
	}
	if c.State != "running" {
		return nil, fmt.Errorf("container %s is %s on %s", c.Name, c.State, a.cfg.Name)
	}
	// The container's memory, by content.
	pids, err := pages.Processes(c.PID)
	if err != nil {
		return nil, err
	}
	seen := map[pages.Hash]bool{}
	var unique []pages.Hash
	err = pages.Scan(pids, 256, func(ch pages.Chunk) error {
		for _, h := range ch.Hashes {
			if !seen[h] {
				seen[h] = true
				unique = append(unique, h)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var out []HostCost
	for _, h := range req.Hosts {
		hc := HostCost{Host: h, MemoryBytes: int64(len(seen)) * pages.Size}
		out = append(out, hc)
		i := len(out) - 1
		if h == a.cfg.Name {
			continue
		}
		p, err := a.peer(h)
		if err != nil {
			out[i].Problem = err.Error()
			continue
		}
		var info HostInfo
		if err := p.Call(ctx, PathInfo, nil, &info); err != nil {
			out[i].Problem = err.Error()
			continue
		}
		if !info.Podman {
			out[i].Problem = "runs no podman"
			continue
		}
		plan, err := a.layerPlanOf(ctx, c, h)
		if err != nil {
			out[i].Problem = err.Error()
			continue
		}
		if !plan.ImagePresent {
			out[i].LayerBytes = plan.MissingBytes
		}
		held, err := p.HavePages(ctx, unique)
		if err != nil {
			out[i].Problem = err.Error()
			continue
		}
		out[i].MissingMemory = int64(len(seen)-held) * pages.Size
		if out[i].Mbit, err = p.Bandwidth(ctx, 1<<20); err != nil {
			out[i].Problem = err.Error()
		}
	}
	return out, nil
}
