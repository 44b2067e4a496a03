package transfer

// The target's half of a move, top to bottom: prepare (pre-flight checks, journal,
// endpoint), the page session (pagesrv.go), restore (journal, podman import, journal),
// then commit or abort from the source; and settling moves whose outcome this agent does
// not know (it restarted, or the source went silent), by asking the source.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/migrate-project/migrate/checkpoint"
	"github.com/migrate-project/migrate/overlaynet"
	"github.com/migrate-project/migrate/pages"
)

// prepare runs the target's part of the pre-flight gate and, if it passes (and this is not
// a dry run), journals the move and plumbs the container's endpoint without announcing it.
func (a *Agent) prepare(r *http.Request) (any, error) {
	var req PrepareRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	if err := ValidContainerName(req.Container); err != nil {
		return nil, err
	}
	if err := mustBe(r.Context(), req.Source, "prepare a move from "+req.Source); err != nil {
		return nil, err
	}
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	if req.Move == "" && !req.DryRun {
		return nil, badRequest{errors.New("prepare: no move ID")}
	}
	if req.Endpoint.Name != req.Container || req.Endpoint.NetNS != overlaynet.NewEndpoint(req.Container, req.Endpoint.Prefix).NetNS {
		return nil, badRequest{fmt.Errorf("prepare: endpoint %q does not belong to container %q", req.Endpoint.Name, req.Container)}
	}
	ctx := r.Context()
	resp := PrepareResponse{}
	add := func(c Check) { resp.Checks = append(resp.Checks, c) }
	add(Check{Property: "criu", Target: a.info.CRIU, OK: a.info.CRIUProblem == "", Detail: a.info.CRIUProblem})
	add(Check{Property: "oci runtime", Source: req.Runtime, Target: a.info.Runtime, OK: req.Runtime == a.info.Runtime})
	add(Check{Property: "cgroups", Source: req.Cgroups, Target: a.info.Cgroups, OK: req.Cgroups == a.info.Cgroups})
	if len(req.CPUInfo) > 0 {
		err := cpuinfoCheck(ctx, req.CPUInfo)
		c := Check{Property: "cpu features", Source: "criu cpuinfo of " + req.Source, Target: "compatible", OK: err == nil}
		if err != nil {
			c.Target, c.Detail = "incompatible", err.Error()
		}
		add(c)
	}
	if len(req.Binds) > 0 {
		add(bindCheck(req.Binds))
	}
	if len(req.Volumes) > 0 {
		vc, err := a.volumesFree(ctx, req.Volumes)
		if err != nil {
			return nil, err
		}
		add(vc)
	}
	has, err := a.podman.ImageExists(ctx, req.Image)
	if err != nil {
		return nil, err
	}
	add(Check{Property: "image", Source: req.Image, Target: map[bool]string{true: "present", false: "missing"}[has], OK: has,
		Detail: map[bool]string{true: "", false: "load the image on the target first"}[has]})
	exists, err := a.podman.Exists(ctx, req.Container)
	if err != nil {
		return nil, err
	}
	var pending incomingMove
	if a.mv.in.get(req.Container, &pending) == nil {
		exists = true // a move of that name is still being settled here
	}
	add(Check{Property: "name", Source: req.Container, Target: map[bool]string{true: "taken", false: "free"}[exists], OK: !exists})
	owner := ""
	for _, l := range a.ovs.Locations() {
		if l.IP == req.Endpoint.Prefix.Addr() && l.Name != req.Container {
			owner = fmt.Sprintf("%s on %s", l.Name, l.Host)
		}
	}
	_, nsErr := os.Stat(req.Endpoint.NetNSPath())
	if owner == "" && nsErr == nil {
		owner = "namespace " + req.Endpoint.NetNSPath() + " exists"
	}
	add(Check{Property: "address", Source: req.Endpoint.Prefix.String(), Target: map[bool]string{true: "free", false: owner}[owner == ""], OK: owner == ""})
	for _, c := range resp.Checks {
		if !c.OK || req.DryRun {
			return resp, nil
		}
	}
	// Journal first: an agent that dies while plumbing finds the entry and undoes it.
	mv := incomingMove{Prepare: req}
	if err := a.mv.setIn(&mv, InPrepared); err != nil {
		return nil, err
	}
	if err := fault("target-prepare"); err != nil {
		return nil, err
	}
	if err := a.ovs.Plumb(ctx, req.Endpoint); err != nil {
		a.mv.in.remove(req.Container)
		return nil, err
	}
	a.openSession(req)
	return resp, nil
}

var errDigest = errors.New("archive damaged in transit: digest mismatch")

// verifyingReader hashes the archive and turns its end into an error unless the digest in
// the request's trailer matches: podman never sees a complete archive that is wrong.
type verifyingReader struct {
	src     io.Reader     // the archive: the request body, or what is rebuilt from it
	trailer func() string // the digest the sender sent, read once src has ended
	h       hash.Hash
	n       int64
	err     error
	late    bool // the trailer comes later: the caller checks the digest then (verifyDigest)
}

// newVerifyingReader checks src (the archive: the request body, or what is rebuilt from
// it) against the digest in r's trailer.
func newVerifyingReader(src io.Reader, r *http.Request) *verifyingReader {
	return &verifyingReader{src: src, trailer: func() string { return r.Trailer.Get(digestTrailer) }, h: sha256.New()}
}

func (v *verifyingReader) Read(b []byte) (int, error) {
	n, err := v.src.Read(b)
	v.h.Write(b[:n])
	v.n += int64(n)
	if err == io.EOF {
		if v.late {
			return n, err
		}
		if err := v.verify(); err != nil {
			return n, err
		}
	} else if err != nil {
		v.err = fmt.Errorf("receive archive after %d bytes: %w", v.n, err)
	}
	return n, err
}

// verifyDigest compares a whole archive with the digest in r's trailer (read once the
// body has ended).
func verifyDigest(archive []byte, r *http.Request) error {
	sum := sha256.Sum256(archive)
	got := "sha256:" + hex.EncodeToString(sum[:])
	if want := r.Trailer.Get(digestTrailer); want != got {
		return fmt.Errorf("%w (sent %q, received %s after %d bytes)", errDigest, want, got, len(archive))
	}
	return nil
}

// verify compares what was read with the trailer's digest.
func (v *verifyingReader) verify() error {
	want := v.trailer()
	got := "sha256:" + hex.EncodeToString(v.h.Sum(nil))
	if want != got {
		v.err = fmt.Errorf("%w (sent %q, received %s after %d bytes)", errDigest, want, got, v.n)
	}
	return v.err
}

// restore receives the checkpoint archive of a prepared move and restores the container.
// The journal says "restoring" before podman starts and "restored" before the answer
// leaves: a target that restarts knows whether a container it finds is this move's.
func (a *Agent) restore(r *http.Request) (any, error) {
	name, move := r.URL.Query().Get("container"), r.URL.Query().Get("move")
	if err := ValidContainerName(name); err != nil {
		return nil, err
	}
	var mv incomingMove
	if err := a.mv.in.get(name, &mv); err != nil || mv.Prepare.Move != move || mv.State != InPrepared {
		return nil, badRequest{fmt.Errorf("no prepared move %s of %q on %s", move, name, a.cfg.Name)}
	}
	prep := mv.Prepare
	if err := mustBe(r.Context(), prep.Source, "restore "+name); err != nil {
		return nil, err
	}
	if err := a.needPodman(); err != nil {
		return nil, err
	}
	// The source's abort of this move waits until this handler has ended (abort, below):
	// undone earlier, a container podman is still creating would stay behind.
	defer a.mv.restoreRuns(move)()
	start := time.Now()
	defer guardBody(r, bodyStall(prep.StallTimeout))()
	// "restoring" is journaled while the archive is still on its way (the request comes
	// when the source freezes the container), not on the frozen phase's path; podman
	// starts only once it is durable. Failing before that puts the entry back.
	journal := make(chan error, 1)
	goSafe("journal restoring", func() { journal <- a.mv.setIn(&mv, InRestoring) }, func(p any) { journal <- fmt.Errorf("journal: internal error: %v", p) })
	journalWaited := false
	defer func() {
		if !journalWaited && <-journal == nil {
			if err := a.mv.setIn(&mv, InPrepared); err != nil {
				slog.Warn("journal the incoming move back as prepared", "container", name, "err", err)
			}
		}
	}()
	var src io.Reader = r.Body
	var pst pages.Stats
	encoded := r.URL.Query().Get("encoding") == "pages"
	var lr *lazyRestore // the memory path: the container's memory is restored lazily
	// A streamed restore: the memory still arrives while podman restores (its stats
	// mst); memDone tells its end.
	var memDone chan error
	var mst pages.Stats
	var streamedArchive []byte
	// The journal is durable and the neighbour cache set before podman starts, whenever
	// that is: at a prelude (gate.go), or once the archive is here.
	var podmanReady bool
	beforePodman := func() error {
		if podmanReady {
			return nil
		}
		podmanReady, journalWaited = true, true
		if err := <-journal; err != nil {
			return err
		}
		// The container's neighbour cache, before it runs: its first packets go out at once.
		if ns, err := overlaynet.ParseNeighbors(r.Header.Get(neighborsHeader)); err != nil {
			slog.Warn("neighbour cache from the source", "container", name, "err", err)
		} else if len(ns) > 0 {
			if err := overlaynet.SetNeighbors(prep.Endpoint, ns); err != nil {
				slog.Warn("neighbour cache", "container", name, "err", err)
			}
		}
		return nil
	}
	// The gated import (gate.go): podman imports the prelude while CRIU's images are on
	// their way; a failure once it began (gatedErr) is answered after its end.
	var gate *criuGate
	var gated chan importResult
	var gatedErr error
	var preludeAt time.Time
	restoreOpts := checkpoint.RestoreOptions{TCPEstablished: true, NoStats: true, IgnoreVolumes: true}
	if encoded {
		sess, err := a.session(r.Context(), name)
		if err != nil {
			return nil, err
		}
		if mode := r.URL.Query().Get("memory"); mode == "lazy" || mode == "postcopy" || mode == "stream" {
			if a.info.MemoryProblem != "" {
				return nil, badRequest{fmt.Errorf("%s cannot restore lazily: %s", a.cfg.Name, a.info.MemoryProblem)}
			}
			body, done, err := bodyReader(r)
			if err != nil {
				return nil, err
			}
			// The source hands the memory over now: CRIU may have its close answered
			// already (the dump then ends whatever happens here).
			if err := fault("target-memory"); err != nil {
				done()
				return nil, err
			}
			var archive []byte
			var pc *postcopyIn
			// A "stream" body starts with its layout: 'S', the images first and the
			// memory while podman restores (memory.go, prepareStreamed), or 'M', the
			// memory first as in a "lazy" one; either may follow a prelude ('P', gate.go),
			// and then only 'S'.
			br := bufio.NewReaderSize(body, 1<<20)
			if mode == "stream" {
				layout, err := br.ReadByte()
				var descriptors []byte
				if err == nil && layout == 'P' {
					var prelude []byte
					if prelude, err = readPrelude(br); err == nil {
						preludeAt = time.Now()
						err = beforePodman()
					}
					if err == nil {
						gate, err = newCRIUGate(name)
					}
					if err == nil {
						descriptors, _ = tarFile(prelude, "checkpoint/"+descriptorsFile)
						gated = a.startImport(name, bytes.NewReader(prelude), restoreOpts)
						// Podman imports; CRIU will wait in the gate for the images.
						if err = fault("target-gate"); err == nil {
							if layout, err = br.ReadByte(); err == nil && layout != 'S' {
								err = badRequest{fmt.Errorf("layout %q of a streamed restore after a prelude, where only 'S' may follow", layout)}
							}
						}
						gatedErr = err
					}
				}
				if err == nil && layout != 'S' && layout != 'M' {
					err = badRequest{fmt.Errorf("unknown layout %q of a streamed restore", layout)}
				}
				if err != nil && gated == nil { // a gate is only made with its import
					done()
					return nil, fmt.Errorf("restore %s on %s: %w", name, a.cfg.Name, err)
				}
				if err == nil && layout == 'S' {
					lr, archive, err = a.prepareStreamed(r.Context(), name, br, sess, &pst, gate, descriptors)
					if err != nil && gated == nil {
						done()
						return nil, fmt.Errorf("restore %s on %s: %w", name, a.cfg.Name, err)
					}
					gatedErr = err
				}
				if gatedErr != nil {
					done()
				} else if layout == 'S' {
					memDone = make(chan error, 1)
					goSafe("receive the memory", func() {
						err := lr.receiveMemory(br, sess, &mst)
						if err == nil {
							_, err = io.Copy(io.Discard, r.Body) // to its end: the digest is in the trailer
						}
						done()
						memDone <- err
					}, func(p any) { done(); memDone <- fmt.Errorf("receive the memory: internal error: %v", p) })
				}
			}
			if memDone != nil {
				src, streamedArchive = bytes.NewReader(archive), archive
			} else if mode == "postcopy" {
				pc = newPostcopyIn(a, name, move, prep.Source, prep.Endpoint, sess, postcopyStall)
				a.mu.Lock()
				a.postcopies[name] = pc
				a.mu.Unlock()
			}
			if memDone == nil && gatedErr == nil {
				lr, archive, err = a.prepareLazy(r.Context(), name, br, sess, &pst, pc)
				if err == nil {
					_, err = io.Copy(io.Discard, r.Body) // to its end: the digest is in the trailer
				}
				done()
				if err != nil {
					if lr != nil {
						lr.restored(false)
					} else if pc != nil {
						a.mu.Lock()
						delete(a.postcopies, name)
						a.mu.Unlock()
					}
					return nil, fmt.Errorf("restore %s on %s: %w", name, a.cfg.Name, err)
				}
				src = bytes.NewReader(archive)
			}
		} else if src, err = a.decodeArchive(r.Context(), r, sess, &pst); err != nil {
			return nil, err
		}
	}
	decoded := time.Now()
	if err := beforePodman(); err != nil { // at once if a prelude came
		return nil, err
	}
	journaled := time.Now()
	vr := newVerifyingReader(src, r)
	// A streamed restore's trailer comes after the memory: the archive's digest is
	// checked then, before the answer (a damaged archive's container is undone).
	vr.late = memDone != nil
	importAt := time.Now()
	var res *checkpoint.Result
	var err error
	if gated != nil {
		// Podman imports the prelude already; CRIU waits in the gate, which setUp opened
		// (or, after a failure, is refused now).
		if gatedErr != nil {
			gate.refuse()
		}
		ir := <-gated
		gate.close()
		res, err = ir.res, ir.err
		if gatedErr != nil {
			err = gatedErr
		}
		slog.Debug("gated import", "container", name, "podman began after the freeze by", preludeAt.Sub(start), "CRIU waited in the gate", gate.readerWaited())
		importAt = preludeAt
		if res != nil {
			vr.n = res.Bytes
		}
	} else {
		if lr == nil {
			restoreOpts.NoStats = false
		}
		ir := <-a.startImport(name, vr, restoreOpts)
		res, err = ir.res, ir.err
	}
	imported := time.Now()
	if vr.err != nil {
		err = vr.err
	}
	memoryAt := imported
	if memDone != nil {
		// Whatever podman did: the stream is read to its end (or fails) before anything
		// of the restore is undone or answered.
		merr := <-memDone
		memoryAt = time.Now()
		pst.AddPages(mst)
		if merr == nil {
			// The whole archive against the trailer's digest (podman may have stopped
			// reading it early): a damaged one explains whatever podman made of it.
			if verr := verifyDigest(streamedArchive, r); verr != nil {
				err = verr
			}
		}
		if err == nil && merr != nil {
			err = merr
		}
		if err == nil {
			err = lr.release()
		}
	}
	if err == nil {
		err = fault("target-restore")
	}
	if err == nil {
		// Before the answer leaves: from here on only the source's word removes it.
		err = a.mv.setIn(&mv, InRestored)
	}
	if lr != nil {
		lr.restored(err == nil)
	}
	if err != nil {
		// Nothing half-restored may stay: the source will take the container back. The
		// CRIU log is kept first.
		bctx := context.WithoutCancel(r.Context())
		where := ""
		if c, ierr := a.podman.Inspect(bctx, name); ierr == nil {
			if dir := a.keepLogs(name, c.StaticDir, "restore.log"); dir != "" {
				where = " (CRIU and runtime logs kept in " + a.cfg.Name + ":" + dir + ")"
			}
		}
		// The source cannot commit a failed restore: undo it now rather than wait for an
		// abort that a cut link may never deliver. The journal stays if that fails.
		goSafe("undo failed restore", func() {
			if uerr := a.mv.undoIncoming(bctx, &mv); uerr != nil {
				slog.Error("undo failed restore", "container", name, "err", uerr)
			}
		})
		return nil, fmt.Errorf("restore %s on %s: %w%s", name, a.cfg.Name, err, where)
	}
	overlaynet.GratuitousARP(prep.Endpoint)
	slog.Debug("restored", "container", name, "received and set up", decoded.Sub(start), "journal restoring", journaled.Sub(decoded),
		"neighbours", importAt.Sub(journaled), "podman import", imported.Sub(importAt), "memory after the import", memoryAt.Sub(imported),
		"streamed", memDone != nil, "journal restored and the rest", time.Since(memoryAt))
	out := RestoreResult{Bytes: vr.n, Digest: "sha256:" + hex.EncodeToString(vr.h.Sum(nil)), Restore: res.Duration,
		Received: time.Since(start), CRIURestore: res.CRIURestore}
	if encoded {
		out.Pages = &pst
	}
	if lr != nil {
		out.LazySetUp = lr.setupTook
	}
	if gate != nil {
		out.Gated, out.GateWaited = true, gate.readerWaited()
	}
	return out, nil
}

// commit: the source has decided that the container runs here for good. Answering it
// again (a retry after a lost answer) is fine; a commit never removes anything.
func (a *Agent) commit(r *http.Request) (any, error) {
	var ref MoveRef
	if err := decodeBody(r, &ref); err != nil {
		return nil, err
	}
	if err := ValidContainerName(ref.Container); err != nil {
		return nil, err
	}
	if err := fault("target-commit"); err != nil {
		return nil, err
	}
	ctx := r.Context()
	var mv incomingMove
	err := a.mv.in.get(ref.Container, &mv)
	if err == nil && mv.Prepare.Move == ref.Move {
		if err := mustBe(ctx, mv.Prepare.Source, "commit the move of "+ref.Container); err != nil {
			return nil, err
		}
		if mv.State != InRestored && !a.mv.runs(ctx, ref.Container) {
			return nil, badRequest{fmt.Errorf("commit of %s: it was not restored on %s (state %s)", ref.Container, a.cfg.Name, mv.State)}
		}
		return nil, a.mv.keepIncoming(ctx, &mv)
	}
	if err != nil && !errors.Is(err, errNoEntry) {
		return nil, err
	}
	// No entry: committed before (the answer was lost), if the container runs here.
	if a.mv.runs(ctx, ref.Container) {
		return nil, nil
	}
	return nil, badRequest{fmt.Errorf("commit: no move %s of %s on %s, and it does not run here", ref.Move, ref.Container, a.cfg.Name)}
}

// abort: the source rolled the move back. Only the move the abort names is undone: a
// container of that name with no journal entry of that move is left alone.
func (a *Agent) abort(r *http.Request) (any, error) {
	var req AbortRequest
	if err := decodeBody(r, &req); err != nil {
		return nil, err
	}
	if err := ValidContainerName(req.Container); err != nil {
		return nil, err
	}
	ctx := r.Context()
	var mv incomingMove
	if err := a.mv.in.get(req.Container, &mv); err != nil {
		if errors.Is(err, errNoEntry) {
			return nil, nil // nothing to undo
		}
		return nil, err
	}
	if err := mustBe(ctx, mv.Prepare.Source, "abort the move of "+req.Container); err != nil {
		return nil, err
	}
	if mv.Prepare.Move != req.Move {
		return nil, nil // another move's entry: not this abort's to undo
	}
	// A restore of this move still at work ends first (its import included); then what it
	// made, if anything, is undone here.
	a.mv.waitRestore(req.Move, importDeadline)
	if err := a.mv.in.get(req.Container, &mv); err != nil {
		if errors.Is(err, errNoEntry) {
			return nil, nil // the restore undid itself meanwhile
		}
		return nil, err
	}
	if mv.Prepare.Move != req.Move {
		return nil, nil
	}
	return nil, a.mv.undoIncoming(context.WithoutCancel(ctx), &mv)
}

// importDeadline bounds podman's restore of an archive whose bytes are all here.
const importDeadline = 5 * time.Minute

// Deadlines of the target's half: a prepared move whose source has been silent this long
// is settled by asking the source; a restored one that no commit followed, sooner.
const (
	preparedQuiet = 5 * time.Minute
	restoredQuiet = 20 * time.Second
	settleEvery   = 10 * time.Second
	// attentionAfter: a move still unsettled after this is reported as needing attention.
	attentionAfter = 10 * time.Minute
)

// settle runs until ctx ends: every settleEvery it finishes the moves this agent's
// journals hold that nothing else is finishing: outgoing moves left by an earlier run or
// whose peer did not confirm, incoming moves whose source went quiet. The first pass
// settles everything (this agent has just started).
func (a *Agent) settle(ctx context.Context) {
	first := true
	t := time.NewTicker(settleEvery)
	defer t.Stop()
	for {
		a.settleOnce(ctx, first)
		first = false
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (a *Agent) settleOnce(ctx context.Context, all bool) {
	var unresolved []string
	for _, name := range a.mv.out.list() {
		if a.isInflight(name) {
			continue // the push under way owns it
		}
		done, f, err := a.mv.resolveOutgoing(ctx, name)
		if !done {
			why := strings.Join(f.Pending, "; ")
			if err != nil {
				why = err.Error()
			}
			unresolved = append(unresolved, fmt.Sprintf("outgoing %s: %s", name, why))
		}
	}
	for _, name := range a.mv.in.list() {
		var mv incomingMove
		if a.mv.in.get(name, &mv) != nil {
			continue
		}
		quiet := time.Since(a.lastActivity(name, mv.Updated))
		if !all && (mv.State == InRestoring || (mv.State == InPrepared && quiet < preparedQuiet) || (mv.State == InRestored && quiet < restoredQuiet)) {
			continue
		}
		done, err := a.mv.resolveIncoming(ctx, name)
		if !done {
			why := "the source says the move is under way"
			if err != nil {
				why = err.Error()
			}
			if quiet > attentionAfter {
				slog.Error("NEEDS ATTENTION: incoming move unsettled", "container", name, "since", mv.Updated, "why", why)
			}
			unresolved = append(unresolved, fmt.Sprintf("incoming %s from %s (%s): %s", name, mv.Prepare.Source, mv.State, why))
		}
	}
	a.mu.Lock()
	a.unresolved = unresolved
	a.mu.Unlock()
}

// lastActivity is when the source last did something for an incoming move (a page
// announcement, a batch), or the journal's time if nothing since this agent started.
func (a *Agent) lastActivity(name string, journaled time.Time) time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	if s := a.sessions[name]; s != nil && s.touched.After(journaled) {
		return s.touched
	}
	return journaled
}

// outcome answers a target that asks how a move from this host ended.
func (a *Agent) outcome(r *http.Request) (any, error) {
	var ref MoveRef
	if err := decodeBody(r, &ref); err != nil {
		return nil, err
	}
	if err := ValidContainerName(ref.Container); err != nil {
		return nil, err
	}
	var mv outgoingMove
	if err := a.mv.out.get(ref.Container, &mv); err == nil && mv.Move == ref.Move {
		if err := mustBe(r.Context(), mv.Target, "the outcome of the move of "+ref.Container); err != nil {
			return nil, err
		}
	}
	out := a.mv.outcome(r.Context(), ref, a.isInflight(ref.Container))
	return out, nil
}

// importResult is podman's answer to an import.
type importResult struct {
	res *checkpoint.Result
	err error
}

// startImport has podman restore the container from archive in the background. Not
// under the request's context: a source that goes away would cancel only this call, not
// podman's restore, which could then create the container after the undo looked for it.
// Podman's answer is waited for, within its own deadline.
func (a *Agent) startImport(name string, archive io.Reader, o checkpoint.RestoreOptions) chan importResult {
	ch := make(chan importResult, 1)
	goSafe("podman import", func() {
		ctx, cancel := context.WithTimeout(context.Background(), importDeadline)
		defer cancel()
		res, err := a.podman.Import(ctx, archive, o)
		ch <- importResult{res, err}
	}, func(p any) { ch <- importResult{nil, fmt.Errorf("podman import of %s: internal error: %v", name, p)} })
	return ch
}
