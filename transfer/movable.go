package transfer

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/pages"
)

// What can move with a container and what cannot: a host device or the host's network
// stays behind, and a bind mount needs its path on the target (it is not copied).

// movable is the source's part of the pre-flight gate about the container itself.
func movable(c *checkpoint.Container) []Check {
	var out []Check
	if len(c.Devices) > 0 {
		out = append(out, Check{Property: "devices", Source: strings.Join(c.Devices, ","), Target: "-", OK: false,
			Detail: "the container uses host devices, which stay with their host: run it without them to move it"})
	}
	if c.NetworkMode == "host" {
		out = append(out, Check{Property: "network", Source: "host", Target: "-", OK: false,
			Detail: "the container shares its host's network, which cannot move: start it with `migrate run --ip`"})
	}
	return out
}

// capSysResource is CAP_SYS_RESOURCE's number.
const capSysResource = 24

// hasCapability reports whether this process has the capability in its effective set.
func hasCapability(bit uint) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	v, ok := statusField(b, "CapEff")
	n, err := strconv.ParseUint(v, 16, 64)
	return ok && err == nil && n&(1<<bit) != 0
}

// processUsers lists the users (real, effective, saved) other than root that the
// container's processes run as.
func processUsers(init int) ([]string, error) {
	pids, err := pages.Processes(init)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue // gone meanwhile
		}
		v, _ := statusField(b, "Uid")
		f := strings.Fields(v)
		for _, u := range f[:min(3, len(f))] {
			if u != "0" && !seen[u] {
				seen[u] = true
				out = append(out, "uid "+u)
			}
		}
	}
	sort.Strings(out)
	return out, nil
}

// usersCheck: without CAP_SYS_RESOURCE, CRIU fails to dump a process of another user
// ("Can't get rlimit"): the pre-flight says so before anything is frozen.
func usersCheck(noSysResource bool, c *checkpoint.Container) []Check {
	if !noSysResource || c.PID == 0 {
		return nil
	}
	users, err := processUsers(c.PID)
	if err != nil || len(users) == 0 {
		return nil
	}
	return []Check{{Property: "process users", Source: strings.Join(users, ","), Target: "-", OK: false,
		Detail: "CRIU cannot read the rlimits of a non-root process without CAP_SYS_RESOURCE, which this host's agent lacks (its bounding set): run the agent with it, or the container's processes as root"}}
}

// bindSources lists the host paths a container bind-mounts.
func bindSources(c *checkpoint.Container) []string {
	var out []string
	vols := volumeNames(c)
next:
	for _, m := range c.Mounts {
		if m.Type != checkpoint.MountBind {
			continue
		}
		for _, v := range vols {
			if isVolumeDir(m.Source, v) {
				continue next // a migrate volume: it moves
			}
		}
		out = append(out, m.Source)
	}
	return out
}

// maxBinds bounds the bind mounts one request may name.
const maxBinds = 256

// bindCheck is the target's check that every bind-mounted path exists here.
func bindCheck(paths []string) Check {
	c := Check{Property: "bind mounts", Source: fmt.Sprintf("%d paths", len(paths)), Target: "present", OK: true}
	if len(paths) > maxBinds {
		c.OK, c.Target, c.Detail = false, "-", fmt.Sprintf("more than %d bind mounts", maxBinds)
		return c
	}
	var missing []string
	for _, p := range paths {
		if !filepath.IsAbs(p) {
			missing = append(missing, p+" (not absolute)")
			continue
		}
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		c.OK, c.Target = false, "missing"
		c.Detail = "bind mounts are not copied; create on the target: " + strings.Join(missing, ", ")
	}
	return c
}

// Limits on what `migrate run` passes to podman.
const (
	maxRunMounts = 64
	maxRunKV     = 256 // labels, annotations, env
)

// checkRun validates a run request beyond its name and address: every mount, label and
// limit, with a reason a user can act on.
func checkRun(req *RunRequest) error {
	if len(req.Mounts) > maxRunMounts {
		return fmt.Errorf("at most %d mounts", maxRunMounts)
	}
	if len(req.Labels) > maxRunKV || len(req.Annotations) > maxRunKV || len(req.Env) > maxRunKV {
		return fmt.Errorf("at most %d labels, annotations or environment variables each", maxRunKV)
	}
	for k := range req.Labels {
		if strings.HasPrefix(k, "migrate.") {
			return fmt.Errorf("label %q: labels migrate.* are migrate's own", k)
		}
	}
	for k := range req.Annotations {
		if k == checkpoint.AnnotationCRIUConfig {
			return fmt.Errorf("annotation %q is set by migrate (it steers CRIU during a move)", k)
		}
	}
	dests := map[string]bool{}
	for _, m := range req.Mounts {
		if !filepath.IsAbs(m.Dest) || filepath.Clean(m.Dest) == "/" {
			return fmt.Errorf("mount destination %q: want an absolute path inside the container, not /", m.Dest)
		}
		if dests[filepath.Clean(m.Dest)] {
			return fmt.Errorf("two mounts at %s", m.Dest)
		}
		dests[filepath.Clean(m.Dest)] = true
		switch m.Type {
		case checkpoint.MountVolume:
			if err := ValidVolumeName(m.Source); err != nil {
				return err
			}
		case checkpoint.MountBind:
			if !filepath.IsAbs(m.Source) {
				return fmt.Errorf("bind mount %q: want an absolute host path (a name is a volume)", m.Source)
			}
			if _, err := os.Stat(m.Source); err != nil {
				return fmt.Errorf("bind mount: %s does not exist on this host", m.Source)
			}
		case checkpoint.MountTmpfs:
			for _, o := range m.Options {
				k, _, _ := strings.Cut(o, "=")
				switch k {
				case "size", "mode", "uid", "gid", "nr_inodes", "noexec", "nosuid", "nodev", "exec", "suid", "dev":
				default:
					return fmt.Errorf("tmpfs %s: option %q: want size=, mode=, uid=, gid=, nr_inodes= or noexec/nosuid/nodev", m.Dest, o)
				}
			}
		default:
			return fmt.Errorf("mount at %s: type %q: want volume, bind or tmpfs", m.Dest, m.Type)
		}
	}
	if req.MemoryLimit < 0 || (req.MemoryLimit > 0 && req.MemoryLimit < 6<<20) {
		return fmt.Errorf("--memory %d bytes: want at least 6 MiB", req.MemoryLimit)
	}
	if req.CPUs < 0 || req.CPUs > 1024 {
		return fmt.Errorf("--cpus %g: want a number of CPUs above 0", req.CPUs)
	}
	return nil
}

// ValidVolumeName checks a named volume's name (podman's rule, and a length bound).
func ValidVolumeName(name string) error {
	ok := name != "" && len(name) <= 128
	for i, r := range name {
		alnum := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9'
		if !alnum && (i == 0 || !strings.ContainsRune("_.-", r)) {
			ok = false
		}
	}
	if !ok {
		return fmt.Errorf("volume name %q: want letters, digits, '_', '.' or '-', starting with a letter or digit, at most 128", name)
	}
	return nil
}
