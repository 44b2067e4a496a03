package transfer

import (
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Fault injection for the tests and the fault matrix (scripts/faults.sh): the agent's
// environment variable MIGRATE_FAULT lists points of a move, each as
//
//	crash:POINT   the agent kills itself (SIGKILL) on reaching POINT
//	fail:POINT    the step at POINT fails with an error
//	pause:POINT   the agent waits 5 s at POINT (a slow step: e.g. long pre-copy rounds)
//	damage:POINT  the data sent at POINT has one bit flipped, after its digest was taken
//
// Points: source-prepare (before asking the target to prepare), source-round (before a
// pre-copy round), source-freeze (traffic held, before the checkpoint), source-stream
// (the archive's first byte is going out: CRIU has dumped, or, with a prelude, CRIU
// still dumps), source-restored
// (the target restored it, before the decision), source-committed (decision journaled,
// before anything else), source-cleanup (before the source copy goes), source-handover
// (the memory path's read hand-over: CRIU's lazy dump waits, nothing read yet),
// source-handover-close (that memory kept, before CRIU's transfer is closed), source-early
// (the read hand-over's early restore: the target restored it, podman may still be at
// work here); target-prepare
// (journaled, before plumbing), target-memory (the frozen phase's memory is arriving,
// memory path only), target-gate (the gated import: podman imports the prelude, CRIU's
// images not here yet), target-stream (the streamed restore: podman restores from CRIU's
// images, the first of the memory's pages has arrived), target-restore (podman restored it, before the journal
// says so), target-commit (on the commit, before acting); source-postcopy (--postcopy,
// decided: each batch of pages pumped to the target); disk-full (every journal write
// fails with ENOSPC); image-upload (damage: an image archive sent to a target);
// checkpoint-stream (damage: the frozen phase's archive, after its digest was taken);
// target-store (damage, on the target: one page it stored in a pre-copy round changes on
// its disk, once per agent).
//
// Without the variable, fault does nothing.
func fault(point string) error {
	for _, kind := range faultsAt(point) {
		switch kind {
		case "crash":
			slog.Error("fault injection: crashing", "point", point)
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		case "fail":
			return fmt.Errorf("fault injected at %s", point)
		case "pause":
			time.Sleep(5 * time.Second)
		}
	}
	return nil
}

// faultsAt lists the kinds of fault MIGRATE_FAULT injects at point.
func faultsAt(point string) []string {
	var kinds []string
	for _, f := range strings.Split(os.Getenv("MIGRATE_FAULT"), ",") {
		if kind, at, _ := strings.Cut(strings.TrimSpace(f), ":"); at == point {
			kinds = append(kinds, kind)
		}
	}
	return kinds
}

// damaged reports whether MIGRATE_FAULT damages the data sent at point.
func damaged(point string) bool { return slices.Contains(faultsAt(point), "damage") }
