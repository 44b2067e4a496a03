#!/usr/bin/env bash
# Set up this host (scripts/install.sh), build migrate, and run the demo: a testbed with
# hosts a and b and a client; a container on a serves an iperf3 stream to the client and
# moves to b mid-stream. Prints the downtime the client saw, the bytes moved and whether
# the connection survived. Run as root. Extra arguments go to `migrate demo`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it builds namespaces and runs podman)" >&2; exit 1; }
"$REPO/scripts/install.sh"
build_binaries
exec "$REPO/bin/migrate" demo "$@"
