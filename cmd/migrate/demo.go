package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/migrate-project/migrate/testbed"
	"github.com/urfave/cli/v2"
)

var demoCommand = &cli.Command{
	Name:  "demo",
	Usage: "move a container serving an iperf3 stream between two testbed hosts and report",
	Description: `Builds a testbed (hosts a and b, a client, agents on all three), starts an iperf3
server in a container on the overlay on a (migrate run), streams from it to the client,
moves the container to b mid-stream (migrate push) and prints the largest gap the client
saw, the bytes on the wire, the total time and whether the connection survived. The
testbed is removed afterwards unless --keep.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "name", Value: "demo", Usage: "testbed name"},
		&cli.Float64Flag{Name: "rate", Value: 100, Usage: "link rate in Mbit/s (0: unshaped)"},
		&cli.DurationFlag{Name: "delay", Value: time.Millisecond, Usage: "one-way delay per link"},
		&cli.DurationFlag{Name: "duration", Value: 12 * time.Second, Usage: "length of the iperf3 stream"},
		&cli.StringFlag{Name: "memload", Usage: "memload binary for the test images (default: next to this binary)"},
		&cli.BoolFlag{Name: "keep", Usage: "leave the testbed up afterwards"},
	},
	Action: func(c *cli.Context) error {
		if err := testbed.Preflight(true); err != nil {
			return notReadyError{err}
		}
		name := c.String("name")
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		tb, err := testbed.Up(c.Context, testbed.Config{
			Agents:  exe,
			Name:    name,
			Link:    testbed.Link{RateMbit: c.Float64("rate"), Delay: c.Duration("delay")},
			Memload: memloadPath(c.String("memload")),
			Owner:   demoOwner(c.Bool("keep")),
		})
		if err != nil {
			return err
		}
		if !c.Bool("keep") {
			defer testbed.Down(context.WithoutCancel(c.Context), name)
		}
		d, err := tb.RunDemo(c.Context, "a", "b", c.Duration("duration"))
		if err != nil {
			return err
		}
		if c.Bool("json") {
			if err := printJSON(c, d); err != nil {
				return err
			}
		} else {
			w := c.App.Writer
			fmt.Fprintf(w, "migrate push %s --to %s (from %s) over a %s link\n", d.Container, d.To, d.From, d.Link)
			fmt.Fprintf(w, "  downtime (largest gap the client saw): %s\n", d.LargestGap.Round(time.Millisecond))
			if p := d.Push; p != nil {
				fmt.Fprintf(w, "  bytes on the wire (checkpoint):        %.1f MB\n", float64(p.Bytes)/1e6)
				fmt.Fprintf(w, "  total time of the push:                %s\n", p.Total.Round(time.Millisecond))
				fmt.Fprintf(w, "  traffic held (freeze to re-point):     %s\n", p.Frozen.Round(time.Millisecond))
				if !p.OK {
					fmt.Fprintf(w, "  push FAILED: %s\n", p.Error)
				}
			}
			fmt.Fprintf(w, "  iperf3 stream: sent %d bytes, received %d bytes\n", d.SentBytes, d.ReceivedBytes)
			fmt.Fprintf(w, "  checked stream: %d of %d bytes received, each one checked, largest gap %s\n",
				d.Stream.Received, d.Stream.Expected, d.Stream.LargestGap.Round(time.Millisecond))
			if d.Survived {
				fmt.Fprintln(w, "  connections survived: yes (same TCP connections, every byte arrived)")
			} else {
				fmt.Fprintf(w, "  connection survived: NO (%s)\n", d.ClientError)
			}
		}
		if !d.Survived {
			return fmt.Errorf("the connection did not survive the move")
		}
		return nil
	},
}

// demoOwner makes the demo the owner of its testbed unless the user keeps it: a demo
// interrupted before its teardown leaves a testbed the next demo reclaims.
func demoOwner(keep bool) int {
	if keep {
		return 0
	}
	return os.Getpid()
}
