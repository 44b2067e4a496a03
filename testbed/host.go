package testbed

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/migrate-project/migrate/overlaynet"
)

// startHost gives h its mount namespace with a private podman store at the default paths,
// its podman API service and (unless disabled) its Open vSwitch instance.
func (tb *Testbed) startHost(ctx context.Context, h *Host) error {
	if err := os.MkdirAll(h.Dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(h.MountNS, nil, 0o644); err != nil {
		return err
	}
	if _, err := run(ctx, nil, "unshare", "--mount="+h.MountNS, "--propagation", "private", "true"); err != nil {
		return fmt.Errorf("mount namespace: %w", err)
	}
	for _, p := range podmanPaths {
		src := filepath.Join(h.DataDir, strings.ReplaceAll(strings.Trim(p, "/"), "/", "-"))
		if err := os.MkdirAll(src, 0o755); err != nil {
			return err
		}
		if err := os.MkdirAll(p, 0o755); err != nil { // the mount point, in the shared file system
			return err
		}
		if _, err := run(ctx, nil, "nsenter", "--mount="+h.MountNS, "--", "mount", "--bind", src, p); err != nil {
			return fmt.Errorf("private %s: %w", p, err)
		}
	}
	// sysfs shows the network devices of the namespace that mounted it: give the host its
	// own, as `ip netns exec` does, or /sys/class/net would list the machine's devices.
	// The cgroup hierarchies live under the old /sys: park them, mount the new sysfs, and
	// move them back in.
	park := filepath.Join(h.Dir, "cgroup")
	if err := os.MkdirAll(park, 0o755); err != nil {
		return err
	}
	for _, args := range [][]string{
		{"mount", "--rbind", "/sys/fs/cgroup", park},
		{"mount", "-t", "sysfs", "sysfs", "/sys"},
		{"mount", "--move", park, "/sys/fs/cgroup"},
	} {
		if _, err := run(ctx, nil, "nsenter", append(nsenterArgs(h), args...)...); err != nil {
			return fmt.Errorf("sysfs of %s: %w", h.Name, err)
		}
	}
	if err := tb.startPodman(ctx, h); err != nil {
		return err
	}
	if h.OVSDir != "" {
		if err := tb.startOVS(ctx, h); err != nil {
			return fmt.Errorf("open vswitch: %w", err)
		}
	}
	return nil
}

func (tb *Testbed) startPodman(ctx context.Context, h *Host) error {
	logf, err := os.Create(filepath.Join(h.Dir, "podman.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	args := append(nsenterArgs(h), "podman")
	// MIGRATE_PODMAN_LOG_LEVEL=debug times podman's steps in podman.log (kept with the
	// agents' logs under MIGRATE_AGENT_LOGS).
	if lvl := os.Getenv("MIGRATE_PODMAN_LOG_LEVEL"); lvl != "" {
		args = append(args, "--log-level="+lvl)
	}
	cmd := exec.Command("nsenter", append(args, "system", "service", "--time=0", h.PodmanURI)...)
	cmd.Env = baseEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start podman service: %w", err)
	}
	go cmd.Wait() //nolint:errcheck // reaps it if it ends while we run; Down stops it by PID
	if err := os.WriteFile(filepath.Join(h.Dir, "podman.pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		return err
	}
	sock := strings.TrimPrefix(h.PodmanURI, "unix://")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := pingPodman(ctx, sock); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("podman service on %s did not answer within 30s (%v); log: %s", h.Name, err, filepath.Join(h.Dir, "podman.log"))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// pingPodman asks the podman API service behind a unix socket for /_ping.
func pingPodman(ctx context.Context, sock string) error {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://d/_ping", nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/_ping: %s", resp.Status)
	}
	return nil
}

func (tb *Testbed) startOVS(ctx context.Context, h *Host) error {
	d := h.OVSDir
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	schema := "/usr/share/openvswitch/vswitch.ovsschema"
	if _, err := run(ctx, nil, "ovsdb-tool", "create", filepath.Join(d, "conf.db"), schema); err != nil {
		return err
	}
	db := "unix:" + filepath.Join(d, "db.sock")
	steps := [][]string{
		{"ovsdb-server", filepath.Join(d, "conf.db"), "--remote=punix:" + filepath.Join(d, "db.sock"),
			"--pidfile=" + filepath.Join(d, "ovsdb-server.pid"), "--unixctl=" + filepath.Join(d, "ovsdb-server.ctl"),
			"--log-file=" + filepath.Join(d, "ovsdb-server.log"), "--detach", "--no-chdir"},
		{"ovs-vsctl", "--db=" + db, "--no-wait", "init"},
		{"ovs-vswitchd", db, "--pidfile=" + filepath.Join(d, "ovs-vswitchd.pid"),
			"--unixctl=" + filepath.Join(d, "ovs-vswitchd.ctl"), "--log-file=" + filepath.Join(d, "ovs-vswitchd.log"),
			"--detach", "--no-chdir"},
		{"ovs-vsctl", "--db=" + db, "--timeout=20", "add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=" + overlaynet.Datapath()},
	}
	for _, s := range steps {
		if _, err := tb.Run(ctx, h.Name, s...); err != nil {
			return err
		}
	}
	slog.Debug("ovs up", "host", h.Name, "datapath", overlaynet.Datapath())
	return nil
}

// procNS returns the namespace identity (device:inode) of path, or "" if it is not a namespace.
func nsID(path string) string {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return ""
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino)
}

// procInfo is one process, as seen in /proc.
type procInfo struct {
	pid, ppid int
	comm      string
	netns     string
	mntns     string
}

func listProcs() []procInfo {
	ents, _ := os.ReadDir("/proc")
	var ps []procInfo
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		p := procInfo{pid: pid}
		f, err := os.Open(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, _ := strings.Cut(sc.Text(), ":")
			switch k {
			case "Name":
				p.comm = strings.TrimSpace(v)
			case "PPid":
				p.ppid, _ = strconv.Atoi(strings.TrimSpace(v))
			}
		}
		f.Close()
		p.netns = nsID(filepath.Join("/proc", e.Name(), "ns/net"))
		p.mntns = nsID(filepath.Join("/proc", e.Name(), "ns/mnt"))
		ps = append(ps, p)
	}
	return ps
}
