package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/migrate-project/migrate/transfer"
	"github.com/urfave/cli/v2"
)

// moveOf asks every host whether container is being moved (nil if not, or if no host
// answered about it).
func (op *operator) moveOf(ctx context.Context, name string) *transfer.MoveInFlight {
	var mu sync.Mutex
	var found *transfer.MoveInFlight
	var wg sync.WaitGroup
	for _, p := range op.peers {
		wg.Add(1)
		go func(p *transfer.Peer) {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			st, err := p.Status(cctx)
			if err != nil {
				return
			}
			for _, m := range st.Moves {
				if m.Container == name {
					mu.Lock()
					if found == nil || m.Since.Before(found.Since) {
						m := m
						found = &m
					}
					mu.Unlock()
				}
			}
		}(p)
	}
	wg.Wait()
	return found
}

// where finds the host of a container for rm, logs and exec: the one that has it (running
// or not); a container being moved is refused with where it goes.
func (op *operator) where(c *cli.Context, name string, refuseMoving bool) (string, error) {
	if c.String("on") != "" {
		return c.String("on"), nil
	}
	if m := op.moveOf(c.Context, name); m != nil {
		if refuseMoving {
			return "", busyError{fmt.Errorf("%s; try again when it has ended (`migrate status`)", m)}
		}
		fmt.Fprintf(c.App.ErrWriter, "migrate: note: %s\n", m)
	}
	all, errs := op.containers(c.Context)
	var hosts []string
	for _, ci := range all {
		if ci.Name == name {
			hosts = append(hosts, ci.Host)
		}
	}
	switch {
	case len(hosts) == 1:
		return hosts[0], nil
	case len(hosts) > 1:
		return "", usageError{fmt.Errorf("hosts %v each have a container named %s: say which with --on", hosts, name)}
	}
	msg := fmt.Sprintf("no host has a container named %s", name)
	for h, e := range errs {
		msg += fmt.Sprintf("; %s did not answer: %v", h, e)
	}
	return "", errors.New(msg)
}

// operatorFor validates a container's name and finds the host that has it.
func operatorFor(c *cli.Context, name string, refuseMoving bool) (*operator, *transfer.Peer, string, error) {
	if err := transfer.ValidContainerName(name); err != nil {
		return nil, nil, "", usageError{err}
	}
	op, err := newOperator(c)
	if err != nil {
		return nil, nil, "", err
	}
	host, err := op.where(c, name, refuseMoving)
	if err != nil {
		return op, nil, "", err
	}
	p, err := op.peer(host)
	return op, p, host, err
}

var onFlag = &cli.StringFlag{Name: "on", Usage: "the host (default: found by asking every host)"}

var rmCommand = &cli.Command{
	Name:      "rm",
	Usage:     "stop and remove a container, freeing its name and overlay address on every node",
	ArgsUsage: "NAME",
	Description: `  migrate rm redis

Removes the container wherever it runs (stopping it first) and tells every node that its
overlay address is free. A container already removed with 'podman rm' whose address is
still held is freed the same way. A container being moved is refused (exit code 5) with
where it goes; try again when the move has ended.

Exit codes: 0 removed, 1 failed or not found, 2 bad usage, 5 being moved.`,
	Flags: []cli.Flag{inventoryFlag, certsFlag, identityFlag, onFlag},
	Action: func(c *cli.Context) error {
		if c.NArg() != 1 {
			return usageError{errors.New("usage: migrate rm NAME")}
		}
		name := c.Args().First()
		if err := transfer.ValidContainerName(name); err != nil {
			return usageError{err}
		}
		op, err := newOperator(c)
		if err != nil {
			return err
		}
		host, err := op.where(c, name, true)
		if err != nil {
			// No container of that name: its address may still be held somewhere.
			h, lerr := op.addressHolder(c.Context, name)
			if lerr != nil || h == "" {
				return err
			}
			host = h
		}
		p, err := op.peer(host)
		if err != nil {
			return err
		}
		res, err := p.Remove(c.Context, name)
		if err != nil {
			return err
		}
		if c.Bool("json") {
			return printJSON(c, res)
		}
		what := "removed"
		if !res.Removed {
			what = "was already gone; freed its address"
		}
		fmt.Fprintf(c.App.Writer, "%s on %s: %s", name, res.Host, what)
		if res.Freed.IsValid() {
			fmt.Fprintf(c.App.Writer, " (%s is free)", res.Freed)
		}
		fmt.Fprintln(c.App.Writer)
		for _, u := range res.Unreached {
			fmt.Fprintf(c.App.ErrWriter, "migrate: attention: %s did not hear that the address is free; it learns at its next sync\n", u)
		}
		return nil
	},
}

// addressHolder names the host whose overlay still holds an endpoint called name.
func (op *operator) addressHolder(ctx context.Context, name string) (string, error) {
	for _, p := range op.peers {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		locs, err := p.Locations(cctx)
		cancel()
		if err != nil {
			continue
		}
		for _, l := range locs {
			if l.Name == name && l.Host != "" {
				return l.Host, nil
			}
		}
	}
	return "", nil
}

var logsCommand = &cli.Command{
	Name:      "logs",
	Usage:     "print a container's log, wherever it runs",
	ArgsUsage: "NAME",
	Description: `  migrate logs redis
  migrate logs -f --tail 20 redis     # the last 20 lines, then follow

Reads the log through the podman service of the host that has the container. Following
ends when the container stops, when it is moved away (follow it again on its new host),
or on Ctrl-C.`,
	Flags: []cli.Flag{inventoryFlag, certsFlag, identityFlag, onFlag,
		&cli.BoolFlag{Name: "follow", Aliases: []string{"f"}, Usage: "keep printing new lines"},
		&cli.IntFlag{Name: "tail", Value: -1, Usage: "only the last N lines (-1: all)"},
	},
	Action: func(c *cli.Context) error {
		if c.NArg() != 1 {
			return usageError{errors.New("usage: migrate logs [-f] NAME")}
		}
		name := c.Args().First()
		_, p, _, err := operatorFor(c, name, false)
		if err != nil {
			return err
		}
		ctx := c.Context
		if !c.Bool("follow") {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, 5*time.Minute)
			defer cancel()
		}
		out, errw := c.App.Writer, c.App.ErrWriter
		if c.Bool("json") {
			jw := &jsonLines{c: c}
			out, errw = jw.stream("stdout"), jw.stream("stderr")
		}
		err = p.Logs(ctx, name, c.Bool("follow"), c.Int("tail"), out, errw)
		if err != nil && c.Context.Err() != nil {
			return nil // Ctrl-C while following
		}
		return err
	},
}

var execCommand = &cli.Command{
	Name:      "exec",
	Usage:     "run a command in a container, wherever it runs",
	ArgsUsage: "NAME -- COMMAND [ARG...]",
	Description: `  migrate exec redis -- redis-cli INCR hits
  migrate exec --env-file app.env pg -- psql -c 'select 1'

Runs the command through the podman service of the host that runs the container, its
output on this terminal (no input, no TTY). migrate exits with the command's exit code;
with 1 if it could not run it, 2 on bad usage and 5 while the container is being moved.`,
	Flags: []cli.Flag{inventoryFlag, certsFlag, identityFlag, onFlag,
		&cli.StringSliceFlag{Name: "env", Aliases: []string{"e"}, Usage: "KEY=VALUE for the command"},
		&cli.StringFlag{Name: "env-file", Usage: "a file of KEY=VALUE lines"},
		&cli.StringFlag{Name: "user", Aliases: []string{"u"}, Usage: "run as this user[:group]"},
		&cli.StringFlag{Name: "workdir", Aliases: []string{"w"}, Usage: "run in this directory"},
	},
	Action: func(c *cli.Context) error {
		args := c.Args().Slice()
		if len(args) > 1 && args[1] == "--" {
			args = append(args[:1], args[2:]...)
		}
		if len(args) < 2 {
			return usageError{errors.New("usage: migrate exec NAME -- COMMAND [ARG...]")}
		}
		name := args[0]
		if err := transfer.ValidContainerName(name); err != nil {
			return usageError{err}
		}
		env, err := envList(c.StringSlice("env"), c.String("env-file"))
		if err != nil {
			return usageError{err}
		}
		req := transfer.ExecRequest{Name: name, Cmd: args[1:], User: c.String("user"), WorkDir: c.String("workdir")}
		for k, v := range env {
			req.Env = append(req.Env, k+"="+v)
		}
		_, p, host, err := operatorFor(c, name, true)
		if err != nil {
			return err
		}
		out, errw := c.App.Writer, c.App.ErrWriter
		var jw *jsonLines
		if c.Bool("json") {
			jw = &jsonLines{c: c}
			out, errw = jw.stream("stdout"), jw.stream("stderr")
		}
		code, err := p.Exec(c.Context, req, out, errw)
		if err != nil {
			return err
		}
		if jw != nil {
			jw.emit(map[string]any{"exit_code": code, "host": host})
		}
		if code != 0 {
			return cli.Exit("", code)
		}
		return nil
	},
}

// envList merges --env-file (first) and --env into one map, with errors that name the line.
func envList(kvs []string, file string) (map[string]string, error) {
	env := map[string]string{}
	if file != "" {
		f, err := os.Open(file)
		if err != nil {
			return nil, fmt.Errorf("--env-file: %w", err)
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for n := 1; sc.Scan(); n++ {
			line := strings.TrimSpace(sc.Text())
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				// podman's rule: a bare name takes its value from this environment.
				if val, set := os.LookupEnv(line); set {
					env[line] = val
				}
				continue
			}
			if k = strings.TrimSpace(k); k == "" || strings.ContainsAny(k, " \t") {
				return nil, fmt.Errorf("--env-file %s:%d: %q is not KEY=VALUE", file, n, line)
			}
			env[k] = v
		}
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("--env-file %s: %w", file, err)
		}
	}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--env %q: want KEY=VALUE", kv)
		}
		env[k] = v
	}
	return env, nil
}

// jsonLines writes output as NDJSON: {"stream":"stdout","data":"..."} per write.
type jsonLines struct {
	c  *cli.Context
	mu sync.Mutex
}

func (j *jsonLines) emit(v any) {
	j.mu.Lock()
	defer j.mu.Unlock()
	printJSONLine(j.c, v)
}

func (j *jsonLines) stream(name string) *jsonStream { return &jsonStream{j, name} }

type jsonStream struct {
	j    *jsonLines
	name string
}

func (s *jsonStream) Write(b []byte) (int, error) {
	s.j.emit(map[string]string{"stream": s.name, "data": string(b)})
	return len(b), nil
}
