package masks

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/mnt"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrate-project/migrate/internal/testenv"
)

// A podman container's mountinfo (runc on cgroup v1), with a few look-alikes that are
// not masks: a writable tmpfs, a read-only one with options, one with a mount beneath it,
// one bound from a subdirectory, and a non-empty one.
const mountinfo = `248 172 0:55 / / rw,relatime - overlay overlay rw,lowerdir=/l
249 248 0:58 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
250 248 0:59 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
259 251 0:62 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755
177 249 0:63 / /proc/acpi ro,relatime - tmpfs tmpfs ro
178 249 0:59 /null /proc/keys rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
180 251 0:64 / /sys/firmware ro,relatime - tmpfs tmpfs ro
181 251 0:65 / /sys/dev/block ro,relatime - tmpfs tmpfs ro
190 248 0:66 / /data ro,relatime - tmpfs tmpfs ro,size=1024k
191 248 0:67 / /under ro,relatime - tmpfs tmpfs ro
192 191 0:68 / /under/x rw,relatime - tmpfs tmpfs rw
193 248 0:69 /sub /bound ro,relatime - tmpfs tmpfs ro
194 248 0:70 / /full ro,relatime - tmpfs tmpfs ro
195 248 0:71 / /with\040space ro,relatime - tmpfs tmpfs ro
196 248 0:72 / /writable rw,relatime - tmpfs tmpfs ro
`

func TestParseFindsOnlyEmptyReadOnlyMasks(t *testing.T) {
	got, err := parse([]byte(mountinfo), func(p string) bool { return p != "/full" })
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/proc/acpi", "/sys/firmware", "/sys/dev/block"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("masks %v, want %v", got, want)
	}
	lines := DumpLines(got)
	if lines[0] != "external mnt[/proc/acpi]:migrate-mask-proc-acpi" || len(lines) != 3 {
		t.Fatalf("dump lines %q", lines)
	}
	if _, err := parse([]byte("1 2 3\n"), func(string) bool { return true }); err == nil {
		t.Fatal("a damaged mountinfo line was taken")
	}
}

// mntImage builds a CRIU mountpoints image whose entries carry keys.
func mntImage(keys ...string) []byte {
	m := magic.LoadMagic()
	var img []byte
	img = binary.LittleEndian.AppendUint32(img, uint32(m.ByName["IMG_COMMON"]))
	img = binary.LittleEndian.AppendUint32(img, uint32(m.ByName["MNTS"]))
	for i, k := range keys {
		e := &mnt.MntEntry{Fstype: proto.Uint32(uint32(mnt.Fstype_TMPFS)), MntId: proto.Uint32(uint32(100 + i)),
			RootDev: proto.Uint32(1), ParentMntId: proto.Uint32(1), Flags: proto.Uint32(1), Root: proto.String("/"),
			Mountpoint: proto.String("./x"), Source: proto.String("tmpfs"), Options: proto.String("")}
		if k != "" {
			e.ExtKey = proto.String(k)
		}
		b, err := proto.Marshal(e)
		if err != nil {
			panic(err)
		}
		img = binary.LittleEndian.AppendUint32(img, uint32(len(b)))
		img = append(img, b...)
	}
	return img
}

func TestKeysTakesOnlyKeysMigrateMakes(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "mountpoints-13.img"), mntImage("", "/dev/shm", Key("/proc/acpi"), Key("/sys/firmware"), Key("/proc/acpi")), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := Keys(dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"migrate-mask-proc-acpi", "migrate-mask-sys-firmware"}; !reflect.DeepEqual(keys, want) {
		t.Fatalf("keys %v, want %v", keys, want)
	}
	// A peer's images that name a path through a key, or too many masks, are refused.
	var many []string
	for i := range maxMasks + 1 {
		many = append(many, Key("/m"+strings.Repeat("x", i+1)))
	}
	for name, img := range map[string][]byte{
		"escape":    mntImage("migrate-mask-../../etc"),
		"slash":     mntImage("migrate-mask-a/b"),
		"too many":  mntImage(many...),
		"truncated": mntImage(Key("/proc/acpi"))[:12],
	} {
		d := t.TempDir()
		if err := os.WriteFile(filepath.Join(d, "mountpoints-1.img"), img, 0o600); err != nil {
			t.Fatal(err)
		}
		if keys, err := Keys(d); err == nil {
			t.Errorf("%s: images taken, keys %v", name, keys)
		}
	}
}

func TestPrepareMountsReadOnlyEmptyTmpfsAndReleaseUndoesIt(t *testing.T) {
	testenv.Root(t)
	dir := filepath.Join(t.TempDir(), "c1")
	keys := []string{Key("/proc/acpi"), Key("/sys/firmware")}
	lines, release, err := Prepare(dir, keys)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	if len(lines) != 2 || lines[0] != "external mnt[migrate-mask-proc-acpi]:"+filepath.Join(dir, "migrate-mask-proc-acpi") {
		t.Fatalf("lines %q", lines)
	}
	for _, k := range keys {
		at := filepath.Join(dir, k)
		var st unix.Statfs_t
		if err := unix.Statfs(at, &st); err != nil {
			t.Fatal(err)
		}
		if st.Type != unix.TMPFS_MAGIC || st.Flags&unix.ST_RDONLY == 0 {
			t.Fatalf("%s: file system %#x flags %#x, want a read-only tmpfs", at, st.Type, st.Flags)
		}
		if ents, err := os.ReadDir(at); err != nil || len(ents) != 0 {
			t.Fatalf("%s: %v %v, want empty", at, ents, err)
		}
		if err := os.WriteFile(filepath.Join(at, "x"), nil, 0o600); err == nil {
			t.Fatalf("%s: writable", at)
		}
	}
	release()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("after release %s: %v, want it gone", dir, err)
	}
	if _, _, err := Prepare(dir, []string{"migrate-mask-../x"}); err == nil {
		t.Fatal("a key naming a path was prepared")
	}
}

func TestClearDetachesWhatACrashLeft(t *testing.T) {
	testenv.Root(t)
	root := t.TempDir()
	if _, _, err := Prepare(filepath.Join(root, "c1"), []string{Key("/proc/acpi")}); err != nil {
		t.Fatal(err)
	}
	if err := Clear(root); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(root); len(ents) != 0 {
		t.Fatalf("left after Clear: %v", ents)
	}
}
