package testbed_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/migrate-project/migrate/testbed"
	"github.com/migrate-project/migrate/transfer"
)

// TestVolumeMoveVersusStock measures a container with a 1 GiB named volume (random,
// incompressible content): its first move, and the move back after 5% of the volume
// changed, against podman's own way (checkpoint export with the volume, copy, import)
// side by side. By hand (scripts/volume-bench.sh): it takes minutes.
// MIGRATE_VOLUME_BENCH=stock measures podman's way only.
func TestVolumeMoveVersusStock(t *testing.T) {
	mode := os.Getenv("MIGRATE_VOLUME_BENCH")
	if mode == "" {
		t.Skip("a measurement run by hand: scripts/volume-bench.sh")
	}
	mib := 1024
	if v := os.Getenv("MIGRATE_VOLUME_MIB"); v != "" {
		if _, err := fmt.Sscan(v, &mib); err != nil || mib <= 0 {
			t.Fatalf("MIGRATE_VOLUME_MIB=%q: want a size in MiB", v)
		}
	}
	tb := upAgents(t, "volbench", testbed.Link{RateMbit: 100, Delay: 5 * time.Millisecond})
	ctx := context.Background()
	fill := fmt.Sprintf("[ -f /data/big ] || dd if=/dev/urandom of=/data/big bs=1M count=%d 2>/dev/null; touch /data/ready; exec sleep 100000", mib)
	// 5% of the volume rewritten, 1 MiB at a time, spread over the file.
	change := fmt.Sprintf("i=0; while [ $i -lt %d ]; do dd if=/dev/urandom of=/data/big bs=1M count=1 seek=$((i*20)) conv=notrunc 2>/dev/null; i=$((i+1)); done; sync", mib/20)
	ready := func(name string) {
		for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
			if _, _, code := migrate(t, tb, "exec", name, "--", "test", "-f", "/data/ready"); code == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not fill its volume", name)
			}
		}
	}
	sum := func(name string) string {
		return strings.Fields(mustMigrate(t, tb, "exec", name, "--", "sha256sum", "/data/big"))[0]
	}

	if mode != "stock" {
		// migrate: there, 5% changed, back.
		mustMigrate(t, tb, "run", "--on", "a", "--name", "mv", "--ip", "10.88.0.50/16", "-v", "mvdata:/data", testbed.ImageV1, "sh", "-c", fill)
		ready("mv")
		want := sum("mv")
		there := pushArgs(t, tb, "mv", "--to", "b")
		if got := sum("mv"); got != want {
			t.Fatalf("volume content changed in the move: %s, want %s", got, want)
		}
		mustMigrate(t, tb, "exec", "mv", "--", "sh", "-c", change)
		want = sum("mv")
		back := pushArgs(t, tb, "mv", "--to", "a")
		if got := sum("mv"); got != want {
			t.Fatalf("volume content changed in the move back: %s, want %s", got, want)
		}
		mustMigrate(t, tb, "rm", "mv")
		for _, r := range []struct {
			what string
			r    *transfer.PushResult
		}{{"first move (a->b)", there}, {"back after 5% changed (b->a)", back}} {
			vol, frozen := r.r.Volumes[0], r.r.Volumes[1]
			t.Logf("migrate %s: %.1f MB on the wire (volume %.1f MB), total %s, traffic held %s; volume work while running %s, frozen %s (%.2f%% of it)",
				r.what, float64(r.r.Bytes+r.r.VolumeBytes)/1e6, float64(r.r.VolumeBytes)/1e6, r.r.Total.Round(time.Millisecond), r.r.Frozen.Round(time.Millisecond),
				vol.Duration.Round(time.Millisecond), frozen.Duration.Round(time.Millisecond), 100*float64(frozen.Duration)/float64(frozen.Duration+vol.Duration))
		}
	}

	// Stock: the same container and volume, podman's way.
	mustMigrate(t, tb, "run", "--on", "a", "--name", "sv", "--ip", "10.88.0.51/16", "-v", "svdata:/data", testbed.ImageV1, "sh", "-c", fill)
	ready("sv")
	for _, mv := range []struct{ what, from, to string }{{"first move (a->b)", "a", "b"}, {"back after 5% changed (b->a)", "b", "a"}} {
		s, err := tb.StockMoveWithVolumes(ctx, "sv", "10.88.0.51/16", mv.from, mv.to, []string{"svdata"})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("stock %s: %.1f MB, total = downtime %s (checkpoint+volume export %s, copy %s, volume import+restore %s)", mv.what, float64(s.Bytes)/1e6,
			s.Total.Round(time.Millisecond), s.Checkpoint.Round(time.Millisecond), s.Copy.Round(time.Millisecond), s.Restore.Round(time.Millisecond))
		if mv.to == "b" {
			if _, err := tb.Run(ctx, "b", "podman", "exec", "sv", "sh", "-c", change); err != nil {
				t.Fatal(err)
			}
		}
	}
}
