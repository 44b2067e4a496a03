#!/usr/bin/env bash
# trace-execs.sh: run a command (a test, an experiment) with the kernel's process events
# traced, then print when podman, conmon, runc, CRIU and the helpers CRIU runs (tar, gzip,
# ip, iptables) started and ended, in microseconds. This is how the frozen phase's fixed
# costs beneath podman were found: each CRIU, runc or tar started costs milliseconds here.
#
#   scripts/trace-execs.sh OUT.txt -- go test -tags "$GO_TAGS" -run 'TestPushSockperfPingPong$' ./testbed/
#
# Run by hand, as root, with nothing else tracing: it uses the global trace buffer of
# tracefs (mounted for the run if it is not, and unmounted after). The raw trace is OUT.txt;
# the summary goes to stdout.
set -euo pipefail

if [[ $# -lt 3 || $2 != "--" ]]; then
	echo "usage: $0 OUT.txt -- command [args...]" >&2
	exit 2
fi
out=$1
shift 2
[[ $(id -u) == 0 ]] || { echo "trace-execs: run as root (tracefs)" >&2; exit 1; }

tr=/sys/kernel/tracing
mounted=
if [[ ! -e $tr/trace ]]; then
	mount -t tracefs nodev "$tr"
	mounted=1
fi
events=(sched/sched_process_exec sched/sched_process_exit sched/sched_process_fork)
cleanup() {
	echo 0 >"$tr/tracing_on"
	for e in "${events[@]}"; do echo 0 >"$tr/events/$e/enable"; done
	echo >"$tr/trace"
	if [[ -n $mounted ]]; then umount "$tr"; fi
}
trap cleanup EXIT

echo 0 >"$tr/tracing_on"
echo >"$tr/trace"
echo 16384 >"$tr/buffer_size_kb"
for e in "${events[@]}"; do echo 1 >"$tr/events/$e/enable"; done
echo 1 >"$tr/tracing_on"
rc=0
"$@" || rc=$?
echo 0 >"$tr/tracing_on"
cp "$tr/trace" "$out"

# A line per exec of the tools that make the frozen phase, with how long it ran: until its
# first thread exits (for a multi-threaded program, exit_group ends the others with it).
awk '
/sched_process_exec:/ {
	t = ""; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1) }
	f = ""; p = ""
	for (i = 1; i <= NF; i++) { if ($i ~ /^filename=/) f = substr($i, 10); if ($i ~ /^pid=/) p = substr($i, 5) }
	n = f; sub(/.*\//, "", n)
	if (n ~ /^(podman|conmon|runc|criu|tar|gzip|ip|iptables-save|ip6tables-save|iptables-restore|nft)$/) {
		start[p] = t; name[p] = n
	}
}
/sched_process_exit:/ {
	t = ""; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1) }
	p = ""; for (i = 1; i <= NF; i++) if ($i ~ /^pid=/) p = substr($i, 5)
	if (p in start) {
		printf "%.6f  %-14s pid %-8s %8.1f ms\n", start[p], name[p], p, (t - start[p]) * 1000
		delete start[p]
	}
}
END { for (p in start) printf "%.6f  %-14s pid %-8s  still running\n", start[p], name[p], p }
' "$out" | sort -n
exit $rc
