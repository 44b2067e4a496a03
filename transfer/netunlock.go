package transfer

// What a failed lazy dump leaves locked. CRIU decides whether to unlock the container's
// network (its CRIU chain of iptables rules, or its CRIU nftables table, in the
// container's network namespace, and the TCP sockets it put into repair mode) before
// its lazy page server runs; when the page server then fails (this agent hung up with a
// reset, to keep the container), CRIU lets the processes run on but leaves the network
// locked. The rollback unlocks it as CRIU's network_unlock would: nothing is done where
// nothing is locked. Like CRIU (sk-tcp.c, tcp_unlock_one), it gives each socket back the
// SO_REUSEADDR it had before the dump: the kernel clears it when a socket leaves repair
// mode, and a connection that later closes from this side then sits in TIME_WAIT for a
// minute without it, which makes the next restore of the container's listening socket on
// that port fail ("Can't bind inet socket: Address already in use"): a move rolled back
// within that minute could not bring the container back until it passed.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrate-project/migrate/pages"
)

// unlockNetwork releases the network lock a dump left on the container whose first
// process is init, and reports what it released. images is the failed dump's checkpoint
// directory ("" if none): the SO_REUSEADDR it recorded of each socket is restored.
func unlockNetwork(ctx context.Context, init int, images string) (released []string, err error) {
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
	reuse := map[uint64]bool{}
	if images != "" {
		var rerr error
		if reuse, rerr = dumpedReuseAddr(filepath.Join(images, "files.img")); rerr != nil {
			slog.Debug("the failed dump's socket options; SO_REUSEADDR set on every socket taken out of repair mode", "err", rerr)
		}
	}
	n, err := repairOff(init, reuse)
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
// process (pidfd_getfd). Each gets back the SO_REUSEADDR reuse records for its inode; one
// not recorded gets it set (most connections in a server were accepted from a listening
// socket that has it, and a connection that has it never blocks a later bind).
func repairOff(init int, reuse map[uint64]bool) (int, error) {
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
					on := 1
					if ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64); err == nil {
						if r, ok := reuse[ino]; ok && !r {
							on = 0
						}
					}
					if err := unix.SetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_REUSEADDR, on); err != nil {
						errs = append(errs, fmt.Errorf("socket %d of process %d: SO_REUSEADDR: %w", fd, pid, err))
					}
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

// dumpedReuseAddr reads the SO_REUSEADDR a dump recorded of each inet socket, by inode,
// from its files.img (CRIU's FileEntry records).
func dumpedReuseAddr(files string) (map[uint64]bool, error) {
	out := map[uint64]bool{}
	img, err := os.ReadFile(files)
	if err != nil {
		return out, err
	}
	err = pages.ImageEntries(files, img, "FILES", func(b []byte) error {
		var e fdinfo.FileEntry
		if err := (proto.UnmarshalOptions{AllowPartial: true}).Unmarshal(b, &e); err != nil {
			return err
		}
		if e.GetType() == fdinfo.FdTypes_INETSK && e.GetIsk() != nil {
			out[uint64(e.GetIsk().GetIno())] = e.GetIsk().GetOpts().GetReuseaddr()
		}
		return nil
	})
	return out, err
}
