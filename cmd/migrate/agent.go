package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/migrate-project/migrate/transfer"
	"github.com/urfave/cli/v2"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// exitRolledBack: the move failed and was rolled back; the container runs on the source.
const exitRolledBack = 4

// exitAttention: the move failed and could not be rolled back completely: the result
// says where the container runs and what is left; the agents keep settling it.
const exitAttention = 6

type rolledBackError struct{ error }

type attentionError struct{ error }

var (
	inventoryFlag = &cli.StringFlag{Name: "inventory", Value: "/etc/migrate/inventory.json", Usage: "hosts and their agent addresses (JSON)", EnvVars: []string{"MIGRATE_INVENTORY"}}
	certsFlag     = &cli.StringFlag{Name: "certs", Value: "/etc/migrate/certs", Usage: "directory with ca.pem and this identity's certificate", EnvVars: []string{"MIGRATE_CERTS"}}
	identityFlag  = &cli.StringFlag{Name: "identity", Value: "operator", Usage: "whose certificate to present", EnvVars: []string{"MIGRATE_IDENTITY"}}
)

// operator is the client side of the CLI: the inventory and a TLS identity.
type operator struct {
	inv   *transfer.Inventory
	peers map[string]*transfer.Peer
}

func newOperator(c *cli.Context) (*operator, error) {
	inv, err := transfer.LoadInventory(c.String("inventory"))
	if err != nil {
		return nil, usageError{err}
	}
	conf, err := transfer.TLSConfig(c.String("certs"), c.String("identity"))
	if err != nil {
		return nil, usageError{err}
	}
	op := &operator{inv: inv, peers: map[string]*transfer.Peer{}}
	for _, h := range inv.Hosts {
		op.peers[h.Name] = transfer.NewPeer(h.Name, h.Agent, conf)
	}
	return op, nil
}

func (op *operator) peer(name string) (*transfer.Peer, error) {
	p, ok := op.peers[name]
	if !ok {
		_, err := op.inv.Get(name)
		return nil, usageError{err}
	}
	return p, nil
}

// containers asks every host for its containers; unreachable hosts are reported.
func (op *operator) containers(ctx context.Context) ([]transfer.ContainerInfo, map[string]error) {
	var mu sync.Mutex
	var all []transfer.ContainerInfo
	errs := map[string]error{}
	var wg sync.WaitGroup
	for name, p := range op.peers {
		wg.Add(1)
		go func(name string, p *transfer.Peer) {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			cs, err := p.Containers(cctx)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs[name] = err
				return
			}
			all = append(all, cs...)
		}(name, p)
	}
	wg.Wait()
	sort.Slice(all, func(i, j int) bool { return all[i].Name+all[i].Host < all[j].Name+all[j].Host })
	return all, errs
}

// locate returns the host that runs container name: from if given, else found by asking
// every host.
func (op *operator) locate(c *cli.Context, name, from string) (string, error) {
	if from != "" {
		return from, nil
	}
	all, errs := op.containers(c.Context)
	var where []string
	for _, ci := range all {
		if ci.Name == name && ci.State == "running" {
			where = append(where, ci.Host)
		}
	}
	switch {
	case len(where) == 1:
		return where[0], nil
	case len(where) > 1:
		return "", fmt.Errorf("container %s runs on several hosts (%v): say which with --from", name, where)
	}
	if m := op.moveOf(c.Context, name); m != nil {
		return "", busyError{fmt.Errorf("%s; wait for it to end (`migrate status`)", m)}
	}
	msg := fmt.Sprintf("no host runs a container named %s", name)
	for h, e := range errs {
		msg += fmt.Sprintf("; %s did not answer: %v", h, e)
	}
	return "", errors.New(msg)
}

var certsCommand = &cli.Command{
	Name:  "certs",
	Usage: "make the certificates agents and operators authenticate each other with",
	Description: `Every agent and operator presents a certificate issued by one authority and accepts
only peers whose certificate that authority issued (mutual TLS 1.3). Each certificate
carries a role, and an agent answers each request only for the roles that need it:

  host      a host's agent: moves containers to and from other hosts
  node      an overlay-only node (a client on the overlay): learns where endpoints run
  operator  a person or a cron job: run, push, status, plan

  migrate certs init --dir ./certs                              # the authority: keep ca-key.pem safe
  migrate certs issue --dir ./certs --role host a 10.99.0.1     # a host: name and agent address
  migrate certs issue --dir ./certs --role node client 10.99.0.9
  migrate certs issue --dir ./certs --role operator alice
Copy ca.pem, NAME.pem and NAME-key.pem to each host's --certs directory. Host names are
at most 12 lower-case letters, digits or '-' (they name network interfaces).`,
	Subcommands: []*cli.Command{
		{
			Name:  "init",
			Usage: "create a certificate authority",
			Flags: []cli.Flag{&cli.StringFlag{Name: "dir", Required: true}},
			Action: func(c *cli.Context) error {
				return transfer.InitCA(c.String("dir"))
			},
		},
		{
			Name:      "issue",
			Usage:     "issue a certificate for a host, a node or an operator",
			ArgsUsage: "NAME [ADDRESS...]",
			Flags: []cli.Flag{&cli.StringFlag{Name: "dir", Required: true},
				&cli.StringFlag{Name: "role", Required: true, Usage: "host, node or operator"},
				&cli.BoolFlag{Name: "force", Usage: "replace an existing certificate and key of that name"}},
			Action: func(c *cli.Context) error {
				if c.NArg() < 1 {
					return usageError{errors.New("usage: migrate certs issue --dir DIR --role host|node|operator NAME [ADDRESS...]")}
				}
				role, err := transfer.ParseRole(c.String("role"))
				if err != nil {
					return usageError{err}
				}
				return transfer.Issue(c.String("dir"), c.Args().First(), transfer.IssueOptions{Role: role, Hosts: c.Args().Tail(), Force: c.Bool("force")})
			},
		},
		{
			Name:      "revoke",
			Usage:     "revoke a certificate: agents refuse it once they have the new " + transfer.RevokedFile,
			ArgsUsage: "NAME",
			Flags:     []cli.Flag{&cli.StringFlag{Name: "dir", Required: true}},
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return usageError{errors.New("usage: migrate certs revoke --dir DIR NAME")}
				}
				if err := transfer.Revoke(c.String("dir"), c.Args().First()); err != nil {
					return err
				}
				fmt.Fprintf(c.App.ErrWriter, "revoked %s: copy %s to every host's --certs directory\n", c.Args().First(), filepath.Join(c.String("dir"), transfer.RevokedFile))
				return nil
			},
		},
	},
}

// lazyServeCommand is started by an agent for each lazy restore (see transfer.ServeLazy);
// it inherits its listening socket as file descriptor 3.
var lazyServeCommand = &cli.Command{
	Name:   "lazy-serve",
	Hidden: true,
	Usage:  "serve a restored container's lazy pages to CRIU's lazy-pages daemon (started by the agent)",
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "index", Usage: "the index of the pages (written whole before the start)"},
		&cli.BoolFlag{Name: "follow", Usage: "read the index from standard input while the memory arrives"},
		&cli.StringFlag{Name: "store", Required: true},
		&cli.DurationFlag{Name: "deadline", Value: 10 * time.Minute},
		&cli.DurationFlag{Name: "stall", Value: 30 * time.Second, Usage: "with --follow: fail a page that waits this long with nothing arriving"},
		&cli.BoolFlag{Name: "hold", Usage: "with --follow: requests for more than one page (the background fill) wait for the index's end"},
	},
	Action: func(c *cli.Context) error {
		ln, err := net.FileListener(os.NewFile(3, "listener"))
		if err != nil {
			return fmt.Errorf("lazy-serve: inherited listener: %w", err)
		}
		if c.Bool("follow") {
			return transfer.ServeLazyFollow(c.Context, os.Stdin, c.String("store"), ln, c.Duration("deadline"), c.Duration("stall"), c.Bool("hold"))
		}
		if c.String("index") == "" {
			return errors.New("lazy-serve: --index or --follow")
		}
		return transfer.ServeLazy(c.Context, c.String("index"), c.String("store"), ln, c.Duration("deadline"))
	},
}

// criuKdatCommand is started by an agent, under unshare --mount, to have CRIU write its
// kernel-probe cache (see transfer.WriteCRIUKdat).
var criuKdatCommand = &cli.Command{
	Name:   "criu-kdat",
	Hidden: true,
	Usage:  "print CRIU's kernel-probe cache (started by the agent in a mount namespace of its own)",
	Action: func(c *cli.Context) error { return transfer.WriteCRIUKdat(c.Context, c.App.Writer) },
}

var serveCommand = &cli.Command{
	Name:  "serve",
	Usage: "run this host's agent (on every host, and on overlay-only nodes)",
	Description: `The agent sets up this host's node of the overlay (an Open vSwitch bridge, VXLAN tunnels
to every host in the inventory), answers peers and operators over mutual TLS, restores
containers moved here and moves containers away on request.

Each move is journaled in --state-dir (outgoing/, incoming/) before every step. A restarted
agent settles what its journals hold: as a source it rolls back a move it had not decided
and finishes one it had; as a target it asks the source how the move ended, and keeps a
container it restored while the source cannot be asked. 'migrate status' lists moves still
being settled. On SIGTERM it waits up to two minutes for moves under way.

Memory pages of containers moved here or away are kept by SHA-256 in a page store under
--state-dir (bounded by --page-store-mb, oldest first out), so later moves send only pages
the other side lacks.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "name", Required: true, Usage: "this host's name in the inventory", EnvVars: []string{"MIGRATE_HOST"}},
		inventoryFlag, certsFlag,
		&cli.StringFlag{Name: "podman", Value: "unix:///run/podman/podman.sock", Usage: "this host's podman API service (\"\" for a node without containers)"},
		&cli.StringFlag{Name: "underlay", Value: "eth0", Usage: "the device that holds this host's underlay address"},
		&cli.StringFlag{Name: "state-dir", Value: "/var/lib/migrate", Usage: "journals of moves, the page store, the overlay's location table, kept CRIU logs"},
		&cli.StringFlag{Name: "endpoint", Usage: "give this node itself an overlay address (e.g. a client: 10.88.255.1/16)"},
		&cli.Int64Flag{Name: "page-store-mb", Value: 2048, Usage: "bound of the page store (STATE-DIR/pages): memory pages kept by hash, oldest evicted first"},
	},
	Action: func(c *cli.Context) error {
		inv, err := transfer.LoadInventory(c.String("inventory"))
		if err != nil {
			return usageError{err}
		}
		cfg := transfer.AgentConfig{Name: c.String("name"), Inventory: inv, CertDir: c.String("certs"),
			PodmanURI: c.String("podman"), Underlay: c.String("underlay"), StateDir: c.String("state-dir"), PageStoreBytes: c.Int64("page-store-mb") << 20}
		if e := c.String("endpoint"); e != "" {
			if cfg.Endpoint, err = netip.ParsePrefix(e); err != nil {
				return usageError{fmt.Errorf("--endpoint %q: want ADDRESS/PREFIX", e)}
			}
		}
		a, err := transfer.NewAgent(c.Context, cfg)
		if err != nil {
			return err
		}
		return a.Serve(c.Context)
	},
}

var runCommand = &cli.Command{
	Name:      "run",
	Usage:     "start a container on the overlay, with an address that follows it",
	ArgsUsage: "IMAGE [COMMAND [ARG...]]",
	Description: `  migrate run --on a --name web --ip 10.88.0.10/16 localhost/app:v1 iperf3 -s
  migrate run --on a --name redis --ip 10.88.0.20/16 -v redis-data:/data --memory 512m \
      localhost/redis redis-server --appendonly yes --dir /data

The container gets an address on the overlay that follows it when it moves. A named
volume (-v NAME:/path) moves with it; a bind mount (-v /host/path:/path) does not: the
path must exist on every host it moves to (push's pre-flight checks). Host devices and
the host's network cannot move, so run offers neither.`,
	Flags: []cli.Flag{
		inventoryFlag, certsFlag, identityFlag,
		&cli.StringFlag{Name: "on", Required: true, Usage: "host to start it on"},
		&cli.StringFlag{Name: "name", Required: true, Usage: "container name"},
		&cli.StringFlag{Name: "ip", Required: true, Usage: "its overlay address with prefix, e.g. 10.88.0.10/16"},
		&cli.StringSliceFlag{Name: "env", Aliases: []string{"e"}, Usage: "KEY=VALUE"},
		&cli.StringFlag{Name: "env-file", Usage: "a file of KEY=VALUE lines (--env wins)"},
		&cli.StringSliceFlag{Name: "volume", Aliases: []string{"v"}, Usage: "NAME:/path[:ro] (a named volume, moves with it) or /host/path:/path[:ro] (a bind mount, must exist on the target)"},
		&cli.StringSliceFlag{Name: "tmpfs", Usage: "/path[:size=64m,mode=1777]"},
		&cli.StringFlag{Name: "memory", Aliases: []string{"m"}, Usage: "memory limit, e.g. 512m"},
		&cli.Float64Flag{Name: "cpus", Usage: "CPU limit, e.g. 1.5"},
		&cli.StringSliceFlag{Name: "label", Aliases: []string{"l"}, Usage: "KEY=VALUE"},
		&cli.StringSliceFlag{Name: "annotation", Usage: "KEY=VALUE (OCI annotation)"},
		&cli.StringFlag{Name: "user", Aliases: []string{"u"}, Usage: "user[:group] to run as"},
		&cli.StringFlag{Name: "workdir", Aliases: []string{"w"}, Usage: "working directory"},
		&cli.StringFlag{Name: "entrypoint", Usage: `a command, or a JSON array such as '["redis-server","--port","6380"]'`},
		&cli.BoolFlag{Name: "read-only", Usage: "mount the root file system read-only"},
	},
	Action: func(c *cli.Context) error {
		if c.NArg() < 1 {
			return usageError{errors.New("usage: migrate run --on HOST --name NAME --ip ADDR/PREFIX IMAGE [COMMAND...]")}
		}
		ip, err := netip.ParsePrefix(c.String("ip"))
		if err != nil || !ip.Addr().Is4() {
			return usageError{fmt.Errorf("--ip %q: want an IPv4 address with prefix, e.g. 10.88.0.10/16", c.String("ip"))}
		}
		env, err := envList(c.StringSlice("env"), c.String("env-file"))
		if err != nil {
			return usageError{err}
		}
		req := transfer.RunRequest{Name: c.String("name"), Image: c.Args().First(), Command: c.Args().Tail(), Env: env, IP: ip,
			User: c.String("user"), WorkDir: c.String("workdir"), ReadOnly: c.Bool("read-only"), CPUs: c.Float64("cpus")}
		for _, v := range c.StringSlice("volume") {
			m, err := parseVolume(v)
			if err != nil {
				return usageError{err}
			}
			req.Mounts = append(req.Mounts, m)
		}
		for _, v := range c.StringSlice("tmpfs") {
			m, err := parseTmpfs(v)
			if err != nil {
				return usageError{err}
			}
			req.Mounts = append(req.Mounts, m)
		}
		if s := c.String("memory"); s != "" {
			if req.MemoryLimit, err = parseBytes(s); err != nil {
				return usageError{fmt.Errorf("--memory %w", err)}
			}
		}
		if req.Labels, err = parseKV("label", c.StringSlice("label")); err != nil {
			return usageError{err}
		}
		if req.Annotations, err = parseKV("annotation", c.StringSlice("annotation")); err != nil {
			return usageError{err}
		}
		if req.Entrypoint, err = parseEntrypoint(c.String("entrypoint")); err != nil {
			return usageError{err}
		}
		op, err := newOperator(c)
		if err != nil {
			return err
		}
		p, err := op.peer(c.String("on"))
		if err != nil {
			return err
		}
		out, err := p.Run(c.Context, req)
		if err != nil {
			return err
		}
		if c.Bool("json") {
			return printJSON(c, out)
		}
		fmt.Fprintf(c.App.Writer, "%s runs on %s at %s (%s)\n", req.Name, c.String("on"), ip.Addr(), out["mac"])
		return nil
	},
}

var pushCommand = &cli.Command{
	Name:      "push",
	Usage:     "move a running container to another host, its connections with it",
	ArgsUsage: "CONTAINER",
	Description: `  migrate push web --to b
  migrate push web --to b --dry-run   # only the pre-flight gate: can b restore it?

  migrate push web --to b --max-downtime 100ms --bwlimit 50   # share the link
  migrate push web --to b --mode stop-copy                     # no pre-copy rounds

The source agent checks that the target can restore the container. Then (pre-copy, the
default) it copies the container's memory while it runs, in rounds: every page is named by
its SHA-256, and only pages the target's page store lacks cross the link, so a container
returning to a host it left, or sharing pages with one already there, sends little. Rounds
stop when the final copy is estimated to fit --max-downtime, when the dirty set stops
shrinking, or after --max-rounds. The target then re-reads and re-hashes the pages it
holds; where that took longer than --max-downtime, one more round (within --max-rounds)
sends what changed meanwhile. Then it freezes the container's traffic, checkpoints it
with CRIU (TCP connections included) and streams the archive, pages the target holds by
reference, into a restore on the target; the target rebuilds the archive, checks its
SHA-256, restores, and the overlay re-points to it. The source's copy is removed.

Memory path (--memory-path auto, the default, for containers started with 'migrate run'
on hosts with runc and userfaultfd): while frozen, CRIU hands the container's pages to the
source agent (CRIU's page-server protocol), which sends only the pages changed since the
last round; podman's archive carries the rest of the state. The target restores with
lazy pages: the container runs as soon as its non-memory state is back, and CRIU's
lazy-pages daemon fills its memory from the target's page store, at local memory speed.
Every page is on the target before the container resumes, so it never depends on the
source afterwards. Elsewhere, or with --memory-path archive, the pages travel inside
podman's archive and are restored before the container resumes. The pre-flight gate
says which path a move takes, and why.

Post-copy (--postcopy): the container resumes on the target as soon as its non-memory
state is there; the pages it changed since the last pre-copy round follow from the
source, the ones it waits for first. Downtime no longer includes handing over the memory,
but until the last page has arrived the container depends on the source: if the source
host, its agent or the link fails in that phase, the container is LOST (the target stops
it rather than let it run on memory it never got). push reports how long the phase
lasted. A container that writes to its root file system must not use it (only volumes
and memory travel in this mode).

A move is a transaction: both agents journal each step before taking it, and the source
decides. On any failure before the decision the container resumes on the source with its
connections (exit code 4); after it, the move completes on the target even if an agent
or the link fails (exit code 0; what the agents still settle is printed as "attention").
Ctrl-C before the freeze cancels the move; once frozen, it runs to its end.

Output: on a terminal, the phases, pre-copy rounds, and a progress bar (total, rate, ETA)
for the image and the volumes. With --json, one JSON event per line on stdout as it
happens (phase, check, round, progress with bytes and total), the last line the result
({"event":"result","result":{...}}): a script can follow a long move.

Named volumes (migrate run -v NAME:/path) move too: their content crosses while the
container runs, only what the target's page store lacks; while frozen, only the files
changed since. The target's volume is checked against the source's digest.

Exit codes: 0 moved, 1 failed before anything changed, 2 bad usage, 4 rolled back (runs
on the source), 5 busy (already being moved), 6 needs attention (the result says where
it runs and what is left; 'migrate status' shows what the agents are settling).`,
	Flags: []cli.Flag{
		inventoryFlag, certsFlag, identityFlag,
		&cli.StringFlag{Name: "to", Required: true, Usage: "target host"},
		&cli.StringFlag{Name: "from", Usage: "source host (default: found by asking every host)"},
		&cli.BoolFlag{Name: "dry-run", Usage: "run the pre-flight gate only and print the plan"},
		&cli.DurationFlag{Name: "stall-timeout", Value: 60 * time.Second, Usage: "roll back if the transfer makes no progress this long (a cut link)"},
		&cli.StringFlag{Name: "mode", Value: transfer.ModePrecopy, Usage: "precopy (copy memory while it runs, then stop) or stop-copy"},
		&cli.DurationFlag{Name: "max-downtime", Value: 200 * time.Millisecond, Usage: "pre-copy goal: stop iterating once the final page copy is estimated to fit this"},
		&cli.IntFlag{Name: "max-rounds", Value: 8, Usage: "at most this many pre-copy rounds"},
		&cli.StringFlag{Name: "compress", Value: "auto", Usage: "zstd level: auto (fitted to the measured link), none, fastest, default, better, best"},
		&cli.Float64Flag{Name: "bwlimit", Usage: "cap what the move sends to this many Mbit/s (0: no cap)"},
		&cli.StringFlag{Name: "memory-path", Value: transfer.PathAuto, Usage: "auto (page server + lazy restore where possible), memory (that or fail), archive (pages inside podman's archive)"},
		&cli.StringFlag{Name: "handover", Usage: "memory path only: how the frozen memory reaches the agent: read (the default where the host allows CRIU's lazy dump: CRIU dumps lazily, the agent reads the frozen processes' memory, the target's podman starts its import while CRIU dumps and restores from CRIU's images while podman finishes here, unless the container changed its root file system or keeps files in /dev/shm) or page-server (CRIU sends every page to the agent; podman's archive follows)"},
		&cli.BoolFlag{Name: "postcopy", Usage: "resume on the target before the last changed pages crossed (lowest downtime; a source or link failure in that phase LOSES the container)"},
	},
	Action: func(c *cli.Context) error {
		if c.NArg() != 1 {
			return usageError{errors.New("usage: migrate push CONTAINER --to HOST")}
		}
		name := c.Args().First()
		req := transfer.PushRequest{Container: name, To: c.String("to"), DryRun: c.Bool("dry-run"), StallTimeout: c.Duration("stall-timeout"),
			Mode: c.String("mode"), MaxDowntime: c.Duration("max-downtime"), MaxRounds: c.Int("max-rounds"), Compress: c.String("compress"), BWLimitMbit: c.Float64("bwlimit"),
			MemoryPath: c.String("memory-path"), Postcopy: c.Bool("postcopy"), HandOver: c.String("handover")}
		if err := req.Validate(); err != nil {
			return usageError{err}
		}
		op, err := newOperator(c)
		if err != nil {
			return err
		}
		if _, err := op.peer(c.String("to")); err != nil {
			return err
		}
		from, err := op.locate(c, name, c.String("from"))
		if err != nil {
			return err
		}
		src, err := op.peer(from)
		if err != nil {
			return err
		}
		prog := newProgress(c)
		// Ctrl-C asks the source to cancel: before the freeze the move stops and rolls
		// back; once frozen it runs to its end. Either way push waits for the result.
		pctx := context.WithoutCancel(c.Context)
		pushed := make(chan struct{})
		defer close(pushed)
		go func() {
			select {
			case <-c.Context.Done():
			case <-pushed:
				return
			}
			cctx, cancel := context.WithTimeout(pctx, 10*time.Second)
			defer cancel()
			if cr, err := src.CancelPush(cctx, name); err != nil {
				slog.Warn("cancel", "err", err)
			} else {
				fmt.Fprintf(c.App.ErrWriter, "migrate: interrupted: %s; waiting for the result\n", cr.Detail)
			}
		}()
		res, err := src.Push(pctx, req, prog.event)
		prog.done()
		if errors.Is(err, transfer.ErrOutcomeUnknown) {
			return attentionError{err}
		}
		if err != nil {
			return err
		}
		for _, a := range res.Attention {
			fmt.Fprintf(c.App.ErrWriter, "migrate: attention: %s\n", a)
		}
		if c.Bool("json") {
			// The stream's last line: the result.
			if err := printJSONLine(c, transfer.Event{Kind: "result", Result: res, Time: time.Now()}); err != nil {
				return err
			}
		} else {
			printPush(c, res)
		}
		switch {
		case res.OK:
			return nil
		case res.RolledBack:
			return rolledBackError{errors.New(res.Error)}
		case res.Busy:
			return busyError{errors.New(res.Error)}
		case res.Move != "" && len(res.Attention) > 0:
			return attentionError{errors.New(res.Error)}
		default:
			return errors.New(res.Error)
		}
	},
}

func printPush(c *cli.Context, r *transfer.PushResult) {
	w := c.App.Writer
	if r.DryRun {
		fmt.Fprintf(w, "pre-flight for moving %s from %s to %s:\n", r.Container, r.From, r.To)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, ch := range r.Checks {
		mark := "ok"
		if !ch.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(tw, "  %s\t%s\tsource %s\ttarget %s\t%s\n", mark, ch.Property, dash(ch.Source), dash(ch.Target), ch.Detail)
	}
	tw.Flush()
	switch {
	case r.OK && r.DryRun:
		fmt.Fprintf(w, "%s can restore %s: `migrate push %s --to %s` would move it\n", r.To, r.Container, r.Container, r.To)
	case r.OK:
		fmt.Fprintf(w, "moved %s from %s to %s: %.1f MB of checkpoint in %s, traffic held %s\n", r.Container, r.From, r.To,
			float64(r.Bytes)/1e6, r.Total.Round(time.Millisecond), r.Frozen.Round(time.Millisecond))
		if p := r.Plan; p != nil {
			fmt.Fprintf(w, "  image %s: %d of %d layers shipped, %.1f MB on the wire (%.1f MB missing of %.1f MB)\n", p.Image,
				p.MissingLayers, len(p.Layers), float64(r.ImageBytes)/1e6, float64(p.MissingBytes)/1e6, float64(p.TotalBytes)/1e6)
		}
		if len(r.Rounds) > 0 {
			fmt.Fprintf(w, "  pre-copy: %d rounds, %.1f MB while running; %s\n", len(r.Rounds), float64(r.RoundBytes)/1e6, r.StopReason)
		}
		if f := r.Final; f != nil {
			fmt.Fprintf(w, "  frozen phase: %d pages sent (%d as deltas), %d referenced (%d unchanged since the last round, not re-hashed), %.1f MB of other images\n",
				f.PagesSent, f.PagesDelta, f.PagesCopied, f.PagesKnown, float64(f.RawBytes)/1e6)
		}
		if r.MemoryPath != "" {
			path := map[string]string{transfer.PathMemory: "page server, lazy restore", transfer.PathArchive: "in podman's archive"}[r.MemoryPath]
			if r.HandOver == transfer.HandOverRead {
				path = "lazy dump read from the frozen processes, lazy restore"
			}
			fmt.Fprintf(w, "  memory path: %s\n", path)
		}
		if r.EarlyRestore != "" {
			fmt.Fprintf(w, "  early restore: %s\n", r.EarlyRestore)
		}
		if p := r.Postcopy; p != nil {
			fmt.Fprintf(w, "  post-copy phase: %s, %.1f MB (the container depended on %s until then)\n", p.Duration.Round(time.Millisecond), float64(p.WireBytes)/1e6, r.From)
		}
		for _, p := range r.Phases {
			fmt.Fprintf(w, "  %-28s %s\n", p.Name, p.Duration.Round(time.Millisecond))
		}
		if len(r.Downtime) > 0 {
			fmt.Fprintf(w, "  traffic held %s:\n", r.Frozen.Round(time.Millisecond))
			for _, p := range r.Downtime {
				fmt.Fprintf(w, "    %-46s %s\n", p.Name, p.Duration.Round(time.Millisecond))
			}
		}
	}
}

var statusCommand = &cli.Command{
	Name:  "status",
	Usage: "what runs where, moves in flight, each host's last move",
	Flags: []cli.Flag{inventoryFlag, certsFlag, identityFlag},
	Action: func(c *cli.Context) error {
		op, err := newOperator(c)
		if err != nil {
			return err
		}
		var sts []transfer.Status
		var errs []string
		for _, h := range op.inv.Hosts {
			cctx, cancel := context.WithTimeout(c.Context, 5*time.Second)
			st, err := op.peers[h.Name].Status(cctx)
			cancel()
			if err != nil {
				errs = append(errs, err.Error())
				continue
			}
			sts = append(sts, *st)
		}
		var partial error
		if len(errs) > 0 {
			partial = fmt.Errorf("%d of %d hosts did not answer: %s", len(errs), len(op.inv.Hosts), strings.Join(errs, "; "))
		}
		if c.Bool("json") {
			if err := printJSON(c, map[string]any{"hosts": sts, "errors": errs}); err != nil {
				return err
			}
			return partial
		}
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CONTAINER\tHOST\tSTATE\tADDRESS\tIMAGE")
		for _, st := range sts {
			for _, ci := range st.Containers {
				addr := "-"
				if ci.OnOverlay {
					addr = ci.IP.Addr().String()
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", ci.Name, ci.Host, ci.State, addr, ci.Image)
			}
		}
		tw.Flush()
		for _, st := range sts {
			if len(st.InFlight) > 0 {
				fmt.Fprintf(c.App.Writer, "%s: moving %v\n", st.Host, st.InFlight)
			}
			for _, u := range st.Unresolved {
				fmt.Fprintf(c.App.Writer, "%s: settling %s\n", st.Host, u)
			}
			if l := st.Last; l != nil {
				out := "ok"
				if !l.OK {
					out = "FAILED: " + l.Error
				}
				fmt.Fprintf(c.App.Writer, "%s: last move %s -> %s at %s: %s\n", st.Host, l.Container, l.To, l.Finished.Format(time.RFC3339), out)
			}
		}
		return partial
	},
}

// progress shows a push's events: with --json each event as one line of JSON on stdout
// as it happens (the result last); on a terminal a line per phase, a progress bar with
// total, rate and ETA where the phase knows its total (image, volumes), a live byte count
// otherwise.
type progress struct {
	c    *cli.Context
	tty  bool
	json bool
	last int64
	bars *mpb.Progress
	bar  *mpb.Bar
	of   string // the phase the bar belongs to
}

func newProgress(c *cli.Context) *progress {
	f, ok := c.App.ErrWriter.(*os.File)
	return &progress{c: c, tty: ok && term.IsTerminal(int(f.Fd())), json: c.Bool("json")}
}

// endBar completes the current bar, if any.
func (p *progress) endBar() {
	if p.bar != nil {
		p.bar.SetTotal(-1, true)
		p.bars.Wait()
		p.bar, p.bars, p.of = nil, nil, ""
	}
}

func (p *progress) showBar(ev transfer.Event) {
	if p.bar == nil || p.of != ev.Phase {
		p.endBar()
		p.bars = mpb.New(mpb.WithOutput(p.c.App.ErrWriter), mpb.WithWidth(40))
		p.bar = p.bars.New(ev.Total, mpb.BarStyle(),
			mpb.PrependDecorators(decor.Name("  "+ev.Phase+" "), decor.Counters(decor.SizeB1000(0), "% .1f / % .1f")),
			mpb.AppendDecorators(decor.AverageSpeed(decor.SizeB1000(0), "% .1f"), decor.Name(" ETA "), decor.AverageETA(decor.ET_STYLE_GO)))
		p.of = ev.Phase
	}
	p.bar.SetTotal(ev.Total, false)
	p.bar.SetCurrent(ev.Bytes)
}

func (p *progress) event(ev transfer.Event) {
	if p.json {
		if ev.Kind != "result" {
			printJSONLine(p.c, ev)
		}
		return
	}
	w := p.c.App.ErrWriter
	if p.tty && ev.Total > 0 && ev.Kind == "progress" {
		p.showBar(ev)
		return
	}
	p.endBar()
	switch ev.Kind {
	case "phase":
		if p.tty && p.last > 0 {
			fmt.Fprintln(w)
			p.last = 0
		}
		fmt.Fprintf(w, "%s ...\n", ev.Phase)
	case "progress":
		p.last = ev.Bytes
		if p.tty {
			fmt.Fprintf(w, "\r  %8.1f MB sent", float64(ev.Bytes)/1e6)
		}
	case "round":
		if r := ev.Round; r != nil {
			if p.tty && p.last > 0 {
				fmt.Fprintln(w)
				p.last = 0
			}
			fmt.Fprintln(w, "  "+roundLine(r))
		}
	case "error":
		fmt.Fprintf(w, "error: %s\n", ev.Error)
	}
}

func roundLine(r *transfer.Round) string {
	return fmt.Sprintf("round %d: %d pages read, %d dirty, %d sent (%d as deltas), %d already there, %.1f MB on the wire in %s; final copy estimated %s",
		r.N, r.Scanned, r.Dirty, r.Sent, r.Deltas, r.Deduplicated, float64(r.WireBytes)/1e6, r.Duration.Round(time.Millisecond), r.Estimate.Round(time.Millisecond))
}

func (p *progress) done() {
	p.endBar()
	if p.tty && p.last > 0 && !p.json {
		fmt.Fprintln(p.c.App.ErrWriter)
	}
}
