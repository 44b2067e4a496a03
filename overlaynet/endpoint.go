package overlaynet

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Endpoint is a container's place on the overlay: a network namespace (same name, address
// and MAC on every host) whose eth0 is a veth to an OVS port.
type Endpoint struct {
	Name   string       `json:"name"`
	Prefix netip.Prefix `json:"prefix"` // address and overlay prefix, e.g. 10.88.0.10/16
	MAC    string       `json:"mac"`
	// NetNS names the namespace under /run/netns; "" puts the endpoint's end (called
	// ovl0) in the calling process's own namespace, as for a client machine.
	NetNS string `json:"netns"`
}

// NetNSPath is the namespace file podman gets as --network ns:PATH.
func (e Endpoint) NetNSPath() string { return "/run/netns/" + e.NetNS }

// Port is the OVS port (the host end of the veth).
func (e Endpoint) Port() string {
	h := sha256.Sum256([]byte(e.Name))
	return "m-" + hex.EncodeToString(h[:])[:10]
}

// Location is where the endpoint runs when it runs on host.
func (e Endpoint) Location(host string) Location {
	return Location{Name: e.Name, MAC: e.MAC, IP: e.Prefix.Addr(), Host: host}
}

// NewEndpoint derives the namespace name and a locally administered MAC from name and ip.
func NewEndpoint(name string, prefix netip.Prefix) Endpoint {
	a := prefix.Addr().As4()
	return Endpoint{Name: name, Prefix: prefix, NetNS: "mig-" + name,
		MAC: fmt.Sprintf("02:4d:%02x:%02x:%02x:%02x", a[0], a[1], a[2], a[3])}
}

func command(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ErrExists means the endpoint's namespace or port is already there.
var ErrExists = errors.New("already exists")

// Plumb creates the endpoint's namespace and veth and attaches it to the node's bridge,
// with no location announced yet: where this node already knows the endpoint to run (a
// move's source), its rules keep pointing there until Locate says otherwise. On failure
// it leaves nothing behind.
func (o *OVS) Plumb(ctx context.Context, e Endpoint) (err error) {
	port := e.Port()
	if _, err := netlink.LinkByName(port); err == nil {
		return fmt.Errorf("endpoint %s: port %s %w on %s", e.Name, port, ErrExists, o.cfg.Host)
	}
	inner := "ovl0"
	if e.NetNS != "" {
		if _, err := os.Stat(e.NetNSPath()); err == nil {
			return fmt.Errorf("endpoint %s: namespace %s %w on %s", e.Name, e.NetNSPath(), ErrExists, o.cfg.Host)
		}
		inner = "eth0"
	}
	defer func() {
		if err != nil {
			o.Unplumb(context.WithoutCancel(ctx), e)
		}
	}()
	mac, err := net.ParseMAC(e.MAC)
	if err != nil {
		return fmt.Errorf("endpoint %s: MAC %q: %w", e.Name, e.MAC, err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: port, MTU: MTU}, PeerName: inner, PeerHardwareAddr: mac}
	var peer *netlink.Handle
	if e.NetNS != "" {
		if err := command(ctx, "ip", "netns", "add", e.NetNS); err != nil {
			return err
		}
		ns, err := netns.GetFromPath(e.NetNSPath())
		if err != nil {
			return err
		}
		defer ns.Close()
		veth.PeerNamespace = netlink.NsFd(ns)
		if peer, err = netlink.NewHandleAt(ns); err != nil {
			return err
		}
	} else if peer, err = netlink.NewHandle(); err != nil {
		return err
	}
	defer peer.Close()
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("veth %s: %w", port, err)
	}
	in, err := peer.LinkByName(inner)
	if err != nil {
		return err
	}
	if err := peer.LinkSetMTU(in, MTU); err != nil {
		return err
	}
	if err := peer.AddrAdd(in, &netlink.Addr{IPNet: &net.IPNet{IP: e.Prefix.Addr().AsSlice(), Mask: net.CIDRMask(e.Prefix.Bits(), 32)}}); err != nil {
		return fmt.Errorf("address %s: %w", e.Prefix, err)
	}
	for _, l := range []string{inner, "lo"} {
		if link, err := peer.LinkByName(l); err == nil {
			if err := peer.LinkSetUp(link); err != nil {
				return err
			}
		}
	}
	hostEnd, err := netlink.LinkByName(port)
	if err != nil {
		return err
	}
	if err := netlink.LinkSetUp(hostEnd); err != nil {
		return err
	}
	// OVS forwards frames as they are: a checksum left to offload would arrive unfinished
	// (TCP hangs while ping works, openvswitch/ovs-issues#273).
	ethtool := []string{"ethtool", "-K", inner, "tx", "off"}
	if e.NetNS != "" {
		ethtool = append([]string{"ip", "netns", "exec", e.NetNS}, ethtool...)
	}
	if err := command(ctx, ethtool...); err != nil {
		return err
	}
	if err := command(ctx, "ethtool", "-K", port, "tx", "off"); err != nil {
		return err
	}
	return o.Attach(e.Location(o.cfg.Host), port)
}

// Unplumb removes the endpoint's port, veth and namespace. Idempotent.
func (o *OVS) Unplumb(ctx context.Context, e Endpoint) error {
	var errs []error
	if err := o.RemoveLocal(e.MAC, e.Port()); err != nil {
		errs = append(errs, err)
	}
	if l, err := netlink.LinkByName(e.Port()); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, err)
		}
	}
	if e.NetNS != "" {
		if _, err := os.Stat(e.NetNSPath()); err == nil {
			if err := command(ctx, "ip", "netns", "delete", e.NetNS); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// GratuitousARP announces the endpoint's address and MAC from inside its namespace, so
// that every neighbour's cache and any learning switch on the way learn its new place.
func GratuitousARP(e Endpoint) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return err
	}
	defer orig.Close()
	dev := "ovl0"
	if e.NetNS != "" {
		ns, err := netns.GetFromPath(e.NetNSPath())
		if err != nil {
			return err
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			return err
		}
		defer netns.Set(orig)
		dev = "eth0"
	}
	ifi, err := net.InterfaceByName(dev)
	if err != nil {
		return err
	}
	proto := htons(syscall.ETH_P_ARP)
	fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(proto))
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	mac, err := net.ParseMAC(e.MAC)
	if err != nil {
		return err
	}
	ip := e.Prefix.Addr().As4()
	f := make([]byte, 42)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:], syscall.ETH_P_ARP)
	binary.BigEndian.PutUint16(f[14:], 1)      // Ethernet
	binary.BigEndian.PutUint16(f[16:], 0x0800) // IPv4
	f[18], f[19] = 6, 4
	binary.BigEndian.PutUint16(f[20:], 1) // request: sender = target = our address
	copy(f[22:28], mac)
	copy(f[28:32], ip[:])
	copy(f[38:42], ip[:])
	sa := &syscall.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index, Halen: 6}
	copy(sa.Addr[:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	return syscall.Sendto(fd, f, 0, sa)
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}
