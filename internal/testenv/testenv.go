// Package testenv decides whether an integration test runs, skips or fails.
//
// On a developer's laptop without root a missing prerequisite skips the test with the
// reason. Under CI (MIGRATE_INTEGRATION=1, set by scripts/test.sh) it fails the test:
// a green run must never hide tests that did not run.
package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// Required reports whether integration prerequisites are mandatory in this run.
func Required() bool { return os.Getenv("MIGRATE_INTEGRATION") == "1" }

// Need skips (or, when Required, fails) t unless ok.
func Need(t testing.TB, ok bool, reason string) {
	t.Helper()
	if ok {
		return
	}
	if Required() {
		t.Fatalf("integration prerequisite missing (MIGRATE_INTEGRATION=1): %s", reason)
	}
	t.Skipf("skipping: %s (run scripts/test.sh as root to run it)", reason)
}

// Root needs root privileges and the named commands.
func Root(t testing.TB, commands ...string) {
	t.Helper()
	Need(t, os.Geteuid() == 0, "needs root")
	for _, c := range commands {
		_, err := exec.LookPath(c)
		if err != nil {
			_, err = os.Stat(filepath.Join("/usr/local/sbin", c))
		}
		Need(t, err == nil, "needs "+c+" (scripts/install.sh installs it)")
	}
}

// RepoRoot is the module's root directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Memload builds the memload workload into dir and returns its path.
func Memload(t testing.TB, dir string) string {
	t.Helper()
	if p := os.Getenv("MIGRATE_MEMLOAD"); p != "" {
		return p
	}
	out := filepath.Join(dir, "memload")
	cmd := exec.Command("go", "build", "-o", out, "./testbed/memload")
	cmd.Dir = RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build memload: %v\n%s", err, b)
	}
	return out
}

// goTags are the build tags of the podman bindings (as in scripts/lib.sh).
const goTags = "remote exclude_graphdriver_btrfs btrfs_noversion exclude_graphdriver_devicemapper containers_image_openpgp"

// Migrate returns the migrate binary: $MIGRATE_BIN (scripts/test.sh builds it), else a
// fresh build into dir.
func Migrate(t testing.TB, dir string) string {
	t.Helper()
	if p := os.Getenv("MIGRATE_BIN"); p != "" {
		return p
	}
	out := filepath.Join(dir, "migrate")
	cmd := exec.Command("go", "build", "-tags", goTags, "-o", out, "./cmd/migrate")
	cmd.Dir = RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build migrate: %v\n%s", err, b)
	}
	return out
}
