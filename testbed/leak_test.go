package testbed_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/migrate-project/migrate/testbed"
	"github.com/migrate-project/migrate/transfer"
)

// agentInfo reads host's /v1/info as the operator, from the client (curl, so that the
// reading itself leaves no client of ours behind).
func agentInfo(t *testing.T, tb *testbed.Testbed, host string) transfer.HostInfo {
	t.Helper()
	h, err := tb.Host(host)
	if err != nil {
		t.Fatal(err)
	}
	certs := filepath.Join(testbed.StateRoot, tb.Name, "certs")
	out, err := tb.Run(context.Background(), testbed.ClientName, "curl", "-sS", "--fail",
		"--cert", filepath.Join(certs, "operator.pem"), "--key", filepath.Join(certs, "operator-key.pem"), "--cacert", filepath.Join(certs, "ca.pem"),
		fmt.Sprintf("https://%s:%d%s", h.UnderlayIP, testbed.AgentPort, transfer.PathInfo))
	if err != nil {
		t.Fatalf("info of %s: %v %s", host, err, out)
	}
	var info transfer.HostInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("info of %s: %v %.200s", host, err, out)
	}
	return info
}

// About 500 API calls, half of them between agents (`migrate plan` makes the source ask
// the other host for its layers, pages and bandwidth, and every host for its round trip),
// leave the agents' connections and goroutines where they started: one client per peer,
// connections reused, nothing left waiting.
func TestAgentsDoNotLeakConnectionsOrGoroutines(t *testing.T) {
	tb := upAgents(t, "leak", testbed.Link{})
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1, "sleep", "3600")
	plan := func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if out, err := tb.Migrate(ctx, testbed.ClientName, "--json", "plan", "web", "--user", "10.99.0.100").CombinedOutput(); err != nil {
			t.Fatalf("plan: %v\n%s", err, out)
		}
	}
	plan() // the agents' clients for each other exist from here on
	time.Sleep(time.Second)
	before := map[string]transfer.HostInfo{"a": agentInfo(t, tb, "a"), "b": agentInfo(t, tb, "b")}
	const plans = 50 // about 10 calls each
	for i := 0; i < plans; i++ {
		plan()
	}
	for _, h := range []string{"a", "b"} {
		// The operator's processes have exited; their connections close within seconds.
		after := agentInfo(t, tb, h)
		for deadline := time.Now().Add(10 * time.Second); after.OpenConnections > before[h].OpenConnections+4 && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
			after = agentInfo(t, tb, h)
		}
		t.Logf("%s after %d plans: goroutines %d -> %d, open connections %d -> %d", h, plans,
			before[h].Goroutines, after.Goroutines, before[h].OpenConnections, after.OpenConnections)
		// Margins: a peer's pool holds up to 4 idle connections (MaxIdleConnsPerHost),
		// each with a few goroutines on either side. A client per call would leave
		// about 4 connections per plan, 200 in all.
		if after.OpenConnections > before[h].OpenConnections+4 {
			t.Errorf("%s: open connections grew from %d to %d", h, before[h].OpenConnections, after.OpenConnections)
		}
		if after.Goroutines > before[h].Goroutines+16 {
			t.Errorf("%s: goroutines grew from %d to %d", h, before[h].Goroutines, after.Goroutines)
		}
	}
}
