package transfer

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/layers"
)

// holdings lists the layers and images this host holds.
func (a *Agent) holdings(r *http.Request) (any, error) {
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	held, err := a.podman.HeldLayers(r.Context())
	if err != nil {
		return nil, err
	}
	h := Holdings{Layers: []string{}}
	if img := r.URL.Query().Get("image"); img != "" {
		if h.ImagePresent, err = a.podman.ImageExists(r.Context(), img); err != nil {
			return nil, err
		}
	}
	for d := range held {
		h.Layers = append(h.Layers, d)
	}
	sort.Strings(h.Layers)
	return h, nil
}

// LayerPlan works out what moving container to host to costs in image layers.
func (a *Agent) LayerPlan(ctx context.Context, container, to string) (*layers.Plan, error) {
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	c, err := a.podman.Inspect(ctx, container)
	if err != nil {
		return nil, err
	}
	return a.layerPlanOf(ctx, c, to)
}

func (a *Agent) layerPlanOf(ctx context.Context, c *checkpoint.Container, to string) (*layers.Plan, error) {
	id, ls, err := a.podman.ImageLayers(ctx, c.Image)
	if err != nil {
		return nil, err
	}
	target, err := a.peer(to)
	if err != nil {
		return nil, err
	}
	h, err := target.Holdings(ctx, c.Image)
	if err != nil {
		return nil, err
	}
	held := map[string]bool{}
	for _, d := range h.Layers {
		held[d] = true
	}
	in := make([]layers.Layer, len(ls))
	for i, l := range ls {
		in[i] = layers.Layer{DiffID: l.DiffID, Size: l.Size}
	}
	p := layers.NewPlan(c.Image, id, to, in, held, h.ImagePresent)
	if n, err := a.podman.RootfsChanges(ctx, c.Name); err == nil {
		p.RootfsChanges = n
	}
	return &p, nil
}

func (a *Agent) layerPlan(r *http.Request) (any, error) {
	var req PlanRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	return a.LayerPlan(r.Context(), req.Container, req.To)
}

// shipImage streams the image to the target with the layers it holds left out.
func (a *Agent) shipImage(ctx context.Context, p *layers.Plan, progress func(int64)) (*ImageResult, error) {
	target, err := a.peer(p.Target)
	if err != nil {
		return nil, err
	}
	skip := map[string]bool{}
	for _, l := range p.Layers {
		if l.Present {
			skip[l.DiffID] = true
		}
	}
	saved, savew := io.Pipe()
	filtered, filterw := io.Pipe()
	// By name: the archive then carries the name, and the target gets the image under the
	// same name and ID.
	go func() { savew.CloseWithError(a.podman.SaveImage(ctx, p.Image, savew)) }()
	go func() {
		_, err := layers.Filter(saved, filterw, skip)
		saved.CloseWithError(errors.New("filter stopped"))
		filterw.CloseWithError(err)
	}()
	res, err := target.LoadImage(ctx, filtered, progress)
	filtered.CloseWithError(errors.New("upload stopped"))
	if err != nil {
		return nil, fmt.Errorf("ship image %s to %s: %w", p.Image, p.Target, err)
	}
	return res, nil
}

// loadImage receives an image archive; podman only sees its end if the digest matches.
func (a *Agent) loadImage(r *http.Request) (any, error) {
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	vr := newVerifyingReader(r.Body, r)
	names, err := a.podman.LoadImage(r.Context(), vr)
	if vr.err != nil {
		err = vr.err
	}
	if err != nil {
		return nil, fmt.Errorf("load image on %s: %w", a.cfg.Name, err)
	}
	return ImageResult{Bytes: vr.n, Digest: "sha256:" + hex.EncodeToString(vr.h.Sum(nil)), Names: names}, nil
}
