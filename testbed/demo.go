package testbed

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
)

// Demo is what the README's demo measures.
type Demo struct {
	Container     string        `json:"container"`
	From          string        `json:"from"`
	To            string        `json:"to"`
	Link          Link          `json:"link"`
	CheckpointB   int64         `json:"checkpoint_bytes"` // bytes of state moved
	MoveTime      time.Duration `json:"move_ns"`          // checkpoint start to restored
	LargestGap    time.Duration `json:"largest_gap_ns"`   // longest time the client received nothing
	SentBytes     int64         `json:"sent_bytes"`       // by the server in the container
	ReceivedBytes int64         `json:"received_bytes"`   // by the client
	Survived      bool          `json:"connection_survived"`
	ClientError   string        `json:"client_error,omitempty"`
}

// Simple container networking for the testbed until the overlay exists: the container's
// own namespace (same path, address and MAC on every host) hangs off its host by a veth,
// and the client routes the container's address to the host it runs on.
const (
	demoNetNS = "ctr-web"
	demoIP    = "10.88.0.10"
	demoMAC   = "02:00:0a:58:00:0a"
)

func (tb *Testbed) plumbDemo(ctx context.Context, host string) error {
	ns := "/run/netns/" + demoNetNS
	for _, args := range [][]string{
		{"ip", "netns", "add", demoNetNS},
		{"ip", "link", "add", "c-web", "type", "veth", "peer", "name", "eth0", "netns", demoNetNS},
		{"ip", "-n", demoNetNS, "link", "set", "eth0", "address", demoMAC},
		{"ip", "-n", demoNetNS, "addr", "add", demoIP + "/32", "dev", "eth0"},
		{"ip", "-n", demoNetNS, "link", "set", "eth0", "up"},
		{"ip", "-n", demoNetNS, "link", "set", "lo", "up"},
		{"ip", "-n", demoNetNS, "route", "add", "default", "dev", "eth0"},
		{"ip", "link", "set", "c-web", "up"},
		{"sysctl", "-qw", "net.ipv4.conf.c-web.proxy_arp=1"},
		{"ip", "route", "replace", demoIP + "/32", "dev", "c-web"},
	} {
		if _, err := tb.Run(ctx, host, args...); err != nil {
			return fmt.Errorf("plumb %s on %s: %w", ns, host, err)
		}
	}
	return nil
}

func (tb *Testbed) unplumbDemo(ctx context.Context, host string) error {
	_, err := tb.Run(ctx, host, "ip", "netns", "delete", demoNetNS)
	tb.Run(ctx, host, "ip", "route", "del", demoIP+"/32")
	return err
}

// RunDemo starts an iperf3 server in a container on from, streams to the client for
// duration, and after a third of it moves the container to to: checkpoint on from's
// podman, streamed into a restore on to's podman, the client's route re-pointed.
func (tb *Testbed) RunDemo(ctx context.Context, from, to string, duration time.Duration) (*Demo, error) {
	d := &Demo{Container: "web", From: from, To: to}
	if h, err := tb.Host(ClientName); err == nil {
		d.Link = h.Link
	}
	src, err := tb.podman(ctx, from)
	if err != nil {
		return nil, err
	}
	dst, err := tb.podman(ctx, to)
	if err != nil {
		return nil, err
	}
	if err := tb.plumbDemo(ctx, from); err != nil {
		return nil, err
	}
	if _, err := tb.Run(ctx, from, "podman", "run", "-d", "--name", "web", "--network", "ns:/run/netns/"+demoNetNS,
		ImageV1, "iperf3", "-s"); err != nil {
		return nil, err
	}
	if _, err := tb.Run(ctx, ClientName, "ip", "route", "replace", demoIP+"/32", "via", mustHost(tb, from).UnderlayIP.String()); err != nil {
		return nil, err
	}
	time.Sleep(500 * time.Millisecond) // iperf3 -s listening

	// The client receives (-R): it sees exactly when data stops and starts again. A byte
	// count (-n) rather than a time (-t) ends the test only when the receiver has every
	// byte, so "sent == received" is exact (with -t iperf3 reports them unequal even
	// without a move).
	rate := d.Link.RateMbit
	if rate <= 0 {
		rate = 400 // roughly what an unshaped testbed link carries
	}
	// iperf3 sends whole blocks: a count that is not a multiple of the block length ends
	// the receiver short of what was sent.
	const block = 128 << 10
	n := int64(rate*1e6/8*duration.Seconds()*0.9) / block * block
	client, err := tb.Command(ctx, ClientName, "iperf3", "-c", demoIP, "-R", "-l", fmt.Sprint(block),
		"-n", fmt.Sprint(n), "-i", "0.1", "-J")
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	client.Stdout = &out
	if err := client.Start(); err != nil {
		return nil, fmt.Errorf("iperf3 client: %w", err)
	}
	clientDone := make(chan error, 1)
	go func() { clientDone <- client.Wait() }()

	select {
	case <-time.After(duration / 3):
	case err := <-clientDone:
		return nil, fmt.Errorf("iperf3 client ended before the move: %v: %s", err, out.String())
	}
	slog.Info("moving", "container", "web", "from", from, "to", to)
	start := time.Now()
	if err := tb.plumbDemo(ctx, to); err != nil {
		return nil, err
	}
	// Until the container runs on the target, the source drops what arrives for it: no RST
	// from a namespace whose sockets are gone; the client retransmits to the new host.
	if _, err := tb.Run(ctx, from, "ip", "route", "replace", "blackhole", demoIP+"/32"); err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	expErr := make(chan error, 1)
	go func() {
		_, err := src.Export(ctx, "web", pw, checkpoint.Options{TCPEstablished: true})
		pw.CloseWithError(err)
		expErr <- err
	}()
	res, impErr := dst.Import(ctx, pr, checkpoint.RestoreOptions{TCPEstablished: true})
	if err := <-expErr; err != nil {
		return nil, fmt.Errorf("checkpoint on %s: %w", from, err)
	}
	if impErr != nil {
		return nil, fmt.Errorf("restore on %s: %w", to, impErr)
	}
	if _, err := tb.Run(ctx, ClientName, "ip", "route", "replace", demoIP+"/32", "via", mustHost(tb, to).UnderlayIP.String()); err != nil {
		return nil, err
	}
	d.MoveTime = time.Since(start)
	d.CheckpointB = res.Bytes
	if err := src.Remove(ctx, "web"); err != nil {
		slog.Warn("remove the source's copy", "err", err)
	}
	tb.unplumbDemo(ctx, from)

	cerr := <-clientDone
	if cerr != nil {
		d.ClientError = cerr.Error()
	}
	if err := d.parseIperf(out.Bytes()); err != nil && d.ClientError == "" {
		d.ClientError = err.Error()
	}
	d.Survived = cerr == nil && d.ClientError == "" && d.SentBytes > 0 && d.SentBytes == d.ReceivedBytes
	return d, nil
}

func mustHost(tb *Testbed, name string) *Host {
	h, err := tb.Host(name)
	if err != nil {
		panic(err)
	}
	return h
}

func (tb *Testbed) podman(ctx context.Context, host string) (*checkpoint.Podman, error) {
	h, err := tb.Host(host)
	if err != nil {
		return nil, err
	}
	return checkpoint.Connect(ctx, h.PodmanURI)
}

// iperfResult is the part of iperf3's JSON the demo reads.
type iperfResult struct {
	Intervals []struct {
		Sum struct {
			Start, End float64
			Bytes      int64
		} `json:"sum"`
	} `json:"intervals"`
	End struct {
		SumSent     struct{ Bytes int64 } `json:"sum_sent"`
		SumReceived struct{ Bytes int64 } `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
}

func (d *Demo) parseIperf(b []byte) error {
	gap, sent, recv, err := IperfStream(b)
	if err != nil {
		return err
	}
	d.LargestGap, d.SentBytes, d.ReceivedBytes = gap, sent, recv
	return nil
}

// IperfStream reads iperf3's JSON (-J, with -i intervals) and returns the longest run of
// intervals in which nothing arrived, and the bytes sent and received.
func IperfStream(b []byte) (gap time.Duration, sent, received int64, err error) {
	var r iperfResult
	if err := json.Unmarshal(b, &r); err != nil {
		return 0, 0, 0, fmt.Errorf("iperf3 output: %w", err)
	}
	if r.Error != "" {
		return 0, 0, 0, fmt.Errorf("iperf3: %s", r.Error)
	}
	var longest, run float64
	for _, iv := range r.Intervals {
		if iv.Sum.Bytes == 0 {
			run += iv.Sum.End - iv.Sum.Start
			longest = max(longest, run)
		} else {
			run = 0
		}
	}
	return time.Duration(longest * float64(time.Second)), r.End.SumSent.Bytes, r.End.SumReceived.Bytes, nil
}
