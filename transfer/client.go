package transfer

import (
	"context"
	"net/netip"
	"net/url"
	"time"

	"github.com/migrate-project/migrate/layers"
	"github.com/migrate-project/migrate/overlaynet"
)

// The agent's API paths, in one place: the server's routes and the typed client use them.
const (
	PathInfo          = "/v1/info"
	PathContainers    = "/v1/containers"
	PathLocations     = "/v1/locations"
	PathLocate        = "/v1/locate"
	PathRun           = "/v1/run"
	PathPrepare       = "/v1/prepare"
	PathRestore       = "/v1/restore"
	PathPagesAnnounce = "/v1/pages/announce"
	PathPagesPut      = "/v1/pages/put"
	PathPagesHave     = "/v1/pages/have"
	PathProbe         = "/v1/probe"
	PathRTT           = "/v1/rtt"
	PathCosts         = "/v1/costs"
	PathCommit        = "/v1/commit"
	PathAbort         = "/v1/abort"
	PathOutcome       = "/v1/moves/outcome"
	PathPush          = "/v1/push"
	PathPushCancel    = "/v1/push/cancel"
	PathStatus        = "/v1/status"
	PathLayers        = "/v1/layers"
	PathLayerPlan     = "/v1/layers/plan"
	PathImage         = "/v1/image"
	PathPostcopyPages = "/v1/postcopy/pages"
	PathPostcopyWant  = "/v1/postcopy/want"
)

// DefaultCallTimeout bounds a JSON call whose context has no deadline of its own.
const DefaultCallTimeout = 30 * time.Second

func withQuery(path string, kv ...string) string {
	q := url.Values{}
	for i := 0; i+1 < len(kv); i += 2 {
		q.Set(kv[i], kv[i+1])
	}
	return path + "?" + q.Encode()
}

// Info asks an agent what its host is.
func (p *Peer) Info(ctx context.Context) (*HostInfo, error) {
	var out HostInfo
	return &out, p.Call(ctx, PathInfo, nil, &out)
}

// Containers lists the containers the agent's host runs.
func (p *Peer) Containers(ctx context.Context) ([]ContainerInfo, error) {
	var out []ContainerInfo
	return out, p.Call(ctx, PathContainers, nil, &out)
}

// Locations lists the endpoints the agent's node knows.
func (p *Peer) Locations(ctx context.Context) ([]overlaynet.Location, error) {
	var out []overlaynet.Location
	return out, p.Call(ctx, PathLocations, nil, &out)
}

// Locate tells the agent's node where an endpoint runs.
func (p *Peer) Locate(ctx context.Context, loc overlaynet.Location) error {
	return p.Call(ctx, PathLocate, loc, nil)
}

// Prepare asks a target to get ready for a move.
func (p *Peer) Prepare(ctx context.Context, req PrepareRequest) (*PrepareResponse, error) {
	var out PrepareResponse
	return &out, p.Call(ctx, PathPrepare, req, &out)
}

// Commit tells a target that its move is committed.
func (p *Peer) Commit(ctx context.Context, ref MoveRef) error {
	return p.Call(ctx, PathCommit, ref, nil)
}

// Abort tells a target to drop its half of a move.
func (p *Peer) Abort(ctx context.Context, req AbortRequest) error {
	return p.Call(ctx, PathAbort, req, nil)
}

// Outcome asks a source how a move ended.
func (p *Peer) Outcome(ctx context.Context, ref MoveRef) (*MoveOutcome, error) {
	var out MoveOutcome
	return &out, p.Call(ctx, PathOutcome, ref, &out)
}

// Status asks an agent for its host's status.
func (p *Peer) Status(ctx context.Context) (*Status, error) {
	var out Status
	return &out, p.Call(ctx, PathStatus, nil, &out)
}

// CancelResult says whether a cancel stopped a push (it cannot once the container froze).
type CancelResult struct {
	Cancelled bool   `json:"cancelled"`
	Detail    string `json:"detail"`
}

// CancelPush asks the source to cancel the move of container, if nothing is frozen yet.
func (p *Peer) CancelPush(ctx context.Context, container string) (*CancelResult, error) {
	var out CancelResult
	return &out, p.Call(ctx, PathPushCancel, MoveRef{Container: container}, &out)
}

// Run starts a container on the agent's host.
func (p *Peer) Run(ctx context.Context, req RunRequest) (map[string]any, error) {
	var out map[string]any
	return out, p.Call(ctx, PathRun, req, &out)
}

// Costs asks a container's source what moving it to each of hosts would take.
func (p *Peer) Costs(ctx context.Context, req CostRequest) ([]HostCost, error) {
	var out []HostCost
	return out, p.Call(ctx, PathCosts, req, &out)
}

// RTT asks an agent for its round trip to addr.
func (p *Peer) RTT(ctx context.Context, addr netip.Addr) (*RTTResult, error) {
	var out RTTResult
	return &out, p.Call(ctx, withQuery(PathRTT, "addr", addr.String()), nil, &out)
}

// LayerPlan asks a container's source which layers a move to req.To would ship.
func (p *Peer) LayerPlan(ctx context.Context, req PlanRequest) (*layers.Plan, error) {
	var out layers.Plan
	return &out, p.Call(ctx, PathLayerPlan, req, &out)
}

// Holdings asks an agent which layers its host holds, and whether it has image.
func (p *Peer) Holdings(ctx context.Context, image string) (*Holdings, error) {
	var out Holdings
	return &out, p.Call(ctx, withQuery(PathLayers, "image", image), nil, &out)
}
