package testbed

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

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

// buildNetwork creates the underlay: for each host and the client a namespace whose eth0
// is a veth to the underlay namespace, where the wire switches and shapes the frames.
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
	links := map[string]Link{}
	for _, h := range tb.Hosts {
		if err := tb.plugHost(ctx, ul, h); err != nil {
			return fmt.Errorf("plug %s into the underlay: %w", h.Name, err)
		}
		links[h.Name] = h.Link
	}
	if err := writeLinks(tb.Name, links); err != nil {
		return err
	}
	return tb.startWire()
}

func writeLinks(tb string, links map[string]Link) error {
	b, err := json.Marshal(links)
	if err != nil {
		return err
	}
	tmp := linksFile(tb) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, linksFile(tb))
}

// startWire runs the wire (this binary, re-executed) in the underlay namespace.
func (tb *Testbed) startWire() error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(stateDir(tb.Name), "wire.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", "--net="+tb.Underlay, "--", exe)
	cmd.Env = append(baseEnv(), wireEnv+"="+tb.Name)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the wire: %w", err)
	}
	go cmd.Wait() //nolint:errcheck // reaps it; Down ends it
	return os.WriteFile(filepath.Join(stateDir(tb.Name), "wire.pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
}

func (tb *Testbed) plugHost(ctx context.Context, ul *netlink.Handle, h *Host) error {
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
		LinkAttrs:     netlink.LinkAttrs{Name: outer, MTU: 1500},
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
	// The wire forwards frames as they are: no checksum offload (a frame with a partial
	// checksum would arrive broken) and no segmentation offload (frames stay <= MTU).
	for _, side := range []struct{ ns, dev string }{{netnsName(tb.Name, "ul"), outer}, {netnsName(tb.Name, h.Name), "eth0"}} {
		if _, err := run(ctx, nil, "ip", "netns", "exec", side.ns, "ethtool", "-K", side.dev,
			"tx", "off", "tso", "off", "gso", "off", "gro", "off"); err != nil {
			return fmt.Errorf("offloads of %s: %w", side.dev, err)
		}
	}
	if !h.IsClient() {
		if _, err := run(ctx, nil, "ip", "netns", "exec", netnsName(tb.Name, h.Name), "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
			return err
		}
	}
	return nil
}

// SetLink reshapes a host's (or the client's) link while the testbed runs.
func (tb *Testbed) SetLink(host string, l Link) error {
	h, err := tb.Host(host)
	if err != nil {
		return err
	}
	links := map[string]Link{}
	for _, x := range tb.Hosts {
		links[x.Name] = x.Link
	}
	links[host] = l
	if err := writeLinks(tb.Name, links); err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(stateDir(tb.Name), "wire.pid"))
	if err != nil {
		return fmt.Errorf("the wire of testbed %s is not running: %w", tb.Name, err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if pid <= 1 || syscall.Kill(pid, syscall.SIGHUP) != nil {
		return fmt.Errorf("the wire of testbed %s (pid %d) is not running", tb.Name, pid)
	}
	h.Link = l
	return tb.save()
}
