package testbed

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Test images: two images that share their two base layers and differ in the upper one.
//
//	layer 1 "base": busybox (a shell and the usual tools) and the C library
//	layer 2 "net":  iperf3, sockperf, redis-server, nginx and their libraries (Debian's)
//	layer 3:        v1: memload;  v2: memload and an 8 MiB payload
const (
	ImageV1 = "localhost/migrate-test/app:v1"
	ImageV2 = "localhost/migrate-test/app:v2"
	// ImagePG is base, net and Debian's PostgreSQL 15 server (run it as user postgres).
	ImagePG = "localhost/migrate-test/pg:v1"
	// ImageCache is where built image archives are kept, named by a hash of their inputs.
	ImageCache = "/var/cache/migrate/images"
)

// ImageBinaries are the host binaries copied into the test images.
var imageBinaries = map[string][]string{
	"base": {"/bin/busybox"},
	"net":  {"/usr/bin/iperf3", "/usr/bin/sockperf", "/usr/bin/redis-server", "/usr/sbin/nginx"},
}

var lddLine = regexp.MustCompile(`(/[^ ]+) \(0x`)

// libsOf lists the shared objects bin loads, as ldd reports them.
func libsOf(ctx context.Context, bin string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		if strings.Contains(string(out), "not a dynamic executable") {
			return nil, nil
		}
		return nil, nil // static binaries make ldd exit non-zero
	}
	var libs []string
	for _, m := range lddLine.FindAllStringSubmatch(string(out), -1) {
		libs = append(libs, m[1])
	}
	return libs, nil
}

type layerFile struct{ src, dst string }

// imageLayers returns the files of each layer, libraries already in a lower layer left out.
func imageLayers(ctx context.Context, memload string) (map[string][]layerFile, error) {
	layers := map[string][]layerFile{}
	have := map[string]bool{}
	for _, layer := range []string{"base", "net"} {
		for _, bin := range imageBinaries[layer] {
			if _, err := os.Stat(bin); err != nil {
				return nil, fmt.Errorf("test image needs %s: run scripts/install.sh", bin)
			}
			layers[layer] = append(layers[layer], layerFile{bin, "/bin/" + filepath.Base(bin)})
			libs, err := libsOf(ctx, bin)
			if err != nil {
				return nil, err
			}
			for _, l := range libs {
				if !have[l] {
					have[l] = true
					layers[layer] = append(layers[layer], layerFile{l, l})
				}
			}
		}
		// Every image gets the C library's loader and libc in base, even if busybox is static.
		if layer == "base" {
			for _, l := range []string{"/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libm.so.6"} {
				if _, err := os.Stat(l); err == nil && !have[l] {
					have[l] = true
					layers[layer] = append(layers[layer], layerFile{l, l})
				}
			}
		}
	}
	if _, err := os.Stat(memload); err != nil {
		return nil, fmt.Errorf("memload binary %s: %w (build it with `go build -o bin/memload ./testbed/memload`)", memload, err)
	}
	layers["mem"] = []layerFile{{memload, "/bin/memload"}}
	pg, err := pgFiles(ctx, have)
	if err != nil {
		return nil, err
	}
	shim, err := buildAsUser(ctx)
	if err != nil {
		return nil, err
	}
	layers["pg"] = append(pg, layerFile{shim, AsUserLib})
	return layers, nil
}

// AsUserLib, preloaded (LD_PRELOAD) with MIGRATE_TEST_AS_UID set, makes a root process
// see that uid from getuid and geteuid, and nothing else: PostgreSQL, which refuses to
// run as root, runs as root while believing it is that user. The PostgreSQL test uses it
// on hosts whose root lacks CAP_SYS_RESOURCE, where CRIU cannot dump a process of
// another user (push refuses it: "process users"), so that the database's move is still
// proven there. Every file access is root's; the rest of PostgreSQL is unchanged.
const AsUserLib = "/usr/lib/migrate-test/asuser.so"

const asUserSource = `#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>
static uid_t as_user(long nr) {
	const char *s = getenv("MIGRATE_TEST_AS_UID");
	return s && *s ? (uid_t)strtoul(s, 0, 10) : (uid_t)syscall(nr);
}
uid_t getuid(void) { return as_user(SYS_getuid); }
uid_t geteuid(void) { return as_user(SYS_geteuid); }
`

// buildAsUser compiles AsUserLib with the host's C compiler into the image cache, once
// per source; no build ID, so that the image's layer digest is the same on every build.
func buildAsUser(ctx context.Context) (string, error) {
	sum := sha256.Sum256([]byte(asUserSource))
	out := filepath.Join(ImageCache, "asuser-"+hex.EncodeToString(sum[:8])+".so")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := os.MkdirAll(ImageCache, 0o755); err != nil {
		return "", err
	}
	src := out + ".c"
	if err := os.WriteFile(src, []byte(asUserSource), 0o644); err != nil {
		return "", err
	}
	defer os.Remove(src)
	tmp := out + ".partial"
	cmd := exec.CommandContext(ctx, "gcc", "-shared", "-fPIC", "-O2", "-Wl,--build-id=none", "-o", tmp, src)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("test image: compile %s with gcc (scripts/install.sh installs it): %w: %s", AsUserLib, err, b)
	}
	return out, os.Rename(tmp, out)
}

// pgDir is Debian's PostgreSQL 15 (package postgresql-15).
const pgDir = "/usr/lib/postgresql/15"

// pgFiles is the PostgreSQL layer: the server's programs at their Debian paths (initdb
// finds postgres beside it and its share directory relative to it), the libraries
// initdb loads (PL/pgSQL, text search, encodings), the UTC zone, and what they link.
func pgFiles(ctx context.Context, have map[string]bool) ([]layerFile, error) {
	var out []layerFile
	var bins []string
	for _, b := range []string{"postgres", "initdb", "pg_ctl"} {
		bins = append(bins, filepath.Join(pgDir, "bin", b))
	}
	mods, err := filepath.Glob(filepath.Join(pgDir, "lib", "*.so"))
	if err != nil {
		return nil, err
	}
	for _, m := range mods {
		if !strings.Contains(m, "llvmjit") {
			bins = append(bins, m)
		}
	}
	for _, b := range bins {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("test image needs %s (Debian's postgresql-15): run scripts/install.sh", b)
		}
		out = append(out, layerFile{b, b})
		libs, err := libsOf(ctx, b)
		if err != nil {
			return nil, err
		}
		for _, l := range libs {
			if !have[l] {
				have[l] = true
				out = append(out, layerFile{l, l})
			}
		}
	}
	share := "/usr/share/postgresql/15"
	err = filepath.WalkDir(share, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		out = append(out, layerFile{p, p})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("test image needs %s (Debian's postgresql-15): %w", share, err)
	}
	for _, z := range []string{"/usr/share/zoneinfo/UTC", "/usr/share/zoneinfo/Etc/UTC"} {
		out = append(out, layerFile{z, z})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].dst < out[j].dst })
	return out, nil
}

// imageKey hashes everything the images are made of.
func imageKey(layers map[string][]layerFile) (string, error) {
	h := sha256.New()
	names := make([]string, 0, len(layers))
	for n := range layers {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		for _, f := range layers[n] {
			fmt.Fprintf(h, "%s %s %s\n", n, f.src, f.dst)
			in, err := os.Open(f.src)
			if err != nil {
				return "", err
			}
			_, err = io.Copy(h, in)
			in.Close()
			if err != nil {
				return "", err
			}
		}
	}
	fmt.Fprint(h, containerfile("mem"), imagesFormat)
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

const imagesFormat = "v2" // bump when the image layout changes

func containerfile(upper string) string {
	return "FROM scratch\nCOPY base/ /\nCOPY net/ /\nCOPY " + upper + "/ /\n" +
		"ENV PATH=/bin:/usr/bin\nCMD [\"/bin/sh\"]\n"
}

// EnsureImages returns the test image archive, building it inside host's podman store
// (its own store, at the default paths) if no archive with the same inputs is cached.
func (tb *Testbed) EnsureImages(ctx context.Context, host, memload string) (string, error) {
	layers, err := imageLayers(ctx, memload)
	if err != nil {
		return "", err
	}
	key, err := imageKey(layers)
	if err != nil {
		return "", err
	}
	archive := filepath.Join(ImageCache, "test-images-"+key+".tar")
	if _, err := os.Stat(archive); err == nil {
		return archive, nil
	}
	h, err := tb.Host(host)
	if err != nil {
		return "", err
	}
	slog.Info("building test images", "host", host, "archive", archive)
	ctxDir, err := os.MkdirTemp(h.Dir, "images-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(ctxDir)
	for name, files := range layers {
		for _, f := range files {
			if err := copyFile(f.src, filepath.Join(ctxDir, name, f.dst)); err != nil {
				return "", err
			}
		}
	}
	// The busybox applets, as symlinks, and the directories programs expect.
	if err := busyboxLinks(ctx, filepath.Join(ctxDir, "base")); err != nil {
		return "", err
	}
	for _, d := range []string{"tmp", "etc", "root", "proc", "sys", "dev", "run", "var/log/nginx", "var/lib/nginx", "var/lock", "data"} {
		if err := os.MkdirAll(filepath.Join(ctxDir, "base", d), 0o755); err != nil {
			return "", err
		}
	}
	os.Chmod(filepath.Join(ctxDir, "base", "tmp"), 0o1777)
	if err := os.WriteFile(filepath.Join(ctxDir, "base", "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999:postgres:/data:/bin/sh\n"), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(ctxDir, "base", "etc", "group"), []byte("root:x:0:\npostgres:x:999:\n"), 0o644); err != nil {
		return "", err
	}
	// v2's upper layer: memload plus an 8 MiB payload, deterministic so that it has the
	// same digest wherever it is built.
	if err := copyFile(layers["mem"][0].src, filepath.Join(ctxDir, "mem2", "bin", "memload")); err != nil {
		return "", err
	}
	if err := writePayload(filepath.Join(ctxDir, "mem2", "opt", "payload"), 8<<20); err != nil {
		return "", err
	}
	for _, img := range []struct{ tag, upper string }{{ImageV1, "mem"}, {ImageV2, "mem2"}, {ImagePG, "pg"}} {
		cf := filepath.Join(ctxDir, "Containerfile."+img.upper)
		if err := os.WriteFile(cf, []byte(containerfile(img.upper)), 0o644); err != nil {
			return "", err
		}
		// --timestamp 0: layers get the same digests on every machine for the same inputs.
		if _, err := tb.Run(ctx, host, "podman", "build", "-q", "--timestamp", "0", "--network", "none",
			"-t", img.tag, "-f", cf, ctxDir); err != nil {
			return "", fmt.Errorf("build %s: %w", img.tag, err)
		}
	}
	if err := os.MkdirAll(ImageCache, 0o755); err != nil {
		return "", err
	}
	tmp := archive + ".partial"
	os.Remove(tmp)
	if _, err := tb.Run(ctx, host, "podman", "save", "-q", "-m", "-o", tmp, ImageV1, ImageV2, ImagePG); err != nil {
		return "", fmt.Errorf("save test images: %w", err)
	}
	return archive, os.Rename(tmp, archive)
}

// LoadImages loads the archive into every host that lacks the test images.
func (tb *Testbed) LoadImages(ctx context.Context, archive string) error {
	for _, h := range tb.Hosts {
		if h.IsClient() {
			continue
		}
		if _, err := tb.Run(ctx, h.Name, "podman", "image", "exists", ImagePG); err == nil {
			continue
		}
		if _, err := tb.Run(ctx, h.Name, "podman", "load", "-q", "-i", archive); err != nil {
			return fmt.Errorf("load test images into %s: %w", h.Name, err)
		}
	}
	return nil
}

func busyboxLinks(ctx context.Context, root string) error {
	out, err := exec.CommandContext(ctx, "/bin/busybox", "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	for _, app := range strings.Fields(string(out)) {
		if app == "busybox" {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(root, "bin", app)); err != nil && !os.IsExist(err) {
			return err
		}
	}
	return nil
}

func copyFile(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	in, err := os.Open(src) // follows symlinks: the image gets the file under the name asked for
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, st.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// writePayload writes n deterministic, incompressible-looking bytes.
func writePayload(path string, n int) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	buf := make([]byte, n)
	x := uint64(0x9E3779B97F4A7C15)
	for i := 0; i+8 <= n; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		for j := 0; j < 8; j++ {
			buf[i+j] = byte(x >> (8 * j))
		}
	}
	return os.WriteFile(path, buf, 0o644)
}
