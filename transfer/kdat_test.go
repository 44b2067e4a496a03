package transfer

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/migrate-project/migrate/internal/testenv"
)

// Where /run is no tmpfs, the agent's start leaves CRIU a kernel-probe cache that CRIU
// then loads instead of probing the kernel again.
func TestCRIUKdatCacheIsWrittenAndLoaded(t *testing.T) {
	testenv.Root(t, "criu", "unshare")
	var st unix.Statfs_t
	if err := unix.Statfs("/run", &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skip("/run is a tmpfs here: CRIU keeps its cache itself")
	}
	dir := t.TempDir()
	exe := testenv.Migrate(t, dir)
	// Whatever was there goes: the test must see this refresh write it.
	if err := os.Remove(CRIUKdatCache); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if err := refreshCRIUCache(context.Background(), exe); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(CRIUKdatCache); err != nil || fi.Size() == 0 {
		t.Fatalf("no cache after the refresh: %v", err)
	}
	if left, _ := filepath.Glob(CRIUKdatCache + ".migrate-*"); len(left) > 0 {
		t.Errorf("the refresh left %v", left)
	}
	log := filepath.Join(dir, "check.log")
	if out, err := exec.Command("criu", "check", "-v4", "--log-file", log).CombinedOutput(); err != nil {
		t.Logf("criu check: %v: %s", err, out) // optional features may fail; the log is what counts
	}
	b, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "Loaded kdat cache from "+CRIUKdatCache) {
		t.Fatalf("CRIU did not load the cache:\n%s", b)
	}
}
