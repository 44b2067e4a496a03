package testbed_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migrate-project/migrate/internal/testenv"
	"github.com/migrate-project/migrate/testbed"
	"github.com/migrate-project/migrate/transfer"
)

const webIP = "10.88.0.10"

// upAgents starts a testbed whose hosts and client run migrate's agents.
func upAgents(t *testing.T, name string, link testbed.Link) *testbed.Testbed {
	t.Helper()
	testenv.Root(t, tools...)
	dir := t.TempDir()
	return up(t, testbed.Config{Name: name, Link: link, Memload: testenv.Memload(t, dir), Agents: testenv.Migrate(t, dir)})
}

// migrate runs the CLI as the operator on the client and returns stdout, stderr, exit code.
func migrate(t *testing.T, tb *testbed.Testbed, args ...string) (string, string, int) {
	t.Helper()
	return migrateWithin(t, tb, 3*time.Minute, args...)
}

// migrateWithin is migrate with a time limit of its own (a move of a large container).
func migrateWithin(t *testing.T, tb *testbed.Testbed, limit time.Duration, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := tb.Migrate(ctx, testbed.ClientName, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("migrate %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

func mustMigrate(t *testing.T, tb *testbed.Testbed, args ...string) string {
	t.Helper()
	out, errs, code := migrate(t, tb, args...)
	if code != 0 {
		t.Fatalf("migrate %v: exit %d\n%s%s", args, code, out, errs)
	}
	return out
}

// push moves web and returns the result (--json).
func push(t *testing.T, tb *testbed.Testbed, to string) *transfer.PushResult {
	t.Helper()
	return pushArgs(t, tb, "web", "--to", to)
}

// pushArgs runs `migrate --json push ARGS` and returns the result.
func pushArgs(t *testing.T, tb *testbed.Testbed, args ...string) *transfer.PushResult {
	t.Helper()
	full := append([]string{"--json", "push"}, args...)
	out, errs, code := migrateWithin(t, tb, 20*time.Minute, full...)
	if code != 0 {
		t.Fatalf("migrate %v: exit %d\n%s%s", full, code, out, errs)
	}
	r, evs, err := testbed.ParsePush([]byte(out))
	if err != nil {
		t.Fatalf("push output: %v", err)
	}
	// The stream: phases as they happened, before the result.
	if len(evs) < 3 || evs[0].Kind != "phase" {
		t.Fatalf("push --json streamed %d events, first %+v: want the phases, then the result", len(evs), evs[0])
	}
	t.Logf("push %v: %d bytes, total %s, traffic held %s, phases %v", args, r.Bytes, r.Total, r.Frozen, r.Phases)
	return r
}

// where returns the hosts that run container name.
func where(t *testing.T, tb *testbed.Testbed, name string) []string {
	t.Helper()
	var hosts []string
	for _, h := range []string{"a", "b"} {
		out, err := tb.Run(context.Background(), h, "podman", "ps", "--filter", "name=^"+name+"$", "--format", "{{.Names}}")
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) == name {
			hosts = append(hosts, h)
		}
	}
	return hosts
}

// startClient starts a command on the client and returns a function that waits for it
// (3 minutes at most).
func startClient(t *testing.T, tb *testbed.Testbed, args ...string) func() ([]byte, error) {
	t.Helper()
	return startClientFor(t, tb, 3*time.Minute, args...)
}

// startClientFor is startClient for a client that runs longer: wait gives it limit.
func startClientFor(t *testing.T, tb *testbed.Testbed, limit time.Duration, args ...string) func() ([]byte, error) {
	t.Helper()
	cmd, err := tb.Command(context.Background(), testbed.ClientName, args...)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	return func() ([]byte, error) {
		select {
		case err := <-done:
			return out.Bytes(), err
		case <-time.After(limit):
			cmd.Process.Kill()
			return out.Bytes(), fmt.Errorf("client did not finish in %s", limit)
		}
	}
}

// iperfBytes is a byte count that iperf3 sends in whole 128 KiB blocks.
func iperfBytes(mbit float64, seconds float64) int64 {
	const block = 128 << 10
	return int64(mbit*1e6/8*seconds) / block * block
}

// traffic is what a user sends through a move: an iperf3 stream (-R, a byte count) and an
// exact byte stream whose every byte the client checks.
type traffic struct {
	iperf  func() ([]byte, error)
	iperfN int64 // the bytes iperf3 must send and receive
	stream *exec.Cmd
	out    *bytes.Buffer
}

// serve is the container command for traffic: the stream paced at streamMbit for seconds.
func serve(streamMbit, seconds float64) (string, int64) {
	n := int64(streamMbit * 1e6 / 8 * seconds)
	return testbed.StreamServe(n, streamMbit), n
}

func startTraffic(t *testing.T, tb *testbed.Testbed, iperfMbit, seconds float64, streamBytes int64) *traffic {
	t.Helper()
	n := iperfBytes(iperfMbit, seconds)
	tr := &traffic{iperfN: n, iperf: startClient(t, tb, "iperf3", "-c", webIP, "-R", "-l", "131072", "-n", fmt.Sprint(n), "-i", "0.1", "-J")}
	var err error
	tr.stream, tr.out, err = tb.StreamClient(context.Background(), webIP, streamBytes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.stream.Process.Kill() })
	return tr
}

// check waits for both and fails the test unless iperf3 finished without error and the
// exact stream arrived whole: every byte sent was received, once, unchanged.
func (tr *traffic) check(t *testing.T) {
	t.Helper()
	out, err := tr.iperf()
	if err != nil {
		t.Fatalf("iperf3 client: %v\n%s", err, out)
	}
	gap, sent, recv, err := testbed.IperfStream(out)
	// With -R the server sends and the client stops once it has received what was
	// asked: every asked byte must arrive, and at most one 128 KiB block more (CI saw
	// 140 bytes more). The server's count may exceed the client's by what was still in
	// flight when the client stopped: at most one block (CI saw 131,072 - 140 bytes).
	if err != nil || recv < tr.iperfN || recv >= tr.iperfN+131072 || sent < recv || sent-recv > 131072 {
		t.Fatalf("iperf3: asked for %d bytes, %d sent, %d received: %v", tr.iperfN, sent, recv, err)
	}
	serr := tr.stream.Wait()
	st, perr := testbed.ParseStream(tr.out.Bytes())
	if serr != nil || perr != nil || !st.Intact() {
		t.Fatalf("the byte stream did not survive: %v %v %+v\n%s", serr, perr, st, tr.out.String())
	}
	t.Logf("iperf3: %d bytes sent, %d received, largest gap %s; exact stream: %d of %d bytes, all checked, largest gap %s",
		sent, recv, gap, st.Received, st.Expected, st.LargestGap.Round(time.Millisecond))
}

// An iperf3 stream keeps its one connection through a -> b -> a.
func TestPushIperfThereAndBack(t *testing.T) {
	tb := upAgents(t, "iperf", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	cmd, n := serve(20, 14)
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1, "sh", "-c", cmd)
	waitListen(t, tb, "a", "web", 5201, testbed.StreamPort)
	tr := startTraffic(t, tb, 60, 12, n)
	// Under way: 4 MB have reached the client (half a second at 60 Mbit/s).
	waitWire(t, tb, testbed.ClientName, false, 4<<20, 30*time.Second)
	r1, w1 := pushCounted(t, tb, "a", "b", "web", "--to", "b")
	if !r1.OK {
		t.Fatalf("push to b: %+v", r1)
	}
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "b" {
		t.Fatalf("after push to b, web runs on %v", w)
	}
	// Traffic from b now: 4 MB more before moving back.
	waitWire(t, tb, testbed.ClientName, false, 4<<20, 30*time.Second)
	r2, w2 := pushCounted(t, tb, "b", "a", "web", "--to", "a")
	if !r2.OK {
		t.Fatalf("push back to a: %+v", r2)
	}
	t.Logf("into b %d bytes on the wire, into a %d", w1, w2)
	tr.check(t)
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "a" {
		t.Fatalf("after push back, web runs on %v", w)
	}
}

// sockperfThrough runs a sockperf ping-pong client against web for seconds, calls move
// after 3 s, and returns the largest gap and round trip the client saw and its replies.
// The client must end without error: no reconnect, no reset.
func sockperfThrough(t *testing.T, tb *testbed.Testbed, seconds int, move func()) (gap, rtt time.Duration, n int) {
	t.Helper()
	return sockperfAt(t, tb, webIP, seconds, move)
}

// sockperfAt runs a sockperf ping-pong client against ip:11111 for seconds, with move
// happening 3 s in, and returns the largest gap between replies.
func sockperfAt(t *testing.T, tb *testbed.Testbed, ip string, seconds int, move func()) (gap, rtt time.Duration, n int) {
	t.Helper()
	log := sockperfLog(t, tb, ip, seconds, move)
	gap, rtt, n, err := testbed.SockperfGap(log)
	if err != nil {
		t.Fatal(err)
	}
	return gap, rtt, n
}

// sockperfLog is sockperfAt's run; it returns the client's full log.
func sockperfLog(t *testing.T, tb *testbed.Testbed, ip string, seconds int, move func()) []byte {
	t.Helper()
	logf := filepath.Join(t.TempDir(), "sockperf.csv")
	// It runs for the given time, which must cover the move: wait that long and a margin.
	c0 := wireCounts(t, tb)[testbed.ClientName]
	wait := startClientFor(t, tb, time.Duration(seconds)*time.Second+time.Minute, "sockperf", "ping-pong", "--tcp", "-i", ip, "-p", "11111", "-t", fmt.Sprint(seconds), "--mps", "200", "--full-log", logf)
	// The client is under way (sockperf warms up, then pings at 200/s): 300 of its frames
	// have crossed its link.
	deadline := time.Now().Add(20 * time.Second)
	for wireCounts(t, tb)[testbed.ClientName].UpFrames-c0.UpFrames < 300 {
		if time.Now().After(deadline) {
			t.Fatal("the sockperf client sent fewer than 300 frames in 20 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	move()
	out, err := wait()
	if err != nil || bytes.Contains(out, []byte("ERROR")) {
		t.Fatalf("sockperf client: %v\n%s", err, out)
	}
	log, err := os.ReadFile(logf)
	if err != nil {
		t.Fatal(err)
	}
	return log
}

// A sockperf ping-pong client runs through a move without error or reconnect; beside it a
// UDP client proves the hold port: UDP does not retransmit, so the datagrams sent while
// the container was frozen come back only if the source held them and delivered them to
// the target.
func TestPushSockperfPingPong(t *testing.T) {
	tb := upAgents(t, "sockp", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1,
		"sh", "-c", "memload -udp-echo :7002 & exec sockperf server --tcp -p 11111")
	waitListen(t, tb, "a", "web", 11111)
	// There by CRIU's page server (podman's archive follows the memory), back by the
	// default, the read hand-over (whose target's podman imports while CRIU dumps and
	// restores while the memory crosses): both keep every connection and every datagram.
	moves := []struct {
		to   string
		args []string
	}{{"b", []string{"--handover", "page-server"}}, {"a", nil}}
	for _, mv := range moves {
		var r *transfer.PushResult
		var udp func() ([]byte, error)
		log := sockperfLog(t, tb, webIP, 10, func() {
			// The UDP client starts once sockperf runs (its frames would count as sockperf's)
			// and sends for 5 s: from before the freeze to after the switch.
			udp = startClient(t, tb, tb.MemloadBin, "-udp-ping", webIP+":7002", "-udp-rate", "200", "-for", "5s")
			if r = pushArgs(t, tb, append([]string{"web", "--to", mv.to}, mv.args...)...); !r.OK {
				t.Fatalf("push %v: %+v", mv.args, r)
			}
		})
		checkSockperfMove(t, tb, log, udp, r, mv.to)
	}
}

// checkSockperfMove checks a move of TestPushSockperfPingPong: the container on exactly
// the host it went to, the TCP connection on at its pace with a gap of the held time, and
// every UDP datagram held and delivered.
func checkSockperfMove(t *testing.T, tb *testbed.Testbed, log []byte, udp func() ([]byte, error), r *transfer.PushResult, to string) {
	t.Helper()
	gap, rtt, n, err := testbed.SockperfGap(log)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range r.Downtime {
		t.Logf("frozen phase (to %s, hand-over %s): %-90s %s", to, r.HandOver, p.Name, p.Duration)
	}
	t.Logf("sockperf through the move to %s (hand-over %s, early restore %q): %d replies, largest gap %s, largest round trip %s; traffic held %s, %d frames held, %d lost",
		to, r.HandOver, r.EarlyRestore, n, gap, rtt, r.Frozen, r.HeldFrames, r.LostFrames)
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != to {
		t.Fatalf("after the push web runs on %v", w)
	}
	if want := map[bool]string{true: transfer.HandOverPageServer, false: transfer.HandOverRead}[to == "b"]; r.HandOver != want {
		t.Errorf("the move to %s handed the memory over by %q, want %q", to, r.HandOver, want)
	}
	if r.HandOver == transfer.HandOverRead && !strings.HasPrefix(r.EarlyRestore, "yes, streamed and gated") {
		t.Errorf("the read hand-over of sockperf did not restore early, streamed and gated: %q", r.EarlyRestore)
	}
	// After the move the connection carries on at the client's pace, 200 a second. Judged
	// on what follows the gap alone: the total count also holds sockperf's warm-up and
	// the machine's load before the move (1,582-1,968 of 2,000 measured).
	if rate, after, err := testbed.SockperfRateAfterGap(log); err != nil {
		t.Error(err)
	} else if rate < 0.8*200 {
		t.Errorf("after the move sockperf got %.0f replies a second (%d replies), want at least 160 of its 200", rate, after)
	}
	// TCP's gap: the held time and a round trip (8-9 ms more measured; 158-191 ms more
	// before the target learnt it ran the container ahead of the release, the held pings
	// then lost and resent by TCP).
	if gap > r.Frozen+tcpGapMargin {
		t.Errorf("sockperf's gap %s exceeds the time traffic was held (%s) by more than %s", gap.Round(time.Millisecond), r.Frozen.Round(time.Millisecond), tcpGapMargin)
	}

	// The hold port, through UDP: 200 datagrams a second, each echoed.
	out, err := udp()
	if err != nil {
		t.Fatalf("udp client: %v\n%s", err, out)
	}
	u, err := testbed.ParseUDP(out)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("udp through the move: %d sent, %d echoed, %d lost, largest gap %s", u.Sent, u.Echoed, u.Lost, u.LargestGap.Round(time.Millisecond))
	// Every datagram sent while frozen was held: about 200 a second of the held time.
	if want := int(0.8 * 200 * r.Frozen.Seconds()); r.HeldFrames < want || r.LostFrames != 0 {
		t.Errorf("the hold kept %d frames and lost %d in %s: want at least %d (80%% of 200/s), none lost", r.HeldFrames, r.LostFrames, r.Frozen, want)
	}
	// ... and delivered: none lost (2 allowed: a datagram in the socket's queue as CRIU
	// dumps it, which CRIU does not keep).
	if u.Sent < 950 || u.Lost > udpLossAllowed {
		t.Errorf("%d of %d datagrams did not come back (allowed %d): the hold did not deliver what it kept", u.Lost, u.Sent, udpLossAllowed)
	}
	// The held ones come back at once when the target takes over: the gap is the held time.
	if d := u.LargestGap - r.Frozen; d < -holdMargin || d > holdMargin {
		t.Errorf("the UDP client's gap %s is %s from the time traffic was held (%s): want within %s",
			u.LargestGap.Round(time.Millisecond), d.Round(time.Millisecond), r.Frozen.Round(time.Millisecond), holdMargin)
	}
}

const (
	// holdMargin: how far the UDP client's largest gap may be from the time traffic was
	// held (measured 2-11 ms over it).
	holdMargin = 100 * time.Millisecond
	// udpLossAllowed: datagrams the move may lose with a working hold (measured 0 of
	// 1,000 and of 2,000; a hold that drops loses about 150).
	udpLossAllowed = 2
	// tcpGapMargin: sockperf's gap over the held time (measured 8-9 ms).
	tcpGapMargin = 100 * time.Millisecond
)

// The target's agent dies mid-transfer: the container keeps running on the source with its
// connection, and the target keeps nothing once its agent is back.
func TestPushTargetAgentKilledMidTransfer(t *testing.T) {
	tb := upAgents(t, "kill", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	// 256 MiB of memory take about 20 s over the 100 Mbit/s link.
	cmd, n := serve(10, 45)
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1,
		"sh", "-c", "memload -size 256 -rate 100 & "+cmd)
	waitListen(t, tb, "a", "web", 5201, testbed.StreamPort)
	tr := startTraffic(t, tb, 60, 40, n)
	waitWire(t, tb, testbed.ClientName, false, 4<<20, 30*time.Second)

	p := startPush(t, tb, "push", "web", "--to", "b", "--mode", "stop-copy")
	p.transferred(32 << 20) // dump done, transfer under way
	pid, err := tb.AgentPID("b")
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.wait(4)
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "a" {
		t.Fatalf("after the failed move web runs on %v, want a", w)
	}
	tr.check(t)

	// b's agent comes back (as a supervisor would restart it) and undoes the half move.
	if err := tb.StartAgent(context.Background(), "b"); err != nil {
		t.Fatal(err)
	}
	if err := tb.WaitAgent(context.Background(), "b"); err != nil {
		t.Fatal(err)
	}
	// It asks a, learns the move was rolled back, and drops its half; a then hears b
	// confirm and drops its journal entry.
	waitSettled(t, tb, 90*time.Second)
	noTraces(t, tb, "b")
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "a" {
		t.Fatalf("after b settled web runs on %v, want a", w)
	}
}

// Bad requests are refused with a message that says what is wrong, and nothing moves:
// a peer with a foreign certificate, an unknown container or host, a container not on
// the overlay, a name or address that the target already has.
func TestRefusals(t *testing.T) {
	tb := upAgents(t, "auth", testbed.Link{})
	ctx := context.Background()
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1, "sleep", "600")
	if _, err := tb.Run(ctx, "a", "podman", "run", "-d", "--name", "plain", "--network", "none", testbed.ImageV1, "sleep", "600"); err != nil {
		t.Fatal(err)
	}
	if _, err := tb.Run(ctx, "b", "podman", "create", "--name", "web", "--network", "none", testbed.ImageV1, "true"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"push", "nosuch", "--to", "b"}, 1, "no host runs a container named nosuch"},
		{[]string{"push", "web", "--to", "zz"}, 2, `unknown host "zz"`},
		{[]string{"push", "plain", "--to", "b"}, 1, "not on the overlay"},
		{[]string{"push", "web", "--to", "b", "--dry-run"}, 1, `name: source "web", target "taken"`},
		{[]string{"push", "web", "--to", "b"}, 1, `name: source "web", target "taken"`},
		{[]string{"push", "web", "--to", "a"}, 1, "already runs on a"},
		{[]string{"run", "--on", "b", "--name", "web2", "--ip", webIP + "/16", testbed.ImageV1, "true"}, 1, "is taken by web on a"},
		{[]string{"push"}, 2, "Required flag"},
		{[]string{"push", "web", "--to", "client"}, 1, "runs no containers"},
	} {
		out, errs, code := migrate(t, tb, tc.args...)
		if code != tc.code || !strings.Contains(out+errs, tc.want) {
			t.Errorf("migrate %v: exit %d, want %d with %q:\n%s%s", tc.args, code, tc.code, tc.want, out, errs)
		}
	}
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "a" {
		t.Errorf("after refused pushes web runs on %v, want a", w)
	}

	// Reproduction 2 of the crash-safety issue: the client's node certificate (issued by
	// the installation's own authority) force-removed web through /v1/abort. A node may
	// learn locations and nothing more: every path that acts is refused, and web runs on.
	certs := filepath.Join(testbed.StateRoot, "auth", "certs")
	ha, err := tb.Host("a")
	if err != nil {
		t.Fatal(err)
	}
	for _, req := range []struct{ path, body string }{
		{transfer.PathAbort, `{"container":"web","source":"a"}`},
		{transfer.PathLocate, `{"name":"web","mac":"02:4d:0a:58:00:0a","ip":"10.88.0.10","host":"b"}`},
		{transfer.PathPush, `{"container":"web","to":"b"}`},
		{transfer.PathRun, `{"name":"x","image":"` + testbed.ImageV1 + `","ip":"10.88.0.99/16"}`},
	} {
		out, err := tb.Run(ctx, testbed.ClientName, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
			"--cert", filepath.Join(certs, "client.pem"), "--key", filepath.Join(certs, "client-key.pem"), "--cacert", filepath.Join(certs, "ca.pem"),
			"-X", "POST", "-H", "Content-Type: application/json", "-d", req.body,
			fmt.Sprintf("https://%s:%d%s", ha.UnderlayIP, testbed.AgentPort, req.path))
		if err != nil {
			t.Fatalf("curl %s: %v %s", req.path, err, out)
		}
		if strings.TrimSpace(out) != "403" {
			t.Errorf("POST %s with the client's node certificate: HTTP %s, want 403", req.path, out)
		}
	}
	if out, errs, code := migrate(t, tb, "push", "web", "--to", "b", "--identity", "client"); code == 0 || !strings.Contains(out+errs, "may not do this") {
		t.Errorf("push with a node certificate: exit %d\n%s%s", code, out, errs)
	}
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "a" {
		t.Fatalf("after a node's requests web runs on %v, want a", w)
	}

	// An intruder that trusts the installation's authority but whose own certificate
	// another authority issued: the agents refuse it.
	rogue := filepath.Join(testbed.StateRoot, "auth", "rogue")
	if err := transfer.InitCA(rogue); err != nil {
		t.Fatal(err)
	}
	if err := transfer.Issue(rogue, "operator", transfer.IssueOptions{Role: transfer.RoleOperator}); err != nil {
		t.Fatal(err)
	}
	realCA, err := os.ReadFile(filepath.Join(testbed.StateRoot, "auth", "certs", "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(rogue, "ca.pem"), realCA, 0o644)
	out, errs, code := migrate(t, tb, "status", "--certs", rogue)
	if code == 0 || !strings.Contains(errs+out, "not authenticated") {
		t.Fatalf("an agent accepted a certificate from a foreign authority (exit %d):\n%s%s", code, out, errs)
	}
	t.Logf("agent refused the rogue: %.200s", lastLine(errs))

	dir := filepath.Join(testbed.StateRoot, "auth", "intruder")
	if err := transfer.InitCA(dir); err != nil {
		t.Fatal(err)
	}
	if err := transfer.Issue(dir, "operator", transfer.IssueOptions{Role: transfer.RoleOperator}); err != nil {
		t.Fatal(err)
	}
	// A stranger altogether: its side refuses the agents' certificates.
	out, errs, code = migrate(t, tb, "status", "--certs", dir)
	if code == 0 || !strings.Contains(errs+out, "not authenticated") {
		t.Fatalf("a foreign certificate was not refused (exit %d):\n%s%s", code, out, errs)
	}
	t.Logf("refused: %s", lastLine(errs))
	// With the right certificate the same command works.
	mustMigrate(t, tb, "status")
}

func lastLine(s string) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return l[len(l)-1]
}

// Downtime at 100 Mbit/s as a sockperf ping-pong client sees it: `migrate push` and the
// stock sequence, side by side on one testbed. Both must keep the connection; the figures
// go to the log (and the issue note), not into a timed assertion.
func TestDowntimePushVersusStock(t *testing.T) {
	tb := upAgents(t, "stock", testbed.Link{RateMbit: 100})
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1, "sockperf", "server", "--tcp", "-p", "11111")
	waitListen(t, tb, "a", "web", 11111)
	measure := func(label string, move func() string) {
		var detail string
		gap, rtt, n := sockperfThrough(t, tb, 9, func() { detail = move() })
		t.Logf("%-12s largest gap %7s  largest round trip %7s  replies %d  %s", label, gap.Round(time.Millisecond), rtt.Round(time.Millisecond), n, detail)
	}
	measure("migrate push", func() string {
		r := push(t, tb, "b")
		if !r.OK {
			t.Fatalf("push: %+v", r)
		}
		return fmt.Sprintf("(bytes %d, total %s, held %s)", r.Bytes, r.Total.Round(time.Millisecond), r.Frozen.Round(time.Millisecond))
	})
	measure("stock", func() string {
		r, err := tb.StockMove(context.Background(), "web", webIP+"/16", "b", "a")
		if err != nil {
			t.Fatalf("stock move: %v", err)
		}
		return fmt.Sprintf("(bytes %d, checkpoint %s, copy %s, restore %s, re-point %s, total %s)", r.Bytes,
			r.Checkpoint.Round(time.Millisecond), r.Copy.Round(time.Millisecond), r.Restore.Round(time.Millisecond),
			r.Repoint.Round(time.Millisecond), r.Total.Round(time.Millisecond))
	})
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "a" {
		t.Errorf("after both moves web runs on %v, want a", w)
	}
}

// The link to the target is cut (every frame dropped, no reset) mid-transfer: push rolls
// back when the transfer stalls, the container and its connection go on on the source, and
// the target cleans up by itself once the link is back.
func TestPushLinkCutMidTransfer(t *testing.T) {
	link := testbed.Link{RateMbit: 100, Delay: time.Millisecond}
	tb := upAgents(t, "cut", link)
	ctx := context.Background()
	cmd, n := serve(10, 50)
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1,
		"sh", "-c", "memload -size 256 -rate 100 & "+cmd)
	waitListen(t, tb, "a", "web", 5201, testbed.StreamPort)
	tr := startTraffic(t, tb, 50, 45, n)
	waitWire(t, tb, testbed.ClientName, false, 4<<20, 30*time.Second)

	p := startPush(t, tb, "push", "web", "--to", "b", "--mode", "stop-copy", "--stall-timeout", "5s")
	p.transferred(32 << 20) // the transfer is under way
	if err := tb.SetLink("b", testbed.Link{RateMbit: 100, Delay: time.Millisecond, Loss: 100}); err != nil {
		t.Fatal(err)
	}
	p.wait(4)
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "a" {
		t.Fatalf("after the cut web runs on %v, want a", w)
	}
	if err := tb.SetLink("b", link); err != nil {
		t.Fatal(err)
	}
	tr.check(t)
	// b notices the dead transfer (keepalive) and undoes its half of the move.
	deadline := time.Now().Add(90 * time.Second)
	for {
		// A failing command is a failure, not an empty (clean-looking) answer.
		ns, err := tb.Run(ctx, "b", "ip", "netns", "list")
		if err != nil {
			t.Fatalf("ip netns list on b: %v", err)
		}
		ps, err := tb.Run(ctx, "b", "podman", "ps", "-a", "--format", "{{.Names}}")
		if err != nil {
			t.Fatalf("podman ps on b: %v", err)
		}
		if !strings.Contains(ns, "mig-web") && strings.TrimSpace(ps) == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("b still holds the half move: netns %q containers %q", ns, ps)
		}
		time.Sleep(2 * time.Second)
	}
}
