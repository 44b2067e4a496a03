package main

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/migrate-project/migrate/overlaynet"
	"github.com/migrate-project/migrate/transfer"
	"github.com/urfave/cli/v2"
)

// moveFlag names a hand-driven move in both journals.
var moveFlag = &cli.StringFlag{Name: "move", Value: "manual", Usage: "the move's ID (prepare and commit must agree)"}

// overlayCommand drives the overlay by hand: what `push` does around a checkpoint, for
// experiments that move a container another way (the stock podman sequence) and for
// repairs.
var overlayCommand = &cli.Command{
	Name:   "overlay",
	Usage:  "plumb and re-point overlay endpoints by hand (experiments, repairs); acts as a host: --identity HOST",
	Hidden: true,
	Subcommands: []*cli.Command{
		{
			Name:      "prepare",
			Usage:     "plumb CONTAINER's endpoint on the target, unannounced",
			ArgsUsage: "CONTAINER",
			Flags: []cli.Flag{inventoryFlag, certsFlag, identityFlag, &cli.StringFlag{Name: "from", Required: true}, &cli.StringFlag{Name: "to", Required: true},
				moveFlag},
			Action: func(c *cli.Context) error {
				op, err := newOperator(c)
				if err != nil {
					return err
				}
				src, err := op.peer(c.String("from"))
				if err != nil {
					return err
				}
				dst, err := op.peer(c.String("to"))
				if err != nil {
					return err
				}
				cs, err := src.Containers(c.Context)
				if err != nil {
					return err
				}
				info, err := src.Info(c.Context)
				if err != nil {
					return err
				}
				for _, ci := range cs {
					if ci.Name != c.Args().First() || !ci.OnOverlay {
						continue
					}
					ep := overlaynet.NewEndpoint(ci.Name, ci.IP)
					ep.MAC = ci.MAC
					req := transfer.PrepareRequest{Container: ci.Name, Move: c.String("move"), Image: ci.Image, Source: c.String("from"), Endpoint: ep, Runtime: info.Runtime, Cgroups: info.Cgroups}
					pr, err := dst.Prepare(c.Context, req)
					if err != nil {
						return err
					}
					for _, ch := range pr.Checks {
						if !ch.OK {
							return fmt.Errorf("%s: source %q target %q", ch.Property, ch.Source, ch.Target)
						}
					}
					return nil
				}
				return fmt.Errorf("no container %q on the overlay on %s", c.Args().First(), c.String("from"))
			},
		},
		{
			Name:      "locate",
			Usage:     "point every node at CONTAINER on host --on",
			ArgsUsage: "CONTAINER",
			Flags: []cli.Flag{inventoryFlag, certsFlag, identityFlag, &cli.StringFlag{Name: "on", Required: true},
				&cli.StringFlag{Name: "ip", Required: true, Usage: "address/prefix"}, &cli.StringFlag{Name: "mac", Usage: "default: derived from the address as `run` does"}},
			Action: func(c *cli.Context) error {
				op, err := newOperator(c)
				if err != nil {
					return err
				}
				ip, err := netip.ParsePrefix(c.String("ip"))
				if err != nil {
					return usageError{err}
				}
				ep := overlaynet.NewEndpoint(c.Args().First(), ip)
				if m := c.String("mac"); m != "" {
					ep.MAC = m
				}
				var errs []error
				for _, h := range op.inv.Hosts {
					if err := op.peers[h.Name].Locate(c.Context, ep.Location(c.String("on"))); err != nil {
						errs = append(errs, err)
					}
				}
				return errors.Join(errs...)
			},
		},
		{
			Name:      "commit",
			Usage:     "tell host --on that CONTAINER's move to it is complete",
			ArgsUsage: "CONTAINER",
			Flags:     []cli.Flag{inventoryFlag, certsFlag, identityFlag, &cli.StringFlag{Name: "on", Required: true}, moveFlag},
			Action: func(c *cli.Context) error {
				op, err := newOperator(c)
				if err != nil {
					return err
				}
				p, err := op.peer(c.String("on"))
				if err != nil {
					return err
				}
				return p.Commit(c.Context, transfer.MoveRef{Container: c.Args().First(), Move: c.String("move")})
			},
		},
	},
}
