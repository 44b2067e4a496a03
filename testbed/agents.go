package testbed

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/migrate-project/migrate/transfer"
)

// ClientEndpoint is the client's own address on the overlay.
var ClientEndpoint = netip.MustParsePrefix("10.88.255.1/16")

func (tb *Testbed) certDir() string   { return filepath.Join(stateDir(tb.Name), "certs") }
func (tb *Testbed) inventory() string { return filepath.Join(stateDir(tb.Name), "inventory.json") }

// OperatorEnv is the environment under which `migrate` commands act as the testbed's
// operator (inventory, certificates, identity).
func (tb *Testbed) OperatorEnv() []string {
	return []string{"MIGRATE_INVENTORY=" + tb.inventory(), "MIGRATE_CERTS=" + tb.certDir(), "MIGRATE_IDENTITY=operator"}
}

// MigrateAs runs the migrate binary inside host presenting identity's certificate (a
// host's, the client node's, or "operator").
func (tb *Testbed) MigrateAs(ctx context.Context, host, identity string, args ...string) *exec.Cmd {
	cmd := tb.Migrate(ctx, host, args...)
	cmd.Env = append(cmd.Env, "MIGRATE_IDENTITY="+identity)
	return cmd
}

// Migrate runs the migrate binary as the operator inside host (its namespaces reach the
// agents' underlay addresses).
func (tb *Testbed) Migrate(ctx context.Context, host string, args ...string) *exec.Cmd {
	cmd, err := tb.Command(ctx, host, append([]string{tb.MigrateBin}, args...)...)
	if err != nil {
		cmd = exec.CommandContext(ctx, tb.MigrateBin)
		cmd.Err = err // Start, Run and Output return it
		return cmd
	}
	cmd.Env = append(cmd.Env, tb.OperatorEnv()...)
	return cmd
}

// startAgents issues certificates, writes the inventory and starts `migrate serve` on
// every host and on the client (an overlay node with an address, without containers).
func (tb *Testbed) startAgents(ctx context.Context) error {
	inv := transfer.Inventory{}
	for _, h := range tb.Hosts {
		inv.Hosts = append(inv.Hosts, transfer.HostEntry{Name: h.Name, Agent: netip.AddrPortFrom(h.UnderlayIP, AgentPort).String()})
		h.AgentAddr = netip.AddrPortFrom(h.UnderlayIP, AgentPort).String()
	}
	b, _ := json.MarshalIndent(inv, "", "  ")
	if err := os.WriteFile(tb.inventory(), b, 0o644); err != nil {
		return err
	}
	if err := transfer.InitCA(tb.certDir()); err != nil {
		return err
	}
	for _, h := range tb.Hosts {
		// The client is an overlay-only node: it may learn locations, nothing more.
		role := transfer.RoleHost
		if h.IsClient() {
			role = transfer.RoleNode
		}
		if err := transfer.Issue(tb.certDir(), h.Name, transfer.IssueOptions{Role: role, Hosts: []string{h.UnderlayIP.String()}}); err != nil {
			return err
		}
	}
	if err := transfer.Issue(tb.certDir(), "operator", transfer.IssueOptions{Role: transfer.RoleOperator}); err != nil {
		return err
	}
	for _, h := range tb.Hosts {
		if h.IsClient() && h.OVSDir == "" {
			h.OVSDir = filepath.Join(h.Dir, "ovs")
			if err := os.MkdirAll(h.Dir, 0o755); err != nil {
				return err
			}
			if err := tb.startOVS(ctx, h); err != nil {
				return fmt.Errorf("open vswitch on the client: %w", err)
			}
		}
		if err := tb.StartAgent(ctx, h.Name); err != nil {
			return err
		}
	}
	for _, h := range tb.Hosts {
		if err := tb.waitAgent(ctx, h); err != nil {
			return err
		}
	}
	return nil
}

// StartAgent starts the agent of host (after it stopped).
func (tb *Testbed) StartAgent(ctx context.Context, host string) error {
	return tb.StartAgentEnv(ctx, host, nil)
}

// RestartAgent stops host's agent and starts it again with extra environment (e.g. a
// MIGRATE_FAULT for a test), waiting until it serves.
func (tb *Testbed) RestartAgent(ctx context.Context, host string, env []string) error {
	if pid, err := tb.AgentPID(host); err == nil {
		terminate([]int{pid})
	}
	if err := tb.StartAgentEnv(ctx, host, env); err != nil {
		return err
	}
	return tb.WaitAgent(ctx, host)
}

// StartAgentEnv starts the agent of host with extra environment.
func (tb *Testbed) StartAgentEnv(ctx context.Context, host string, env []string) error {
	h, err := tb.Host(host)
	if err != nil {
		return err
	}
	logPath := filepath.Join(h.Dir, "agent.log")
	os.Rename(logPath, logPath+".1") // a restart starts a fresh log; the last one is kept
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := []string{tb.MigrateBin, "--log-level", "debug", "serve", "--name", h.Name, "--inventory", tb.inventory(),
		"--certs", tb.certDir(), "--state-dir", filepath.Join(h.Dir, "agent"), "--underlay", "eth0"}
	if h.IsClient() {
		args = append(args, "--podman", "", "--endpoint", ClientEndpoint.String())
	} else {
		args = append(args, "--podman", h.PodmanURI)
	}
	cmd := exec.Command("nsenter", append(nsenterArgs(h), args...)...)
	cmd.Env = append(append(baseEnv(), h.env()...), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start agent on %s: %w", h.Name, err)
	}
	go cmd.Wait() //nolint:errcheck // reaps it; Down or KillAgent ends it
	return os.WriteFile(filepath.Join(h.Dir, "agent.pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
}

// AgentPID is the PID of host's agent.
func (tb *Testbed) AgentPID(host string) (int, error) {
	h, err := tb.Host(host)
	if err != nil {
		return 0, err
	}
	b, err := os.ReadFile(filepath.Join(h.Dir, "agent.pid"))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

func (tb *Testbed) waitAgent(ctx context.Context, h *Host) error {
	logPath := filepath.Join(h.Dir, "agent.log")
	pid, err := tb.AgentPID(h.Name)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(logPath)
		if strings.Contains(string(b), "agent serving") {
			return nil
		}
		if !alive(pid) {
			return fmt.Errorf("agent on %s exited: %s", h.Name, tail(string(b), 1500))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	b, _ := os.ReadFile(logPath)
	return fmt.Errorf("agent on %s not serving after 60s: %s", h.Name, tail(string(b), 1500))
}

// WaitAgent waits until host's (re)started agent serves.
func (tb *Testbed) WaitAgent(ctx context.Context, host string) error {
	h, err := tb.Host(host)
	if err != nil {
		return err
	}
	return tb.waitAgent(ctx, h)
}

// AgentLogs returns the tail of every agent's log, for a failed test to show.
func (tb *Testbed) AgentLogs() string {
	var b strings.Builder
	for _, h := range tb.Hosts {
		for _, f := range []string{"agent.log.1", "agent.log"} {
			if data, err := os.ReadFile(filepath.Join(h.Dir, f)); err == nil {
				fmt.Fprintf(&b, "--- %s %s\n%s\n", h.Name, f, tail(string(data), 3000))
			}
		}
	}
	return b.String()
}

// KeepAgentLogs copies every host's agent logs, whole, into dir as <testbed>-<host>-agent.log.
func (tb *Testbed) KeepAgentLogs(dir string) error {
	for _, h := range tb.Hosts {
		var all []byte
		for _, f := range []string{"agent.log.1", "agent.log"} {
			if data, err := os.ReadFile(filepath.Join(h.Dir, f)); err == nil {
				all = append(all, data...)
			}
		}
		if len(all) == 0 {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, tb.Name+"-"+h.Name+"-agent.log"), all, 0o644); err != nil {
			return err
		}
		// podman's own log, whose lines are timed at debug level (MIGRATE_PODMAN_LOG_LEVEL).
		if data, err := os.ReadFile(filepath.Join(h.Dir, "podman.log")); err == nil && len(data) > 0 {
			if err := os.WriteFile(filepath.Join(dir, tb.Name+"-"+h.Name+"-podman.log"), data, 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
