package transfer

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/migrate-project/migrate/overlaynet"
)

// Unit tests of the move's commit, rollback and recovery paths with fakes for podman, the
// overlay and the peers: two hosts, a and b, each with its own journals, as after any
// crash. The invariant checked everywhere: the container runs on exactly one host.

type fakeRuntime struct {
	containers map[string]string // name -> state
	failRemove error
	restored   int
}

func (r *fakeRuntime) State(_ context.Context, name string) (string, bool, error) {
	st, ok := r.containers[name]
	return st, ok, nil
}

func (r *fakeRuntime) Remove(_ context.Context, name string) error {
	if r.failRemove != nil {
		return r.failRemove
	}
	delete(r.containers, name)
	return nil
}

func (r *fakeRuntime) Unfreeze(context.Context, string) error { return nil }

func (r *fakeRuntime) RemoveVolumes(context.Context, []string, string) error { return nil }

func (r *fakeRuntime) RestoreLocal(_ context.Context, name string) error {
	if _, ok := r.containers[name]; !ok {
		return errors.New("no such container")
	}
	r.containers[name] = "running"
	r.restored++
	return nil
}

type fakeOverlay struct {
	host   string
	locs   map[string]string // mac -> host
	local  map[string]bool
	frozen map[string]bool
	// atSwitch, if set, sees the world as the held frames are released.
	atSwitch func(loc overlaynet.Location)
}

func newFakeOverlay(host string) *fakeOverlay {
	return &fakeOverlay{host: host, locs: map[string]string{}, local: map[string]bool{}, frozen: map[string]bool{}}
}

func (o *fakeOverlay) AddLocal(loc overlaynet.Location, _ string) error {
	o.local[loc.MAC], o.locs[loc.MAC] = true, o.host
	return nil
}

func (o *fakeOverlay) Locate(loc overlaynet.Location) error {
	o.locs[loc.MAC] = loc.Host
	return nil
}

func (o *fakeOverlay) Thaw(mac string) (int, int, error) {
	n := 0
	if o.frozen[mac] {
		n = 3
	}
	delete(o.frozen, mac)
	return n, 0, nil
}

func (o *fakeOverlay) Switch(loc overlaynet.Location) (int, int, error) {
	if o.atSwitch != nil {
		o.atSwitch(loc)
	}
	o.Locate(loc)
	return o.Thaw(loc.MAC)
}

func (o *fakeOverlay) Unplumb(_ context.Context, e overlaynet.Endpoint) error {
	delete(o.local, e.MAC)
	if o.locs[e.MAC] == o.host {
		delete(o.locs, e.MAC)
	}
	return nil
}

// world is two hosts whose movers reach each other unless a link or agent is down.
type world struct {
	t     *testing.T
	hosts map[string]*mover
	rts   map[string]*fakeRuntime
	ovs   map[string]*fakeOverlay
	down  map[string]bool // agents not answering
}

type worldPeers struct {
	w    *world
	from string
}

var errDown = errors.New("connection refused")

func (p worldPeers) Client(host string) (moveClient, error) {
	return worldClient{p.w, p.from, host}, nil
}

// worldClient is one host's client of another's agent; it fails while either is down.
type worldClient struct {
	w          *world
	from, host string
}

func (c worldClient) to() (*mover, error) {
	if c.w.down[c.host] || c.w.down[c.from] {
		return nil, errDown
	}
	return c.w.hosts[c.host], nil
}

func (c worldClient) Outcome(ctx context.Context, ref MoveRef) (*MoveOutcome, error) {
	m, err := c.to()
	if err != nil {
		return nil, err
	}
	out := m.outcome(ctx, ref, false)
	return &out, nil
}

func (c worldClient) Commit(ctx context.Context, ref MoveRef) error {
	m, err := c.to()
	if err != nil {
		return err
	}
	var mv incomingMove
	if err := m.in.get(ref.Container, &mv); err == nil && mv.Prepare.Move == ref.Move {
		return m.keepIncoming(ctx, &mv)
	}
	if st, ok := c.w.rts[c.host].containers[ref.Container]; ok && st == "running" {
		return nil
	}
	return errors.New("no such move")
}

func (c worldClient) Abort(ctx context.Context, req AbortRequest) error {
	m, err := c.to()
	if err != nil {
		return err
	}
	var mv incomingMove
	if err := m.in.get(req.Container, &mv); err != nil || mv.Prepare.Move != req.Move {
		return nil
	}
	return m.undoIncoming(ctx, &mv)
}

func (p worldPeers) Announce(_ context.Context, loc overlaynet.Location) []string {
	var failed []string
	for h, o := range p.w.ovs {
		if p.w.down[h] && h != p.from {
			failed = append(failed, h)
			continue
		}
		o.locs[loc.MAC] = loc.Host
	}
	sort.Strings(failed)
	return failed
}

func (p worldPeers) LocateAt(_ context.Context, host string, loc overlaynet.Location) error {
	if p.w.down[host] && host != p.from {
		return fmt.Errorf("%s does not answer", host)
	}
	p.w.ovs[host].locs[loc.MAC] = loc.Host
	return nil
}

func newWorld(t *testing.T) *world {
	w := &world{t: t, hosts: map[string]*mover{}, rts: map[string]*fakeRuntime{}, ovs: map[string]*fakeOverlay{}, down: map[string]bool{}}
	for _, h := range []string{"a", "b"} {
		dir := t.TempDir()
		w.rts[h] = &fakeRuntime{containers: map[string]string{}}
		w.ovs[h] = newFakeOverlay(h)
		w.hosts[h] = &mover{self: h, rt: w.rts[h], ov: w.ovs[h], peers: worldPeers{w, h},
			out: journal{dir + "/outgoing"}, in: journal{dir + "/incoming"}}
	}
	return w
}

var webEP = overlaynet.NewEndpoint("web", netip.MustParsePrefix("10.88.0.10/16"))

// runsOn lists the hosts where web runs.
func (w *world) runsOn() []string {
	var out []string
	for _, h := range []string{"a", "b"} {
		if w.rts[h].containers["web"] == "running" {
			out = append(out, h)
		}
	}
	return out
}

func (w *world) mustRunOn(host string) {
	w.t.Helper()
	if got := w.runsOn(); len(got) != 1 || got[0] != host {
		w.t.Fatalf("web runs on %v, want exactly %s", got, host)
	}
}

func (w *world) journals() []string {
	var out []string
	for _, h := range []string{"a", "b"} {
		for _, n := range w.hosts[h].out.list() {
			out = append(out, h+":out:"+n)
		}
		for _, n := range w.hosts[h].in.list() {
			out = append(out, h+":in:"+n)
		}
	}
	return out
}

func (w *world) mustBeClean() {
	w.t.Helper()
	if j := w.journals(); len(j) > 0 {
		w.t.Fatalf("journal entries left: %v", j)
	}
}

// moveUpToRestored plays a move of web from a to b up to the target's restore: a journals it
// frozen (checkpointed, stopped), b restored it and journaled that. It returns a's entry.
func (w *world) moveUpToRestored() *outgoingMove {
	w.t.Helper()
	a, b := w.hosts["a"], w.hosts["b"]
	w.rts["a"].containers["web"] = "running"
	w.ovs["a"].AddLocal(webEP.Location("a"), webEP.Port())
	w.ovs["b"].Locate(webEP.Location("a"))
	mv := &outgoingMove{Move: "m1", Container: "web", Target: "b", Endpoint: webEP}
	if err := a.setOut(mv, OutStarted); err != nil {
		w.t.Fatal(err)
	}
	in := &incomingMove{Prepare: PrepareRequest{Container: "web", Move: "m1", Source: "a", Endpoint: webEP}}
	if err := b.setIn(in, InPrepared); err != nil {
		w.t.Fatal(err)
	}
	if err := a.setOut(mv, OutFrozen); err != nil {
		w.t.Fatal(err)
	}
	w.ovs["a"].frozen[webEP.MAC] = true
	w.rts["a"].containers["web"] = "exited" // checkpointed
	w.rts["b"].containers["web"] = "running"
	if err := b.setIn(in, InRestored); err != nil {
		w.t.Fatal(err)
	}
	return mv
}

// Reproduction 1 of the issue: the target's agent is killed while the source commits. The
// source keeps its decision until the target confirms; the restarted target asks and
// keeps the container.
func TestTargetKilledInCommitKeepsTheContainer(t *testing.T) {
	w := newWorld(t)
	mv := w.moveUpToRestored()
	w.down["b"] = true
	f, err := w.hosts["a"].commit(context.Background(), mv)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Pending) == 0 || !strings.Contains(f.Pending[0], "not confirmed") {
		t.Fatalf("the unconfirmed commit is not reported: %+v", f)
	}
	if f.HeldFrames != 3 {
		t.Fatalf("held frames not released: %+v", f)
	}
	w.mustRunOn("b")
	if got := w.hosts["a"].out.list(); len(got) != 1 {
		t.Fatalf("the source dropped its decision before the target confirmed: %v", got)
	}
	// b's agent restarts: it asks a.
	w.down["b"] = false
	done, err := w.hosts["b"].resolveIncoming(context.Background(), "web")
	if !done || err != nil {
		t.Fatalf("target recovery: done %v, %v", done, err)
	}
	w.mustRunOn("b")
	if w.ovs["b"].locs[webEP.MAC] != "b" || w.ovs["a"].locs[webEP.MAC] != "b" {
		t.Fatalf("overlay does not point at b: a %v b %v", w.ovs["a"].locs, w.ovs["b"].locs)
	}
	// a's settling loop retries the commit, which b confirms.
	done, _, err = w.hosts["a"].resolveOutgoing(context.Background(), "web")
	if !done || err != nil {
		t.Fatalf("source settle: done %v, %v", done, err)
	}
	w.mustRunOn("b")
	w.mustBeClean()
}

// A target that cannot ask its source keeps a container it restored: never removed on a
// guess.
func TestTargetKeepsRestoredContainerWhileSourceIsUnreachable(t *testing.T) {
	w := newWorld(t)
	w.moveUpToRestored()
	w.down["a"] = true
	done, err := w.hosts["b"].resolveIncoming(context.Background(), "web")
	if done || err == nil || !strings.Contains(err.Error(), "cannot be asked") {
		t.Fatalf("done %v, err %v", done, err)
	}
	if w.rts["b"].containers["web"] != "running" {
		t.Fatal("the target removed a container while its source could not be asked")
	}
}

// The source's agent dies while the container is frozen, before any decision: when it is
// back, the move rolls back, the target drops its copy, and the container runs on the
// source again.
func TestSourceRestartBeforeDecisionRollsBack(t *testing.T) {
	w := newWorld(t)
	w.moveUpToRestored()
	// Meanwhile the target, told nothing, asks: the move is not decided.
	out := w.hosts["a"].outcome(context.Background(), MoveRef{Container: "web", Move: "m1"}, false)
	if out.State != OutcomeInProgress {
		t.Fatalf("outcome before the source settles: %+v", out)
	}
	done, f, err := w.hosts["a"].resolveOutgoing(context.Background(), "web")
	if !done || err != nil {
		t.Fatalf("done %v %+v %v", done, f, err)
	}
	if !f.Running || w.rts["a"].restored != 1 {
		t.Fatalf("not resumed on the source: %+v", f)
	}
	w.mustRunOn("a")
	if w.ovs["a"].locs[webEP.MAC] != "a" || !w.ovs["a"].local[webEP.MAC] {
		t.Fatal("the source's overlay does not point at it again")
	}
	w.mustBeClean()
}

// The rollback's abort does not reach the target: the source keeps "aborted" and says so
// when the target asks; the target then drops its copy.
func TestRollbackReachesTheTargetLater(t *testing.T) {
	w := newWorld(t)
	mv := w.moveUpToRestored()
	w.down["b"] = true
	f, err := w.hosts["a"].abort(context.Background(), mv)
	if err == nil || !f.Running {
		t.Fatalf("rollback: %+v %v", f, err)
	}
	if got := w.runsOn(); len(got) != 2 {
		t.Fatalf("expected both copies until b learns the outcome, got %v", got)
	}
	w.down["b"] = false
	if done, err := w.hosts["b"].resolveIncoming(context.Background(), "web"); !done || err != nil {
		t.Fatalf("target recovery: %v %v", done, err)
	}
	w.mustRunOn("a")
	if done, _, err := w.hosts["a"].resolveOutgoing(context.Background(), "web"); !done || err != nil {
		t.Fatalf("source settle: %v %v", done, err)
	}
	w.mustBeClean()
}

// After the decision the source's agent dies: when it is back it finishes the commit.
func TestSourceRestartAfterDecisionCompletes(t *testing.T) {
	w := newWorld(t)
	mv := w.moveUpToRestored()
	if err := w.hosts["a"].setOut(mv, OutCommitted); err != nil {
		t.Fatal(err)
	}
	// The target asks before the source is back up: it waits.
	w.down["a"] = true
	if done, _ := w.hosts["b"].resolveIncoming(context.Background(), "web"); done {
		t.Fatal("target settled without its source")
	}
	w.down["a"] = false
	done, f, err := w.hosts["a"].resolveOutgoing(context.Background(), "web")
	if !done || err != nil {
		t.Fatalf("%v %+v %v", done, f, err)
	}
	w.mustRunOn("b")
	if _, ok := w.rts["a"].containers["web"]; ok {
		t.Fatal("the source's copy was not removed")
	}
	w.mustBeClean()
}

// A target restarted with a prepared move (nothing restored) whose source is gone drops it:
// nothing runs there, so nothing is lost.
func TestPreparedMoveWithoutSourceIsDropped(t *testing.T) {
	w := newWorld(t)
	b := w.hosts["b"]
	in := &incomingMove{Prepare: PrepareRequest{Container: "web", Move: "m1", Source: "a", Endpoint: webEP}}
	b.setIn(in, InPrepared)
	w.ovs["b"].local[webEP.MAC] = true
	w.down["a"] = true
	if done, err := b.resolveIncoming(context.Background(), "web"); !done || err != nil {
		t.Fatalf("%v %v", done, err)
	}
	if w.ovs["b"].local[webEP.MAC] {
		t.Fatal("endpoint left plumbed")
	}
	w.mustBeClean()
}

// The source has no record of the move (its state was lost) and does not run the
// container: the target keeps the only copy.
func TestUnknownOutcomeKeepsTheOnlyCopy(t *testing.T) {
	w := newWorld(t)
	w.moveUpToRestored()
	w.hosts["a"].out.remove("web")
	delete(w.rts["a"].containers, "web")
	if done, err := w.hosts["b"].resolveIncoming(context.Background(), "web"); !done || err != nil {
		t.Fatalf("%v %v", done, err)
	}
	w.mustRunOn("b")
	// ... but when the source runs it, the target's copy goes.
	w2 := newWorld(t)
	w2.moveUpToRestored()
	w2.hosts["a"].out.remove("web")
	w2.rts["a"].containers["web"] = "running"
	if done, err := w2.hosts["b"].resolveIncoming(context.Background(), "web"); !done || err != nil {
		t.Fatalf("%v %v", done, err)
	}
	w2.mustRunOn("a")
}

// Undoing a move whose container cannot be removed keeps the journal entry (to try again)
// and says so, instead of forgetting the container.
func TestUndoKeepsTheJournalWhenRemovalFails(t *testing.T) {
	w := newWorld(t)
	w.moveUpToRestored()
	w.rts["b"].failRemove = errors.New("device busy")
	var in incomingMove
	w.hosts["b"].in.get("web", &in)
	if err := w.hosts["b"].undoIncoming(context.Background(), &in); err == nil || !strings.Contains(err.Error(), "device busy") {
		t.Fatalf("undo: %v", err)
	}
	if got := w.hosts["b"].in.list(); len(got) != 1 {
		t.Fatalf("journal entry dropped although the container stayed: %v", got)
	}
}

// A rollback that cannot resume the container on the source does not claim it did.
func TestRollbackThatCannotResumeSaysSo(t *testing.T) {
	w := newWorld(t)
	mv := w.moveUpToRestored()
	delete(w.rts["a"].containers, "web")
	f, err := w.hosts["a"].abort(context.Background(), mv)
	if err == nil || f.Running {
		t.Fatalf("rollback claimed success: %+v %v", f, err)
	}
}

func TestJournalNamesAreChecked(t *testing.T) {
	j := journal{t.TempDir()}
	for _, bad := range []string{"../../etc/passwd", "a/b", "", ".hidden", "x\x00"} {
		if err := j.put(bad, map[string]int{}); err == nil {
			t.Errorf("journal accepted %q", bad)
		}
	}
	if err := j.put("web-1.a_b", map[string]int{"x": 1}); err != nil {
		t.Fatal(err)
	}
	var v map[string]int
	if err := j.get("web-1.a_b", &v); err != nil || v["x"] != 1 {
		t.Fatalf("%v %v", v, err)
	}
	if got := j.list(); len(got) != 1 || got[0] != "web-1.a_b" {
		t.Fatalf("list %v", got)
	}
}

// The frozen phase's watchdog: a long first period (podman's checkpoint before its first
// byte), then the stall timeout from the first byte on, kicks included.
func TestWatchdogTakesTheStallPeriodAfterTheFirstByte(t *testing.T) {
	wd := newWatchdog(context.Background(), time.Hour, "no first byte")
	defer wd.done(nil)
	wd.expect(20*time.Millisecond, "stalled")
	wd.kick()
	select {
	case <-wd.ctx.Done():
		if got := wd.done(errors.New("transfer failed")); got.Error() != "stalled" {
			t.Fatalf("the watchdog reported %q, want the current stage's reason", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("after the first byte a kick re-armed the watchdog with the first-byte deadline")
	}
}

// A failed restore undoes itself while the source's abort arrives: both end the move
// once, and the second finds nothing left to do (not a failed removal).
func TestConcurrentUndoEndsTheMoveOnce(t *testing.T) {
	w := newWorld(t)
	w.moveUpToRestored()
	b := w.hosts["b"]
	var in incomingMove
	if err := b.in.get("web", &in); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 2)
	for i := 0; i < 2; i++ {
		go func() { copy := in; errs <- b.undoIncoming(context.Background(), &copy) }()
	}
	for i := 0; i < 2; i++ {
		if err := <-errs; err != nil {
			t.Fatalf("undo: %v", err)
		}
	}
	if _, ok := w.rts["b"].containers["web"]; ok || len(b.in.list()) != 0 {
		t.Fatalf("b still holds the move: %v %v", w.rts["b"].containers, b.in.list())
	}
}

// The held frames are released only once the target knows it runs the container: until
// then its rules send them back to the source, where they die (OpenFlow does not send a
// frame out of the port it came in on).
func TestHeldFramesAreReleasedAfterTheTargetKnows(t *testing.T) {
	w := newWorld(t)
	mv := w.moveUpToRestored()
	var targetAtRelease string
	w.ovs["a"].atSwitch = func(loc overlaynet.Location) { targetAtRelease = w.ovs["b"].locs[loc.MAC] }
	f, err := w.hosts["a"].commit(context.Background(), mv)
	if err != nil {
		t.Fatal(err)
	}
	if targetAtRelease != "b" {
		t.Fatalf("the source released the held frames while the target's overlay pointed at %q", targetAtRelease)
	}
	if f.HeldFrames != 3 {
		t.Fatalf("held frames not released: %+v", f)
	}
	w.mustRunOn("b")
}

// A write that a crash cut short leaves its temporary file; the agent's start removes it
// and keeps the entries (each is the old one or the new one).
func TestJournalCleanRemovesCutShortWritesOnly(t *testing.T) {
	j := journal{t.TempDir()}
	if err := j.put("web", map[string]int{"x": 1}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(j.dir, tempPrefix+"123"), []byte(`{"x":`), 0o600); err != nil {
		t.Fatal(err)
	}
	j.clean()
	ents, err := os.ReadDir(j.dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || ents[0].Name() != "web.json" {
		t.Fatalf("after clean: %v", ents)
	}
	var v map[string]int
	if err := j.get("web", &v); err != nil || v["x"] != 1 {
		t.Fatalf("the entry: %v %v", v, err)
	}
}

// A restarted agent holds the traffic of the containers its journal left frozen or
// committed (until their moves are settled), not of the others.
func TestFrozenMovesFromTheJournal(t *testing.T) {
	dir := t.TempDir()
	out := journal{filepath.Join(dir, "outgoing")}
	for i, st := range []string{OutStarted, OutFrozen, OutCommitted, OutAborted} {
		name := fmt.Sprintf("c%d", i)
		mv := outgoingMove{Move: "m", Container: name, Target: "b", State: st,
			Endpoint: overlaynet.Endpoint{Name: name, MAC: fmt.Sprintf("02:00:00:00:00:%02x", i)}}
		if err := out.put(name, &mv); err != nil {
			t.Fatal(err)
		}
	}
	got := frozenMoves(dir)
	sort.Strings(got)
	if want := []string{"02:00:00:00:00:01", "02:00:00:00:00:02"}; !slices.Equal(got, want) {
		t.Fatalf("frozen after a restart: %v, want %v", got, want)
	}
}

// has tells an entry from none (a restarted agent's adoption and removal watch ask it).
func TestJournalHas(t *testing.T) {
	in := journal{filepath.Join(t.TempDir(), "incoming")}
	if in.has("web") {
		t.Fatal("an empty journal has web")
	}
	if err := in.put("web", &incomingMove{State: InRestored}); err != nil {
		t.Fatal(err)
	}
	if !in.has("web") || in.has("db") || in.has("../web") {
		t.Fatal("has does not tell web's entry from others")
	}
	if err := in.remove("web"); err != nil || in.has("web") {
		t.Fatalf("after remove: has %v, err %v", in.has("web"), err)
	}
}

// The source's abort waits for a restore of the same move still at work (its podman
// import may yet create the container), and for nothing else.
func TestAbortWaitsForTheRestoreOfItsMove(t *testing.T) {
	var m mover
	t0 := time.Now()
	m.waitRestore("m1", time.Second)
	if time.Since(t0) > 100*time.Millisecond {
		t.Fatal("waited with no restore at work")
	}
	end := m.restoreRuns("m1")
	ended := make(chan time.Time, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		ended <- time.Now()
		end()
	}()
	m.waitRestore("m2", time.Second) // another move's restore: no wait
	if time.Since(t0) > 100*time.Millisecond {
		t.Fatal("waited for another move's restore")
	}
	m.waitRestore("m1", 5*time.Second)
	select {
	case at := <-ended:
		if time.Now().Before(at) {
			t.Fatal("the wait ended before the restore")
		}
	default:
		t.Fatal("the wait ended before the restore")
	}
	t1 := time.Now()
	m.restoreRuns("m3") // never ends: the limit does
	m.waitRestore("m3", 150*time.Millisecond)
	if d := time.Since(t1); d < 150*time.Millisecond || d > time.Second {
		t.Fatalf("waited %s for a restore that never ends, want its limit of 150ms", d)
	}
}
