#!/usr/bin/env bash
# The whole fault matrix (by hand; CI runs a subset through scripts/test.sh): an agent
# killed or a step failing at every point of a move, the operator killed; after each, the
# container must run on exactly one host, intact, with its connection, and nothing left
# over. Prints the table of outcomes; the whole log goes to results/faults.log. About 3
# minutes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "faults.sh: run as root" >&2; exit 1; }
"$REPO/scripts/install.sh"
cd "$REPO"
build_binaries
mkdir -p results
export MIGRATE_INTEGRATION=1 MIGRATE_BIN="$REPO/bin/migrate" MIGRATE_MEMLOAD="$REPO/bin/memload" MIGRATE_FAULT_MATRIX=full
go test -tags "$GO_TAGS" -count=1 -timeout 30m -run '^TestFaultMatrix$' -v ./testbed 2>&1 | tee results/faults.log | grep -E 'fault matrix:|^\s*--- |^(ok|FAIL)'
