package transfer

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/pages"
	"github.com/migrate-project/migrate/volumes"
)

// Named volumes move with their container, outside the frozen phase: while it runs,
// each volume's content crosses as pages through the page store (only pages the target
// lacks); while frozen, only the files changed since. The source's volumes go with its
// copy of the container at commit; on a rollback they stay, and the target removes the
// ones the move created.
//
// A volume of `migrate run -v NAME:/path` is a podman volume (`podman volume ls` shows
// it) that the container mounts by its directory, as a bind mount, and the container's
// LabelVolumes names it: podman's checkpoint API puts the content of every podman-mounted
// named volume into the archive, i.e. into the frozen phase, whole, at every move, and
// its API offers no way out (the CLI's --ignore-volumes is not in it). Mounted by
// directory, the volume stays out of the archive, and the restore finds it at the same
// path on the target, where the move created it.

// PathVolumeSync applies a volume's tree on the target.
const PathVolumeSync = "/v1/volumes/sync"

// LabelVolumeMove marks a volume a move created on the target (its move's ID).
const LabelVolumeMove = "migrate.move"

// VolumeSynced is the target's answer to a volume's tree.
type VolumeSynced struct {
	Volume  string          `json:"volume"`
	Digest  string          `json:"digest"` // of the tree it now holds, checked on disk
	Applied volumes.Applied `json:"applied"`
	// Mountpoint is the volume's directory on the target: the restored container mounts
	// it at the source's path, so the two must be the same.
	Mountpoint string `json:"mountpoint"`
}

// VolumeResult is what a push did for one volume.
type VolumeResult struct {
	Name string `json:"name"`
	// Bytes is the volume's content; Read what the source read of it, Wire what crossed.
	Bytes    int64         `json:"bytes"`
	Read     int64         `json:"read_bytes"`
	Wire     int64         `json:"wire_bytes"`
	Files    int           `json:"files_written"` // files the target wrote
	Duration time.Duration `json:"duration_ns"`
	Final    bool          `json:"final"` // the pass in the frozen phase
	Digest   string        `json:"digest"`
	Skipped  []string      `json:"skipped,omitempty"` // sockets, devices, FIFOs: not moved
}

// LabelVolumes names a container's migrate volumes (comma-separated).
const LabelVolumes = "migrate.volumes"

// volumeNames lists the container's migrate volumes.
func volumeNames(c *checkpoint.Container) []string {
	var out []string
	for _, v := range strings.Split(c.Labels[LabelVolumes], ",") {
		if v != "" {
			out = append(out, v)
		}
	}
	sort.Strings(out)
	return out
}

// isVolumeDir reports whether a bind mount's source is the directory of the named
// volume (podman's layout: .../volumes/NAME/_data).
func isVolumeDir(src, name string) bool {
	return strings.HasSuffix(src, "/volumes/"+name+"/_data")
}

// volumeMounts turns run's named volumes into bind mounts of their directories, creating
// the volumes that do not exist; a volume another container uses is refused.
func (a *Agent) volumeMounts(ctx context.Context, mounts []checkpoint.Mount) ([]checkpoint.Mount, []string, error) {
	var names []string
	out := make([]checkpoint.Mount, 0, len(mounts))
	for _, m := range mounts {
		if m.Type != checkpoint.MountVolume {
			out = append(out, m)
			continue
		}
		if users, err := a.volumeUsers(ctx, m.Source); err != nil {
			return nil, nil, err
		} else if len(users) > 0 {
			return nil, nil, badRequest{fmt.Errorf("volume %s is used by %v: a volume moves with its container, so it has one", m.Source, users)}
		}
		ok, err := a.podman.VolumeExists(ctx, m.Source)
		if err != nil {
			return nil, nil, err
		}
		var v *checkpoint.Volume
		if ok {
			v, err = a.podman.InspectVolume(ctx, m.Source)
		} else {
			v, err = a.podman.CreateVolume(ctx, m.Source, nil)
		}
		if err != nil {
			return nil, nil, err
		}
		if v.Driver != "" && v.Driver != "local" || !isVolumeDir(v.Mountpoint, m.Source) {
			return nil, nil, badRequest{fmt.Errorf("volume %s (driver %q at %s): only local volumes move", m.Source, v.Driver, v.Mountpoint)}
		}
		names = append(names, m.Source)
		out = append(out, checkpoint.Mount{Type: checkpoint.MountBind, Source: v.Mountpoint, Dest: m.Dest, ReadOnly: m.ReadOnly})
	}
	return out, names, nil
}

// volumeUsers names the containers on this host whose migrate volumes include name, and
// those podman itself mounts it in.
func (a *Agent) volumeUsers(ctx context.Context, name string) ([]string, error) {
	users, err := a.podman.VolumeUsers(ctx, name)
	if err != nil {
		return nil, err
	}
	l, err := a.podman.List(ctx)
	if err != nil {
		return nil, err
	}
	for _, c := range l {
		for _, v := range volumeNames(&c) {
			if v == name {
				users = append(users, c.Name)
			}
		}
	}
	return users, nil
}

// volumeChecks is the source's pre-flight about its volumes: each must be used by this
// container only (another container would lose it), and a volume podman itself mounts
// cannot move outside the frozen phase.
func (a *Agent) volumeChecks(ctx context.Context, c *checkpoint.Container) []Check {
	var out []Check
	for _, m := range c.Mounts {
		if m.Type == checkpoint.MountVolume {
			out = append(out, Check{Property: "volume " + m.Source, Source: "podman-mounted", Target: "-", OK: false,
				Detail: "start the container with `migrate run -v " + m.Source + ":" + m.Dest + "` for its volume to move"})
		}
	}
	for _, v := range volumeNames(c) {
		users, err := a.volumeUsers(ctx, v)
		ch := Check{Property: "volume " + v, Source: "used by " + c.Name, Target: "-", OK: true}
		switch {
		case err != nil:
			ch.OK, ch.Detail = false, err.Error()
		case len(users) > 1:
			ch.OK, ch.Source = false, fmt.Sprintf("shared by %v", users)
			ch.Detail = "a volume moves with its container; another container uses it too"
		}
		out = append(out, ch)
	}
	return out
}

// copyVolumes sends each volume's content the target lacks and has the target apply its
// tree. trees holds the trees of an earlier pass (empty: the first); the new ones replace
// them. Announced pages join sess as they join the target's session (the archive refers
// to pages by their place in it).
func (a *Agent) copyVolumes(ctx context.Context, target *Peer, container string, names []string, l *link, sess *pages.Session, trees map[string]*volumes.Tree, final bool,
	progress func(read, total int64)) ([]VolumeResult, error) {
	var out []VolumeResult
	// The content to read, for the progress: the first pass reads it all.
	var total, done int64
	for _, name := range names {
		v, err := a.podman.InspectVolume(ctx, name)
		if err != nil {
			return nil, err
		}
		if !final {
			total += volumes.Size(v.Mountpoint)
		}
	}
	for _, name := range names {
		t0 := time.Now()
		v, err := a.podman.InspectVolume(ctx, name)
		if err != nil {
			return out, err
		}
		pt := newPutter(l, target, container)
		var wire int64
		var announceErr error
		sink := func(hs []pages.Hash, buf []byte) error {
			l.kick() // reading counts as progress: a volume the target holds sends little
			if done += int64(len(buf)); total > 0 {
				progress(min(done, total), total)
			}
			// Kept here too: the volume coming back later finds its pages.
			if err := a.store.AddTrusted(hs, buf); err != nil {
				slog.Warn("page store", "err", err)
			}
			missing, n, err := target.Announce(ctx, container, hs)
			if err != nil {
				announceErr = err
				return err
			}
			sess.Append(hs...)
			wire += n
			var recs []byte
			for i, m := range missing {
				if m {
					recs = pages.AppendLiteral(recs, buf[i*pages.Size:(i+1)*pages.Size])
				}
			}
			if len(recs) == 0 {
				return nil
			}
			return pt.put(ctx, recs)
		}
		prev := trees[name]
		t, read, err := volumes.Scan(v.Mountpoint, prev, sink)
		w, perr := pt.wait()
		wire += w
		if err == nil {
			err = perr
		}
		if err == nil {
			err = announceErr
		}
		if err != nil {
			return out, fmt.Errorf("volume %s: %w", name, err)
		}
		var manifest bytes.Buffer
		if err := volumes.Diff(prev, t).Encode(&manifest); err != nil {
			return out, err
		}
		wire += int64(manifest.Len())
		var synced VolumeSynced
		if err := target.send(ctx, withQuery(PathVolumeSync, "container", container, "volume", name), &manifest, encodingHeader(""), nil, func(int64) { l.kick() }, &synced); err != nil {
			return out, fmt.Errorf("volume %s on %s: %w", name, target.Name, err)
		}
		if synced.Mountpoint != v.Mountpoint {
			return out, fmt.Errorf("volume %s is at %s on %s and at %s here: the restored container would not find it (podman's storage paths differ)", name, synced.Mountpoint, target.Name, v.Mountpoint)
		}
		if synced.Digest != t.Digest() {
			return out, fmt.Errorf("volume %s: %s holds content of digest %s, the source %s", name, target.Name, synced.Digest, t.Digest())
		}
		trees[name] = t
		out = append(out, VolumeResult{Name: name, Bytes: t.Bytes(), Read: read, Wire: wire, Files: synced.Applied.Files,
			Duration: time.Since(t0), Final: final, Digest: synced.Digest, Skipped: t.Skipped})
	}
	return out, nil
}

// syncVolume (target): apply a volume's tree from the move's source. Its pages are in
// the store (announced and put in this move's session); the volume is created if this
// move's prepare found it missing.
func (a *Agent) syncVolume(r *http.Request) (any, error) {
	ctx := r.Context()
	container, name := r.URL.Query().Get("container"), r.URL.Query().Get("volume")
	if _, err := a.session(ctx, container); err != nil {
		return nil, err
	}
	if err := ValidVolumeName(name); err != nil {
		return nil, badRequest{err}
	}
	var in incomingMove
	if err := a.mv.in.get(container, &in); err != nil {
		return nil, badRequest{fmt.Errorf("volume %s: no move of %s under way here", name, container)}
	}
	allowed := false
	for _, v := range in.Prepare.Volumes {
		allowed = allowed || v == name
	}
	if !allowed {
		return nil, badRequest{fmt.Errorf("volume %s is not one the move of %s named", name, container)}
	}
	body, done, err := bodyReader(r)
	if err != nil {
		return nil, err
	}
	defer done()
	patch, err := volumes.DecodePatch(body)
	if err != nil {
		return nil, badRequest{err}
	}
	a.mu.Lock()
	s := a.sessions[container]
	var prev *volumes.Tree
	if s != nil {
		prev = s.trees[name]
	}
	a.mu.Unlock()
	if s == nil {
		return nil, badRequest{fmt.Errorf("volume %s: the move of %s has ended", name, container)}
	}
	t, err := patch.Apply(prev)
	if err != nil {
		return nil, badRequest{err}
	}
	// Every page the patch names must be one the source announced in this move.
	sess, _ := a.session(ctx, container)
	for _, e := range patch.Entries {
		for i := 0; i+32 <= len(e.Hashes); i += 32 {
			var h pages.Hash
			copy(h[:], e.Hashes[i:i+32])
			if _, ok := sess.Index(h); !ok {
				return nil, badRequest{fmt.Errorf("volume %s: %s names a page the move did not announce", name, e.Path)}
			}
		}
	}
	exists, err := a.podman.VolumeExists(ctx, name)
	if err != nil {
		return nil, err
	}
	var v *checkpoint.Volume
	if exists {
		v, err = a.podman.InspectVolume(ctx, name)
		if err == nil && v.Labels[LabelVolumeMove] != in.Prepare.Move {
			return nil, badRequest{fmt.Errorf("volume %s exists on %s and is not this move's: it is left alone", name, a.cfg.Name)}
		}
	} else {
		v, err = a.podman.CreateVolume(ctx, name, map[string]string{LabelVolumeMove: in.Prepare.Move})
	}
	if err != nil {
		return nil, err
	}
	ap, err := volumes.Apply(v.Mountpoint, t, prev, a.store.Read)
	if err != nil {
		return nil, fmt.Errorf("volume %s on %s: %w", name, a.cfg.Name, err)
	}
	if err := volumes.Verify(v.Mountpoint, t); err != nil {
		return nil, fmt.Errorf("volume %s on %s: %w", name, a.cfg.Name, err)
	}
	a.mu.Lock()
	if s.trees == nil {
		s.trees = map[string]*volumes.Tree{}
	}
	s.trees[name] = t
	a.mu.Unlock()
	return VolumeSynced{Volume: name, Digest: t.Digest(), Applied: ap, Mountpoint: v.Mountpoint}, nil
}

// volumesFree is the target's pre-flight check: a volume of the same name must not exist
// (the move creates it, and removes it again if it rolls back).
func (a *Agent) volumesFree(ctx context.Context, names []string) (Check, error) {
	ch := Check{Property: "volumes", Source: fmt.Sprint(names), Target: "free", OK: true}
	if len(names) > maxRunMounts {
		ch.OK, ch.Target, ch.Detail = false, "-", fmt.Sprintf("more than %d volumes", maxRunMounts)
		return ch, nil
	}
	var taken []string
	for _, v := range names {
		if err := ValidVolumeName(v); err != nil {
			ch.OK, ch.Target, ch.Detail = false, "-", err.Error()
			return ch, nil
		}
		ok, err := a.podman.VolumeExists(ctx, v)
		if err != nil {
			return ch, err
		}
		if ok {
			taken = append(taken, v)
		}
	}
	if len(taken) > 0 {
		ch.OK, ch.Target = false, "taken"
		ch.Detail = fmt.Sprintf("%s has volumes named %v already: remove them (`podman volume rm`) or rename", a.cfg.Name, taken)
	}
	return ch, nil
}
