package transfer

// The early restore of the read hand-over: the target need not wait for podman's archive.
//
// In a lazy dump CRIU writes every image before its lazy page server listens (criu
// cr-dump.c: the inventory, then cr_dump_finish flushes the images and only then serves
// the pages). Once the agent has read the memory and closed CRIU's transfer, what is left
// on this host is CRIU ending the dump (it kills the processes, which grows with memory),
// runc, and podman writing its archive and cleaning up: 0.15 s for a small container,
// 0.4 s for 1 GiB, all of it frozen time in which the target waited for the archive.
// Instead the source sends the archive as it is when CRIU listens (config.dump, spec.dump,
// the checkpoint images, the container's log), as post-copy does, and the target restores
// while podman finishes here. The move is decided only once both are done: the target
// answered that the container runs there and podman's checkpoint returned without error;
// anything else rolls back as before (the memory was kept before CRIU's transfer closed).
// After a streamed restore (the images before the memory) CRIU's transfer stays open
// until the target has restored, so that podman's end here does not compete with it
// (handover.go, endDump); a failure before then fails CRIU's dump and the container runs
// on here.
//
// Podman's archive holds more only where the container changed its root file system
// (rootfs-diff.tar, deleted.files) or keeps files in /dev/shm (devshm-checkpoint.tar);
// both are checked while CRIU dumps, and where either holds anything the target waits
// for podman's archive as before.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/pages"
)

// earlyCheckLimit bounds the check itself; earlyWait how long the frozen phase waits for
// its answer once the memory is handed over (the check runs while CRIU dumps, and is
// usually done by then). An answer that comes later means podman's archive: a container
// must not stay frozen for a check whose only purpose is to save time.
// streamWait is how long CRIU's listening waits for it: an answer by then lets the
// images go before the memory, so that the target restores while the memory crosses.
const (
	earlyCheckLimit = 3 * time.Second
	earlyWait       = 250 * time.Millisecond
	streamWait      = 50 * time.Millisecond
)

// rootfsTravels names the first root file system change that podman's archive would
// carry ("" if none), by podman's own rule (pkg/checkpoint/crutils,
// CRCreateRootFsDiffTar): an added or deleted path always; a changed one when stat, which
// podman calls with the path as `podman diff` gives it, finds something other than a
// directory there.
func rootfsTravels(changes []checkpoint.RootfsChange, stat func(string) (fs.FileInfo, error)) string {
	for _, c := range changes {
		switch c.Kind {
		case "A", "D":
			return c.Kind + " " + c.Path
		case "C":
			fi, err := stat(c.Path)
			if err == nil && !fi.IsDir() {
				return c.Kind + " " + c.Path
			}
		default:
			return c.Kind + " " + c.Path // a kind this rule does not know: podman's archive
		}
	}
	return ""
}

// shmHolds names a file in the container's /dev/shm ("" if it holds none): podman would
// carry it in devshm-checkpoint.tar.
func shmHolds(pid int) (string, error) {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "root", "dev", "shm")
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if len(ents) > 0 {
		return "/dev/shm/" + ents[0].Name(), nil
	}
	return "", nil
}

// earlyProblem says why the target must wait for podman's archive ("" if the images as
// CRIU wrote them are all it needs). It runs while the container is frozen.
func (a *Agent) earlyProblem(ctx context.Context, c *checkpoint.Container) string {
	ctx, cancel := context.WithTimeout(ctx, earlyCheckLimit)
	defer cancel()
	if f, err := shmHolds(c.PID); err != nil {
		return "its /dev/shm could not be read: " + err.Error()
	} else if f != "" {
		return "it keeps " + f + " (podman's archive carries /dev/shm)"
	}
	changes, err := a.podman.RootfsDiff(ctx, c.Name)
	if err != nil {
		return "podman diff: " + err.Error()
	}
	if p := rootfsTravels(changes, os.Stat); p != "" {
		return fmt.Sprintf("it changed its root file system (%s; %d changes): podman's archive carries them", p, len(changes))
	}
	return ""
}

// earlyCheck runs earlyProblem in the background; its answer may be read any number of
// times (the prelude and CRIU's listening both wait for it).
type earlyCheck struct {
	done    chan struct{}
	problem string
}

func newEarlyCheck() *earlyCheck { return &earlyCheck{done: make(chan struct{})} }

// set gives the check's answer (once).
func (c *earlyCheck) set(problem string) {
	c.problem = problem
	close(c.done)
}

func (a *Agent) startEarlyCheck(ctx context.Context, c *checkpoint.Container) *earlyCheck {
	ch := newEarlyCheck()
	goSafe("early restore check", func() { ch.set(a.earlyProblem(ctx, c)) },
		func(p any) { ch.set(fmt.Sprintf("internal error: %v", p)) })
	return ch
}

// within returns the answer if it comes within d (ok false if not).
func (c *earlyCheck) within(d time.Duration) (problem string, ok bool) {
	select {
	case <-c.done:
		return c.problem, true
	case <-time.After(d):
		return "", false
	}
}

// answer waits for the check, at most earlyWait.
func (c *earlyCheck) answer() string {
	if p, ok := c.within(earlyWait); ok {
		return p
	}
	return "the check of its root file system and /dev/shm did not answer within " + earlyWait.String() + " of the memory's hand-over"
}

// logFile is the container's log (k8s-file: userdata/ctr.log), which podman's archive
// carries so that `podman logs` on the target shows what the container printed here.
const logFile = "ctr.log"

// earlySummary is how a push reports the early restore.
func earlySummary(problem string, streamed, gated bool) string {
	if problem == "" && streamed && gated {
		return "yes, streamed and gated: the target's podman imported while CRIU dumped here, and restored from CRIU's images while the memory crossed and podman finished here"
	}
	if problem == "" && streamed {
		return "yes, streamed: the target restored from CRIU's images while the memory crossed and podman finished here"
	}
	if problem == "" {
		return "yes: the target restored while podman finished here"
	}
	return "no: " + strings.TrimSpace(problem)
}

// exportLimit bounds podman's checkpoint call (CRIU's dump, podman's archive and its
// clean-up) when nothing else ends it first.
const exportLimit = 10 * time.Minute

// watchExit tells when process pid ends, through a pidfd opened now (so that a later
// process with the same number is never taken for it). The channel is nil if the process
// cannot be watched (it has ended already, or the kernel has no pidfd): the caller then
// waits for podman instead.
func watchExit(pid int) (<-chan time.Time, func()) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		slog.Debug("watch the container's end", "pid", pid, "err", err)
		return nil, func() {}
	}
	ch := make(chan time.Time, 1)
	stop, stopped := stopper()
	go func() {
		defer unix.Close(fd)
		for {
			select {
			case <-stop:
				return
			default:
			}
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, err := unix.Poll(fds, 50)
			if err != nil && err != unix.EINTR {
				return
			}
			if n > 0 && fds[0].Revents&(unix.POLLIN|unix.POLLHUP) != 0 {
				ch <- time.Now()
				return
			}
		}
	}()
	return ch, stopped
}

// stopper returns a channel and the function that closes it, which may be called more
// than once: a watcher's stop.
func stopper() (<-chan struct{}, func()) {
	stop := make(chan struct{})
	var once sync.Once
	return stop, func() { once.Do(func() { close(stop) }) }
}

// watchKilled tells when no process of the container whose first process is init can run
// an instruction again: each has gone, or is exiting, or has SIGKILL pending (which
// cannot be blocked, and wakes even a frozen or traced task only to end it). CRIU sends
// SIGKILL to the processes it dumped once its dump succeeded (cr_dump_finish); ending
// them then frees their memory first (exit_mm), before the first process's pidfd tells
// (watchExit): about 80 ms for 1 GiB on this kind of machine, time the container was
// frozen for nothing. It polls every step until stop; the processes are listed at the
// first poll (they are frozen: none starts meanwhile). The channel is nil if the
// container's processes cannot be listed.
//
// It is only asked once CRIU's dump has succeeded (endDump, or podman's checkpoint
// reached that point): its signs then only come earlier than the pidfd's, never in place
// of a dump that failed. (A leader that is a zombie while its other threads run would
// look doomed, but CRIU does not dump such a process.)
func watchKilled(init int, step time.Duration) (<-chan time.Time, func()) {
	pids, err := pages.Processes(init)
	if err != nil {
		slog.Debug("watch the container's processes killed", "pid", init, "err", err)
		return nil, func() {}
	}
	ch := make(chan time.Time, 1)
	stop, stopped := stopper()
	go func() {
		t := time.NewTicker(step)
		defer t.Stop()
		for {
			left := pids[:0]
			for _, p := range pids {
				if !doomed(p) {
					left = append(left, p)
				}
			}
			pids = left
			if len(pids) == 0 {
				ch <- time.Now()
				return
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	return ch, stopped
}

// doomed reports whether process pid has gone or will never run an instruction again: it
// is a zombie or dead, is exiting (PF_EXITING), or has SIGKILL pending (a fatal signal
// to a thread group puts it in every thread's own pending set). A process that cannot be
// read for another reason is not doomed.
func doomed(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
		return true
	}
	if err != nil {
		return false
	}
	if d, sure := doomedStat(stat); sure {
		return d
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH)
	}
	return sigkillPending(status)
}

// doomedStat reads /proc/PID/stat: doomed if a zombie, dead or exiting; sure is false
// when it cannot tell (the pending signals are in the status file).
func doomedStat(stat []byte) (doomed, sure bool) {
	// The fields after the command's closing parenthesis (the command may hold any
	// byte): state, ppid, pgrp, session, tty_nr, tpgid, flags.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return false, true
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 7 {
		return false, true
	}
	if f[0] == "Z" || f[0] == "X" || f[0] == "x" {
		return true, true
	}
	const pfExiting = 0x4
	if flags, err := strconv.ParseUint(f[6], 10, 64); err == nil && flags&pfExiting != 0 {
		return true, true
	}
	return false, false
}

// sigkillPending reads /proc/PID/status: SIGKILL pending, for the thread or the process.
func sigkillPending(status []byte) bool {
	const sigkill = 1 << (9 - 1)
	for _, k := range []string{"SigPnd", "ShdPnd"} {
		v, ok := statusField(status, k)
		if mask, err := strconv.ParseUint(v, 16, 64); ok && err == nil && mask&sigkill != 0 {
			return true
		}
	}
	return false
}

// statusField returns the value of field key of a /proc/PID/status file, trimmed.
func statusField(status []byte, key string) (string, bool) {
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.TrimSpace(v), true
		}
	}
	return "", false
}
