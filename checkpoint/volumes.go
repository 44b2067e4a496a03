package checkpoint

import (
	"context"
	"fmt"

	"github.com/containers/podman/v5/pkg/bindings/containers"
	"github.com/containers/podman/v5/pkg/bindings/volumes"
	entitiesTypes "github.com/containers/podman/v5/pkg/domain/entities/types"
)

// Volume is a named volume on a host.
type Volume struct {
	Name       string            `json:"name"`
	Mountpoint string            `json:"mountpoint"` // its directory on the host
	Driver     string            `json:"driver"`
	Labels     map[string]string `json:"labels,omitempty"`
}

// VolumeExists reports whether the host has a volume of that name.
func (p *Podman) VolumeExists(ctx context.Context, name string) (bool, error) {
	ok, err := volumes.Exists(p.with(ctx), name, nil)
	if err != nil {
		return false, fmt.Errorf("look up volume %s on %s: %w", name, p.uri, err)
	}
	return ok, nil
}

// InspectVolume returns the volume's description.
func (p *Podman) InspectVolume(ctx context.Context, name string) (*Volume, error) {
	v, err := volumes.Inspect(p.with(ctx), name, nil)
	if err != nil {
		return nil, fmt.Errorf("inspect volume %s on %s: %w", name, p.uri, err)
	}
	return &Volume{Name: v.Name, Mountpoint: v.Mountpoint, Driver: v.Driver, Labels: v.Labels}, nil
}

// CreateVolume creates an empty local volume with labels.
func (p *Podman) CreateVolume(ctx context.Context, name string, labels map[string]string) (*Volume, error) {
	v, err := volumes.Create(p.with(ctx), entitiesTypes.VolumeCreateOptions{Name: name, Labels: labels}, nil)
	if err != nil {
		return nil, fmt.Errorf("create volume %s on %s: %w", name, p.uri, err)
	}
	return &Volume{Name: v.Name, Mountpoint: v.Mountpoint, Driver: v.Driver, Labels: v.Labels}, nil
}

// RemoveVolume removes a volume (it must be unused); a missing one is no error.
func (p *Podman) RemoveVolume(ctx context.Context, name string) error {
	ok, err := p.VolumeExists(ctx, name)
	if err != nil || !ok {
		return err
	}
	if err := volumes.Remove(p.with(ctx), name, nil); err != nil {
		return fmt.Errorf("remove volume %s on %s: %w", name, p.uri, err)
	}
	return nil
}

// VolumeUsers names the containers on the host that use the volume.
func (p *Podman) VolumeUsers(ctx context.Context, name string) ([]string, error) {
	l, err := containers.List(p.with(ctx), new(containers.ListOptions).WithAll(true).WithFilters(map[string][]string{"volume": {name}}))
	if err != nil {
		return nil, fmt.Errorf("containers using volume %s on %s: %w", name, p.uri, err)
	}
	var out []string
	for _, c := range l {
		if len(c.Names) > 0 {
			out = append(out, c.Names[0])
		}
	}
	return out, nil
}
