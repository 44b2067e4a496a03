package transfer

// CRIU's cache of what it probes of the kernel. CRIU keeps its kernel probe (kerndat) in
// /run/criu.kdat and reads it wherever it lies, but writes it only where /run is a tmpfs
// (criu/kerndat.c, kerndat_save_cache: a reboot must clear it). Where /run is not one (this
// kind of VM), every CRIU run probes the kernel again: 30-40 ms on an idle host, up to 90
// ms beside a move's work, and a move's frozen phase runs CRIU three times (the dump, the
// target's lazy-pages daemon, the restore). The agent has CRIU write the cache in a mount
// namespace of its own whose /run is a tmpfs, and puts it in place; at every start, since
// here a reboot (a new kernel) does not clear it.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// CRIUKdatCache is where CRIU reads its cached kernel probe.
const CRIUKdatCache = "/run/criu.kdat"

// refreshCRIUCache writes CRIU's kernel-probe cache where /run is not a tmpfs (nothing
// where it is: CRIU keeps its own). exe is this program: its criu-kdat command runs in
// the private namespace and prints the cache. Failing costs time, not correctness.
func refreshCRIUCache(ctx context.Context, exe string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(CRIUKdatCache), &st); err != nil {
		return err
	}
	if st.Type == unix.TMPFS_MAGIC {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--propagation", "private", "--", exe, "criu-kdat")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	kdat, err := cmd.Output() // this program's own criu-kdat: CRIU's cache, under a kilobyte
	if err != nil {
		return fmt.Errorf("CRIU's kernel probe in a private /run: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	if len(kdat) == 0 || len(kdat) >= maxKdat {
		return fmt.Errorf("CRIU's kernel probe in a private /run gave a cache of %d bytes", len(kdat))
	}
	// A file beside the cache renamed over it: CRIU never reads a partial cache, and
	// agents starting together each put a whole one in place.
	return replaceFile(CRIUKdatCache, 0o600, func(w io.Writer) error {
		_, err := w.Write(kdat)
		return err
	})
}

// maxKdat bounds the cache put in place (CRIU's is under a kilobyte).
const maxKdat = 1 << 20

// WriteCRIUKdat runs in a mount namespace of its own (migrate criu-kdat, started by the
// agent under unshare): a tmpfs on /run, where `criu check` then writes its cache, which
// goes to w.
func WriteCRIUKdat(ctx context.Context, w io.Writer) error {
	if err := unix.Mount("tmpfs", filepath.Dir(CRIUKdatCache), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=1m,mode=0755"); err != nil {
		return fmt.Errorf("a tmpfs on %s (run under unshare --mount): %w", filepath.Dir(CRIUKdatCache), err)
	}
	cmd := exec.CommandContext(ctx, "criu", "check")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// Its verdict on optional features does not matter: the probe is cached before it.
	runErr := cmd.Run()
	b, err := os.ReadFile(CRIUKdatCache)
	if err != nil {
		return fmt.Errorf("criu check wrote no %s (%v): %s", CRIUKdatCache, runErr, strings.TrimSpace(out.String()))
	}
	_, err = w.Write(b)
	return err
}

// logCRIUCache refreshes the cache at the agent's start and says how it went.
func logCRIUCache(ctx context.Context) {
	exe, err := os.Executable()
	if err == nil {
		err = refreshCRIUCache(ctx, exe)
	}
	if err != nil {
		slog.Warn("CRIU's kernel-probe cache not written: every CRIU run probes the kernel again (30-90 ms of every frozen phase)", "err", err)
	}
}
