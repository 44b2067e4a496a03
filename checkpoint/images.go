package checkpoint

import (
	"context"
	"fmt"
	"io"

	"github.com/containers/podman/v5/pkg/bindings/containers"
	"github.com/containers/podman/v5/pkg/bindings/images"
)

// ImageLayer is one layer of an image: its DiffID and uncompressed size.
type ImageLayer struct {
	DiffID string
	Size   int64
}

// ImageLayers returns an image's ID and its layers, bottom first.
func (p *Podman) ImageLayers(ctx context.Context, image string) (string, []ImageLayer, error) {
	rep, err := images.GetImage(p.with(ctx), image, nil)
	if err != nil {
		return "", nil, fmt.Errorf("inspect image %s on %s: %w", image, p.uri, err)
	}
	hist, err := images.History(p.with(ctx), image, nil)
	if err != nil {
		return "", nil, fmt.Errorf("history of %s on %s: %w", image, p.uri, err)
	}
	// History is newest first; entries that made a layer have a size or are not empty.
	var sizes []int64
	for i := len(hist) - 1; i >= 0; i-- {
		if hist[i].Size > 0 {
			sizes = append(sizes, hist[i].Size)
		}
	}
	var out []ImageLayer
	for i, d := range rep.RootFS.Layers {
		l := ImageLayer{DiffID: d.String()}
		if len(sizes) == len(rep.RootFS.Layers) {
			l.Size = sizes[i]
		}
		out = append(out, l)
	}
	return rep.ID, out, nil
}

// HeldLayers returns the DiffIDs of every layer of every image on the host.
func (p *Podman) HeldLayers(ctx context.Context) (map[string]bool, error) {
	l, err := images.List(p.with(ctx), nil)
	if err != nil {
		return nil, fmt.Errorf("list images on %s: %w", p.uri, err)
	}
	held := map[string]bool{}
	for _, s := range l {
		rep, err := images.GetImage(p.with(ctx), s.ID, nil)
		if err != nil {
			continue
		}
		for _, d := range rep.RootFS.Layers {
			held[d.String()] = true
		}
	}
	return held, nil
}

// SaveImage streams the image as an uncompressed docker-archive.
func (p *Podman) SaveImage(ctx context.Context, image string, w io.Writer) error {
	opts := new(images.ExportOptions).WithFormat("docker-archive").WithCompress(false)
	if err := images.Export(p.with(ctx), []string{image}, w, opts); err != nil {
		return fmt.Errorf("save image %s on %s: %w", image, p.uri, err)
	}
	return nil
}

// LoadImage loads an image archive read from r.
func (p *Podman) LoadImage(ctx context.Context, r io.Reader) ([]string, error) {
	rep, err := images.Load(p.with(ctx), r)
	if err != nil {
		return nil, fmt.Errorf("load image on %s: %w", p.uri, err)
	}
	return rep.Names, nil
}

// RootfsChanges counts the paths a container changed in its rootfs.
func (p *Podman) RootfsChanges(ctx context.Context, name string) (int, error) {
	d, err := containers.Diff(p.with(ctx), name, nil)
	if err != nil {
		return 0, p.apiError("diff", name, err)
	}
	return len(d), nil
}

// RootfsChange is a path a container changed in its root file system, as `podman diff`
// names it: Kind is "A" (added), "C" (changed) or "D" (deleted).
type RootfsChange struct {
	Path string `json:"path"`
	Kind string `json:"kind"`
}

// RootfsDiff lists the paths a container changed in its root file system.
func (p *Podman) RootfsDiff(ctx context.Context, name string) ([]RootfsChange, error) {
	d, err := containers.Diff(p.with(ctx), name, nil)
	if err != nil {
		return nil, p.apiError("diff", name, err)
	}
	out := make([]RootfsChange, 0, len(d))
	for _, c := range d {
		out = append(out, RootfsChange{Path: c.Path, Kind: c.Kind.String()})
	}
	return out, nil
}
