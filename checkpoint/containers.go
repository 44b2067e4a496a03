package checkpoint

import (
	"context"
	"fmt"
	"strings"

	"github.com/containers/podman/v5/pkg/bindings/containers"
	"github.com/containers/podman/v5/pkg/bindings/images"
	"github.com/containers/podman/v5/pkg/bindings/system"
	"github.com/containers/podman/v5/pkg/specgen"
)

// Container is what migrate needs to know of a container.
type Container struct {
	ID     string            `json:"id"`
	Name   string            `json:"name"`
	Image  string            `json:"image"`
	State  string            `json:"state"`
	Labels map[string]string `json:"labels,omitempty"`
	// StaticDir holds the container's CRIU logs (dump.log, restore.log) on its host.
	StaticDir string `json:"static_dir,omitempty"`
	// PID is the host PID of the container's first process (0 unless running).
	PID int `json:"pid,omitempty"`
	// CRIUConfig is the CRIU configuration file runc hands CRIU for this container (its
	// org.criu.config annotation; "" when it has none).
	CRIUConfig string `json:"criu_config,omitempty"`
}

// AnnotationCRIUConfig names the CRIU configuration file runc passes to CRIU, for dump and
// restore alike; its settings override runc's. A missing file is ignored.
const AnnotationCRIUConfig = "org.criu.config"

// Spec describes a container to create on a given network namespace.
type Spec struct {
	Name    string
	Image   string
	Command []string
	Env     map[string]string
	Labels  map[string]string
	NetNS   string // path of the network namespace the container joins
	// CRIUConfig, if set, becomes the container's org.criu.config annotation.
	CRIUConfig string
}

// Run creates and starts a container.
func (p *Podman) Run(ctx context.Context, s Spec) (string, error) {
	g := specgen.NewSpecGenerator(s.Image, false)
	g.Name = s.Name
	g.Command = s.Command
	g.Env = s.Env
	g.Labels = s.Labels
	if s.CRIUConfig != "" {
		g.Annotations = map[string]string{AnnotationCRIUConfig: s.CRIUConfig}
	}
	if s.NetNS != "" {
		g.NetNS = specgen.Namespace{NSMode: specgen.Path, Value: s.NetNS}
	}
	resp, err := containers.CreateWithSpec(p.with(ctx), g, nil)
	if err != nil {
		return "", p.apiError("create", s.Name, err)
	}
	if err := containers.Start(p.with(ctx), resp.ID, nil); err != nil {
		containers.Remove(p.with(ctx), resp.ID, new(containers.RemoveOptions).WithForce(true))
		return "", p.apiError("start", s.Name, err)
	}
	return resp.ID, nil
}

// Inspect returns a container's description.
func (p *Podman) Inspect(ctx context.Context, name string) (*Container, error) {
	d, err := containers.Inspect(p.with(ctx), name, nil)
	if err != nil {
		return nil, p.apiError("inspect", name, err)
	}
	return &Container{ID: d.ID, Name: d.Name, Image: d.ImageName, State: d.State.Status, Labels: d.Config.Labels, StaticDir: d.StaticDir, PID: d.State.Pid,
		CRIUConfig: d.Config.Annotations[AnnotationCRIUConfig]}, nil
}

// List returns every container on the host.
func (p *Podman) List(ctx context.Context) ([]Container, error) {
	l, err := containers.List(p.with(ctx), new(containers.ListOptions).WithAll(true))
	if err != nil {
		return nil, fmt.Errorf("list containers on %s: %w", p.uri, err)
	}
	out := make([]Container, 0, len(l))
	for _, c := range l {
		name := c.ID
		if len(c.Names) > 0 {
			name = c.Names[0]
		}
		out = append(out, Container{ID: c.ID, Name: name, Image: c.Image, State: c.State, Labels: c.Labels})
	}
	return out, nil
}

// Exists reports whether the host has a container of that name.
func (p *Podman) Exists(ctx context.Context, name string) (bool, error) {
	ok, err := containers.Exists(p.with(ctx), name, nil)
	if err != nil {
		return false, fmt.Errorf("look up container %s on %s: %w", name, p.uri, err)
	}
	return ok, nil
}

// ImageExists reports whether the host holds the image.
func (p *Podman) ImageExists(ctx context.Context, image string) (bool, error) {
	ok, err := images.Exists(p.with(ctx), image, nil)
	if err != nil {
		return false, fmt.Errorf("look up image %s on %s: %w", image, p.uri, err)
	}
	return ok, nil
}

// RestoreLocal restores a container from the checkpoint it kept on this host (Keep).
func (p *Podman) RestoreLocal(ctx context.Context, name string, tcpEstablished bool) error {
	_, err := containers.Restore(p.with(ctx), name, new(containers.RestoreOptions).WithTCPEstablished(tcpEstablished).WithKeep(true))
	if err != nil {
		return p.apiError("restore", name, err)
	}
	return nil
}

// Runtime returns the name of the host's default OCI runtime (runc, crun, ...).
func (p *Podman) Runtime(ctx context.Context) (string, error) {
	info, err := system.Info(p.with(ctx), nil)
	if err != nil {
		return "", fmt.Errorf("podman info on %s: %w", p.uri, err)
	}
	if info.Host.OCIRuntime == nil {
		return "", nil
	}
	return strings.TrimSpace(info.Host.OCIRuntime.Name), nil
}
