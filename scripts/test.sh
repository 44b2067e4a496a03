#!/usr/bin/env bash
# Set up this host (scripts/install.sh) and run every test: unit tests, integration tests
# with real podman, CRIU, Open vSwitch and network namespaces, and testbed tests.
#
# MIGRATE_INTEGRATION=1 (set here) makes a missing prerequisite FAIL an integration test
# instead of skipping it. Run as root. Extra arguments go to `go test` (e.g. -run Smoke).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the tests build namespaces and run podman)" >&2; exit 1; }

"$REPO/scripts/install.sh"
cd "$REPO"
echo "test.sh: building" >&2
build_binaries
go vet -tags "$GO_TAGS" ./...
# Every decoder of untrusted bytes, fuzzed briefly (scripts/fuzz.sh 10m by hand).
"$REPO/scripts/fuzz.sh" 20000x
export MIGRATE_INTEGRATION=1 MIGRATE_BIN="$REPO/bin/migrate" MIGRATE_MEMLOAD="$REPO/bin/memload"
# -p 1: testbed tests check that the machine is left as they found it, so packages must
# not run their testbeds at the same time.
go test -tags "$GO_TAGS" -count=1 -p 1 -timeout 40m "$@" ./...
