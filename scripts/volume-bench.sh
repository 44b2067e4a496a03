#!/usr/bin/env bash
# Measure a container with a named volume (default 1 GiB, MIGRATE_VOLUME_MIB to change):
# its first move and the move back after 5% changed, with migrate and podman's own way,
# side by side on a 100 Mbit/s, 10 ms RTT testbed. By hand; about 6 minutes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "volume-bench.sh: run as root" >&2; exit 1; }
"$REPO/scripts/install.sh"
cd "$REPO"
build_binaries
mkdir -p results
export MIGRATE_INTEGRATION=1 MIGRATE_BIN="$REPO/bin/migrate" MIGRATE_MEMLOAD="$REPO/bin/memload" MIGRATE_VOLUME_BENCH="${MIGRATE_VOLUME_BENCH:-1}"
go test -tags "$GO_TAGS" -count=1 -timeout 40m -run '^TestVolumeMoveVersusStock$' -v ./testbed 2>&1 | tee results/volume-bench.log | grep -E 'migrate |stock |^(ok|FAIL)|--- '
