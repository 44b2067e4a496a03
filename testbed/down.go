package testbed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Down removes testbed name and everything it started: containers, podman services, OVS
// instances, leftover processes in its namespaces, mounts, namespaces (and with them their
// links and tc qdiscs) and its directories. It finds them by name, so it also cleans up
// after a crashed or killed run, and is a no-op when nothing is left.
func Down(ctx context.Context, name string) error {
	if !validName(name) {
		return fmt.Errorf("testbed name %q: use 1-8 characters a-z, 0-9", name)
	}
	var errs []error
	hosts := discover(name)
	for _, hn := range hosts {
		if hn == "ul" {
			continue
		}
		if err := downHost(ctx, name, hn); err != nil {
			errs = append(errs, fmt.Errorf("host %s: %w", hn, err))
		}
	}
	stopPidfile(filepath.Join(stateDir(name), "wire.pid"), "")
	if ns := "/run/netns/" + netnsName(name, "ul"); exists(ns) {
		killIn(nsID(ns), "")
		if _, err := run(ctx, nil, "ip", "netns", "delete", netnsName(name, "ul")); err != nil {
			errs = append(errs, err)
		}
	}
	for _, d := range []string{stateDir(name), dataDir(name)} {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	// Leave no trace once the last testbed is gone.
	if empty(StateRoot) {
		if isMountPoint(StateRoot) {
			if err := syscall.Unmount(StateRoot, syscall.MNT_DETACH); err != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", StateRoot, err))
			}
		}
		os.Remove(StateRoot)
	}
	if empty(DataRoot) {
		os.Remove(DataRoot)
	}
	if len(hosts) > 0 {
		slog.Info("testbed down", "testbed", name, "hosts", hosts)
	}
	return errors.Join(errs...)
}

func downHost(ctx context.Context, tb, name string) error {
	h := &Host{Name: name, NetNS: "/run/netns/" + netnsName(tb, name), Dir: filepath.Join(stateDir(tb), name)}
	mnt := filepath.Join(stateDir(tb), name+".mnt")
	hasMnt := isMountPoint(mnt)
	if hasMnt {
		h.MountNS = mnt
	}
	hasNet := exists(h.NetNS)
	var errs []error

	// Containers first, the way podman stops them (conmon, container processes, mounts).
	if hasMnt && hasNet {
		cctx, cancel := context.WithTimeout(ctx, 90*time.Second)
		if _, err := run(cctx, nil, "nsenter", append(nsenterArgs(h), "podman", "rm", "--all", "--force", "--time", "0")...); err != nil {
			slog.Warn("remove containers", "host", name, "err", err)
		}
		cancel()
	}
	// Then the daemons we started, by the PIDs we recorded.
	for _, pf := range []struct{ file, comm string }{
		{filepath.Join(h.Dir, "podman.pid"), "podman"},
		{filepath.Join(h.Dir, "ovs", "ovs-vswitchd.pid"), "ovs-vswitchd"},
		{filepath.Join(h.Dir, "ovs", "ovsdb-server.pid"), "ovsdb-server"},
		{filepath.Join(h.Dir, "agent.pid"), "migrate"},
	} {
		stopPidfile(pf.file, pf.comm)
	}
	// Anything still alive in the host's namespaces was started by the testbed (a container
	// whose conmon died, a command run with `testbed exec`): end it and its children.
	var netID, mntID string
	if hasNet {
		netID = nsID(h.NetNS)
	}
	if hasMnt {
		mntID = nsID(mnt)
	}
	killIn(netID, mntID)

	if hasMnt {
		if err := syscall.Unmount(mnt, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mnt, err))
		}
	}
	if hasNet {
		if _, err := run(ctx, nil, "ip", "netns", "delete", netnsName(tb, name)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// stopPidfile ends the process named in file, if it is still the command we started.
func stopPidfile(file, comm string) {
	b, err := os.ReadFile(file)
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return
	}
	c, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil || !strings.HasPrefix(strings.TrimSpace(string(c)), comm) {
		return // gone, or the PID now belongs to something else
	}
	terminate([]int{pid})
}

// terminate sends SIGTERM, waits up to 5 s, then SIGKILLs what is left.
func terminate(pids []int) {
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGTERM)
	}
	waitGone(pids, 5*time.Second)
	for _, p := range pids {
		if alive(p) {
			syscall.Kill(p, syscall.SIGKILL)
		}
	}
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie has finished; its parent reaps it.
	f := strings.Fields(string(b))
	return len(f) > 2 && f[2] != "Z"
}

// killIn ends every process whose network namespace is netID or whose mount namespace is
// mntID, with all their descendants.
func killIn(netID, mntID string) {
	if netID == "" && mntID == "" {
		return
	}
	procs := listProcs()
	children := map[int][]int{}
	for _, p := range procs {
		children[p.ppid] = append(children[p.ppid], p.pid)
	}
	self := os.Getpid()
	mark := map[int]bool{}
	var walk func(int)
	walk = func(pid int) {
		if mark[pid] || pid == self || pid <= 1 {
			return
		}
		mark[pid] = true
		for _, c := range children[pid] {
			walk(c)
		}
	}
	for _, p := range procs {
		if (netID != "" && p.netns == netID) || (mntID != "" && p.mntns == mntID) {
			walk(p.pid)
		}
	}
	if len(mark) == 0 {
		return
	}
	pids := make([]int, 0, len(mark))
	for p := range mark {
		pids = append(pids, p)
	}
	sort.Ints(pids)
	slog.Debug("ending leftover processes", "pids", pids)
	// Freeze the tree first so nothing respawns, then kill it.
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGSTOP)
	}
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGKILL)
	}
	waitGone(pids, 5*time.Second)
}

// waitGone waits up to d for the processes to end.
func waitGone(pids []int, d time.Duration) {
	deadline := time.Now().Add(d)
	for _, p := range pids {
		for alive(p) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// discover lists the hosts of testbed name that left any trace: a network namespace, a
// persisted mount namespace, or a directory.
func discover(name string) []string {
	set := map[string]bool{}
	prefix := "mtb-" + name + "-"
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if h, ok := strings.CutPrefix(e.Name(), prefix); ok {
				set[h] = true
			}
		}
	}
	if ents, err := os.ReadDir(stateDir(name)); err == nil {
		for _, e := range ents {
			if h, ok := strings.CutSuffix(e.Name(), ".mnt"); ok {
				set[h] = true
			} else if e.IsDir() {
				set[e.Name()] = true
			}
		}
	}
	if ents, err := os.ReadDir(dataDir(name)); err == nil {
		for _, e := range ents {
			if e.IsDir() {
				set[e.Name()] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for h := range set {
		out = append(out, h)
	}
	sort.Strings(out)
	return out
}

// Leftovers lists what testbed name still holds on this machine; empty after Down.
func Leftovers(name string) []string {
	var out []string
	for _, h := range discover(name) {
		out = append(out, "host "+h)
	}
	for _, p := range []string{stateDir(name), dataDir(name)} {
		if exists(p) {
			out = append(out, p)
		}
	}
	return out
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func empty(dir string) bool {
	ents, err := os.ReadDir(dir)
	return err == nil && len(ents) == 0
}
