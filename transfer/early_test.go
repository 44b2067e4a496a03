package transfer

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/migrate-project/migrate/checkpoint"
)

// The early restore is taken only where podman's archive would carry nothing of the root
// file system: by podman's own rule, added and deleted paths always travel, a changed
// path only when it names a file.
func TestRootfsTravelsFollowsPodmansRule(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		changes []checkpoint.RootfsChange
		travels string
	}{
		{"nothing changed", nil, ""},
		{"changed directories only", []checkpoint.RootfsChange{{Path: dir, Kind: "C"}, {Path: "/no/such/path", Kind: "C"}}, ""},
		{"a changed file", []checkpoint.RootfsChange{{Path: dir, Kind: "C"}, {Path: file, Kind: "C"}}, "C " + file},
		{"an added path", []checkpoint.RootfsChange{{Path: dir, Kind: "C"}, {Path: "/tmp/new", Kind: "A"}}, "A /tmp/new"},
		{"a deleted path", []checkpoint.RootfsChange{{Path: "/etc/motd", Kind: "D"}}, "D /etc/motd"},
		{"a kind not known", []checkpoint.RootfsChange{{Path: "/x", Kind: "?"}}, "? /x"},
	}
	for _, c := range cases {
		if got := rootfsTravels(c.changes, os.Stat); got != c.travels {
			t.Errorf("%s: rootfsTravels = %q, want %q", c.name, got, c.travels)
		}
	}
	// A stat that fails is podman skipping the path, whatever the error.
	if got := rootfsTravels([]checkpoint.RootfsChange{{Path: file, Kind: "C"}}, func(string) (fs.FileInfo, error) { return nil, fs.ErrPermission }); got != "" {
		t.Errorf("changed path podman cannot stat: rootfsTravels = %q, want none", got)
	}
}

func TestShmHoldsNamesAFileInTheProcessesDevShm(t *testing.T) {
	// This process's /dev/shm is the host's: the answer must match what is there.
	ents, err := os.ReadDir("/dev/shm")
	if err != nil {
		t.Skip("no /dev/shm here")
	}
	got, err := shmHolds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if (len(ents) == 0) != (got == "") || (got != "" && !strings.HasPrefix(got, "/dev/shm/")) {
		t.Fatalf("shmHolds = %q with %d entries in /dev/shm", got, len(ents))
	}
	f, err := os.CreateTemp("/dev/shm", "migrate-early-test-")
	if err != nil {
		t.Skip("cannot write /dev/shm:", err)
	}
	defer os.Remove(f.Name())
	f.Close()
	if got, err := shmHolds(os.Getpid()); err != nil || got == "" {
		t.Fatalf("with %s in /dev/shm: shmHolds = %q, %v", f.Name(), got, err)
	}
}
