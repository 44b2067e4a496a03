package transfer

// What a failed lazy dump leaves locked. CRIU decides whether to unlock the container's
// network (its CRIU chain of iptables rules, or its CRIU nftables table, in the
// container's network namespace, and the TCP sockets it put into repair mode) before
// its lazy page server runs; when the page server then fails (this agent hung up with a
// reset, to keep the container), CRIU lets the processes run on but leaves the network
// locked. The rollback unlocks it as CRIU's network_unlock would: nothing is done where
// nothing is locked.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/migrate-project/migrate/pages"
)

// unlockNetwork releases the network lock a dump left on the container whose first
// process is init, and reports what it released.
func unlockNetwork(ctx context.Context, init int) (released []string, err error) {
	netns := fmt.Sprintf("--net=/proc/%d/ns/net", init)
	run := func(args ...string) ([]byte, error) {
		cmd := exec.CommandContext(ctx, "nsenter", append([]string{netns, "--"}, args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return out, fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
		}
		return out, nil
	}
	var errs []error
	for _, ipt := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(ipt); err != nil {
			continue
		}
		if _, err := run(ipt, "-w", "-n", "-L", "CRIU"); err != nil {
			continue // no CRIU chain
		}
		for _, args := range [][]string{{"-D", "INPUT", "-j", "CRIU"}, {"-D", "OUTPUT", "-j", "CRIU"}, {"-F", "CRIU"}, {"-X", "CRIU"}} {
			if _, err := run(append([]string{ipt, "-w"}, args...)...); err != nil && args[0] != "-D" {
				errs = append(errs, err)
			}
		}
		released = append(released, ipt+" chain CRIU")
	}
	if _, err := exec.LookPath("nft"); err == nil {
		out, err := run("nft", "list", "tables")
		if err == nil {
			for _, line := range strings.Split(string(out), "\n") {
				f := strings.Fields(line) // table FAMILY NAME
				if len(f) == 3 && f[0] == "table" && strings.HasPrefix(f[2], "CRIU") {
					if _, err := run("nft", "delete", "table", f[1], f[2]); err != nil {
						errs = append(errs, err)
					} else {
						released = append(released, "nft table "+f[1]+" "+f[2])
					}
				}
			}
		}
	}
	n, err := repairOff(init)
	if err != nil {
		errs = append(errs, err)
	}
	if n > 0 {
		released = append(released, fmt.Sprintf("%d TCP sockets out of repair mode", n))
	}
	return released, errors.Join(errs...)
}

// repairOff takes the container's TCP sockets that are in repair mode out of it, as
// CRIU does when it unlocks a connection: through a copy of each socket taken from its
// process (pidfd_getfd).
func repairOff(init int) (int, error) {
	pids, err := pages.Processes(init)
	if err != nil {
		return 0, nil // gone
	}
	seen := map[string]bool{}
	n := 0
	var errs []error
	for _, pid := range pids {
		dir := fmt.Sprintf("/proc/%d/fd", pid)
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		var pidfd int = -1
		for _, e := range ents {
			link, err := os.Readlink(dir + "/" + e.Name())
			if err != nil || !strings.HasPrefix(link, "socket:[") || seen[link] {
				continue
			}
			seen[link] = true
			fd, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			if pidfd < 0 {
				if pidfd, err = unix.PidfdOpen(pid, 0); err != nil {
					errs = append(errs, fmt.Errorf("pidfd of process %d: %w", pid, err))
					break
				}
			}
			dup, err := unix.PidfdGetfd(pidfd, fd, 0)
			if err != nil {
				continue // closed meanwhile
			}
			if v, err := unix.GetsockoptInt(dup, unix.IPPROTO_TCP, unix.TCP_REPAIR); err == nil && v == 1 {
				if err := unix.SetsockoptInt(dup, unix.IPPROTO_TCP, unix.TCP_REPAIR, 0); err != nil {
					errs = append(errs, fmt.Errorf("socket %d of process %d out of repair mode: %w", fd, pid, err))
				} else {
					n++
				}
			}
			unix.Close(dup)
		}
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
	}
	return n, errors.Join(errs...)
}
