package testbed

import (
	"context"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// handleAt opens a netlink handle inside the network namespace at path.
func handleAt(path string) (*netlink.Handle, netns.NsHandle, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, 0, fmt.Errorf("open netns %s: %w", path, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, 0, fmt.Errorf("netlink in %s: %w", path, err)
	}
	return h, ns, nil
}

// buildNetwork creates the underlay: a bridge in its own namespace, and for each host and
// the client a namespace with eth0 on that bridge, shaped as configured.
func (tb *Testbed) buildNetwork(ctx context.Context) error {
	if _, err := run(ctx, nil, "ip", "netns", "add", netnsName(tb.Name, "ul")); err != nil {
		return err
	}
	ul, ulns, err := handleAt(tb.Underlay)
	if err != nil {
		return err
	}
	defer ulns.Close()
	defer ul.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	if err := ul.LinkAdd(br); err != nil {
		return fmt.Errorf("add underlay bridge: %w", err)
	}
	if err := ul.LinkSetUp(br); err != nil {
		return err
	}
	for _, h := range tb.Hosts {
		if err := tb.plugHost(ctx, ul, br, h); err != nil {
			return fmt.Errorf("plug %s into the underlay: %w", h.Name, err)
		}
	}
	return nil
}

func (tb *Testbed) plugHost(ctx context.Context, ul *netlink.Handle, br *netlink.Bridge, h *Host) error {
	if _, err := run(ctx, nil, "ip", "netns", "add", netnsName(tb.Name, h.Name)); err != nil {
		return err
	}
	hh, hns, err := handleAt(h.NetNS)
	if err != nil {
		return err
	}
	defer hns.Close()
	defer hh.Close()

	outer := "v-" + h.Name
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: outer, MasterIndex: br.Index},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(hns),
	}
	if err := ul.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s: %w", outer, err)
	}
	if err := ul.LinkSetUp(veth); err != nil {
		return err
	}
	eth0, err := hh.LinkByName("eth0")
	if err != nil {
		return err
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: h.UnderlayIP.AsSlice(), Mask: net.CIDRMask(24, 32)}}
	if err := hh.AddrAdd(eth0, addr); err != nil {
		return fmt.Errorf("address %s: %w", addr, err)
	}
	if err := hh.LinkSetUp(eth0); err != nil {
		return err
	}
	if lo, err := hh.LinkByName("lo"); err == nil {
		if err := hh.LinkSetUp(lo); err != nil {
			return err
		}
	}
	if h.Link.shaped() {
		// Shape both directions: the underlay side's egress is traffic to the host.
		if err := shape(ul, veth, h.Link); err != nil {
			return fmt.Errorf("shape %s: %w", outer, err)
		}
		if err := shape(hh, eth0, h.Link); err != nil {
			return fmt.Errorf("shape eth0 of %s: %w", h.Name, err)
		}
	}
	if !h.IsClient() {
		if _, err := run(ctx, nil, "ip", "netns", "exec", netnsName(tb.Name, h.Name), "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
			return err
		}
	}
	return nil
}

// shape puts a netem qdisc with the link's rate, delay and loss at the root of link.
func shape(h *netlink.Handle, link netlink.Link, l Link) error {
	q := netlink.NewNetem(netlink.QdiscAttrs{
		LinkIndex: link.Attrs().Index,
		Handle:    netlink.MakeHandle(1, 0),
		Parent:    netlink.HANDLE_ROOT,
	}, netlink.NetemQdiscAttrs{
		Latency: uint32(l.Delay.Microseconds()),
		Loss:    float32(l.Loss),
		Limit:   100000, // packets: room for a full bandwidth-delay product
	})
	if l.RateMbit > 0 {
		q.Rate64 = uint64(l.RateMbit * 1e6 / 8) // bytes per second
	}
	return h.QdiscReplace(q)
}

// SetLink reshapes a host's (or the client's) link while the testbed runs.
func (tb *Testbed) SetLink(host string, l Link) error {
	h, err := tb.Host(host)
	if err != nil {
		return err
	}
	for _, side := range []struct{ ns, dev string }{{tb.Underlay, "v-" + h.Name}, {h.NetNS, "eth0"}} {
		nh, ns, err := handleAt(side.ns)
		if err != nil {
			return err
		}
		link, err := nh.LinkByName(side.dev)
		if err == nil {
			if l.shaped() {
				err = shape(nh, link, l)
			} else {
				err = nh.QdiscDel(&netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: link.Attrs().Index, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT}})
			}
		}
		nh.Close()
		ns.Close()
		if err != nil {
			return fmt.Errorf("shape %s in %s: %w", side.dev, side.ns, err)
		}
	}
	h.Link = l
	return tb.save()
}
