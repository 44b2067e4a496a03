package transfer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The frozen phase freezes the container's cgroup itself, right when its traffic is held,
// before podman's checkpoint reaches CRIU: CRIU finds it frozen and skips its own freezer
// loop, which waits in 100 ms steps (criu/seize.c). CRIU thaws the cgroup once it has
// seized the processes; a rollback thaws it in any case (a running container is never
// left frozen).

// cgroupFreezer is one cgroup's freezer, v1 (freezer.state) or v2 (cgroup.freeze).
type cgroupFreezer struct {
	dir string
	v2  bool
}

// freezerOf finds the freezer of process pid's cgroup.
func freezerOf(pid int) (*cgroupFreezer, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var unified string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "freezer" {
				return &cgroupFreezer{dir: filepath.Join("/sys/fs/cgroup/freezer", parts[2])}, nil
			}
		}
		if parts[0] == "0" && parts[1] == "" {
			unified = parts[2]
		}
	}
	if unified != "" {
		dir := filepath.Join("/sys/fs/cgroup", unified)
		if _, err := os.Stat(filepath.Join(dir, "cgroup.freeze")); err == nil {
			return &cgroupFreezer{dir: dir, v2: true}, nil
		}
	}
	return nil, fmt.Errorf("process %d: no freezer cgroup", pid)
}

func (f *cgroupFreezer) write(frozen bool) error {
	name, val := "freezer.state", "THAWED"
	if f.v2 {
		name, val = "cgroup.freeze", "0"
	}
	if frozen {
		val = map[bool]string{false: "FROZEN", true: "1"}[f.v2]
	}
	return os.WriteFile(filepath.Join(f.dir, name), []byte(val), 0o644)
}

func (f *cgroupFreezer) frozen() (bool, error) {
	if f.v2 {
		b, err := os.ReadFile(filepath.Join(f.dir, "cgroup.events"))
		return strings.Contains(string(b), "frozen 1"), err
	}
	b, err := os.ReadFile(filepath.Join(f.dir, "freezer.state"))
	return strings.TrimSpace(string(b)) == "FROZEN", err
}

// freeze freezes the cgroup and waits (polling each millisecond) until it is frozen; if
// it is not within the deadline, it thaws it again and fails.
func (f *cgroupFreezer) freeze(ctx context.Context, within time.Duration) error {
	if err := f.write(true); err != nil {
		return fmt.Errorf("freeze %s: %w", f.dir, err)
	}
	deadline := time.Now().Add(within)
	for {
		ok, err := f.frozen()
		if err == nil && ok {
			return nil
		}
		if err == nil && time.Now().After(deadline) {
			err = fmt.Errorf("not frozen within %s", within)
		}
		if err == nil {
			err = ctx.Err()
		}
		if err != nil {
			f.write(false)
			return fmt.Errorf("freeze %s: %w", f.dir, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// thaw thaws the cgroup; a cgroup that is gone (its container was checkpointed) is fine.
func (f *cgroupFreezer) thaw() error {
	if err := f.write(false); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("thaw %s: %w", f.dir, err)
	}
	return nil
}
