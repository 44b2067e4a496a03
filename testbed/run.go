package testbed

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// binPath is the PATH given to everything the testbed starts: /usr/local/sbin first, where
// scripts/install.sh puts the CRIU that works on this kernel.
const binPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// run executes name with explicit arguments and returns its stdout; on failure the error
// carries the command line and its stderr.
func run(ctx context.Context, env []string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(baseEnv(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func baseEnv() []string {
	env := []string{"PATH=" + binPath}
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); k != "PATH" {
			env = append(env, kv)
		}
	}
	return env
}

// nsenterArgs returns the nsenter arguments that enter a host's namespaces. nsenter opens
// every namespace file before it enters any, so paths are resolved in the caller's view.
func nsenterArgs(h *Host) []string {
	args := []string{"--net=" + h.NetNS}
	if h.MountNS != "" {
		args = append(args, "--mount="+h.MountNS)
	}
	return append(args, "--")
}
