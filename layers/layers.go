// Package layers works out which image layers a target host lacks and ships only those.
//
// Layers are named by their DiffID (the digest of the uncompressed layer), the name every
// containers-storage uses. Shipping streams the image as a docker-archive in which every
// layer the target already holds is an empty placeholder: podman's load (containers/image)
// looks a layer up by digest before it reads its blob, so held layers are reused and
// never read, while a layer it lacks is read and verified against its digest — a wrong
// placeholder or a damaged blob fails the load and nothing becomes visible.
package layers

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
)

// Layer is one layer of an image.
type Layer struct {
	DiffID  string `json:"diff_id"`
	Size    int64  `json:"size"`
	Present bool   `json:"present"` // the target holds it
}

// Plan is what moving an image to a target costs.
type Plan struct {
	Image         string  `json:"image"`
	ImageID       string  `json:"image_id"`
	Target        string  `json:"target"`
	ImagePresent  bool    `json:"image_present"` // the target has the image itself
	Layers        []Layer `json:"layers"`
	TotalBytes    int64   `json:"total_bytes"`
	MissingBytes  int64   `json:"missing_bytes"` // what crosses the link for the image
	MissingLayers int     `json:"missing_layers"`
	// RootfsChanges counts the paths the container changed in its rootfs; they travel in
	// the checkpoint archive.
	RootfsChanges int `json:"rootfs_changes"`
}

// NewPlan marks the layers the target holds and adds up the rest.
func NewPlan(image, id, target string, layers []Layer, held map[string]bool, imagePresent bool) Plan {
	p := Plan{Image: image, ImageID: id, Target: target, ImagePresent: imagePresent}
	for _, l := range layers {
		l.Present = imagePresent || held[l.DiffID]
		p.TotalBytes += l.Size
		if !l.Present {
			p.MissingBytes += l.Size
			p.MissingLayers++
		}
		p.Layers = append(p.Layers, l)
	}
	return p
}

// Cost returns, for every candidate host, the bytes of layers it would have to receive:
// the move planner's measure of what an image costs to bring there.
func Cost(layers []Layer, held map[string]map[string]bool) map[string]int64 {
	out := make(map[string]int64, len(held))
	for host, h := range held {
		var n int64
		for _, l := range layers {
			if !h[l.DiffID] {
				n += l.Size
			}
		}
		out[host] = n
	}
	return out
}

// Stats counts what Filter passed on.
type Stats struct {
	LayersSent, LayersSkipped int
	BytesSkipped              int64
}

// Filter copies a docker-archive tar stream from r to w, replacing the blob of every layer
// in skip (by DiffID, "sha256:...") with an empty placeholder.
func Filter(r io.Reader, w io.Writer, skip map[string]bool) (Stats, error) {
	var st Stats
	tr, tw := tar.NewReader(r), tar.NewWriter(w)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return st, fmt.Errorf("read image archive: %w", err)
		}
		if h.Typeflag == tar.TypeReg && isLayerBlob(h.Name) {
			if skip["sha256:"+strings.TrimSuffix(path.Base(h.Name), ".tar")] {
				st.LayersSkipped++
				st.BytesSkipped += h.Size
				ph := *h
				ph.Size = 0
				if err := tw.WriteHeader(&ph); err != nil {
					return st, err
				}
				continue
			}
			st.LayersSent++
		}
		if err := tw.WriteHeader(h); err != nil {
			return st, err
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return st, fmt.Errorf("copy %s: %w", h.Name, err)
		}
	}
	return st, tw.Close()
}

// isLayerBlob recognises docker-archive layer blobs: "<64 hex digits>.tar" at the top.
func isLayerBlob(name string) bool {
	base, ok := strings.CutSuffix(name, ".tar")
	if !ok || strings.Contains(base, "/") || len(base) != 64 {
		return false
	}
	for _, c := range base {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
