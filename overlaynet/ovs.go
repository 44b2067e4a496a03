// Package overlaynet keeps a container's IP and MAC wherever it runs: an Open vSwitch
// bridge per host, VXLAN tunnels to every peer over the underlay, the container's veth as a
// port, and explicit OpenFlow rules that send each container's MAC to the host running it.
//
// A node's flow table is a function of its desired state (tunnels, local endpoints, where
// every remote endpoint runs, which endpoints are frozen). The first table, and any change
// that the fast path cannot make, replaces the table as a whole in one OpenFlow bundle
// (ovs-ofctl), so a retry is harmless; a change to a table this node programmed goes as
// the few flow modifications it amounts to, on the bridge's management socket
// (openflow.go), the new and changed flows before the deletions.
package overlaynet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/digitalocean/go-openvswitch/ovs"
	"github.com/vishvananda/netlink"
)

const (
	// cookie marks the flows this package owns.
	cookie = 0x4d4947
	// MTU of an endpoint: the underlay's 1500 less VXLAN's 50 bytes.
	MTU = 1450
)

// Config describes this node of the overlay.
type Config struct {
	Host     string                // this host's name
	LocalIP  netip.Addr            // its underlay address (tunnel endpoint)
	Underlay string                // the underlay device holding LocalIP, e.g. eth0
	Peers    map[string]netip.Addr // every other node: name -> underlay address
	Bridge   string                // default br-int
	VNI      int                   // default 4242
	NoHold   bool                  // no hold port (a node that never freezes containers)
	// Frozen are endpoints a crashed agent had frozen for a move not settled yet: their
	// traffic is held (and their own frames dropped) from the first table on, not sent
	// to a namespace whose sockets a dump removed (which resets the connections), until
	// the move's recovery switches or thaws them.
	Frozen []string
	// StateFile keeps the node's location table across agent restarts, so that a
	// restarted agent's first flow table already sends traffic where it went before
	// ("": none).
	StateFile string
}

// Location says where an endpoint (a container, or a client's port) runs.
type Location struct {
	Name string     `json:"name"`
	MAC  string     `json:"mac"`
	IP   netip.Addr `json:"ip"`
	Host string     `json:"host"`
}

// OVS is the Open vSwitch driver of one node.
type OVS struct {
	cfg      Config
	c        *ovs.Client
	datapath string

	mu      sync.Mutex
	tunnels map[string]int      // peer -> ofport
	local   map[string]int      // MAC -> ofport of a local endpoint
	locs    map[string]Location // MAC -> where it runs (all endpoints, local and remote)
	frozen  map[string]bool     // MACs whose traffic is held (or dropped) here during a move
	muted   map[string]bool     // frozen MACs whose own frames are dropped (their processes are frozen)
	hold    int                 // the hold port's OpenFlow port (0: none, frozen traffic is dropped)
	saved   []byte              // the location table as last written to cfg.StateFile
	holder  *Holder             // keeps what the hold port receives
	// programmed is the table as last programmed (nil: unknown), against which a change
	// goes by the fast path (openflow.go).
	programmed []ofFlow
}

// NewOVS returns the driver; Setup makes the node ready.
func NewOVS(cfg Config) *OVS {
	if cfg.Bridge == "" {
		cfg.Bridge = "br-int"
	}
	if cfg.VNI == 0 {
		cfg.VNI = 4242
	}
	return &OVS{cfg: cfg, c: ovs.New(ovs.Timeout(10)), tunnels: map[string]int{},
		local: map[string]int{}, locs: map[string]Location{}, frozen: map[string]bool{}, muted: map[string]bool{}}
}

// Datapath is "system" where the kernel has the openvswitch module, else "netdev".
func Datapath() string {
	if _, err := os.Stat("/sys/module/openvswitch"); err == nil {
		return "system"
	}
	return "netdev"
}

func vsctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "ovs-vsctl", append([]string{"--timeout=10"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("ovs-vsctl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}

// Setup creates (or checks) the bridge and the tunnels to every peer. Idempotent.
func (o *OVS) Setup(ctx context.Context) error {
	o.datapath = Datapath()
	br := o.cfg.Bridge
	if _, err := vsctl(ctx, "--may-exist", "add-br", br, "--", "set", "bridge", br,
		"datapath_type="+o.datapath, "fail_mode=secure"); err != nil {
		return fmt.Errorf("bridge %s: %w", br, err)
	}
	if o.datapath == "netdev" {
		if err := o.setupPhy(ctx); err != nil {
			return fmt.Errorf("userspace tunnel endpoint: %w", err)
		}
	}
	existing, err := o.c.VSwitch.ListPorts(br)
	if err != nil {
		return fmt.Errorf("list ports of %s: %w", br, err)
	}
	for _, p := range existing { // tunnels to peers no longer listed
		if peer, ok := strings.CutPrefix(p, "vx-"); ok {
			if _, want := o.cfg.Peers[peer]; !want {
				o.c.VSwitch.DeletePort(br, p)
			}
		}
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.programmed = nil // the whole table, as found, is replaced
	for peer, ip := range o.cfg.Peers {
		port := "vx-" + peer
		if len(port) > 15 {
			return fmt.Errorf("peer name %q too long for a port name", peer)
		}
		if _, err := vsctl(ctx, "--may-exist", "add-port", br, port, "--", "set", "interface", port,
			"type=vxlan", "options:remote_ip="+ip.String(), "options:key="+strconv.Itoa(o.cfg.VNI)); err != nil {
			return fmt.Errorf("tunnel to %s: %w", peer, err)
		}
		ofport, err := o.ofport(port)
		if err != nil {
			return err
		}
		o.tunnels[peer] = ofport
	}
	if !o.cfg.NoHold {
		if o.hold, err = o.setupHold(ctx); err != nil {
			return err
		}
		if o.holder == nil {
			if o.holder, err = OpenHolder(holdBytes); err != nil {
				return err
			}
		}
	}
	o.loadLocked(ctx)
	for _, mac := range o.cfg.Frozen {
		o.freezeLocked(mac)
		o.muted[mac] = true
	}
	return o.programLocked()
}

// loadLocked restores the location table an earlier run kept: remote endpoints whose host
// still has a tunnel, local ones whose port is still on the bridge.
func (o *OVS) loadLocked(ctx context.Context) {
	if o.cfg.StateFile == "" {
		return
	}
	b, err := os.ReadFile(o.cfg.StateFile)
	if err != nil {
		return
	}
	var locs []Location
	if err := json.Unmarshal(b, &locs); err != nil {
		slog.Warn("overlay state", "file", o.cfg.StateFile, "err", err)
		return
	}
	for _, l := range locs {
		if l.Host == o.cfg.Host {
			port, err := o.ofport(Endpoint{Name: l.Name}.Port())
			if err != nil {
				continue // gone while the agent was down
			}
			o.local[l.MAC] = port
		} else if _, ok := o.tunnels[l.Host]; !ok {
			continue
		}
		o.locs[l.MAC] = l
	}
}

// saveLocked keeps the location table for the next run (best effort: a lost table is
// relearnt from the peers).
func (o *OVS) saveLocked() {
	if o.cfg.StateFile == "" {
		return
	}
	locs := make([]Location, 0, len(o.locs))
	for _, l := range o.locs {
		locs = append(locs, l)
	}
	sort.Slice(locs, func(i, j int) bool { return locs[i].MAC < locs[j].MAC })
	b, _ := json.Marshal(locs)
	if bytes.Equal(b, o.saved) {
		return // a freeze or a thaw: flows changed, locations did not
	}
	tmp := o.cfg.StateFile + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err == nil && os.Rename(tmp, o.cfg.StateFile) == nil {
		o.saved = b
	}
}

// setupPhy puts the underlay device on a bridge of its own that holds the node's underlay
// address, as the userspace datapath's tunnelling needs (OVS's userspace-tunneling guide).
func (o *OVS) setupPhy(ctx context.Context) error {
	dev := o.cfg.Underlay
	if cur, err := vsctl(ctx, "port-to-br", dev); err == nil && cur == "br-phy" {
		return nil
	}
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("underlay device %s: %w", dev, err)
	}
	if _, err := vsctl(ctx, "--may-exist", "add-br", "br-phy", "--", "set", "bridge", "br-phy",
		"datapath_type=netdev", "other_config:hwaddr="+link.Attrs().HardwareAddr.String(),
		"--", "--may-exist", "add-port", "br-phy", dev); err != nil {
		return err
	}
	pfx, err := o.underlayPrefix()
	if err != nil {
		return err
	}
	// Address on br-phy first, then off the device: the node stays reachable throughout.
	for _, args := range [][]string{
		{"ip", "link", "set", "br-phy", "up"},
		{"ip", "addr", "replace", pfx.String(), "dev", "br-phy"},
		{"ip", "addr", "del", pfx.String(), "dev", dev},
	} {
		if out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

func (o *OVS) underlayPrefix() (netip.Prefix, error) {
	out, err := exec.Command("ip", "-o", "-4", "addr", "show").Output()
	if err != nil {
		return netip.Prefix{}, err
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "inet" {
				if p, err := netip.ParsePrefix(f[i+1]); err == nil && p.Addr() == o.cfg.LocalIP {
					return p, nil
				}
			}
		}
	}
	return netip.Prefix{}, fmt.Errorf("no interface holds the underlay address %s", o.cfg.LocalIP)
}

func (o *OVS) ofport(port string) (int, error) {
	out, err := vsctl(context.Background(), "get", "interface", port, "ofport")
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(out)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("port %s has no OpenFlow port number (%q): is the interface up?", port, out)
	}
	return n, nil
}

// AddLocal records an endpoint on this node behind OVS port port, and that it runs here.
func (o *OVS) AddLocal(loc Location, port string) error {
	return o.addPort(loc, port, true)
}

// Attach records an endpoint's port on this node without claiming that it runs here: the
// node's rules go on pointing at where the endpoint is known to run (a move's source)
// until Locate points them here. An endpoint known nowhere else is taken to run here.
func (o *OVS) Attach(loc Location, port string) error {
	return o.addPort(loc, port, false)
}

func (o *OVS) addPort(loc Location, port string, here bool) error {
	if _, err := vsctl(context.Background(), "--may-exist", "add-port", o.cfg.Bridge, port); err != nil {
		return err
	}
	ofport, err := o.ofport(port)
	if err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	loc.Host = o.cfg.Host
	o.local[loc.MAC] = ofport
	if _, known := o.locs[loc.MAC]; here || !known {
		o.locs[loc.MAC] = loc
	} else if o.holder != nil {
		o.holder.HoldFrom(loc.MAC) // a move's target: kept until Locate points here
	}
	return o.programLocked()
}

// RemoveLocal forgets a local endpoint and removes its port. Where the endpoint went (if it
// moved) is recorded separately with Locate.
func (o *OVS) RemoveLocal(mac, port string) error {
	o.mu.Lock()
	delete(o.local, mac)
	if l, ok := o.locs[mac]; ok && l.Host == o.cfg.Host {
		delete(o.locs, mac)
	}
	delete(o.frozen, mac)
	delete(o.muted, mac)
	err := o.programLocked()
	o.mu.Unlock()
	if o.holder != nil {
		o.holder.DropFrom(mac) // a restored copy undone: what it sent never goes out
	}
	if port != "" {
		if _, derr := vsctl(context.Background(), "--if-exists", "del-port", o.cfg.Bridge, port); derr != nil && err == nil {
			err = derr
		}
	}
	return err
}

// Locate records where an endpoint runs and points this node's rules there.
func (o *OVS) Locate(loc Location) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if loc.Host == o.cfg.Host {
		if _, ok := o.local[loc.MAC]; !ok {
			return fmt.Errorf("endpoint %s (%s) is not attached on %s", loc.Name, loc.MAC, o.cfg.Host)
		}
	} else if _, ok := o.tunnels[loc.Host]; !ok {
		return fmt.Errorf("no tunnel from %s to %s", o.cfg.Host, loc.Host)
	}
	o.locs[loc.MAC] = loc
	err := o.programLocked()
	if err == nil && loc.Host == o.cfg.Host && o.holder != nil {
		// A move's decision: what the restored copy sent while it waited follows.
		if n, lost, herr := o.holder.ReleaseFrom(loc.MAC); herr != nil || n > 0 || lost > 0 {
			slog.Debug("frames the restored copy sent before the decision", "mac", loc.MAC, "released", n, "lost", lost, "err", herr)
		}
	}
	return err
}

// Forget drops a remote endpoint's location.
func (o *OVS) Forget(mac string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.local[mac]; ok {
		return nil
	}
	delete(o.locs, mac)
	return o.programLocked()
}

// Freeze holds traffic to an endpoint at this node: during a move, frames for a container
// that is being checkpointed go to the hold port (or are dropped, without one) instead of
// meeting a namespace whose sockets are gone (which would reset the connection).
func (o *OVS) Freeze(mac string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.freezeLocked(mac)
	return o.programLocked()
}

// freezeLocked starts holding mac's traffic (the flows follow at the next program).
func (o *OVS) freezeLocked(mac string) {
	if o.holder != nil {
		o.holder.Hold(mac)
	}
	o.frozen[mac] = true
}

// Mute drops what a frozen endpoint sends, once its processes are frozen: from then on only
// its kernel sends (retransmits, acknowledgements), and nothing of that may reach a client
// (see flows). Not before: a reply its process sent between Freeze and its freeze would
// be dropped and, being sent already, resent by the restored copy only when its
// retransmission timer fires (a second: a restored socket has no round-trip estimate).
// Thaw and Switch end it.
func (o *OVS) Mute(mac string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.frozen[mac] {
		return fmt.Errorf("mute %s: not frozen", mac)
	}
	o.muted[mac] = true
	return o.programLocked()
}

// Thaw passes traffic to an endpoint again, wherever the rules now send it, and puts
// the frames held for it back on the bridge to follow them. It returns how many frames
// were delivered and how many the hold's bound lost.
func (o *OVS) Thaw(mac string) (held, lost int, err error) {
	o.mu.Lock()
	delete(o.frozen, mac)
	delete(o.muted, mac)
	err = o.programLocked()
	o.mu.Unlock()
	if o.holder == nil {
		return 0, 0, err
	}
	held, lost, herr := o.holder.Release(mac)
	if herr != nil {
		// Frames not put back are as if dropped: the clients retransmit.
		slog.Warn("held frames", "mac", mac, "err", herr)
	}
	return held, lost, err
}

// Switch points the node at an endpoint's new location and lets its held traffic go
// there, in one change of the flow table (Locate, then Thaw, would take two).
func (o *OVS) Switch(loc Location) (held, lost int, err error) {
	o.mu.Lock()
	if _, ok := o.tunnels[loc.Host]; !ok && loc.Host != o.cfg.Host {
		o.mu.Unlock()
		return 0, 0, fmt.Errorf("no tunnel from %s to %s", o.cfg.Host, loc.Host)
	}
	o.locs[loc.MAC] = loc
	delete(o.frozen, loc.MAC)
	delete(o.muted, loc.MAC) // where the endpoint runs elsewhere, its port here is mute anyway
	t0 := time.Now()
	err = o.programLocked()
	slog.Debug("switch: flows programmed", "took", time.Since(t0))
	o.mu.Unlock()
	if o.holder == nil {
		return 0, 0, err
	}
	held, lost, herr := o.holder.Release(loc.MAC)
	if herr != nil {
		slog.Warn("held frames", "mac", loc.MAC, "err", herr)
	}
	return held, lost, err
}

// Locations lists every endpoint this node knows, local ones first.
func (o *OVS) Locations() []Location {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]Location, 0, len(o.locs))
	for _, l := range o.locs {
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Local reports whether mac is attached on this node.
func (o *OVS) Local(mac string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	_, ok := o.local[mac]
	return ok
}

// flows computes the node's flow table.
func (o *OVS) flows() []*ovs.Flow {
	var fl []*ovs.Flow
	multicast := ovs.FieldMatch("dl_dst", "01:00:00:00:00:00/01:00:00:00:00:00")
	var locals []int
	for _, p := range o.local {
		locals = append(locals, p)
	}
	sort.Ints(locals)
	// Unicast: each endpoint's MAC to its port, or to the tunnel towards its host.
	for mac, loc := range o.locs {
		var out int
		if p, ok := o.local[mac]; ok && loc.Host == o.cfg.Host {
			out = p
		} else if t, ok := o.tunnels[loc.Host]; ok {
			out = t
		} else {
			continue
		}
		fl = append(fl, &ovs.Flow{Priority: 100, Cookie: cookie,
			Matches: []ovs.Match{ovs.DataLinkDestination(mac)}, Actions: []ovs.Action{ovs.Output(out)}})
	}
	// A container restored here for a move stays mute until the overlay locates it here
	// (the source's decision): before that its copy on the source may still be the live
	// one, and anything this copy sent (its TCP stream going on) would break the
	// connection the source's copy resumes after a rollback.
	// A container whose processes are frozen here for a move is mute as well (Mute).
	// CRIU's own network lock is skipped (writeCRIUConfig: this node holds the frames to
	// it), and TCP sockets in repair mode still retransmit on their timers: left out,
	// those later copies carry newer timestamps than the dump recorded, and the client
	// then discards everything the restored copy sends (PAWS) until its clock has caught
	// up, seconds after the restore.
	// A restored copy's frames go to the hold port, which keeps them only while it waits
	// for the decision (Attach, Locate): on its source the dead copy's kernel still sends.
	for mac, p := range o.local {
		loc, ok := o.locs[mac]
		switch {
		case o.muted[mac]:
			fl = append(fl, &ovs.Flow{Priority: 300, Cookie: cookie, InPort: p, Actions: []ovs.Action{ovs.Drop()}})
		case ok && loc.Host != o.cfg.Host:
			act := ovs.Drop()
			if o.hold > 0 {
				act = ovs.Output(o.hold)
			}
			fl = append(fl, &ovs.Flow{Priority: 300, Cookie: cookie, InPort: p, Actions: []ovs.Action{act}})
		}
	}
	for mac := range o.frozen {
		act := ovs.Drop()
		if o.hold > 0 {
			act = ovs.Output(o.hold)
		}
		fl = append(fl, &ovs.Flow{Priority: 200, Cookie: cookie,
			Matches: []ovs.Match{ovs.DataLinkDestination(mac)}, Actions: []ovs.Action{act}})
	}
	// Broadcast and multicast (ARP): from a tunnel only to local ports (split horizon, no
	// loops in the full mesh); from a local port to every other port.
	for _, t := range o.tunnels {
		acts := []ovs.Action{}
		for _, p := range locals {
			acts = append(acts, ovs.Output(p))
		}
		if len(acts) == 0 {
			acts = append(acts, ovs.Drop())
		}
		fl = append(fl, &ovs.Flow{Priority: 50, Cookie: cookie, InPort: t, Matches: []ovs.Match{multicast}, Actions: acts})
	}
	fl = append(fl, &ovs.Flow{Priority: 40, Cookie: cookie, Matches: []ovs.Match{multicast}, Actions: []ovs.Action{ovs.Flood()}})
	fl = append(fl, &ovs.Flow{Priority: 0, Cookie: cookie, Actions: []ovs.Action{ovs.Drop()}})
	return fl
}

// programLocked replaces the bridge's flows with the desired ones in one bundle.
func (o *OVS) programLocked() error {
	flows := o.flows()
	fast, err := o.programFast(flows)
	if err == nil {
		o.programmed = fast
		slog.Debug("overlay flows changed", "host", o.cfg.Host, "flows", len(flows))
		o.saveLocked()
		return nil
	}
	if !errors.Is(err, errNoFastPath) {
		slog.Warn("overlay flows: the fast change failed; replacing the table by ovs-ofctl", "host", o.cfg.Host, "err", err)
	}
	o.programmed = nil
	err = o.c.OpenFlow.AddFlowBundle(o.cfg.Bridge, func(tx *ovs.FlowTransaction) error {
		tx.Delete(&ovs.MatchFlow{Cookie: cookie, CookieMask: 0xffffffffffffffff})
		tx.Add(flows...)
		return tx.Commit()
	})
	if err != nil {
		return fmt.Errorf("program flows on %s: %w", o.cfg.Bridge, err)
	}
	o.programmed = fast // nil where a flow is outside the fast path's terms
	slog.Debug("overlay flows", "host", o.cfg.Host, "flows", len(flows))
	o.saveLocked()
	return nil
}
