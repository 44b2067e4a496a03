package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/transfer"
)

// parseVolume reads -v as podman does: NAME:/dest[:ro|rw] is a named volume (it moves
// with the container), /host/path:/dest[:ro|rw] a bind mount (the target must have it).
func parseVolume(s string) (checkpoint.Mount, error) {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 {
		return checkpoint.Mount{}, fmt.Errorf("-v %q: want NAME:/path or /host/path:/path, optionally :ro", s)
	}
	m := checkpoint.Mount{Source: parts[0], Dest: parts[1], Type: checkpoint.MountVolume}
	if len(parts) == 3 {
		for _, o := range strings.Split(parts[2], ",") {
			switch o {
			case "ro":
				m.ReadOnly = true
			case "rw", "z", "Z":
			default:
				return checkpoint.Mount{}, fmt.Errorf("-v %q: option %q: want ro or rw", s, o)
			}
		}
	}
	if !filepath.IsAbs(m.Dest) {
		return checkpoint.Mount{}, fmt.Errorf("-v %q: the path in the container must be absolute", s)
	}
	if strings.HasPrefix(m.Source, "/") {
		m.Type = checkpoint.MountBind
	} else if strings.HasPrefix(m.Source, ".") {
		return checkpoint.Mount{}, fmt.Errorf("-v %q: a relative host path; give it absolute (it must exist on every host the container may move to)", s)
	} else if err := transfer.ValidVolumeName(m.Source); err != nil {
		return checkpoint.Mount{}, fmt.Errorf("-v %q: %w", s, err)
	}
	return m, nil
}

// parseTmpfs reads --tmpfs /path[:opt,opt...].
func parseTmpfs(s string) (checkpoint.Mount, error) {
	dest, opts, _ := strings.Cut(s, ":")
	if !filepath.IsAbs(dest) {
		return checkpoint.Mount{}, fmt.Errorf("--tmpfs %q: want /path[:size=64m,mode=1777]", s)
	}
	m := checkpoint.Mount{Type: checkpoint.MountTmpfs, Dest: dest}
	if opts != "" {
		m.Options = strings.Split(opts, ",")
	}
	return m, nil
}

// parseBytes reads a size as podman's --memory does: a number with an optional unit b, k,
// m or g (powers of 1024).
func parseBytes(s string) (int64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	mult := int64(1)
	switch {
	case strings.HasSuffix(t, "g"), strings.HasSuffix(t, "gb"), strings.HasSuffix(t, "gib"):
		mult = 1 << 30
	case strings.HasSuffix(t, "m"), strings.HasSuffix(t, "mb"), strings.HasSuffix(t, "mib"):
		mult = 1 << 20
	case strings.HasSuffix(t, "k"), strings.HasSuffix(t, "kb"), strings.HasSuffix(t, "kib"):
		mult = 1 << 10
	}
	t = strings.TrimRight(t, "gmkib")
	n, err := strconv.ParseFloat(t, 64)
	if err != nil || n <= 0 || n*float64(mult) > 1<<50 {
		return 0, fmt.Errorf("%q: want a size such as 512m or 2g", s)
	}
	return int64(n * float64(mult)), nil
}

// parseKV reads repeated KEY=VALUE flags into a map.
func parseKV(flag string, kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--%s %q: want KEY=VALUE", flag, kv)
		}
		out[k] = v
	}
	return out, nil
}

// parseEntrypoint reads --entrypoint as podman does: a JSON array, or one command.
func parseEntrypoint(s string) ([]string, error) {
	if s == "" {
		return nil, nil
	}
	if strings.HasPrefix(strings.TrimSpace(s), "[") {
		var ep []string
		if err := json.Unmarshal([]byte(s), &ep); err != nil || len(ep) == 0 {
			return nil, fmt.Errorf("--entrypoint %q: want a command or a JSON array of strings", s)
		}
		return ep, nil
	}
	return []string{s}, nil
}
