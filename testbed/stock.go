package testbed

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// StockResult times the stock sequence.
type StockResult struct {
	Bytes      int64         `json:"bytes"`
	Checkpoint time.Duration `json:"checkpoint_ns"`
	Copy       time.Duration `json:"copy_ns"`
	Restore    time.Duration `json:"restore_ns"`
	Repoint    time.Duration `json:"repoint_ns"`
	Total      time.Duration `json:"total_ns"`
}

// StockMove moves container name (on the overlay at ip) the stock way, for comparison with
// `migrate push`: podman container checkpoint --tcp-established --export on from, the file
// copied over the underlay with nc, podman container restore --tcp-established --import
// on to, and the overlay re-pointed. The target's endpoint is plumbed beforehand, as push
// does before it freezes anything.
func (tb *Testbed) StockMove(ctx context.Context, name, ip, from, to string) (*StockResult, error) {
	return tb.StockMoveWithVolumes(ctx, name, ip, from, to, nil)
}

// StockMoveWithVolumes is StockMove for a container with volumes, moved as podman's own
// export would: each volume exported as a tar after the checkpoint (podman puts it into
// the checkpoint archive), copied with it, and imported into a new volume on the target
// before the restore.
func (tb *Testbed) StockMoveWithVolumes(ctx context.Context, name, ip, from, to string, volumes []string) (*StockResult, error) {
	if _, err := tb.Host(to); err != nil {
		return nil, err
	}
	if out, err := tb.MigrateAs(ctx, ClientName, from, "overlay", "prepare", "--from", from, "--to", to, name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("prepare the endpoint on %s: %v: %s", to, err, out)
	}
	dir := filepath.Join(dataDir(tb.Name), "stock")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	files := []string{"checkpoint"}
	files = append(files, volumes...)
	src := func(f string) string { return filepath.Join(dir, "from-"+f+".tar") }
	dstf := func(f string) string { return filepath.Join(dir, "to-"+f+".tar") }

	r := &StockResult{}
	start := time.Now()
	if _, err := tb.Run(ctx, from, "podman", "container", "checkpoint", "--tcp-established", "--export", src("checkpoint"), name); err != nil {
		return nil, err
	}
	for _, v := range volumes {
		if _, err := tb.Run(ctx, from, "podman", "volume", "export", "-o", src(v), v); err != nil {
			return nil, err
		}
	}
	r.Checkpoint = time.Since(start)
	t := time.Now()
	for _, f := range files {
		n, err := tb.CopyFile(ctx, from, to, src(f), dstf(f))
		if err != nil {
			return nil, fmt.Errorf("stock copy: %w", err)
		}
		r.Bytes += n
	}
	r.Copy = time.Since(t)
	t = time.Now()
	for _, v := range volumes {
		if _, err := tb.Run(ctx, to, "podman", "volume", "create", v); err != nil {
			return nil, err
		}
		if _, err := tb.Run(ctx, to, "podman", "volume", "import", v, dstf(v)); err != nil {
			return nil, err
		}
	}
	if _, err := tb.Run(ctx, to, "podman", "container", "restore", "--tcp-established", "--import", dstf("checkpoint")); err != nil {
		return nil, err
	}
	r.Restore = time.Since(t)
	t = time.Now()
	if out, err := tb.MigrateAs(ctx, ClientName, from, "overlay", "locate", "--on", to, "--ip", ip, name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("re-point the overlay: %v: %s", err, out)
	}
	r.Repoint = time.Since(t)
	r.Total = time.Since(start)
	tb.MigrateAs(ctx, ClientName, from, "overlay", "commit", "--on", to, name).Run()
	tb.Run(ctx, from, "podman", "rm", "-f", name)
	// The source's endpoint goes too (push unplumbs it at commit), so that the container
	// can come back.
	tb.Run(ctx, from, "ip", "netns", "delete", "mig-"+name)
	for _, v := range volumes {
		tb.Run(ctx, from, "podman", "volume", "rm", v)
	}
	return r, nil
}

// StockImageCopy copies image from one host to another the stock way: podman save on the
// source, the archive over the underlay (CopyFile), podman load on the target. It returns the
// archive's size.
func (tb *Testbed) StockImageCopy(ctx context.Context, image, from, to string) (int64, error) {
	if _, err := tb.Host(to); err != nil {
		return 0, err
	}
	dir := filepath.Join(dataDir(tb.Name), "stock-image")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	srcFile, dstFile := filepath.Join(dir, "from.tar"), filepath.Join(dir, "to.tar")
	if _, err := tb.Run(ctx, from, "podman", "save", "-o", srcFile, image); err != nil {
		return 0, err
	}
	n, err := tb.CopyFile(ctx, from, to, srcFile, dstFile)
	if err != nil {
		return 0, fmt.Errorf("copy image: %w", err)
	}
	if _, err := tb.Run(ctx, to, "podman", "load", "-i", dstFile); err != nil {
		return 0, err
	}
	return n, nil
}
