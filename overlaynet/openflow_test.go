package overlaynet

import (
	"bytes"
	"encoding/hex"
	"os/exec"
	"sort"
	"strings"
	"testing"

	"github.com/migrate-project/migrate/internal/testenv"
)

// movingNode is a node's state in the middle of a move: a local container frozen, a
// remote client, a hold port.
func movingNode() *OVS {
	o := webNode()
	o.hold = 9
	o.frozen["02:4d:0a:58:00:0a"] = true
	o.muted["02:4d:0a:58:00:0a"] = true
	return o
}

// fields splits a flow's text into its match fields and its actions, in a canonical form.
func fields(match, actions string) string {
	var fs []string
	for _, f := range strings.FieldsFunc(match, func(r rune) bool { return r == ',' || r == ' ' }) {
		if !strings.HasPrefix(f, "cookie") && f != "table=0" && f != "idle_timeout=0" {
			fs = append(fs, f)
		}
	}
	sort.Strings(fs)
	return strings.Join(fs, ",") + " actions=" + strings.ToLower(actions)
}

// Every flow the node makes, encoded by the fast path, is read back by OVS's own decoder
// (ovs-ofctl ofp-print) as the flow ovs-ofctl would have installed.
func TestFlowModsDecodeAsTheirFlows(t *testing.T) {
	_, err := exec.LookPath("ovs-ofctl")
	testenv.Need(t, err == nil, "needs ovs-ofctl (scripts/install.sh installs Open vSwitch)")
	for _, fl := range movingNode().flows() {
		text, err := fl.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		match, actions, _ := strings.Cut(string(text), ",actions=")
		want := fields(match, actions)
		f, err := toOF(fl)
		if err != nil {
			t.Fatalf("%s: %v", text, err)
		}
		for cmd, verb := range map[uint8]string{ofpfcAdd: "ADD", ofpfcDeleteStrict: "DEL_STRICT"} {
			out, err := exec.Command("ovs-ofctl", "ofp-print", hex.EncodeToString(encodeFlowMod(7, cmd, f))).CombinedOutput()
			if err != nil {
				t.Fatalf("ofp-print of %s: %v: %s", text, err, out)
			}
			got := string(bytes.TrimSpace(out))
			_, rest, ok := strings.Cut(got, "(xid=0x7): "+verb+" ")
			if !ok || !strings.Contains(rest, "cookie:0x4d4947") {
				t.Fatalf("%s as %s decodes as %q", text, verb, got)
			}
			m, a, _ := strings.Cut(rest, " actions=")
			want := want
			if verb == "DEL_STRICT" {
				want = fields(match, "drop") // a delete carries no actions
			}
			if g := fields(m, a); g != want {
				t.Errorf("%s as %s decodes as %q:\n got %s\nwant %s", text, verb, got, g, want)
			}
		}
	}
}

// A move's switch on the source, as the fast path sends it: the MAC points at the target
// and the dead copy's port sends into the hold port (which keeps nothing of it) before
// the hold goes; nothing else changes.
func TestSwitchIsThreeFlowMods(t *testing.T) {
	o := movingNode()
	before := mustOF(t, o)
	l := o.locs["02:4d:0a:58:00:0a"]
	l.Host = "b"
	o.locs[l.MAC] = l
	delete(o.frozen, l.MAC) // as Switch does
	delete(o.muted, l.MAC)
	add, del := ofDiff(before, mustOF(t, o))
	if len(add) != 2 || add[0].priority != 100 || add[0].dst.String() != l.MAC || len(add[0].outputs) != 1 || add[0].outputs[0] != 5 ||
		add[1].priority != 300 || add[1].inPort != 3 || len(add[1].outputs) != 1 || add[1].outputs[0] != 9 {
		t.Fatalf("adds %+v, want the MAC to the tunnel to b (port 5), then port 3 into the hold port (9)", add)
	}
	if len(del) != 1 || del[0].priority != 200 {
		t.Fatalf("deletes %+v, want the hold flow", del)
	}
	// And back: an unchanged table is no change.
	if add, del := ofDiff(before, before); len(add)+len(del) != 0 {
		t.Fatalf("a table against itself: %d adds, %d deletes", len(add), len(del))
	}
}

func mustOF(t *testing.T, o *OVS) []ofFlow {
	t.Helper()
	var out []ofFlow
	for _, fl := range o.flows() {
		f, err := toOF(fl)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, f)
	}
	return out
}

// A reply of the switch is bounded by its 16-bit length; a short or lying header is an
// error, not a panic.
func TestReadOFRejectsBadHeaders(t *testing.T) {
	for _, b := range [][]byte{{4, 0, 0, 4, 0, 0, 0, 1}, {4, 0, 0, 20, 0, 0, 0, 1, 1, 2}, {4, 0}} {
		if _, err := readOF(bytes.NewReader(b)); err == nil {
			t.Errorf("readOF(% x) gave no error", b)
		}
	}
	m, err := readOF(bytes.NewReader([]byte{4, ofBarrierReply, 0, 8, 0, 0, 0, 9}))
	if err != nil || m.typ != ofBarrierReply || m.xid != 9 {
		t.Fatalf("barrier reply read as %+v, %v", m, err)
	}
}
