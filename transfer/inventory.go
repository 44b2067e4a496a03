package transfer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
)

// Inventory lists the hosts of an installation and where their agents listen. Format
// (JSON):
//
//	{"hosts": [
//	  {"name": "a", "agent": "10.99.0.1:7443", "locations": ["north", "harbour"]},
//	  {"name": "b", "agent": "10.99.0.2:7443"}
//	]}
//
// The agent address's IP is also the host's underlay address (its tunnel endpoint).
// "locations" (optional) names the places of a mobility trace whose users this host
// serves best (`migrate auto --mode proactive`); a host always serves the place named
// like itself. Unknown fields are errors, so a typo does not pass silently.
type Inventory struct {
	Hosts []HostEntry `json:"hosts"`
}

// HostEntry is one host.
type HostEntry struct {
	Name      string   `json:"name"`
	Agent     string   `json:"agent"`
	Locations []string `json:"locations,omitempty"`
}

// Underlay is the host's underlay (tunnel endpoint) address.
func (h HostEntry) Underlay() netip.Addr {
	ap, _ := netip.ParseAddrPort(h.Agent)
	return ap.Addr()
}

// LoadInventory reads and validates an inventory file.
func LoadInventory(path string) (*Inventory, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("inventory: %w (set --inventory or MIGRATE_INVENTORY)", err)
	}
	var inv Inventory
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&inv); err != nil {
		return nil, fmt.Errorf("inventory %s: %w (format: {\"hosts\": [{\"name\": \"a\", \"agent\": \"IP:PORT\", \"locations\": [...]}]})", path, err)
	}
	if err := inv.Validate(); err != nil {
		return nil, fmt.Errorf("inventory %s: %w", path, err)
	}
	return &inv, nil
}

// Validate checks names and addresses.
func (inv *Inventory) Validate() error {
	if len(inv.Hosts) == 0 {
		return errors.New("no hosts")
	}
	seen := map[string]bool{}
	served := map[string]string{}
	for i, h := range inv.Hosts {
		for _, l := range h.Locations {
			if other, ok := served[l]; ok && other != h.Name {
				return fmt.Errorf("location %q is served by both %q and %q", l, other, h.Name)
			}
			served[l] = h.Name
		}
		if h.Name == "" {
			return fmt.Errorf("host %d has no name", i+1)
		}
		if err := ValidHostName(h.Name); err != nil {
			return err
		}
		if seen[h.Name] {
			return fmt.Errorf("host %q listed twice", h.Name)
		}
		seen[h.Name] = true
		if _, err := netip.ParseAddrPort(h.Agent); err != nil {
			if _, _, err2 := net.SplitHostPort(h.Agent); err2 != nil {
				return fmt.Errorf("host %q: agent address %q: want IP:PORT", h.Name, h.Agent)
			}
			return fmt.Errorf("host %q: agent address %q: want an IP address, not a name (it is also the tunnel endpoint)", h.Name, h.Agent)
		}
	}
	return nil
}

// ServedBy returns the host that serves a place of a mobility trace: the one that lists
// it in its locations, else the host of that name.
func (inv *Inventory) ServedBy(location string) (string, bool) {
	for _, h := range inv.Hosts {
		for _, l := range h.Locations {
			if l == location {
				return h.Name, true
			}
		}
	}
	for _, h := range inv.Hosts {
		if h.Name == location {
			return h.Name, true
		}
	}
	return "", false
}

// Get returns the named host.
func (inv *Inventory) Get(name string) (HostEntry, error) {
	for _, h := range inv.Hosts {
		if h.Name == name {
			return h, nil
		}
	}
	names := make([]string, 0, len(inv.Hosts))
	for _, h := range inv.Hosts {
		names = append(names, h.Name)
	}
	return HostEntry{}, fmt.Errorf("unknown host %q (the inventory has %v)", name, names)
}
