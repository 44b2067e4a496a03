package checkpoint

import (
	"context"
	"fmt"
	"strings"

	"github.com/containers/podman/v5/pkg/bindings/containers"
	"github.com/containers/podman/v5/pkg/bindings/images"
	"github.com/containers/podman/v5/pkg/bindings/system"
	"github.com/containers/podman/v5/pkg/specgen"
	rspec "github.com/opencontainers/runtime-spec/specs-go"
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
	// What decides whether it can move (Inspect only).
	Mounts      []Mount  `json:"mounts,omitempty"`       // volumes and bind mounts (tmpfs not listed)
	Devices     []string `json:"devices,omitempty"`      // host devices passed in
	NetworkMode string   `json:"network_mode,omitempty"` // "host" when it shares the host's network
}

// AnnotationCRIUConfig names the CRIU configuration file runc passes to CRIU, for dump and
// restore alike; its settings override runc's. A missing file is ignored.
const AnnotationCRIUConfig = "org.criu.config"

// Mount kinds.
const (
	MountVolume = "volume" // a named podman volume
	MountBind   = "bind"   // a host path
	MountTmpfs  = "tmpfs"  // memory-backed, empty at start
)

// Mount is a volume, bind mount or tmpfs of a container.
type Mount struct {
	Type     string `json:"type"`             // MountVolume, MountBind or MountTmpfs
	Source   string `json:"source,omitempty"` // volume name or host path ("" for tmpfs)
	Dest     string `json:"dest"`             // path in the container
	ReadOnly bool   `json:"read_only,omitempty"`
	// Options are tmpfs options (size=64m, mode=1777, ...).
	Options []string `json:"options,omitempty"`
}

// Spec describes a container to create on a given network namespace.
type Spec struct {
	Name        string
	Image       string
	Command     []string
	Entrypoint  []string
	Env         map[string]string
	Labels      map[string]string
	Annotations map[string]string
	User        string
	WorkDir     string
	ReadOnly    bool
	Mounts      []Mount
	MemoryLimit int64   // bytes; 0: none
	CPUs        float64 // CPUs' worth of time; 0: no limit
	NetNS       string  // path of the network namespace the container joins
	// CRIUConfig, if set, becomes the container's org.criu.config annotation.
	CRIUConfig string
}

// cpuPeriod is the CFS period a CPU limit is expressed in (podman's default).
const cpuPeriod = 100000

// Run creates and starts a container.
func (p *Podman) Run(ctx context.Context, s Spec) (string, error) {
	g := specgen.NewSpecGenerator(s.Image, false)
	g.Name = s.Name
	g.Command = s.Command
	g.Env = s.Env
	g.Labels = s.Labels
	g.Entrypoint = s.Entrypoint
	g.User = s.User
	g.WorkDir = s.WorkDir
	if s.ReadOnly {
		ro := true
		g.ReadOnlyFilesystem = &ro
	}
	g.Annotations = map[string]string{}
	for k, v := range s.Annotations {
		g.Annotations[k] = v
	}
	if s.CRIUConfig != "" {
		g.Annotations[AnnotationCRIUConfig] = s.CRIUConfig
	}
	for _, m := range s.Mounts {
		var opts []string
		if m.ReadOnly {
			opts = append(opts, "ro")
		}
		switch m.Type {
		case MountVolume:
			g.Volumes = append(g.Volumes, &specgen.NamedVolume{Name: m.Source, Dest: m.Dest, Options: opts})
		case MountBind:
			g.Mounts = append(g.Mounts, rspec.Mount{Type: "bind", Source: m.Source, Destination: m.Dest, Options: append(opts, "rbind")})
		case MountTmpfs:
			g.Mounts = append(g.Mounts, rspec.Mount{Type: "tmpfs", Source: "tmpfs", Destination: m.Dest, Options: append(opts, m.Options...)})
		default:
			return "", fmt.Errorf("mount of %s: unknown type %q", m.Dest, m.Type)
		}
	}
	if s.MemoryLimit > 0 || s.CPUs > 0 {
		g.ResourceLimits = &rspec.LinuxResources{}
		if s.MemoryLimit > 0 {
			limit := s.MemoryLimit
			g.ResourceLimits.Memory = &rspec.LinuxMemory{Limit: &limit}
		}
		if s.CPUs > 0 {
			quota, period := int64(s.CPUs*cpuPeriod), uint64(cpuPeriod)
			g.ResourceLimits.CPU = &rspec.LinuxCPU{Quota: &quota, Period: &period}
		}
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
	c := &Container{ID: d.ID, Name: d.Name, Image: d.ImageName, State: d.State.Status, Labels: d.Config.Labels, StaticDir: d.StaticDir, PID: d.State.Pid,
		CRIUConfig: d.Config.Annotations[AnnotationCRIUConfig]}
	for _, m := range d.Mounts {
		switch m.Type {
		case MountVolume:
			c.Mounts = append(c.Mounts, Mount{Type: MountVolume, Source: m.Name, Dest: m.Destination, ReadOnly: !m.RW})
		case MountBind:
			c.Mounts = append(c.Mounts, Mount{Type: MountBind, Source: m.Source, Dest: m.Destination, ReadOnly: !m.RW})
		}
	}
	if hc := d.HostConfig; hc != nil {
		c.NetworkMode = hc.NetworkMode
		for _, dev := range hc.Devices {
			c.Devices = append(c.Devices, dev.PathOnHost)
		}
	}
	return c, nil
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
