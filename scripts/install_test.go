package scripts

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/migrate-project/migrate/internal/testenv"
)

func TestInstallScriptSyntax(t *testing.T) {
	for _, s := range []string{"install.sh", "test.sh", "demo.sh", "lib.sh"} {
		if out, err := exec.Command("bash", "-n", s).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", s, err, out)
		}
	}
}

// installSecondRun bounds install.sh on a ready host (measured 0.56-0.59 s; the
// margin covers a slow apt cache or dpkg-query on a loaded machine).
const installSecondRun = 5 * time.Second

// On a ready host (scripts/test.sh has just run it) install.sh must change nothing, fast.
func TestInstallScriptSecondRunIsFastNoOp(t *testing.T) {
	testenv.Root(t, "apt-get", "dpkg-query")
	if _, err := os.Stat("/usr/local/sbin/criu"); err != nil {
		testenv.Need(t, false, "host not set up yet: run scripts/install.sh first")
	}
	start := time.Now()
	out, err := exec.Command("bash", "install.sh").CombinedOutput()
	took := time.Since(start)
	if err != nil {
		t.Fatalf("install.sh: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "nothing changed") || strings.Contains(string(out), "CHANGED") {
		t.Errorf("second run changed the host:\n%s", out)
	}
	if took > installSecondRun {
		t.Errorf("second run took %s; a ready host should take seconds", took)
	}
	t.Logf("second run: %s", took)
}
