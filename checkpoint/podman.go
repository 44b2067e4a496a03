// Package checkpoint checkpoints and restores containers through a host's podman API
// service (the podman v5 Go bindings), streaming the checkpoint archive instead of
// staging it in files.
package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/containers/podman/v5/pkg/bindings"
	"github.com/containers/podman/v5/pkg/bindings/containers"
	"github.com/containers/podman/v5/pkg/domain/entities/types"
	"github.com/containers/podman/v5/pkg/errorhandling"
)

// ErrNoSuchContainer is returned (wrapped) for a container the host does not have.
var ErrNoSuchContainer = errors.New("no such container")

// Podman is a connection to one host's podman API service.
type Podman struct {
	uri  string
	conn context.Context // carries the bindings' client
}

// Connect opens a connection to the podman service at uri (unix:///path/podman.sock, or
// ssh:// and tcp:// as podman supports them) and checks that it answers.
func Connect(ctx context.Context, uri string) (*Podman, error) {
	conn, err := bindings.NewConnection(ctx, uri)
	if err != nil {
		return nil, fmt.Errorf("connect to podman at %s: %w (is `podman system service` running there?)", uri, err)
	}
	return &Podman{uri: uri, conn: conn}, nil
}

// URI is where this connection goes.
func (p *Podman) URI() string { return p.uri }

// with returns ctx (for its deadline and cancellation) carrying the bindings' client.
func (p *Podman) with(ctx context.Context) context.Context { return connCtx{ctx, p.conn} }

type connCtx struct {
	context.Context
	conn context.Context
}

func (c connCtx) Value(key any) any {
	if v := c.conn.Value(key); v != nil {
		return v
	}
	return c.Context.Value(key)
}

// Options are the checkpoint options migrate uses.
type Options struct {
	TCPEstablished bool // keep established TCP connections (the container keeps its address)
	LeaveRunning   bool // the container goes on running after the dump
	IgnoreRootfs   bool // leave the container's rootfs changes out of the archive
	// Keep leaves the checkpoint on this host, so the container can be restored here
	// again (RestoreLocal) if the move fails.
	Keep bool
}

// RestoreOptions are the restore options migrate uses.
type RestoreOptions struct {
	TCPEstablished bool
	Name           string // restore under this name instead of the one in the archive
	IgnoreVolumes  bool   // the archive carries no volume content: use the volumes as they are
	// NoStats: do not ask podman for CRIU's statistics (it looks for them in the bundle,
	// where a restore whose work directory is elsewhere left none).
	NoStats bool
}

// Result describes a checkpoint or restore.
type Result struct {
	ID          string        `json:"id"`
	Bytes       int64         `json:"bytes"`           // archive size
	Duration    time.Duration `json:"duration_ns"`     // wall time of the call
	Runtime     time.Duration `json:"runtime_ns"`      // as podman measured the runtime's part
	CRIURestore time.Duration `json:"criu_restore_ns"` // CRIU's own restore time
}

// Export checkpoints container name and streams the checkpoint archive into w. Unless
// LeaveRunning, the container is stopped once the archive is complete.
func (p *Podman) Export(ctx context.Context, name string, w io.Writer, o Options) (*Result, error) {
	start := time.Now()
	conn, err := bindings.GetClient(p.conn)
	if err != nil {
		return nil, err
	}
	opts := new(containers.CheckpointOptions).WithTCPEstablished(o.TCPEstablished).
		WithLeaveRunning(o.LeaveRunning).WithIgnoreRootfs(o.IgnoreRootfs).WithKeep(o.Keep).WithPrintStats(true)
	params, err := opts.ToParams()
	if err != nil {
		return nil, err
	}
	params.Set("export", "true")
	resp, err := conn.DoRequest(p.with(ctx), nil, http.MethodPost, "/containers/%s/checkpoint", params, nil, name)
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s on %s: %w", name, p.uri, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, p.apiError("checkpoint", name, resp.Process(nil))
	}
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s on %s: stream archive after %d bytes: %w", name, p.uri, n, err)
	}
	return &Result{ID: name, Bytes: n, Duration: time.Since(start)}, nil
}

// Import restores a container from the checkpoint archive read from r.
func (p *Podman) Import(ctx context.Context, r io.Reader, o RestoreOptions) (*Result, error) {
	start := time.Now()
	conn, err := bindings.GetClient(p.conn)
	if err != nil {
		return nil, err
	}
	opts := new(containers.RestoreOptions).WithTCPEstablished(o.TCPEstablished).WithPrintStats(!o.NoStats).WithIgnoreVolumes(o.IgnoreVolumes)
	if o.Name != "" {
		opts = opts.WithName(o.Name)
	}
	params, err := opts.ToParams()
	if err != nil {
		return nil, err
	}
	params.Set("import", "true")
	cr := &countingReader{r: r}
	resp, err := conn.DoRequest(p.with(ctx), cr, http.MethodPost, "/containers/%s/restore", params, nil, "import")
	if err != nil {
		return nil, fmt.Errorf("restore on %s: %w", p.uri, err)
	}
	defer resp.Body.Close()
	var rep types.RestoreReport
	if err := resp.Process(&rep); err != nil {
		return nil, p.apiError("restore", o.Name, err)
	}
	res := &Result{ID: rep.Id, Bytes: cr.n, Duration: time.Since(start), Runtime: time.Duration(rep.RuntimeDuration) * time.Microsecond}
	if s := rep.CRIUStatistics; s != nil {
		res.CRIURestore = time.Duration(s.RestoreTime) * time.Microsecond
	}
	return res, nil
}

// State returns the container's state ("running", "exited", ...).
func (p *Podman) State(ctx context.Context, name string) (string, error) {
	data, err := containers.Inspect(p.with(ctx), name, nil)
	if err != nil {
		return "", p.apiError("inspect", name, err)
	}
	return data.State.Status, nil
}

// Remove removes the container (stopping it first).
func (p *Podman) Remove(ctx context.Context, name string) error {
	_, err := containers.Remove(p.with(ctx), name, new(containers.RemoveOptions).WithForce(true).WithTimeout(0))
	if err != nil {
		return p.apiError("remove", name, err)
	}
	return nil
}

// apiError turns a podman API error into one that names the host and what to do.
func (p *Podman) apiError(op, name string, err error) error {
	var em *errorhandling.ErrorModel
	if errors.As(err, &em) && em.ResponseCode == http.StatusNotFound {
		return fmt.Errorf("%s %s on %s: %w (podman: %s)", op, name, p.uri, ErrNoSuchContainer, em.Message)
	}
	if name == "" {
		return fmt.Errorf("%s on %s: %w", op, p.uri, err)
	}
	return fmt.Errorf("%s %s on %s: %w", op, name, p.uri, err)
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}
