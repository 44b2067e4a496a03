package transfer

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
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
	PathRemove        = "/v1/rm"
	PathLogs          = "/v1/logs"
	PathExec          = "/v1/exec"
	PathPrepare       = "/v1/prepare"
	PathRestore       = "/v1/restore"
	PathPagesAnnounce = "/v1/pages/announce"
	PathPagesPut      = "/v1/pages/put"
	PathPagesHave     = "/v1/pages/have"
	PathPagesVerify   = "/v1/pages/verify"
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

// VerifyPages asks the target to re-read and re-hash the pages it holds for the move of
// container: a damaged one fails the move before the freeze.
func (p *Peer) VerifyPages(ctx context.Context, container string) (*PagesVerify, error) {
	var out PagesVerify
	return &out, p.Call(ctx, withQuery(PathPagesVerify, "container", container), struct{}{}, &out)
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

// Remove removes a container on the host and frees its name and address everywhere.
func (p *Peer) Remove(ctx context.Context, name string) (*RemoveResult, error) {
	var out RemoveResult
	return &out, p.Call(ctx, PathRemove, RemoveRequest{Name: name}, &out)
}

// Logs copies the container's log to stdout and stderr; with follow until it stops or ctx
// ends. tail < 0: every line.
func (p *Peer) Logs(ctx context.Context, name string, follow bool, tail int, stdout, stderr io.Writer) error {
	q := []string{"name", name, "follow", strconv.FormatBool(follow)}
	if tail >= 0 {
		q = append(q, "tail", strconv.Itoa(tail))
	}
	_, err := p.frames(ctx, http.MethodGet, withQuery(PathLogs, q...), nil, stdout, stderr)
	return err
}

// Exec runs a command in the container and returns its exit code.
func (p *Peer) Exec(ctx context.Context, req ExecRequest, stdout, stderr io.Writer) (int, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return 0, err
	}
	code, err := p.frames(ctx, http.MethodPost, PathExec, b, stdout, stderr)
	if err != nil {
		return 0, err
	}
	if code == nil {
		return 0, fmt.Errorf("host %s: the exec ended without an exit code", p.Name)
	}
	return *code, nil
}

// frames reads a stream of Frames (logs, exec) into stdout and stderr and returns the exit
// code it ends with, if any.
func (p *Peer) frames(ctx context.Context, method, path string, body []byte, stdout, stderr io.Writer) (*int, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, p.url(path), rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.hc.Do(req)
	if err != nil {
		return nil, p.classify(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, p.decode(resp, nil)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var f Frame
		if err := json.Unmarshal(sc.Bytes(), &f); err != nil {
			return nil, fmt.Errorf("host %s: bad output frame: %w", p.Name, err)
		}
		switch {
		case f.Error != "":
			return nil, fmt.Errorf("host %s: %s", p.Name, f.Error)
		case f.Exit != nil:
			return f.Exit, nil
		case f.Out != "":
			if _, err := io.WriteString(stdout, f.Out); err != nil {
				return nil, err
			}
		case f.Err != "":
			if _, err := io.WriteString(stderr, f.Err); err != nil {
				return nil, err
			}
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return nil, p.classify(err)
	}
	return nil, nil
}
