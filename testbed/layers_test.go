package testbed_test

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/migrate-project/migrate/testbed"
)

// layerSizes lists the layer blobs of image as podman on host saves them: DiffID -> bytes.
func layerSizes(t *testing.T, tb *testbed.Testbed, host, image string) map[string]int64 {
	t.Helper()
	f := filepath.Join(testbed.DataRoot, tb.Name, "save-"+host+".tar")
	defer os.Remove(f)
	if _, err := tb.Run(context.Background(), host, "podman", "save", "--format", "docker-archive", "-o", f, image); err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	sizes := map[string]int64{}
	tr := tar.NewReader(in)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if base, ok := strings.CutSuffix(h.Name, ".tar"); ok && len(base) == 64 && h.Typeflag == tar.TypeReg {
			sizes["sha256:"+base] = h.Size
		}
	}
	return sizes
}

func imageLayers(t *testing.T, tb *testbed.Testbed, host, image string) []string {
	t.Helper()
	out, err := tb.Run(context.Background(), host, "podman", "image", "inspect", "--format", "{{range .RootFS.Layers}}{{.}} {{end}}", image)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(out)
}

// The target holds image 1; a container of image 2 (same base layers) moves. Only the
// missing layer crosses the agents' connection; a layer damaged on the way is refused and
// the container stays on the source.
func TestPushShipsOnlyMissingLayers(t *testing.T) {
	tb := upAgents(t, "layers", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	ctx := context.Background()
	if _, err := tb.Run(ctx, "b", "podman", "rmi", testbed.ImageV2); err != nil {
		t.Fatal(err)
	}
	cmd, n := serve(10, 25)
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV2, "sh", "-c", cmd)
	waitListen(t, tb, "a", "web", 5201, testbed.StreamPort)

	// What b lacks, measured on the images themselves rather than taken from the plan.
	held := map[string]bool{}
	for _, d := range imageLayers(t, tb, "b", testbed.ImageV1) {
		held[d] = true
	}
	var missing, total int64
	for d, n := range layerSizes(t, tb, "a", testbed.ImageV2) {
		total += n
		if !held[d] {
			missing += n
		}
	}
	if missing == 0 || missing == total {
		t.Fatalf("test images must share some layers and differ in others (missing %d of %d)", missing, total)
	}
	out := mustMigrate(t, tb, "layers", "diff", "web", "--to", "b")
	t.Logf("layers diff:\n%s", out)

	tr := startTraffic(t, tb, 60, 15, n)
	waitWire(t, tb, testbed.ClientName, false, 4<<20, 30*time.Second) // traffic under way

	// A byte flipped on the way: the target refuses the archive, nothing moves.
	if err := tb.RestartAgent(ctx, "a", []string{"MIGRATE_FAULT=damage:image-upload"}); err != nil {
		t.Fatal(err)
	}
	pout, perr, code := migrate(t, tb, "push", "web", "--to", "b")
	if code == 0 || !strings.Contains(pout+perr, "digest mismatch") {
		t.Fatalf("a damaged image archive was not refused (exit %d):\n%s%s", code, pout, perr)
	}
	t.Logf("damaged layer refused: %s", lastLine(perr))
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "a" {
		t.Fatalf("after the refused move web runs on %v, want a", w)
	}
	if _, err := tb.Run(ctx, "b", "podman", "image", "exists", testbed.ImageV2); err == nil {
		t.Fatal("b holds the image after a damaged transfer")
	}

	if err := tb.RestartAgent(ctx, "a", nil); err != nil {
		t.Fatal(err)
	}
	r := push(t, tb, "b")
	if !r.OK {
		t.Fatalf("push: %+v", r)
	}
	const overhead = 64 << 10 // manifest, config, tar headers, placeholders
	t.Logf("image bytes on the connection %d; missing layers %d of %d (ratio %.4f)", r.ImageBytes, missing, total, float64(r.ImageBytes)/float64(missing))
	if limit := missing*105/100 + overhead; r.ImageBytes > limit || r.ImageBytes < missing {
		t.Errorf("%d image bytes crossed for %d bytes of missing layers (limit %d)", r.ImageBytes, missing, limit)
	}
	if got, want := imageID(t, tb, "b", testbed.ImageV2), imageID(t, tb, "a", testbed.ImageV2); got != want {
		t.Errorf("image ID on b %s, on a %s", got, want)
	}
	tr.check(t)
}

func imageID(t *testing.T, tb *testbed.Testbed, host, image string) string {
	t.Helper()
	out, err := tb.Run(context.Background(), host, "podman", "image", "inspect", "--format", "{{.ID}}", image)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// A target that holds no image at all receives the whole image; the container runs there
// and keeps its connection.
func TestPushToTargetWithoutImages(t *testing.T) {
	tb := upAgents(t, "noimg", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	ctx := context.Background()
	if _, err := tb.Run(ctx, "b", "podman", "rmi", "-a"); err != nil {
		t.Fatal(err)
	}
	cmd, n := serve(10, 14)
	mustMigrate(t, tb, "run", "--on", "a", "--name", "web", "--ip", webIP+"/16", testbed.ImageV1, "sh", "-c", cmd)
	waitListen(t, tb, "a", "web", 5201, testbed.StreamPort)
	var total int64
	for _, n := range layerSizes(t, tb, "a", testbed.ImageV1) {
		total += n
	}
	tr := startTraffic(t, tb, 60, 10, n)
	waitWire(t, tb, testbed.ClientName, false, 4<<20, 30*time.Second) // traffic under way
	r := push(t, tb, "b")
	if !r.OK || r.ImageBytes < total {
		t.Fatalf("push: ok %v, %d image bytes for a %d-byte image: %+v", r.OK, r.ImageBytes, total, r)
	}
	tr.check(t)
	if w := where(t, tb, "web"); len(w) != 1 || w[0] != "b" {
		t.Fatalf("web runs on %v, want b", w)
	}
}

// Bytes and time of moving a container whose image the target partly or wholly lacks:
// `migrate push` against the stock way (podman save | copy | podman load, then checkpoint
// --export | copy | restore --import), at 100 Mbit/s. Figures are logged, not asserted.
func TestBenchImageMoveVersusStock(t *testing.T) {
	tb := upAgents(t, "bench", testbed.Link{RateMbit: 100, Delay: time.Millisecond})
	ctx := context.Background()
	for i, sc := range []struct {
		name  string
		prune []string // what b forgets before each move
	}{
		{"target has base", []string{"rmi", "-f", testbed.ImageV2}},
		{"target has nothing", []string{"rmi", "-a", "-f"}},
	} {
		reset := func() {
			if _, err := tb.Run(ctx, "b", "podman", "rm", "-a", "-f"); err != nil {
				t.Fatal(err)
			}
			if _, err := tb.Run(ctx, "b", append([]string{"podman"}, sc.prune...)...); err != nil {
				t.Fatal(err)
			}
		}
		// Names and addresses per scenario: the reset removes containers behind the agents'
		// backs, leaving their endpoints plumbed.
		ip := func(n int) string { return fmt.Sprintf("10.88.1.%d/16", 10*i+n) }
		p, s := fmt.Sprint("p", i), fmt.Sprint("s", i)

		reset()
		mustMigrate(t, tb, "run", "--on", "a", "--name", p, "--ip", ip(1), testbed.ImageV2, "iperf3", "-s")
		out := mustMigrate(t, tb, "--json", "push", p, "--to", "b")
		r, _, err := testbed.ParsePush([]byte(out))
		if err != nil || !r.OK {
			t.Fatalf("push: %v %s", err, out)
		}
		pushBytes := r.ImageBytes + r.Bytes

		reset()
		mustMigrate(t, tb, "run", "--on", "a", "--name", s, "--ip", ip(2), testbed.ImageV2, "iperf3", "-s")
		start := time.Now()
		img, err := tb.StockImageCopy(ctx, testbed.ImageV2, "a", "b")
		if err != nil {
			t.Fatal(err)
		}
		sr, err := tb.StockMove(ctx, s, ip(2), "a", "b")
		if err != nil {
			t.Fatal(err)
		}
		stockTime, stockBytes := time.Since(start), img+sr.Bytes
		t.Logf("%-18s push: %6.1f MB %6s | stock: %6.1f MB %6s | ratio bytes %.2f, time %.2f",
			sc.name, float64(pushBytes)/1e6, r.Total.Round(10*time.Millisecond), float64(stockBytes)/1e6,
			stockTime.Round(10*time.Millisecond), float64(pushBytes)/float64(stockBytes), r.Total.Seconds()/stockTime.Seconds())
	}
}
