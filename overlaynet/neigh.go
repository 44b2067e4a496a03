package overlaynet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// A container's neighbour cache moves with it. Without it, the restored container's first
// packet waits for an ARP exchange, whose answer may still travel to the old host (the
// peers learn the new location a moment after the switch): ARP retries after a second,
// and that second is downtime the client sees.

// Neighbor is one entry of an endpoint's neighbour cache.
type Neighbor struct {
	IP  netip.Addr `json:"ip"`
	MAC string     `json:"mac"`
}

// MaxNeighbors bounds what an endpoint's cache carries (and what a target accepts).
const MaxNeighbors = 256

// Neighbors reads the endpoint's IPv4 neighbour cache (entries with an address known).
func Neighbors(e Endpoint) ([]Neighbor, error) {
	h, err := endpointHandle(e)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	link, err := h.LinkByName("eth0")
	if err != nil {
		return nil, err
	}
	list, err := h.NeighList(link.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		return nil, err
	}
	var out []Neighbor
	for _, n := range list {
		if n.State&(netlink.NUD_REACHABLE|netlink.NUD_STALE|netlink.NUD_DELAY|netlink.NUD_PROBE|netlink.NUD_PERMANENT) == 0 || len(n.HardwareAddr) != 6 {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP.To4())
		if !ok {
			continue
		}
		out = append(out, Neighbor{IP: ip, MAC: n.HardwareAddr.String()})
		if len(out) == MaxNeighbors {
			break
		}
	}
	return out, nil
}

// SetNeighbors fills the endpoint's neighbour cache (entries marked stale: the kernel uses
// them at once and confirms them by unicast when it next sends).
func SetNeighbors(e Endpoint, ns []Neighbor) error {
	if len(ns) > MaxNeighbors {
		return fmt.Errorf("%d neighbours: at most %d", len(ns), MaxNeighbors)
	}
	h, err := endpointHandle(e)
	if err != nil {
		return err
	}
	defer h.Close()
	link, err := h.LinkByName("eth0")
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range ns {
		mac, err := net.ParseMAC(n.MAC)
		if err != nil || len(mac) != 6 || !n.IP.Is4() {
			errs = append(errs, fmt.Errorf("neighbour %s at %q: not an IPv4 address and a MAC", n.IP, n.MAC))
			continue
		}
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: link.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_STALE,
			IP: n.IP.AsSlice(), HardwareAddr: mac}); err != nil {
			errs = append(errs, fmt.Errorf("neighbour %s: %w", n.IP, err))
		}
	}
	return errors.Join(errs...)
}

func endpointHandle(e Endpoint) (*netlink.Handle, error) {
	if e.NetNS == "" {
		return nil, errors.New("endpoint has no namespace of its own")
	}
	ns, err := netns.GetFromPath(e.NetNSPath())
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	return netlink.NewHandleAt(ns)
}

// FormatNeighbors and ParseNeighbors put a neighbour list in one header value
// ("ip=mac,ip=mac"); ParseNeighbors bounds and checks what it accepts.
func FormatNeighbors(ns []Neighbor) string {
	parts := make([]string, len(ns))
	for i, n := range ns {
		parts[i] = n.IP.String() + "=" + n.MAC
	}
	return strings.Join(parts, ",")
}

func ParseNeighbors(s string) ([]Neighbor, error) {
	if s == "" {
		return nil, nil
	}
	if len(s) > MaxNeighbors*40 {
		return nil, fmt.Errorf("neighbour list of %d bytes", len(s))
	}
	var out []Neighbor
	for _, p := range strings.Split(s, ",") {
		ip, mac, ok := strings.Cut(p, "=")
		a, err := netip.ParseAddr(ip)
		if !ok || err != nil || !a.Is4() {
			return nil, fmt.Errorf("neighbour %q: want IPv4=MAC", p)
		}
		if hw, err := net.ParseMAC(mac); err != nil || len(hw) != 6 {
			return nil, fmt.Errorf("neighbour %q: bad MAC", p)
		}
		out = append(out, Neighbor{IP: a, MAC: mac})
		if len(out) > MaxNeighbors {
			return nil, fmt.Errorf("more than %d neighbours", MaxNeighbors)
		}
	}
	return out, nil
}
