package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/migrate-project/migrate/testbed"
	"github.com/urfave/cli/v2"
)

var nameFlag = &cli.StringFlag{Name: "name", Value: "tb", Usage: "testbed name (1-8 of a-z, 0-9)", EnvVars: []string{"MIGRATE_TESTBED"}}

var testbedCommand = &cli.Command{
	Name:  "testbed",
	Usage: "several migrate hosts and a client on this machine, out of namespaces",
	Description: `A testbed host is a network namespace and a mount namespace with its own podman store
at the default paths, its own podman API service and its own Open vSwitch instance. Hosts
and the client (the end user) share an underlay bridge; each link can be shaped.

  migrate testbed up --hosts a,b --rate 100 --delay 5ms
  migrate testbed exec a -- podman ps
  migrate testbed exec client -- ping -c1 10.99.0.1
  migrate testbed down`,
	Subcommands: []*cli.Command{
		{
			Name:  "up",
			Usage: "build the testbed",
			Flags: []cli.Flag{
				nameFlag,
				&cli.StringSliceFlag{Name: "hosts", Value: cli.NewStringSlice("a", "b"), Usage: "host names"},
				&cli.Float64Flag{Name: "rate", Usage: "link rate in Mbit/s for every link (0: unshaped)"},
				&cli.DurationFlag{Name: "delay", Usage: "one-way delay of every link, each direction"},
				&cli.Float64Flag{Name: "loss", Usage: "loss in percent on every link"},
				&cli.StringFlag{Name: "images", Usage: "test image archive to load (default: build them, cached in " + testbed.ImageCache + ")"},
				&cli.StringFlag{Name: "memload", Usage: "memload binary for the test images (default: next to this binary)"},
				&cli.BoolFlag{Name: "no-images", Usage: "don't load test images"},
				&cli.BoolFlag{Name: "no-ovs", Usage: "don't start an Open vSwitch instance per host"},
				&cli.BoolFlag{Name: "agents", Usage: "run `migrate serve` on every host and the client (with certificates and an inventory)"},
			},
			Action: func(c *cli.Context) error {
				cfg := testbed.Config{
					Name:  c.String("name"),
					Hosts: c.StringSlice("hosts"),
					Link:  testbed.Link{RateMbit: c.Float64("rate"), Delay: c.Duration("delay"), Loss: c.Float64("loss")},
					NoOVS: c.Bool("no-ovs"),
				}
				if !c.Bool("no-images") {
					cfg.Images = c.String("images")
					if cfg.Images == "" {
						cfg.Memload = memloadPath(c.String("memload"))
					}
				}
				if c.Bool("agents") {
					exe, err := os.Executable()
					if err != nil {
						return err
					}
					cfg.Agents = exe
				}
				if err := testbed.Preflight(!cfg.NoOVS); err != nil {
					return notReadyError{err}
				}
				tb, err := testbed.Up(c.Context, cfg)
				if err != nil {
					return err
				}
				return printTestbed(c, tb)
			},
		},
		{
			Name:  "down",
			Usage: "remove the testbed and everything it started (also after a crash)",
			Flags: []cli.Flag{nameFlag},
			Action: func(c *cli.Context) error {
				return testbed.Down(c.Context, c.String("name"))
			},
		},
		{
			Name:  "status",
			Usage: "show the testbed's hosts",
			Flags: []cli.Flag{nameFlag},
			Action: func(c *cli.Context) error {
				tb, err := testbed.Load(c.String("name"))
				if err != nil {
					return err
				}
				return printTestbed(c, tb)
			},
		},
		{
			Name:      "exec",
			Usage:     "run a command inside a host (or the client)",
			ArgsUsage: "HOST -- COMMAND [ARG...]",
			Flags:     []cli.Flag{nameFlag},
			Action: func(c *cli.Context) error {
				args := c.Args().Slice()
				if len(args) < 2 {
					return usageError{fmt.Errorf("usage: migrate testbed exec HOST -- COMMAND [ARG...]")}
				}
				tb, err := testbed.Load(c.String("name"))
				if err != nil {
					return err
				}
				command := args[1:]
				if command[0] == "--" {
					command = command[1:]
				}
				cmd, err := tb.Command(c.Context, args[0], command...)
				if err != nil {
					return usageError{err}
				}
				cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, c.App.Writer, c.App.ErrWriter
				if err := cmd.Run(); err != nil {
					if ee, ok := err.(*exec.ExitError); ok {
						return cli.Exit("", ee.ExitCode())
					}
					return err
				}
				return nil
			},
		},
		{
			Name:      "report",
			Usage:     "merge experiment runs (CSV), redraw the plot and print pre-copy / stock ratios",
			ArgsUsage: "RUN.csv [RUN.csv...]",
			Description: `Runs of scripts/experiment.sh each write an experiment.csv. report merges them, a
later file's row replacing an earlier one of the same configuration and case (a
configuration measured again), and writes experiment.csv and experiment.svg to --out.

  SIZES=256 scripts/experiment.sh; SIZES=1024 OUT=results/big scripts/experiment.sh
  migrate testbed report --out docs results/experiment/experiment.csv results/big/experiment.csv`,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "out", Usage: "write experiment.csv and experiment.svg to this directory (default: only print the ratios)"},
			},
			Action: func(c *cli.Context) error {
				if c.NArg() == 0 {
					return usageError{fmt.Errorf("usage: migrate testbed report [--out DIR] RUN.csv [RUN.csv...]")}
				}
				var runs [][]testbed.ExpRow
				for _, name := range c.Args().Slice() {
					rows, err := readRun(name)
					if err != nil {
						return usageError{err}
					}
					runs = append(runs, rows)
				}
				rows := testbed.MergeRows(runs...)
				if dir := c.String("out"); dir != "" {
					if err := testbed.WriteReport(dir, rows); err != nil {
						return err
					}
				}
				if c.Bool("json") {
					return printJSON(c, rows)
				}
				for _, line := range testbed.Ratios(rows) {
					fmt.Fprintln(c.App.Writer, line)
				}
				return nil
			},
		},
	},
}

func readRun(name string) ([]testbed.ExpRow, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rows, err := testbed.ReadCSV(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (not an experiment.csv?)", name, err)
	}
	return rows, nil
}

// memloadPath finds the memload binary: the flag, else next to this executable.
func memloadPath(flag string) string {
	if flag != "" {
		return flag
	}
	if exe, err := os.Executable(); err == nil {
		return filepath.Join(filepath.Dir(exe), "memload")
	}
	return "memload"
}

func printTestbed(c *cli.Context, tb *testbed.Testbed) error {
	if c.Bool("json") {
		return printJSON(c, tb)
	}
	w := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "HOST\tUNDERLAY IP\tLINK\tPODMAN\tAGENT")
	for _, h := range tb.Hosts {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", h.Name, h.UnderlayIP, h.Link, dash(h.PodmanURI), dash(h.AgentAddr))
	}
	return w.Flush()
}

func dash(s string) string {
	if strings.TrimSpace(s) == "" {
		return "-"
	}
	return s
}
