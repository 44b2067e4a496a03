// Package transfer is the agent (`migrate serve`) and its protocol: HTTP/1.1 over mutually
// authenticated TLS 1.3 between agents and operators, checkpoint archives streamed with a
// SHA-256 digest checked before anything is restored, and the push transaction that moves
// a container and rolls back on any failure.
package transfer

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/layers"
	"github.com/migrate-project/migrate/overlaynet"
	"github.com/migrate-project/migrate/pages"
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
	// DirtyTracking: the kernel tracks dirty pages for CRIU (soft-dirty).
	DirtyTracking bool `json:"dirty_tracking"`
	// NoSysResource: the agent lacks CAP_SYS_RESOURCE, without which CRIU cannot read the
	// rlimits of a process of another user: only containers whose processes all run as
	// root can be checkpointed here.
	NoSysResource bool `json:"no_cap_sys_resource,omitempty"`
	// MemoryProblem says why this host cannot take the memory path (page server and
	// lazy pages); empty when it can.
	MemoryProblem string            `json:"memory_problem,omitempty"`
	PageStore     *pages.StoreStats `json:"page_store,omitempty"`
	// The agent's own resources, for operators and leak tests.
	Goroutines      int   `json:"goroutines"`
	OpenConnections int64 `json:"open_connections"` // connections its server holds
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
	Name        string             `json:"name"`
	Image       string             `json:"image"`
	Command     []string           `json:"command,omitempty"`
	Entrypoint  []string           `json:"entrypoint,omitempty"`
	Env         map[string]string  `json:"env,omitempty"`
	IP          netip.Prefix       `json:"ip"`
	Labels      map[string]string  `json:"labels,omitempty"`
	Annotations map[string]string  `json:"annotations,omitempty"`
	User        string             `json:"user,omitempty"`
	WorkDir     string             `json:"workdir,omitempty"`
	ReadOnly    bool               `json:"read_only,omitempty"`
	Mounts      []checkpoint.Mount `json:"mounts,omitempty"`
	MemoryLimit int64              `json:"memory_limit,omitempty"` // bytes
	CPUs        float64            `json:"cpus,omitempty"`
}

// MoveInFlight is a move under way, as the host at one of its ends sees it.
type MoveInFlight struct {
	Container string    `json:"container"`
	From      string    `json:"from"`
	To        string    `json:"to"`
	Since     time.Time `json:"since"`
}

// String says what the move is, for an error about its container.
func (m MoveInFlight) String() string {
	return fmt.Sprintf("%s is being moved from %s to %s, since %s (%s ago)", m.Container, m.From, m.To,
		m.Since.Local().Format("15:04:05"), time.Since(m.Since).Round(time.Second))
}

// RemoveRequest removes a container and frees its name and address.
type RemoveRequest struct {
	Name string `json:"name"`
}

// RemoveResult says what rm did on the host.
type RemoveResult struct {
	Container string     `json:"container"`
	Host      string     `json:"host"`
	Removed   bool       `json:"removed"`             // a container was removed (else only its address was freed)
	Freed     netip.Addr `json:"freed,omitzero"`      // the overlay address freed
	Unreached []string   `json:"unreached,omitempty"` // nodes that did not hear of it (they learn at their next sync)
}

// ExecRequest runs a command in a container.
type ExecRequest struct {
	Name    string   `json:"name"`
	Cmd     []string `json:"cmd"`
	Env     []string `json:"env,omitempty"`
	User    string   `json:"user,omitempty"`
	WorkDir string   `json:"workdir,omitempty"`
}

// Frame is one line of a logs or exec stream: output on stdout (Out) or stderr (Err), the
// exit code at the end of an exec, or an error.
type Frame struct {
	Out   string `json:"o,omitempty"`
	Err   string `json:"e,omitempty"`
	Exit  *int   `json:"exit,omitempty"`
	Error string `json:"error,omitempty"`
}

// PrepareRequest asks a target to get ready for a container.
type PrepareRequest struct {
	Container string              `json:"container"`
	Move      string              `json:"move"` // the move's ID, chosen by the source
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
	// Binds are the host paths the container bind-mounts: the target must have each.
	Binds []string `json:"binds,omitempty"`
	// Volumes are the container's named volumes: they must not exist on the target, which
	// creates them as their content arrives.
	Volumes []string `json:"volumes,omitempty"`
	// StallTimeout is the source's: the target fails a restore whose body makes no
	// progress for this long (bounded; 0: a minute).
	StallTimeout time.Duration `json:"stall_timeout_ns,omitempty"`
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

// AbortRequest undoes a prepare (and a restore) on the target. Only the move it names
// is undone: a target never removes a container on an abort that names another move.
type AbortRequest struct {
	Container string              `json:"container"`
	Move      string              `json:"move"`
	Source    string              `json:"source"`
	Endpoint  overlaynet.Endpoint `json:"endpoint"`
}

// MoveRef names one move of a container.
type MoveRef struct {
	Container string `json:"container"`
	Move      string `json:"move"`
}

// The outcome of a move as its source knows it.
const (
	OutcomeCommitted  = "committed"   // the container runs on the target for good
	OutcomeAborted    = "aborted"     // rolled back: the target must drop its half
	OutcomeInProgress = "in-progress" // not decided yet
	OutcomeUnknown    = "unknown"     // the source has no record of the move
)

// MoveOutcome is a source's answer to a target that asks how a move ended.
type MoveOutcome struct {
	State    string `json:"state"`
	RunsHere bool   `json:"runs_here"` // the source runs a container of that name
}

// RestoreResult is the target's report of a restore.
type RestoreResult struct {
	Bytes    int64         `json:"bytes"`
	Digest   string        `json:"digest"`
	Restore  time.Duration `json:"restore_ns"`
	Received time.Duration `json:"receive_ns"`
	// CRIURestore is CRIU's own restore time as podman reports it.
	CRIURestore time.Duration `json:"criu_restore_ns,omitempty"`
	// LazySetUp (lazy restores) is the set-up after the stream ended and before podman's
	// import: memory images written, page server and CRIU's lazy-pages daemon listening.
	LazySetUp time.Duration `json:"lazy_setup_ns,omitempty"`
	Pages     *pages.Stats  `json:"pages,omitempty"` // for an encoded archive
	// Gated (a gated import, gate.go): podman imported the prelude; GateWaited, CRIU
	// waited in the gate for its images (podman was ready before them).
	Gated      bool `json:"gated,omitempty"`
	GateWaited bool `json:"gate_waited,omitempty"`
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
	// Mode is ModePrecopy (the default) or ModeStopCopy.
	Mode string `json:"mode,omitempty"`
	// MaxDowntime is pre-copy's goal: rounds stop once the final page copy is estimated
	// to fit it. Default 200 ms.
	MaxDowntime time.Duration `json:"max_downtime_ns,omitempty"`
	// MaxRounds bounds the pre-copy rounds (default 8).
	MaxRounds int `json:"max_rounds,omitempty"`
	// Compress is "auto" (the default: zstd at a level fitted to the link), "none",
	// "fastest", "default", "better" or "best".
	Compress string `json:"compress,omitempty"`
	// BWLimitMbit caps the rate of everything the move sends (0: no cap).
	BWLimitMbit float64 `json:"bwlimit_mbit,omitempty"`
	// MemoryPath is PathAuto (the default), PathMemory (fail unless it can be taken) or
	// PathArchive (the pages inside podman's archive, as before the memory path).
	MemoryPath string `json:"memory_path,omitempty"`
	// Postcopy resumes the container on the target before the pages changed since the
	// last pre-copy round have crossed; the source serves them on demand and in the
	// background. A source or link failure in that phase loses the container.
	Postcopy bool `json:"postcopy,omitempty"`
	// HandOver is how the frozen phase's memory reaches the source agent on the memory
	// path: HandOverAuto (the default: the read hand-over where the source can dump
	// lazily, else the page server), HandOverRead (a lazy dump whose pages the agent
	// reads from the frozen processes) or HandOverPageServer (CRIU sends every page to
	// the agent's page server).
	HandOver string `json:"handover,omitempty"`
}

// PostcopyResult is the post-copy phase: from the restore on the target until its last
// page arrived.
type PostcopyResult struct {
	Duration  time.Duration `json:"duration_ns"`
	WireBytes int64         `json:"wire_bytes"`
	Error     string        `json:"error,omitempty"`
}

// Validate checks the options a user gives.
func (r PushRequest) Validate() error {
	switch r.MemoryPath {
	case "", PathAuto, PathMemory, PathArchive:
	default:
		return fmt.Errorf("--memory-path %q: want %s, %s or %s", r.MemoryPath, PathAuto, PathMemory, PathArchive)
	}
	switch r.HandOver {
	case HandOverAuto, HandOverRead, HandOverPageServer:
	default:
		return fmt.Errorf("--handover %q: want %s or %s", r.HandOver, HandOverRead, HandOverPageServer)
	}
	if r.Mode != "" && r.Mode != ModePrecopy && r.Mode != ModeStopCopy {
		return fmt.Errorf("--mode %q: want %s or %s", r.Mode, ModePrecopy, ModeStopCopy)
	}
	if r.BWLimitMbit < 0 || r.MaxRounds < 0 || r.MaxDowntime < 0 {
		return errors.New("--bwlimit, --max-rounds and --max-downtime must not be negative")
	}
	if r.Compress != "" {
		if _, _, err := zstdLevel(r.Compress, 0); err != nil {
			return err
		}
	}
	return nil
}

// Push modes.
const (
	ModePrecopy  = "precopy"   // copy memory in rounds while the container runs, then stop
	ModeStopCopy = "stop-copy" // stop, then copy everything
)

// Round is one pre-copy round: every page of the container read and hashed while it
// runs; pages with content the target was not told of yet are announced, and those it
// does not hold are sent.
type Round struct {
	N            int           `json:"round"`
	Scanned      int64         `json:"pages_scanned"`
	Dirty        int64         `json:"pages_dirty"`        // content new to this migration (first round: all)
	Sent         int64         `json:"pages_sent"`         // of those, the pages the target lacked
	Deduplicated int64         `json:"pages_deduplicated"` // of those, the pages the target's store held already
	Deltas       int64         `json:"pages_as_delta"`     // sent pages that went as a delta against their previous content
	WireBytes    int64         `json:"wire_bytes"`
	Duration     time.Duration `json:"duration_ns"`
	DirtyRate    float64       `json:"dirty_pages_per_s"`
	Bandwidth    float64       `json:"bandwidth_mbit,omitempty"`
	Estimate     time.Duration `json:"estimate_ns"` // estimated final page copy if stopping now
}

// PagesAnnounce is the target's answer to an announcement of page hashes.
type PagesAnnounce struct {
	Missing []byte `json:"missing"` // bit i set: the i-th page announced is not held
	Held    int    `json:"held"`
}

// PagesPut is the target's answer to a batch of pages.
type PagesPut struct {
	Pages int `json:"pages"`
}

// PagesVerify is the target's check of the pages it holds for a move.
type PagesVerify struct {
	Pages int           `json:"pages"`
	Took  time.Duration `json:"took_ns"`
}

// Event is one line of a push's progress stream (newline-delimited JSON).
type Event struct {
	Time   time.Time   `json:"time"`
	Kind   string      `json:"event"` // phase, check, round, progress, result, error
	Phase  string      `json:"phase,omitempty"`
	Check  *Check      `json:"check,omitempty"`
	Bytes  int64       `json:"bytes,omitempty"`
	Total  int64       `json:"total,omitempty"` // of a progress event: the bytes the phase will handle, when known
	Result *PushResult `json:"result,omitempty"`
	Round  *Round      `json:"round,omitempty"`
	Error  string      `json:"error,omitempty"`
}

// PushResult is the outcome of a push.
type PushResult struct {
	Container  string `json:"container"`
	From       string `json:"from"`
	To         string `json:"to"`
	OK         bool   `json:"ok"`
	DryRun     bool   `json:"dry_run,omitempty"`
	RolledBack bool   `json:"rolled_back,omitempty"` // failed; the container runs on the source
	Busy       bool   `json:"busy,omitempty"`        // refused: the container is being moved already
	// Move is the move's ID, as both journals name it.
	Move string `json:"move,omitempty"`
	// Attention lists what a move left for the agents to finish (a peer that did not
	// confirm the outcome, a copy not removed): they retry in the background; `migrate
	// status` shows it. With OK the container runs on the target; with RolledBack on the
	// source.
	Attention []string `json:"attention,omitempty"`
	// Where is the host that runs the container when the push ended, as far as the
	// source knows ("" if it does not know: see Attention).
	Where      string       `json:"where,omitempty"`
	Error      string       `json:"error,omitempty"`
	Checks     []Check      `json:"checks,omitempty"`
	Mode       string       `json:"mode,omitempty"`
	Bytes      int64        `json:"bytes"`       // memory and checkpoint bytes over the agent connection (rounds + final)
	RoundBytes int64        `json:"round_bytes"` // of those, sent while the container ran
	Rounds     []Round      `json:"rounds,omitempty"`
	StopReason string       `json:"stop_reason,omitempty"` // why pre-copy stopped iterating
	Final      *pages.Stats `json:"final,omitempty"`       // what the frozen phase's archive carried
	Downtime   []Phase      `json:"downtime,omitempty"`    // the frozen phase, step by step
	DirtyTrack string       `json:"dirty_tracking,omitempty"`
	// MemoryPath is the path the memory took: PathMemory or PathArchive.
	MemoryPath string `json:"memory_path,omitempty"`
	// HandOver is how the memory path's frozen memory reached the source agent:
	// HandOverRead or HandOverPageServer (empty for the archive path and post-copy).
	HandOver string `json:"handover,omitempty"`
	// EarlyRestore says whether the target restored from CRIU's images while podman
	// finished here (the read hand-over), and if not, why not.
	EarlyRestore string `json:"early_restore,omitempty"`
	// Postcopy reports the post-copy phase of a --postcopy move.
	Postcopy   *PostcopyResult `json:"postcopy,omitempty"`
	HeldFrames int             `json:"held_frames"`           // frames for the container kept during the freeze and delivered after
	LostFrames int             `json:"lost_frames,omitempty"` // frames beyond the hold's bound (dropped; clients retransmit)
	ImageBytes int64           `json:"image_bytes"`           // image archive bytes over the agent connection
	// Volumes: each named volume's passes (while it ran, then frozen) and their bytes.
	Volumes     []VolumeResult `json:"volumes,omitempty"`
	VolumeBytes int64          `json:"volume_bytes,omitempty"`
	Plan        *layers.Plan   `json:"layer_plan,omitempty"`
	Total       time.Duration  `json:"total_ns"`         // request to done
	Frozen      time.Duration  `json:"frozen_ns"`        // traffic stopped (freeze) to traffic re-pointed
	Phases      []Phase        `json:"phases,omitempty"` // how long each step took
	LogsDir     string         `json:"logs_dir,omitempty"`
	Finished    time.Time      `json:"finished"`
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
	// Moves are the moves under way from or to this host.
	Moves []MoveInFlight `json:"moves,omitempty"`
	// Unresolved lists moves whose journal entries the agent is still settling.
	Unresolved []string    `json:"unresolved,omitempty"`
	Last       *PushResult `json:"last,omitempty"`
}

// apiError is the body of every error response.
type apiError struct {
	Error string `json:"error"`
	// Busy: refused because the container is being moved; try again when the move ends.
	Busy bool `json:"busy,omitempty"`
}

// AgentError is an agent's refusal or failure as its client sees it.
type AgentError struct {
	Host string
	Code int // the HTTP status
	Msg  string
	Busy bool // the container is being moved
}

func (e *AgentError) Error() string { return fmt.Sprintf("host %s: %s", e.Host, e.Msg) }

// IsBusy reports whether err is an agent's refusal because the container is being moved.
func IsBusy(err error) bool {
	var ae *AgentError
	return errors.As(err, &ae) && ae.Busy
}
