package main

import (
	"errors"
	"fmt"
	"text/tabwriter"

	"github.com/migrate-project/migrate/layers"
	"github.com/migrate-project/migrate/transfer"
	"github.com/urfave/cli/v2"
)

var layersCommand = &cli.Command{
	Name:  "layers",
	Usage: "what moving a container costs in image layers",
	Subcommands: []*cli.Command{
		{
			Name:      "diff",
			Usage:     "which of a container's image layers a target lacks, and their size",
			ArgsUsage: "CONTAINER",
			Description: `  migrate layers diff web --to b
Layers are compared by DiffID (the digest of the uncompressed layer). Only the missing ones
cross the link when web moves; its rootfs changes travel in the checkpoint.`,
			Flags: []cli.Flag{inventoryFlag, certsFlag, identityFlag,
				&cli.StringFlag{Name: "to", Required: true, Usage: "target host"},
				&cli.StringFlag{Name: "from", Usage: "source host (default: found by asking every host)"}},
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return usageError{errors.New("usage: migrate layers diff CONTAINER --to HOST")}
				}
				op, err := newOperator(c)
				if err != nil {
					return err
				}
				from, err := op.locate(c, c.Args().First(), c.String("from"))
				if err != nil {
					return err
				}
				src, err := op.peer(from)
				if err != nil {
					return err
				}
				p, err := src.LayerPlan(c.Context, transfer.PlanRequest{Container: c.Args().First(), To: c.String("to")})
				if err != nil {
					return err
				}
				if c.Bool("json") {
					return printJSON(c, p)
				}
				printPlan(c, p)
				return nil
			},
		},
	},
}

func printPlan(c *cli.Context, p *layers.Plan) {
	w := c.App.Writer
	fmt.Fprintf(w, "image %s (%.12s) to %s:\n", p.Image, p.ImageID, p.Target)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  LAYER\tSIZE\tON TARGET")
	for _, l := range p.Layers {
		on := "missing"
		if l.Present {
			on = "present"
		}
		fmt.Fprintf(tw, "  %.19s\t%.1f MB\t%s\n", l.DiffID, float64(l.Size)/1e6, on)
	}
	tw.Flush()
	fmt.Fprintf(w, "  to ship: %d of %d layers, %.1f of %.1f MB; rootfs changes: %d paths (in the checkpoint)\n",
		p.MissingLayers, len(p.Layers), float64(p.MissingBytes)/1e6, float64(p.TotalBytes)/1e6, p.RootfsChanges)
}
