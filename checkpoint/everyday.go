package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/containers/podman/v5/pkg/api/handlers"
	"github.com/containers/podman/v5/pkg/bindings/containers"
	"github.com/containers/podman/v5/pkg/bindings/system"
	"github.com/containers/podman/v5/pkg/domain/entities/types"
)

// Logs writes the container's log to stdout and stderr (each line with its newline); with
// follow it keeps writing until the container stops or ctx ends. tail < 0 means all lines.
func (p *Podman) Logs(ctx context.Context, name string, follow bool, tail int, stdout, stderr io.Writer) error {
	o := new(containers.LogOptions).WithFollow(follow).WithStdout(true).WithStderr(true)
	if tail >= 0 {
		o = o.WithTail(strconv.Itoa(tail))
	}
	outC, errC := make(chan string, 64), make(chan string, 64)
	var wg sync.WaitGroup
	var werr error
	var once sync.Once
	copyLines := func(c chan string, w io.Writer) {
		defer wg.Done()
		for line := range c {
			if _, err := io.WriteString(w, line+"\n"); err != nil {
				once.Do(func() { werr = err })
			}
		}
	}
	wg.Add(2)
	go copyLines(outC, stdout)
	go copyLines(errC, stderr)
	err := containers.Logs(p.with(ctx), name, o, outC, errC)
	close(outC)
	close(errC)
	wg.Wait()
	if err != nil && ctx.Err() == nil {
		return p.apiError("logs", name, err)
	}
	return werr
}

// ExecOptions is a command to run in a running container.
type ExecOptions struct {
	Cmd     []string
	Env     []string // KEY=VALUE
	User    string
	WorkDir string
}

// Exec runs a command in the container, its output to stdout and stderr, and returns its
// exit code.
func (p *Podman) Exec(ctx context.Context, name string, o ExecOptions, stdout, stderr io.Writer) (int, error) {
	if len(o.Cmd) == 0 {
		return 0, errors.New("exec: no command")
	}
	cfg := new(handlers.ExecCreateConfig)
	cfg.Cmd = o.Cmd
	cfg.Env = o.Env
	cfg.User = o.User
	cfg.WorkingDir = o.WorkDir
	cfg.AttachStdout, cfg.AttachStderr = true, true
	id, err := containers.ExecCreate(p.with(ctx), name, cfg)
	if err != nil {
		return 0, p.apiError("exec", name, err)
	}
	so := new(containers.ExecStartAndAttachOptions).WithOutputStream(stdout).WithErrorStream(stderr).
		WithAttachOutput(true).WithAttachError(true)
	if err := containers.ExecStartAndAttach(p.with(ctx), id, so); err != nil {
		return 0, p.apiError("exec", name, err)
	}
	// The session's exit code is recorded a moment after its output ends.
	for deadline := time.Now().Add(10 * time.Second); ; {
		ins, err := containers.ExecInspect(p.with(ctx), id, nil)
		if err != nil {
			return 0, p.apiError("exec inspect", name, err)
		}
		if !ins.Running {
			return ins.ExitCode, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("exec in %s on %s: the command's output ended but it still runs after 10 s", name, p.uri)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Stop stops the container, killing it after timeout.
func (p *Podman) Stop(ctx context.Context, name string, timeout time.Duration) error {
	if err := containers.Stop(p.with(ctx), name, new(containers.StopOptions).WithTimeout(uint(timeout.Seconds()))); err != nil {
		return p.apiError("stop", name, err)
	}
	return nil
}

// ContainerEvent is a container's life event on the host (podman's event stream).
type ContainerEvent struct {
	Name   string
	Status string // create, start, died, remove, checkpoint, restore, ...
	Labels map[string]string
}

// Events calls fn for each container event from now until ctx ends or the stream breaks
// (podman restarted): the error says which.
func (p *Podman) Events(ctx context.Context, fn func(ContainerEvent)) error {
	ch := make(chan types.Event, 64)
	cancel := make(chan bool, 1)
	done := make(chan error, 1)
	go func() {
		done <- system.Events(p.with(ctx), ch, cancel, new(system.EventsOptions).WithStream(true).
			WithFilters(map[string][]string{"type": {"container"}}))
	}()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				err := <-done
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if err == nil {
					err = errors.New("the event stream ended")
				}
				return fmt.Errorf("podman events on %s: %w", p.uri, err)
			}
			ce := ContainerEvent{Name: ev.Actor.Attributes["name"], Status: string(ev.Action), Labels: map[string]string{}}
			for k, v := range ev.Actor.Attributes {
				ce.Labels[k] = v
			}
			fn(ce)
		case <-ctx.Done():
			cancel <- true
			return ctx.Err()
		}
	}
}
