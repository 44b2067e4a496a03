#!/usr/bin/env bash
# The downtime experiment: on a testbed whose links are shaped to 100 Mbit/s and 10 ms RTT,
# memory workloads of 64, 256 and 1024 MiB dirtying 1% and 10% of their memory a second,
# each serving a sockperf ping-pong client, are moved (a) the stock way (podman checkpoint
# --export, copy, podman restore --import), (b) by `migrate push --mode stop-copy`, (c) by
# `migrate push --memory-path archive` (pre-copy, pages in podman's archive), (d) by
# `migrate push --handover page-server` (pre-copy, the memory path: page server, lazy
# restore), (d') by `migrate push --handover read` (the default: the agent reads the
# frozen memory of CRIU's lazy dump, the target restores while podman finishes),
# (e) by `migrate push --postcopy`; then the same five moves of a Redis holding REDIS keys (1000000 by
# default; DEBUG POPULATE, values of 100 bytes), checked by the same run_id and dataset
# digest (DEBUG DIGEST) on the target. Writes results/experiment/experiment.{csv,svg} and
# prints ratio lines per configuration (pre-copy / stock, post-copy / stock). Takes about 45 minutes for
# SIZES=64,256,1024 DIRTY=1. Run as root.
#
#   SIZES=64,256 DIRTY=1 REDIS=0 scripts/experiment.sh     # a smaller matrix, no Redis
#   SIZES= scripts/experiment.sh                            # only the Redis moves
#   RATE=1000 SIZES=1024 CASES=precopy-read scripts/experiment.sh  # links at 1 Gbit/s (100 unless set)
#   CASES=precopy,postcopy scripts/experiment.sh            # only these cases (of stock,
#                                                           # stop-copy, precopy-archive, precopy, postcopy,
#                                                           # and precopy-read: push --handover read, the
#                                                           # default: the agent reads the frozen memory of
#                                                           # a lazy dump, the target restores early)
#   bin/migrate testbed report --out DIR RUN1.csv RUN2.csv   # merge runs, redraw, ratios
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "experiment.sh: run as root (it builds namespaces and runs podman)" >&2; exit 1; }
"$REPO/scripts/install.sh"
build_binaries
out="${OUT:-$REPO/results/experiment}"
mkdir -p "$out"
cd "$REPO"
MIGRATE_INTEGRATION=1 MIGRATE_BIN="$REPO/bin/migrate" MIGRATE_MEMLOAD="$REPO/bin/memload" \
MIGRATE_EXPERIMENT_SIZES="${SIZES-64,256,1024}" MIGRATE_EXPERIMENT_DIRTY="${DIRTY:-1,10}" MIGRATE_EXPERIMENT_OUT="$out" \
MIGRATE_EXPERIMENT_REDIS="${REDIS:-1000000}" MIGRATE_EXPERIMENT_CASES="${CASES:-}" MIGRATE_EXPERIMENT_RATE="${RATE:-100}" MIGRATE_AGENT_LOGS="$out" \
	go test -tags "$GO_TAGS" -count=1 -timeout 120m -run '^TestExperimentDowntime$' -v ./testbed/ 2>&1 |
	grep --line-buffered -v '^=== ' | tee "$out/experiment.log" | grep -E 'downtime|-copy / stock|results in|FAIL|PASS|ok '
echo "CSV: $out/experiment.csv  plot: $out/experiment.svg  log: $out/experiment.log"
