package overlaynet

// The fast path of a flow-table change. Replacing the table through ovs-ofctl (a process
// that connects, negotiates and sends a bundle) costs 20-40 ms on a busy host, and a
// move's switch makes two such changes while the container's traffic is held (the
// target's, then the source's). A change to a table this node programmed itself is sent
// instead as the few flow modifications it amounts to, in OpenFlow 1.3 on the bridge's
// management socket, and confirmed by a barrier: well under a millisecond. Anything else
// (the first table, an error, a flow this encoder does not know) takes ovs-ofctl's bundle,
// which also repairs whatever a failed fast change left.
//
// No OpenFlow library is served to this project; the encoder covers exactly the flows
// flows() makes: a priority, the cookie, in_port, dl_dst (with a mask), and the actions
// output:N, flood and drop.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/digitalocean/go-openvswitch/ovs"
)

// OpenFlow 1.3 (ofp_version 0x04), the messages and fields used here.
const (
	ofVersion      = 0x04
	ofHello        = 0
	ofError        = 1
	ofEchoRequest  = 2
	ofEchoReply    = 3
	ofFlowMod      = 14
	ofBarrierReq   = 20
	ofBarrierReply = 21

	ofpfcAdd          = 0
	ofpfcDeleteStrict = 4

	ofppFlood   = 0xfffffffb
	ofppAny     = 0xffffffff
	ofpgAny     = 0xffffffff
	ofpNoBuffer = 0xffffffff
	ofpmtOXM    = 1
	oxmBasic    = 0x8000
	oxmInPort   = 0
	oxmEthDst   = 3
	ofpitApply  = 4
	ofpatOutput = 0
	ofWait      = 2 * time.Second
)

// ofFlow is one flow in the terms the fast path encodes.
type ofFlow struct {
	priority     uint16
	inPort       uint32           // 0: any
	dst, dstMask net.HardwareAddr // nil: any; dstMask nil: exact
	outputs      []uint32         // none: drop
}

// key is what identifies a flow in the table (OpenFlow's strict match): its priority and
// match. value is what a change may replace: its actions.
func (f ofFlow) key() string {
	return fmt.Sprintf("%d|%d|%s|%s", f.priority, f.inPort, f.dst, f.dstMask)
}

func (f ofFlow) value() string { return fmt.Sprint(f.outputs) }

// toOF reads a flow of flows() into the fast path's terms.
func toOF(fl *ovs.Flow) (ofFlow, error) {
	f := ofFlow{priority: uint16(fl.Priority)}
	if fl.Table != 0 || fl.Cookie != cookie || fl.Protocol != "" || fl.Priority < 0 || fl.Priority > 0xffff {
		return f, fmt.Errorf("flow outside the fast path's terms: %+v", fl)
	}
	if fl.InPort > 0 {
		f.inPort = uint32(fl.InPort)
	}
	for _, m := range fl.Matches {
		b, err := m.MarshalText()
		if err != nil {
			return f, err
		}
		v, ok := strings.CutPrefix(string(b), "dl_dst=")
		if !ok || f.dst != nil {
			return f, fmt.Errorf("match %q outside the fast path's terms", b)
		}
		mac, mask, masked := strings.Cut(v, "/")
		if f.dst, err = net.ParseMAC(mac); err != nil || len(f.dst) != 6 {
			return f, fmt.Errorf("match %q: %v", b, err)
		}
		if masked {
			if f.dstMask, err = net.ParseMAC(mask); err != nil || len(f.dstMask) != 6 {
				return f, fmt.Errorf("match %q: %v", b, err)
			}
		}
	}
	for _, a := range fl.Actions {
		b, err := a.MarshalText()
		if err != nil {
			return f, err
		}
		switch s := string(b); {
		case s == "drop":
		case s == "flood":
			f.outputs = append(f.outputs, ofppFlood)
		case strings.HasPrefix(s, "output:"):
			p, err := strconv.ParseUint(strings.TrimPrefix(s, "output:"), 10, 32)
			if err != nil || p == 0 || p >= 0xffffff00 {
				return f, fmt.Errorf("action %q outside the fast path's terms", s)
			}
			f.outputs = append(f.outputs, uint32(p))
		default:
			return f, fmt.Errorf("action %q outside the fast path's terms", s)
		}
	}
	return f, nil
}

// ofDiff is what turns the table old into want: the flows to add (new, or with other
// actions: an add replaces a flow of the same match), then the ones to delete. Adds
// first: a move's switch points a MAC somewhere new before the rule that held or muted it
// goes.
func ofDiff(old, want []ofFlow) (add, del []ofFlow) {
	had := map[string]string{}
	for _, f := range old {
		had[f.key()] = f.value()
	}
	keep := map[string]bool{}
	for _, f := range want {
		keep[f.key()] = true
		if v, ok := had[f.key()]; !ok || v != f.value() {
			add = append(add, f)
		}
	}
	for _, f := range old {
		if !keep[f.key()] {
			del = append(del, f)
		}
	}
	return add, del
}

func ofHeader(b []byte, typ uint8, xid uint32) []byte {
	return append(b, ofVersion, typ, 0, 0, byte(xid>>24), byte(xid>>16), byte(xid>>8), byte(xid))
}

// finish writes a message's length into its header.
func finish(b []byte) []byte {
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	return b
}

// encodeFlowMod is an OFPT_FLOW_MOD of f: add (with its actions) or strict delete, of
// this package's cookie only.
func encodeFlowMod(xid uint32, command uint8, f ofFlow) []byte {
	b := ofHeader(make([]byte, 0, 128), ofFlowMod, xid)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, ^uint64(0)) // cookie_mask: this package's flows only
	b = append(b, 0, command)                        // table 0
	b = append(b, 0, 0, 0, 0)                        // idle, hard timeout
	b = binary.BigEndian.AppendUint16(b, f.priority)
	b = binary.BigEndian.AppendUint32(b, ofpNoBuffer)
	b = binary.BigEndian.AppendUint32(b, ofppAny)
	b = binary.BigEndian.AppendUint32(b, ofpgAny)
	b = append(b, 0, 0, 0, 0) // flags, pad
	// ofp_match: OXM fields, padded to 8 bytes.
	m := len(b)
	b = append(b, 0, ofpmtOXM, 0, 0)
	if f.inPort != 0 {
		b = append(b, oxmBasic>>8, 0, oxmInPort<<1, 4)
		b = binary.BigEndian.AppendUint32(b, f.inPort)
	}
	if f.dst != nil {
		if f.dstMask != nil {
			b = append(b, oxmBasic>>8, 0, oxmEthDst<<1|1, 12)
			b = append(append(b, f.dst...), f.dstMask...)
		} else {
			b = append(b, oxmBasic>>8, 0, oxmEthDst<<1, 6)
			b = append(b, f.dst...)
		}
	}
	binary.BigEndian.PutUint16(b[m+2:], uint16(len(b)-m))
	for (len(b)-m)%8 != 0 {
		b = append(b, 0)
	}
	if command == ofpfcAdd && len(f.outputs) > 0 {
		b = append(b, 0, ofpitApply)
		b = binary.BigEndian.AppendUint16(b, uint16(8+16*len(f.outputs)))
		b = append(b, 0, 0, 0, 0)
		for _, p := range f.outputs {
			b = append(b, 0, ofpatOutput, 0, 16)
			b = binary.BigEndian.AppendUint32(b, p)
			b = append(b, 0, 0, 0, 0, 0, 0, 0, 0) // max_len, pad
		}
	}
	return finish(b)
}

// ofMessage is one message read from the switch.
type ofMessage struct {
	version, typ uint8
	xid          uint32
	body         []byte
}

// readOF reads one message; its length is bounded by the 16-bit field.
func readOF(r io.Reader) (ofMessage, error) {
	var h [8]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return ofMessage{}, err
	}
	n := int(binary.BigEndian.Uint16(h[2:]))
	if n < 8 {
		return ofMessage{}, fmt.Errorf("OpenFlow message of length %d", n)
	}
	m := ofMessage{version: h[0], typ: h[1], xid: binary.BigEndian.Uint32(h[4:]), body: make([]byte, n-8)}
	_, err := io.ReadFull(r, m.body)
	return m, err
}

// mgmtSocket is the bridge's OpenFlow management socket (ovs-ofctl's own way in).
func mgmtSocket(bridge string) string {
	dir := os.Getenv("OVS_RUNDIR")
	if dir == "" {
		dir = "/var/run/openvswitch"
	}
	return filepath.Join(dir, bridge+".mgmt")
}

// sendFlowMods connects to the bridge, sends the adds then the deletes, and waits for the
// barrier's reply: when it returns nil, every change is in the table. An error the switch
// returns for any of them fails the whole.
func sendFlowMods(bridge string, add, del []ofFlow) error {
	c, err := net.DialTimeout("unix", mgmtSocket(bridge), ofWait)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(ofWait))
	r := bufio.NewReader(c)
	if _, err := c.Write(finish(ofHeader(nil, ofHello, 1))); err != nil {
		return err
	}
	hello, err := readOF(r)
	if err != nil {
		return fmt.Errorf("OpenFlow hello: %w", err)
	}
	if hello.typ != ofHello || hello.version < ofVersion {
		return fmt.Errorf("the bridge answered the hello with type %d version %d (OpenFlow 1.3 not enabled?)", hello.typ, hello.version)
	}
	var out []byte
	xid := uint32(2)
	for _, f := range add {
		out = append(out, encodeFlowMod(xid, ofpfcAdd, f)...)
		xid++
	}
	for _, f := range del {
		out = append(out, encodeFlowMod(xid, ofpfcDeleteStrict, f)...)
		xid++
	}
	barrier := xid
	out = append(out, finish(ofHeader(nil, ofBarrierReq, barrier))...)
	if _, err := c.Write(out); err != nil {
		return err
	}
	for {
		m, err := readOF(r)
		if err != nil {
			return fmt.Errorf("OpenFlow barrier: %w", err)
		}
		switch m.typ {
		case ofError:
			code := ""
			if len(m.body) >= 4 {
				code = fmt.Sprintf(" type %d code %d", binary.BigEndian.Uint16(m.body), binary.BigEndian.Uint16(m.body[2:]))
			}
			return fmt.Errorf("the bridge refused flow modification %d of %d:%s", m.xid-1, barrier-2, code)
		case ofEchoRequest:
			echo := finish(append(ofHeader(nil, ofEchoReply, m.xid), m.body...))
			if _, err := c.Write(echo); err != nil {
				return err
			}
		case ofBarrierReply:
			if m.xid == barrier {
				return nil
			}
		}
	}
}

// errNoFastPath: the change goes by ovs-ofctl.
var errNoFastPath = errors.New("no fast path")

// programFast sends the difference between the table last programmed and want, if both
// are in the fast path's terms.
func (o *OVS) programFast(want []*ovs.Flow) ([]ofFlow, error) {
	fs := make([]ofFlow, 0, len(want))
	for _, fl := range want {
		f, err := toOF(fl)
		if err != nil {
			return nil, err
		}
		fs = append(fs, f)
	}
	if o.programmed == nil {
		return fs, errNoFastPath
	}
	add, del := ofDiff(o.programmed, fs)
	if len(add) == 0 && len(del) == 0 {
		// Nothing changed: a repeated call, which replaces the whole table as before
		// (it repairs a table that lost flows, e.g. to a restart of OVS).
		return fs, errNoFastPath
	}
	return fs, sendFlowMods(o.cfg.Bridge, add, del)
}
