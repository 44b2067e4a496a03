package transfer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A CRIU log is quoted for its errors only when CRIU failed: a dump that finished is not
// the cause of a failed move, whatever it logged on the way.
func TestCRIUErrorsQuotedOnlyWhenCRIUFailed(t *testing.T) {
	dir := t.TempDir()
	failed := filepath.Join(dir, "failed.log")
	os.WriteFile(failed, []byte("(00.020112) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n(00.1) Error (criu/sk-inet.c:1): connection lost\n"), 0o644)
	ok := filepath.Join(dir, "ok.log")
	os.WriteFile(ok, []byte("(00.020112) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n(00.4) Dumping finished successfully\n"), 0o644)
	if q := criuErrors(failed); !strings.Contains(q, "connection lost") {
		t.Fatalf("failed dump quoted as %q: want its error lines", q)
	}
	if q := criuErrors(ok); q != "" {
		t.Fatalf("successful dump quoted as %q: want nothing", q)
	}
}
