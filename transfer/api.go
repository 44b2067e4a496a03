// Package transfer is the agent (`migrate serve`) and its protocol: HTTP/1.1 over mutually
// authenticated TLS 1.3 between agents and operators, checkpoint archives streamed with a
// SHA-256 digest checked before anything is restored, and the push transaction that moves
// a container and rolls back on any failure.
package transfer

import (
	"net/netip"
	"time"

	"github.com/migrate-project/migrate/layers"
	"github.com/migrate-project/migrate/overlaynet"
)

// Labels that put a container on the overlay; they travel with it in the checkpoint.
const (
	LabelIP  = "migrate.ip"  // address/prefix, e.g. 10.88.0.10/16
	LabelMAC = "migrate.mac" // its MAC
)

// HostInfo is what a host says of itself, for the pre-flight gate.
type HostInfo struct {
	Name        string `json:"name"`
	Kernel      string `json:"kernel"`
	CRIU        string `json:"criu_version"`
	CRIUProblem string `json:"criu_problem,omitempty"`
	Runtime     string `json:"oci_runtime"`
	Cgroups     string `json:"cgroups"`
	Datapath    string `json:"ovs_datapath"`
	Podman      bool   `json:"podman"`
}

// ContainerInfo is a container as an agent reports it.
type ContainerInfo struct {
	Name      string       `json:"name"`
	Host      string       `json:"host"`
	Image     string       `json:"image"`
	State     string       `json:"state"`
	IP        netip.Prefix `json:"ip,omitempty"`
	MAC       string       `json:"mac,omitempty"`
	OnOverlay bool         `json:"on_overlay"`
}

// RunRequest starts a container on the overlay.
type RunRequest struct {
	Name    string            `json:"name"`
	Image   string            `json:"image"`
	Command []string          `json:"command,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	IP      netip.Prefix      `json:"ip"`
}

// PrepareRequest asks a target to get ready for a container.
type PrepareRequest struct {
	Container string              `json:"container"`
	Image     string              `json:"image"`
	Source    string              `json:"source"`
	Endpoint  overlaynet.Endpoint `json:"endpoint"`
	// Source's facts, compared by the target.
	Runtime string `json:"oci_runtime"`
	Cgroups string `json:"cgroups"`
	// CPUInfo is the source's `criu cpuinfo dump` image: the target checks that its CPU
	// offers what the container's processes may use.
	CPUInfo []byte `json:"cpuinfo,omitempty"`
	DryRun  bool   `json:"dry_run,omitempty"`
}

// Check is one property of the pre-flight gate.
type Check struct {
	Property string `json:"property"`
	Source   string `json:"source,omitempty"`
	Target   string `json:"target,omitempty"`
	OK       bool   `json:"ok"`
	Detail   string `json:"detail,omitempty"`
}

// PrepareResponse lists the checks; the target is prepared only if all passed.
type PrepareResponse struct {
	Checks []Check `json:"checks"`
}

// AbortRequest undoes a prepare (and a restore) on the target.
type AbortRequest struct {
	Container string              `json:"container"`
	Source    string              `json:"source"`
	Endpoint  overlaynet.Endpoint `json:"endpoint"`
}

// RestoreResult is the target's report of a restore.
type RestoreResult struct {
	Bytes    int64         `json:"bytes"`
	Digest   string        `json:"digest"`
	Restore  time.Duration `json:"restore_ns"`
	Received time.Duration `json:"receive_ns"`
}

// ImageResult is the target's report of an image load.
type ImageResult struct {
	Bytes  int64    `json:"bytes"` // archive bytes received on the connection
	Digest string   `json:"digest"`
	Names  []string `json:"names"`
}

// Holdings is what layers a host holds (DiffIDs), and whether it has the image asked for.
type Holdings struct {
	Layers       []string `json:"layers"`
	ImagePresent bool     `json:"image_present"`
}

// PlanRequest asks a source for the layer plan of moving a container to a target.
type PlanRequest struct {
	Container string `json:"container"`
	To        string `json:"to"`
}

// PushRequest asks the source agent to move a container.
type PushRequest struct {
	Container string `json:"container"`
	To        string `json:"to"`
	DryRun    bool   `json:"dry_run,omitempty"`
	// StallTimeout rolls the move back when the transfer makes no progress for this long
	// (a cut link that sends no reset). Default 60 s.
	StallTimeout time.Duration `json:"stall_timeout_ns,omitempty"`
}

// Event is one line of a push's progress stream (newline-delimited JSON).
type Event struct {
	Time   time.Time   `json:"time"`
	Kind   string      `json:"event"` // phase, check, progress, result, error
	Phase  string      `json:"phase,omitempty"`
	Check  *Check      `json:"check,omitempty"`
	Bytes  int64       `json:"bytes,omitempty"`
	Result *PushResult `json:"result,omitempty"`
	Error  string      `json:"error,omitempty"`
}

// PushResult is the outcome of a push.
type PushResult struct {
	Container  string        `json:"container"`
	From       string        `json:"from"`
	To         string        `json:"to"`
	OK         bool          `json:"ok"`
	DryRun     bool          `json:"dry_run,omitempty"`
	RolledBack bool          `json:"rolled_back,omitempty"` // failed; the container runs on the source
	Error      string        `json:"error,omitempty"`
	Checks     []Check       `json:"checks,omitempty"`
	Bytes      int64         `json:"bytes"`       // checkpoint bytes over the agent connection
	ImageBytes int64         `json:"image_bytes"` // image archive bytes over the agent connection
	Plan       *layers.Plan  `json:"layer_plan,omitempty"`
	Total      time.Duration `json:"total_ns"`         // request to done
	Frozen     time.Duration `json:"frozen_ns"`        // traffic stopped (freeze) to traffic re-pointed
	Phases     []Phase       `json:"phases,omitempty"` // how long each step took
	LogsDir    string        `json:"logs_dir,omitempty"`
	Finished   time.Time     `json:"finished"`
}

// Phase is one timed step of a push.
type Phase struct {
	Name     string        `json:"name"`
	Duration time.Duration `json:"duration_ns"`
}

// Status is what `migrate status` shows of one host.
type Status struct {
	Host       string          `json:"host"`
	Containers []ContainerInfo `json:"containers"`
	InFlight   []string        `json:"in_flight,omitempty"`
	Last       *PushResult     `json:"last,omitempty"`
}

// apiError is the body of every error response.
type apiError struct {
	Error string `json:"error"`
}
