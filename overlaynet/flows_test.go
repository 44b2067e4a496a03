package overlaynet

import (
	"context"
	"net/netip"
	"os"
	"sort"
	"strings"
	"testing"
	"time"
)

func table(o *OVS) []string {
	var out []string
	for _, f := range o.flows() {
		b, err := f.MarshalText()
		if err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	sort.Strings(out)
	return out
}

func has(t *testing.T, flows []string, parts ...string) {
	t.Helper()
	for _, f := range flows {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(f, p)
		}
		if ok {
			return
		}
	}
	t.Errorf("no flow with %q in:\n%s", parts, strings.Join(flows, "\n"))
}

// webNode is node a running web (port 3) with tunnels to b (5) and the client's node (6).
func webNode() *OVS {
	o := NewOVS(Config{Host: "a"})
	o.tunnels = map[string]int{"b": 5, "client": 6}
	o.local = map[string]int{"02:4d:0a:58:00:0a": 3}
	o.locs = map[string]Location{
		"02:4d:0a:58:00:0a": {Name: "web", MAC: "02:4d:0a:58:00:0a", IP: netip.MustParseAddr("10.88.0.10"), Host: "a"},
		"02:4d:0a:58:ff:01": {Name: "client", MAC: "02:4d:0a:58:ff:01", Host: "client"},
	}
	return o
}

func TestFlowsFollowLocations(t *testing.T) {
	o := webNode()
	f := table(o)
	has(t, f, "priority=100", "dl_dst=02:4d:0a:58:00:0a", "actions=output:3")
	has(t, f, "priority=100", "dl_dst=02:4d:0a:58:ff:01", "actions=output:6")
	// Broadcasts from a tunnel reach only local ports (no loops in the full mesh).
	has(t, f, "priority=50", "in_port=5", "actions=output:3")
	has(t, f, "priority=50", "in_port=6", "actions=output:3")
	has(t, f, "priority=40", "actions=flood")
	has(t, f, "priority=0", "actions=drop")

	// Moved to b: the same MAC now goes into the tunnel to b.
	l := o.locs["02:4d:0a:58:00:0a"]
	l.Host = "b"
	o.locs[l.MAC] = l
	f = table(o)
	has(t, f, "priority=100", "dl_dst=02:4d:0a:58:00:0a", "actions=output:5")

	// Frozen during a move: dropped above every other rule, or, with a hold port, kept
	// there until the container runs again.
	o.frozen["02:4d:0a:58:00:0a"] = true
	has(t, table(o), "priority=200", "dl_dst=02:4d:0a:58:00:0a", "actions=drop")
	o.hold = 9
	has(t, table(o), "priority=200", "dl_dst=02:4d:0a:58:00:0a", "actions=output:9")
}

// A container frozen on its own node sends nothing either once muted (its processes
// frozen): its sockets' retransmits after CRIU's dump would carry timestamps the restored
// copy has not reached (PAWS). Before that its replies go out.
func TestFrozenLocalContainerIsMute(t *testing.T) {
	o := NewOVS(Config{Host: "a"})
	o.tunnels = map[string]int{"b": 5}
	o.local = map[string]int{"02:4d:0a:58:00:0a": 3}
	o.locs = map[string]Location{"02:4d:0a:58:00:0a": {Name: "web", MAC: "02:4d:0a:58:00:0a", Host: "a"}}
	mute := func() bool {
		for _, f := range table(o) {
			if strings.Contains(f, "priority=300") && strings.Contains(f, "in_port=3") && strings.Contains(f, "actions=drop") {
				return true
			}
		}
		return false
	}
	if mute() {
		t.Fatal("a running local container is mute")
	}
	o.frozen["02:4d:0a:58:00:0a"] = true
	if mute() {
		t.Fatal("a container whose traffic is held is mute before its processes are frozen")
	}
	o.muted["02:4d:0a:58:00:0a"] = true
	if !mute() {
		t.Fatalf("a muted local container still sends:\n%s", strings.Join(table(o), "\n"))
	}
	delete(o.frozen, "02:4d:0a:58:00:0a")
	delete(o.muted, "02:4d:0a:58:00:0a")
	if mute() {
		t.Fatal("a thawed container stays mute")
	}
}

func TestFlowsWithoutLocalPortsDropTunnelBroadcasts(t *testing.T) {
	o := NewOVS(Config{Host: "a"})
	o.tunnels = map[string]int{"b": 5}
	has(t, table(o), "priority=50", "in_port=5", "actions=drop")
}

func TestEndpointNames(t *testing.T) {
	e := NewEndpoint("web", netip.MustParsePrefix("10.88.0.10/16"))
	if e.MAC != "02:4d:0a:58:00:0a" || e.NetNS != "mig-web" || e.NetNSPath() != "/run/netns/mig-web" {
		t.Fatalf("%+v", e)
	}
	if p := e.Port(); len(p) > 15 || !strings.HasPrefix(p, "m-") {
		t.Fatalf("port name %q must be a valid interface name", p)
	}
	if NewEndpoint("web2", e.Prefix).Port() == e.Port() {
		t.Fatal("ports of different endpoints must differ")
	}
}

// A restarted node starts from the table it kept: remote endpoints whose host it still
// tunnels to are back in its first flow table; endpoints of hosts it no longer knows, and
// local ones whose port is gone, are not.
func TestLocationTableSurvivesARestart(t *testing.T) {
	file := t.TempDir() + "/locations.json"
	o := NewOVS(Config{Host: "a", StateFile: file})
	o.tunnels = map[string]int{"b": 5}
	o.locs = map[string]Location{
		"02:4d:0a:58:00:0a": {Name: "web", MAC: "02:4d:0a:58:00:0a", IP: netip.MustParseAddr("10.88.0.10"), Host: "b"},
		"02:4d:0a:58:00:0b": {Name: "db", MAC: "02:4d:0a:58:00:0b", IP: netip.MustParseAddr("10.88.0.11"), Host: "gone"},
		"02:4d:0a:58:00:0c": {Name: "nosuchport-xyz", MAC: "02:4d:0a:58:00:0c", IP: netip.MustParseAddr("10.88.0.12"), Host: "a"},
	}
	o.saveLocked()
	// A freeze changes flows, not locations: the file is not written again.
	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	os.Chtimes(file, st.ModTime().Add(-time.Hour), st.ModTime().Add(-time.Hour))
	o.frozen["02:4d:0a:58:00:0a"] = true
	o.saveLocked()
	if st2, _ := os.Stat(file); !st2.ModTime().Equal(st.ModTime().Add(-time.Hour)) {
		t.Error("the location table was written again though no location changed")
	}

	r := NewOVS(Config{Host: "a", StateFile: file})
	r.tunnels = map[string]int{"b": 5}
	r.loadLocked(context.Background())
	if len(r.locs) != 1 || r.locs["02:4d:0a:58:00:0a"].Host != "b" {
		t.Fatalf("restored %v", r.locs)
	}
	has(t, table(r), "dl_dst=02:4d:0a:58:00:0a", "output:5")
}

// A copy restored here for a move, before it is told to run here, sends into the hold
// port (kept there until the decision); a copy frozen here sends nowhere.
func TestRestoredCopySendsIntoTheHold(t *testing.T) {
	o := NewOVS(Config{Host: "b"})
	o.tunnels = map[string]int{"a": 5}
	o.local = map[string]int{"02:4d:0a:58:00:0a": 3}
	o.locs = map[string]Location{"02:4d:0a:58:00:0a": {Name: "web", MAC: "02:4d:0a:58:00:0a", Host: "a"}}
	has(t, table(o), "priority=300", "in_port=3", "actions=drop") // no hold port: dropped
	o.hold = 9
	has(t, table(o), "priority=300", "in_port=3", "actions=output:9")
	o.frozen["02:4d:0a:58:00:0a"], o.muted["02:4d:0a:58:00:0a"] = true, true
	has(t, table(o), "priority=300", "in_port=3", "actions=drop")
}

// What the bound loses is counted per MAC held: releasing one (a target's restored copy)
// neither takes nor clears the losses of another (a container frozen on the same node).
func TestHolderCountsLossesPerMAC(t *testing.T) {
	h := &Holder{fd: -1, max: 0, held: map[string]*kept{}, from: map[string]*kept{}} // every frame over the bound
	frozen, restored := "02:4d:0a:58:00:0a", "02:4d:0a:58:00:0b"
	h.Hold(frozen)
	h.HoldFrom(restored)
	frame := make([]byte, 60)
	for i := 0; i < 3; i++ {
		h.keep(h.held, frozen, frame)
	}
	h.keep(h.from, restored, frame)
	if h.keep(h.held, "02:4d:0a:58:00:0c", frame) {
		t.Fatal("a frame for a MAC not held was kept")
	}
	if _, lost, _ := h.ReleaseFrom(restored); lost != 1 {
		t.Fatalf("the restored copy lost %d frames, want 1", lost)
	}
	if n, lost, err := h.Release(frozen); n != 0 || lost != 3 || err != nil {
		t.Fatalf("the frozen container: %d released, %d lost, %v; want 0, 3, nil", n, lost, err)
	}
}
