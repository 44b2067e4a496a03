package testbed

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/migrate-project/migrate/transfer"
)

// Demo is what the README's demo measures.
type Demo struct {
	Container     string               `json:"container"`
	From          string               `json:"from"`
	To            string               `json:"to"`
	Link          Link                 `json:"link"`
	Push          *transfer.PushResult `json:"push"`
	LargestGap    time.Duration        `json:"largest_gap_ns"` // longest time the client received nothing
	SentBytes     int64                `json:"sent_bytes"`     // by the server in the container
	ReceivedBytes int64                `json:"received_bytes"` // by the client
	// Stream is the exact byte stream that ran beside iperf3 on its own connection.
	Stream      Stream `json:"stream"`
	Survived    bool   `json:"connection_survived"`
	ClientError string `json:"client_error,omitempty"`
}

// DemoIP is the demo container's overlay address.
const DemoIP = "10.88.0.10"

// RunDemo starts an iperf3 server in a container on the overlay on from (with `migrate
// run`), streams from it to the client over the overlay, and after a third of duration
// moves it to to with `migrate push`. The testbed must run agents.
func (tb *Testbed) RunDemo(ctx context.Context, from, to string, duration time.Duration) (*Demo, error) {
	if tb.MigrateBin == "" {
		return nil, fmt.Errorf("testbed %s runs no agents (up --agents)", tb.Name)
	}
	d := &Demo{Container: "web", From: from, To: to}
	if h, err := tb.Host(ClientName); err == nil {
		d.Link = h.Link
	}
	streamBytes := int64(10e6 / 8 * duration.Seconds()) // 10 Mbit/s for the whole demo
	if out, err := tb.Migrate(ctx, ClientName, "run", "--on", from, "--name", "web", "--ip", DemoIP+"/16",
		ImageV1, "sh", "-c", StreamServe(streamBytes, 10)).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("migrate run: %v: %s", err, out)
	}
	time.Sleep(500 * time.Millisecond) // iperf3 -s listening

	// The client receives (-R): it sees exactly when data stops and starts again. A byte
	// count (-n) rather than a time (-t) ends the test only when the receiver has every
	// byte, so "sent == received" is exact; iperf3 sends whole blocks, so the count is a
	// multiple of the block length.
	rate := d.Link.RateMbit
	if rate <= 0 {
		rate = 300 // roughly what an unshaped testbed overlay carries
	}
	const block = 128 << 10
	n := int64(rate*1e6/8*duration.Seconds()*0.9) / block * block
	client, err := tb.Command(ctx, ClientName, "iperf3", "-c", DemoIP, "-R", "-l", fmt.Sprint(block),
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
	stream, streamOut, err := tb.StreamClient(ctx, DemoIP, streamBytes)
	if err != nil {
		return nil, err
	}

	select {
	case <-time.After(duration / 3):
	case err := <-clientDone:
		return nil, fmt.Errorf("iperf3 client ended before the move: %v: %s", err, out.String())
	}
	slog.Info("migrate push", "container", "web", "from", from, "to", to)
	pout, perr := tb.Migrate(ctx, ClientName, "--json", "push", "web", "--to", to).Output()
	res, _, err := ParsePush(pout)
	if err != nil {
		return nil, fmt.Errorf("migrate push: %v (%v)", err, perr)
	}
	d.Push = res

	cerr := <-clientDone
	if cerr != nil {
		d.ClientError = cerr.Error()
	}
	gap, sent, recv, err := IperfStream(out.Bytes())
	if err != nil && d.ClientError == "" {
		d.ClientError = err.Error()
	}
	d.LargestGap, d.SentBytes, d.ReceivedBytes = gap, sent, recv
	serr := stream.Wait()
	d.Stream, err = ParseStream(streamOut.Bytes())
	if (serr != nil || err != nil || !d.Stream.Intact()) && d.ClientError == "" {
		d.ClientError = fmt.Sprintf("byte stream: %v %v %s", serr, err, d.Stream.Error)
	}
	// iperf3's own sent/received figures can differ at its end of test (its last write may
	// be partial, and it stops reading with bytes in flight); the exact stream is the proof.
	d.Survived = res.OK && cerr == nil && d.ClientError == "" && recv > 0 && d.Stream.Intact()
	return d, nil
}

// iperfResult is the part of iperf3's JSON the testbed reads.
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

// ParseEvent reads one line of `migrate --json push`'s output.
func ParseEvent(line []byte) (transfer.Event, error) {
	var ev transfer.Event
	if err := json.Unmarshal(line, &ev); err != nil {
		return ev, fmt.Errorf("push output line %.200q: %w", line, err)
	}
	if ev.Kind == "" {
		return ev, fmt.Errorf("push output line %.200q: not an event", line)
	}
	return ev, nil
}

// ParsePush reads the output of `migrate --json push`: one event per line, the result
// last. It also checks that every line is an event.
func ParsePush(out []byte) (*transfer.PushResult, []transfer.Event, error) {
	var evs []transfer.Event
	for _, line := range bytes.Split(bytes.TrimSpace(out), []byte("\n")) {
		var ev transfer.Event
		if err := json.Unmarshal(line, &ev); err != nil {
			return nil, evs, fmt.Errorf("push output line %q: %w", line, err)
		}
		evs = append(evs, ev)
	}
	if len(evs) == 0 || evs[len(evs)-1].Kind != "result" || evs[len(evs)-1].Result == nil {
		return nil, evs, fmt.Errorf("push output does not end with its result: %s", out)
	}
	return evs[len(evs)-1].Result, evs, nil
}
