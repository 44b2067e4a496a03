// Command migrate live-migrates running Podman containers between Linux hosts.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/migrate-project/migrate/testbed"
	"github.com/migrate-project/migrate/transfer"
	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes, mapped from errors in one place (exitCode).
const (
	exitOK       = 0
	exitFailure  = 1 // the operation failed
	exitUsage    = 2 // bad flags or arguments
	exitNotReady = 3 // a prerequisite is missing on this host (run scripts/install.sh)
)

// usageError marks errors in what the user typed.
type usageError struct{ error }

// notReadyError marks a host that lacks a prerequisite.
type notReadyError struct{ error }

func exitCode(err error) int {
	var ue usageError
	var nr notReadyError
	var rb rolledBackError
	var be busyError
	var ae attentionError
	switch {
	case err == nil:
		return exitOK
	case strings.HasPrefix(err.Error(), "Required flag"): // urfave/cli's type for it is unexported
		return exitUsage
	case errors.As(err, &rb):
		return exitRolledBack
	case errors.As(err, &be), transfer.IsBusy(err):
		return exitBusy
	case errors.As(err, &ae):
		return exitAttention
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &nr):
		return exitNotReady
	default:
		return exitFailure
	}
}

func newApp(stdout, stderr io.Writer) *cli.App {
	app := &cli.App{
		Name:      "migrate",
		Usage:     "move a running Podman container to another host, connections and all",
		Version:   version,
		Writer:    stdout,
		ErrWriter: stderr,
		Description: `migrate checkpoints a running container with CRIU, copies what the target host lacks
while the container keeps running, restores it on the target and re-points the overlay
network, so that its TCP connections survive the move.

Set up a host with scripts/install.sh (as root). Try it on one machine with
'migrate testbed up', which builds several hosts and a client out of namespaces.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: []string{"MIGRATE_LOG_LEVEL"}},
			&cli.BoolFlag{Name: "json", Usage: "print results as JSON on stdout (logs stay on stderr)", EnvVars: []string{"MIGRATE_JSON"}},
		},
		Before: func(c *cli.Context) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
				return usageError{fmt.Errorf("--log-level %q: use debug, info, warn or error", c.String("log-level"))}
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: lvl})))
			return nil
		},
		Commands: []*cli.Command{
			pushCommand,
			planCommand,
			autoCommand,
			runCommand,
			rmCommand,
			logsCommand,
			execCommand,
			statusCommand,
			serveCommand,
			certsCommand,
			overlayCommand,
			layersCommand,
			testbedCommand,
			demoCommand,
			lazyServeCommand,
			criuKdatCommand,
		},
		OnUsageError:   func(_ *cli.Context, err error, _ bool) error { return usageError{err} },
		ExitErrHandler: func(*cli.Context, error) {}, // main maps errors to exit codes
	}
	markUsageErrors(app.Commands)
	return app
}

// markUsageErrors makes flag errors of every (sub)command usage errors (exit code 2).
func markUsageErrors(cmds []*cli.Command) {
	for _, c := range cmds {
		c.OnUsageError = func(_ *cli.Context, err error, _ bool) error { return usageError{err} }
		markUsageErrors(c.Subcommands)
	}
}

func main() {
	testbed.MaybeRunWire() // this process may be a testbed's wire
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	app := newApp(os.Stdout, os.Stderr)
	err := app.RunContext(ctx, reorderArgs(app.Commands, os.Args))
	var ec cli.ExitCoder
	if errors.As(err, &ec) { // a command's own exit status, e.g. from `testbed exec`
		if msg := err.Error(); msg != "" {
			fmt.Fprintf(os.Stderr, "migrate: %s\n", msg)
		}
		os.Exit(ec.ExitCode())
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "migrate: %v\n", err)
	}
	os.Exit(exitCode(err))
}
