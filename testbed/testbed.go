// Package testbed builds several migrate hosts and a client on one machine.
//
// Each host is a network namespace and a mount namespace. In its mount namespace podman's
// default paths (/var/lib/containers/storage, /run/containers/storage, /run/libpod,
// /run/runc) and /run/netns are bind mounts of the host's private directories, so a
// container checkpointed in one host's store really restores into another store at the
// same paths, as between real machines. Each host runs its own podman API service and its
// own Open vSwitch instance; the agent slot (address, directory) is reserved for
// `migrate serve`. The hosts and the client hang off the underlay, a userspace switch (the
// wire, see wire.go) in a namespace of its own that shapes each link (rate, delay, loss).
//
// Down finds everything by name, not from a state file, so it cleans up after a crashed or
// killed run as well.
package testbed

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
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	// StateRoot holds sockets, pid files and persisted mount namespaces. It is made a
	// private bind mount, which persisting a mount namespace requires.
	StateRoot = "/run/migrate-testbed"
	// DataRoot holds each host's private container store.
	DataRoot = "/var/lib/migrate-testbed"

	// ClientName is the end user's machine: a network namespace on the underlay.
	ClientName = "client"
	// AgentPort is the port reserved for each host's `migrate serve`.
	AgentPort = 7443
)

// podmanPaths are podman's default locations; each host binds its own directories there.
var podmanPaths = []string{
	"/var/lib/containers/storage",
	"/run/containers/storage",
	"/run/libpod",
	"/run/runc",
	"/run/netns",
	"/run/migrate", // the agents' CRIU configuration files (transfer.CRIUConfigDir)
}

// Link shapes one host's (or the client's) link to the underlay, in each direction.
// The zero value is an unshaped link.
type Link struct {
	RateMbit float64       `json:"rate_mbit,omitempty"`
	Delay    time.Duration `json:"delay,omitempty"` // one way, each direction
	Loss     float64       `json:"loss_pct,omitempty"`
}

func (l Link) shaped() bool { return l.RateMbit > 0 || l.Delay > 0 || l.Loss > 0 }

func (l Link) String() string {
	if !l.shaped() {
		return "unshaped"
	}
	return fmt.Sprintf("%gMbit/s delay %s loss %g%%", l.RateMbit, l.Delay, l.Loss)
}

// Config describes a testbed.
type Config struct {
	Name  string          // short name, also the prefix of its namespaces; default "tb"
	Hosts []string        // host names; default a, b
	Link  Link            // every link unless Links says otherwise
	Links map[string]Link // per host or "client"
	// Images is a test image archive (see EnsureImages) loaded into every host's store.
	Images string
	// Memload, if Images is empty, is the memload binary to build the test images with.
	Memload string
	NoOVS   bool // skip the per-host Open vSwitch instances
	// Agents, if set, is the migrate binary: every host and the client run its agent
	// (`migrate serve`), with certificates and an inventory made for the testbed.
	Agents string
	// Owner is the PID of the process that tears this testbed down when it ends (a test,
	// the demo); 0 for a testbed the user keeps (`migrate testbed up`). A later Up of the
	// same name reclaims a testbed whose owner is gone (a test run killed mid-way),
	// instead of refusing to start.
	Owner int
}

// Host is one machine of the testbed (or the client).
type Host struct {
	Name       string     `json:"name"`
	NetNS      string     `json:"netns"`              // /run/netns/... file
	MountNS    string     `json:"mountns,omitempty"`  // persisted mount namespace; "" for the client
	Dir        string     `json:"dir"`                // sockets, pid files, logs
	DataDir    string     `json:"data_dir,omitempty"` // private podman store and /run dirs
	UnderlayIP netip.Addr `json:"underlay_ip"`
	Link       Link       `json:"link"`
	PodmanURI  string     `json:"podman_uri,omitempty"` // unix://... of its podman service
	OVSDir     string     `json:"ovs_dir,omitempty"`    // OVS_RUNDIR of its OVS instance
	AgentAddr  string     `json:"agent_addr,omitempty"` // where its `migrate serve` listens
}

// IsClient reports whether h is the end user's machine rather than a migrate host.
func (h *Host) IsClient() bool { return h.Name == ClientName }

// Testbed is a running testbed.
type Testbed struct {
	Name     string  `json:"name"`
	Underlay string  `json:"underlay_netns"`
	Subnet   string  `json:"underlay_subnet"`
	Hosts    []*Host `json:"hosts"` // migrate hosts, then the client
	// MigrateBin is the migrate binary the agents run ("" without agents).
	MigrateBin string `json:"migrate_bin,omitempty"`
	// MemloadBin is the memload binary the test images were built with (the client runs
	// its stream checker).
	MemloadBin string `json:"memload_bin,omitempty"`
	// Owner and OwnerStart identify the process that owns the testbed (Config.Owner and
	// its start time, so that a reused PID does not count as the owner).
	Owner      int    `json:"owner_pid,omitempty"`
	OwnerStart uint64 `json:"owner_start,omitempty"`
}

// Host returns the named host or the client.
func (tb *Testbed) Host(name string) (*Host, error) {
	for _, h := range tb.Hosts {
		if h.Name == name {
			return h, nil
		}
	}
	names := make([]string, 0, len(tb.Hosts))
	for _, h := range tb.Hosts {
		names = append(names, h.Name)
	}
	return nil, fmt.Errorf("testbed %s has no host %q (hosts: %s)", tb.Name, name, strings.Join(names, ", "))
}

// Command returns a command that runs inside host's namespaces.
func (tb *Testbed) Command(ctx context.Context, host string, args ...string) (*exec.Cmd, error) {
	h, err := tb.Host(host)
	if err != nil {
		return nil, err
	}
	if len(args) == 0 {
		return nil, errors.New("no command given")
	}
	cmd := exec.CommandContext(ctx, "nsenter", append(nsenterArgs(h), args...)...)
	cmd.Env = append(baseEnv(), h.env()...)
	return cmd, nil
}

// Run runs args inside host's namespaces and returns stdout; the error carries stderr.
func (tb *Testbed) Run(ctx context.Context, host string, args ...string) (string, error) {
	h, err := tb.Host(host)
	if err != nil {
		return "", err
	}
	out, err := run(ctx, h.env(), "nsenter", append(nsenterArgs(h), args...)...)
	if err != nil {
		return out, fmt.Errorf("on %s: %w", host, err)
	}
	return out, nil
}

func (h *Host) env() []string {
	if h.OVSDir == "" {
		return nil
	}
	return []string{"OVS_RUNDIR=" + h.OVSDir, "OVS_DBDIR=" + h.OVSDir, "OVS_LOGDIR=" + h.OVSDir,
		"OVS_DB=unix:" + filepath.Join(h.OVSDir, "db.sock")}
}

// validName keeps names usable in namespace, interface and file names.
func validName(s string) bool {
	if s == "" || len(s) > 8 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

func (c *Config) defaults() error {
	if c.Name == "" {
		c.Name = "tb"
	}
	if len(c.Hosts) == 0 {
		c.Hosts = []string{"a", "b"}
	}
	if !validName(c.Name) {
		return fmt.Errorf("testbed name %q: use 1-8 characters a-z, 0-9", c.Name)
	}
	if len(c.Hosts) < 2 || len(c.Hosts) > 50 {
		return fmt.Errorf("a testbed needs 2 to 50 hosts, got %d", len(c.Hosts))
	}
	seen := map[string]bool{}
	for _, h := range c.Hosts {
		if !validName(h) || h == ClientName || h == "ul" {
			return fmt.Errorf("host name %q: use 1-8 characters a-z, 0-9 (not %q or \"ul\")", h, ClientName)
		}
		if seen[h] {
			return fmt.Errorf("host %q listed twice", h)
		}
		seen[h] = true
	}
	for name := range c.Links {
		if !seen[name] && name != ClientName {
			return fmt.Errorf("link given for unknown host %q", name)
		}
	}
	return nil
}

func netnsName(tb, host string) string { return "mtb-" + tb + "-" + host }
func stateDir(tb string) string        { return filepath.Join(StateRoot, tb) }
func dataDir(tb string) string         { return filepath.Join(DataRoot, tb) }

// Up builds the testbed. On failure everything already built is torn down again.
func Up(ctx context.Context, cfg Config) (tb *Testbed, err error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if err := Preflight(!cfg.NoOVS); err != nil {
		return nil, err
	}
	if old, err := Load(cfg.Name); err == nil {
		if !old.ownerGone() {
			return nil, fmt.Errorf("testbed %q is already up (run `migrate testbed down --name %s` first)", cfg.Name, cfg.Name)
		}
		slog.Warn("reclaiming a testbed whose owner ended without tearing it down", "testbed", cfg.Name, "owner_pid", old.Owner)
	} else if _, serr := os.Stat(filepath.Join(stateDir(cfg.Name), "testbed.json")); serr == nil {
		return nil, fmt.Errorf("testbed %q: unreadable state (%v); run `migrate testbed down --name %s`", cfg.Name, err, cfg.Name)
	}
	if err := Down(ctx, cfg.Name); err != nil { // leftovers of a crashed run
		return nil, fmt.Errorf("clean leftovers of testbed %s: %w", cfg.Name, err)
	}
	defer func() {
		if err != nil {
			slog.Warn("testbed up failed, tearing down", "testbed", cfg.Name, "err", err)
			if derr := Down(context.WithoutCancel(ctx), cfg.Name); derr != nil {
				slog.Error("testbed down after failed up", "err", derr)
			}
			tb = nil
		}
	}()

	tb = &Testbed{Name: cfg.Name, Underlay: "/run/netns/" + netnsName(cfg.Name, "ul"), Subnet: "10.99.0.0/24", MemloadBin: cfg.Memload}
	if cfg.Owner > 0 {
		tb.Owner = cfg.Owner
		if tb.OwnerStart, err = processStart(cfg.Owner); err != nil {
			return nil, fmt.Errorf("testbed owner %d: %w", cfg.Owner, err)
		}
	}
	for i, name := range append(append([]string{}, cfg.Hosts...), ClientName) {
		link := cfg.Link
		if l, ok := cfg.Links[name]; ok {
			link = l
		}
		h := &Host{
			Name:       name,
			NetNS:      "/run/netns/" + netnsName(cfg.Name, name),
			Dir:        filepath.Join(stateDir(cfg.Name), name),
			UnderlayIP: netip.AddrFrom4([4]byte{10, 99, 0, byte(i + 1)}),
			Link:       link,
		}
		if name == ClientName {
			h.UnderlayIP = netip.AddrFrom4([4]byte{10, 99, 0, 100})
		} else {
			h.MountNS = filepath.Join(stateDir(cfg.Name), name+".mnt")
			h.DataDir = filepath.Join(dataDir(cfg.Name), name)
			h.PodmanURI = "unix://" + filepath.Join(h.Dir, "podman.sock")
			if !cfg.NoOVS {
				h.OVSDir = filepath.Join(h.Dir, "ovs")
			}
		}
		tb.Hosts = append(tb.Hosts, h)
	}

	if err := ensurePrivateStateRoot(ctx); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(stateDir(cfg.Name), 0o755); err != nil {
		return nil, err
	}
	if err := tb.buildNetwork(ctx); err != nil {
		return nil, fmt.Errorf("underlay: %w", err)
	}
	for _, h := range tb.Hosts {
		if h.IsClient() {
			continue
		}
		if err := tb.startHost(ctx, h); err != nil {
			return nil, fmt.Errorf("host %s: %w", h.Name, err)
		}
	}
	if cfg.Images != "" || cfg.Memload != "" {
		archive := cfg.Images
		if archive == "" {
			if archive, err = tb.EnsureImages(ctx, cfg.Hosts[0], cfg.Memload); err != nil {
				return nil, err
			}
		}
		if err := tb.LoadImages(ctx, archive); err != nil {
			return nil, err
		}
	}
	if cfg.Agents != "" {
		if cfg.NoOVS {
			return nil, errors.New("agents need Open vSwitch (the overlay)")
		}
		tb.MigrateBin = cfg.Agents
		if err := tb.startAgents(ctx); err != nil {
			return nil, fmt.Errorf("agents: %w", err)
		}
	}
	if err := tb.save(); err != nil {
		return nil, err
	}
	slog.Info("testbed up", "testbed", tb.Name, "hosts", cfg.Hosts)
	return tb, nil
}

func (tb *Testbed) save() error {
	b, err := json.MarshalIndent(tb, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(stateDir(tb.Name), "testbed.json"), b, 0o644)
}

// ownerGone reports whether the testbed had an owner process that no longer runs.
func (tb *Testbed) ownerGone() bool {
	if tb.Owner <= 0 {
		return false
	}
	start, err := processStart(tb.Owner)
	return err != nil || start != tb.OwnerStart
}

// processStart is the start time of a process (field 22 of /proc/PID/stat, clock ticks
// since boot): with the PID it names one process across PID reuse.
func processStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces: count from its end.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// Load returns the running testbed called name.
func Load(name string) (*Testbed, error) {
	b, err := os.ReadFile(filepath.Join(stateDir(name), "testbed.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("testbed %q is not up (start it with `migrate testbed up --name %s`)", name, name)
	}
	if err != nil {
		return nil, err
	}
	var tb Testbed
	if err := json.Unmarshal(b, &tb); err != nil {
		return nil, fmt.Errorf("read testbed %s state: %w", name, err)
	}
	return &tb, nil
}

// Preflight checks that the tools the testbed drives are installed.
func Preflight(ovs bool) error {
	if os.Geteuid() != 0 {
		return errors.New("the testbed needs root (network and mount namespaces)")
	}
	need := []string{"ip", "nsenter", "unshare", "mount", "umount", "podman", "runc", "conmon"}
	if ovs {
		need = append(need, "ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl")
	}
	var missing []string
	for _, n := range need {
		if _, err := lookPath(n); err != nil {
			missing = append(missing, n)
		}
	}
	if _, err := os.Stat("/usr/local/sbin/criu"); err != nil {
		if _, err := lookPath("criu"); err != nil {
			missing = append(missing, "criu")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s: run scripts/install.sh as root", strings.Join(missing, ", "))
	}
	return nil
}

func lookPath(name string) (string, error) {
	for _, dir := range filepath.SplitList(binPath) {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", exec.ErrNotFound
}

// ensurePrivateStateRoot makes StateRoot a private bind mount of itself: a persisted mount
// namespace must live on a mount that does not propagate into the namespaces it holds.
func ensurePrivateStateRoot(ctx context.Context) error {
	if err := os.MkdirAll(StateRoot, 0o755); err != nil {
		return err
	}
	if isMountPoint(StateRoot) {
		return nil
	}
	if err := syscall.Mount(StateRoot, StateRoot, "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s: %w", StateRoot, err)
	}
	if err := syscall.Mount("", StateRoot, "", syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make %s private: %w", StateRoot, err)
	}
	return nil
}

// isMountPoint reports whether path is a mount point in this mount namespace.
func isMountPoint(path string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}
