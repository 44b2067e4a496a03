// Package masks moves a container's masked directories through CRIU as external mounts.
//
// runc hides directories such as /proc/acpi, /sys/firmware and /sys/dev/block (podman's
// masked paths) under a read-only, empty tmpfs of their own. CRIU dumps every tmpfs by
// running tar, which runs gzip through a shell, and restores it the same way: about 8 ms
// of the frozen dump and 3 ms of the restore per mask on this kind of machine, for a
// content that is always nothing. Named as external mounts in the move's CRIU
// configuration file, they are not dumped; the restoring host binds a fresh read-only
// empty tmpfs of its own in their place, which is what runc had mounted there. A later
// checkpoint without migrate sees an ordinary tmpfs again.
//
// Only a mount that is certainly such a mask qualifies (Find): a tmpfs mounted read-only
// with no other option, at its root, with nothing mounted beneath it, and empty. Its
// content cannot change while the container runs (the file system is read-only).
package masks

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/mnt"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrate-project/migrate/pages"
)

// keyPrefix starts the external key of every mask: a restore maps only keys with it.
const keyPrefix = "migrate-mask"

// maxMasks bounds what a restore takes from images that came from a peer.
const maxMasks = 32

// safe are the paths and keys this package writes into a CRIU configuration file or uses
// as a file name: nothing CRIU's option parser or a path could take otherwise.
var safe = regexp.MustCompile(`^[A-Za-z0-9/._-]{1,200}$`)

// Key is the external key of the mask at path (a path in the container).
func Key(path string) string { return keyPrefix + strings.ReplaceAll(path, "/", "-") }

// Find lists the masks of the container whose first process is pid.
func Find(pid int) ([]string, error) {
	info, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		return nil, fmt.Errorf("masked paths: %w", err)
	}
	root := fmt.Sprintf("/proc/%d/root", pid)
	return parse(info, func(path string) bool {
		ents, err := os.ReadDir(filepath.Join(root, path))
		return err == nil && len(ents) == 0
	})
}

// parse finds the masks in a mountinfo (proc(5)); empty says whether the directory at a
// path in the container holds nothing.
func parse(info []byte, empty func(path string) bool) ([]string, error) {
	type mount struct {
		id, parent, root, point, opts, fstype, super string
	}
	var all []mount
	sc := bufio.NewScanner(bytes.NewReader(info))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 6 || len(g) < 3 {
			return nil, fmt.Errorf("masked paths: a mountinfo line we cannot read: %q", sc.Text())
		}
		all = append(all, mount{id: f[0], parent: f[1], root: f[3], point: f[4], opts: f[5], fstype: g[0], super: g[2]})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("masked paths: %w", err)
	}
	parents := map[string]bool{}
	for _, m := range all {
		parents[m.parent] = true
	}
	var out []string
	seen := map[string]bool{}
	for _, m := range all {
		if m.fstype != "tmpfs" || m.root != "/" || m.super != "ro" || m.point == "/" || parents[m.id] {
			continue
		}
		if !strings.HasPrefix(m.opts, "ro,") && m.opts != "ro" {
			continue
		}
		// Octal escapes (a space is \040) and odd characters: left to CRIU's tar.
		if !safe.MatchString(m.point) || strings.Contains(m.point, "..") {
			continue
		}
		if seen[Key(m.point)] || !empty(m.point) {
			continue
		}
		seen[Key(m.point)] = true
		out = append(out, m.point)
	}
	return out, nil
}

// DumpLines are the CRIU configuration lines that make the masks at paths external.
func DumpLines(paths []string) []string {
	lines := make([]string, 0, len(paths))
	for _, p := range paths {
		lines = append(lines, "external mnt["+p+"]:"+Key(p))
	}
	return lines
}

// Keys returns the keys of the masks the checkpoint images in dir name as external: the
// ones a restore must map (Prepare). Images from a peer are checked: a key is returned
// only if it is one this package could have made, and a damaged image is an error.
func Keys(dir string) ([]string, error) {
	files, err := filepath.Glob(filepath.Join(dir, "mountpoints-*.img"))
	if err != nil {
		return nil, err
	}
	var keys []string
	seen := map[string]bool{}
	for _, f := range files {
		img, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		err = pages.ImageEntries(filepath.Base(f), img, "MNTS", func(b []byte) error {
			var e mnt.MntEntry
			if err := proto.Unmarshal(b, &e); err != nil {
				return err
			}
			k := e.GetExtKey()
			if !strings.HasPrefix(k, keyPrefix+"-") || seen[k] {
				return nil
			}
			if err := checkKey(k); err != nil {
				return err
			}
			if len(keys) == maxMasks {
				return fmt.Errorf("more than %d masks", maxMasks)
			}
			seen[k] = true
			keys = append(keys, k)
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("masked paths in the checkpoint: %w", err)
		}
	}
	return keys, nil
}

// checkKey accepts only a key this package could have made: its prefix, plain
// characters, no path separator or parent.
func checkKey(k string) error {
	if !strings.HasPrefix(k, keyPrefix+"-") || !safe.MatchString(k) || strings.Contains(k, "/") || strings.Contains(k, "..") {
		return fmt.Errorf("mask key %q: not one migrate makes", k)
	}
	return nil
}

// Prepare mounts a read-only empty tmpfs for each key under dir and returns the CRIU
// configuration lines that bind them in the masks' places. release detaches them (the
// restored container's binds keep their own); call it once the restore ended, either way.
func Prepare(dir string, keys []string) (lines []string, release func(), err error) {
	release = func() { detach(dir) }
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			release()
			return nil, nil, err
		}
		at := filepath.Join(dir, k)
		if err := os.MkdirAll(at, 0o755); err != nil {
			release()
			return nil, nil, fmt.Errorf("mask %s: %w", k, err)
		}
		if err := unix.Mount("tmpfs", at, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			release()
			return nil, nil, fmt.Errorf("mask %s: mount a read-only tmpfs: %w", k, err)
		}
		// Private: the container's bind must not share mount events with this host.
		if err := unix.Mount("", at, "", unix.MS_PRIVATE, ""); err != nil {
			release()
			return nil, nil, fmt.Errorf("mask %s: %w", k, err)
		}
		lines = append(lines, "external mnt["+k+"]:"+at)
	}
	return lines, release, nil
}

// detach detaches the tmpfs in each directory of dir (where one is mounted) and removes
// them and dir.
func detach(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		at := filepath.Join(dir, e.Name())
		_ = unix.Unmount(at, unix.MNT_DETACH)
		_ = os.Remove(at)
	}
	_ = os.Remove(dir)
}

// Clear detaches and removes whatever an earlier agent left under dir (a crash between
// Prepare and release).
func Clear(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	for _, e := range ents {
		detach(filepath.Join(dir, e.Name()))
	}
	return nil
}
