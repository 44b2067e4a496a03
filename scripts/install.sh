#!/usr/bin/env bash
# Make this host ready to run migrate: Podman + runc + conmon, a CRIU that can
# checkpoint on *this* kernel, Open vSwitch, iperf3, sockperf and the testbed's tools.
#
# Idempotent: every step first checks, and changes the host only where the check fails.
# On a host that is already ready it takes a few seconds and changes nothing.
# Every change is printed with the reason, and summarised at the end.
#
# Run as root on Debian or Ubuntu.  Environment:
#   MIGRATE_CRIU_MIN      lowest acceptable CRIU version (default 4.2)
#   MIGRATE_FORCE_CRIU_BUILD=1   build CRIU from source even if a usable one exists
set -euo pipefail

CRIU_MIN=${MIGRATE_CRIU_MIN:-4.2}
LIBEXEC=/usr/local/libexec/migrate
CRIU_LINK=/usr/local/sbin/criu          # earlier in PATH than /usr/sbin
CRIU_REAL=$LIBEXEC/criu                 # the binary we built (if we had to)
SRC_DIR=/var/cache/migrate/criu-src
CONF=/etc/containers/containers.conf
MARK="# managed by migrate scripts/install.sh"

changes=()
log()     { printf 'install: %s\n' "$*" >&2; }
changed() { changes+=("$*"); printf 'install: CHANGED: %s\n' "$*" >&2; }
die()     { printf 'install: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and configures podman)"
# shellcheck disable=SC1091
. /etc/os-release
case " ${ID:-} ${ID_LIKE:-} " in
  *" debian "*|*" ubuntu "*) ;;
  *) die "unsupported distribution '${ID:-unknown}': this script knows Debian and Ubuntu" ;;
esac

# version_ge A B: A >= B (dotted numbers)
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# ---------------------------------------------------------------- packages
PKGS=(podman runc conmon containers-storage iproute2 iputils-ping netcat-openbsd ethtool util-linux procps psmisc
      openvswitch-switch openvswitch-common iperf3 sockperf busybox-static
      redis-server redis-tools nginx-light postgresql-15 gcc libc6-dev
      tar xz-utils zstd ca-certificates nftables iptables)
apt_updated=0
apt_update() {
  [ "$apt_updated" = 1 ] && return
  log "apt-get update"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt_updated=1
}
missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s\n' "$p"
  done
}
apt_install() {
  local miss
  mapfile -t miss < <(missing_pkgs "$@")
  [ "${#miss[@]}" -eq 0 ] && return 0
  apt_update
  log "apt-get install ${miss[*]}"
  # Package scripts must not start system daemons (openvswitch-switch would try to start a
  # kernel-datapath OVS, iperf3 a server): migrate and its testbed start their own.
  local policy=/usr/sbin/policy-rc.d had_policy=0
  [ -e "$policy" ] && had_policy=1
  if [ "$had_policy" = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${miss[@]}" \
    >/tmp/migrate-apt.log 2>&1 || rc=$?
  [ "$had_policy" = 0 ] && rm -f "$policy"
  [ "$rc" = 0 ] || { tail -n 30 /tmp/migrate-apt.log >&2; die "apt-get install ${miss[*]} failed (log: /tmp/migrate-apt.log)"; }
  changed "installed packages: ${miss[*]}"
}
apt_install "${PKGS[@]}"

# ---------------------------------------------------------------- Go toolchain
GO=$(command -v go || true)
[ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; }
[ -n "$GO" ] || die "no Go toolchain: install Go >= 1.24 (e.g. to /usr/local/go) to build migrate"
gov=$("$GO" env GOVERSION | sed 's/^go//')
version_ge "$gov" 1.24 || die "Go $gov is too old: migrate needs Go >= 1.24"

# ---------------------------------------------------------------- CRIU
criu_version() { "$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1; }

# probe_criu BIN [ENV...]: a bounded checkpoint + restore of a sleep process.
# Returns 0 when it works, 124 when the dump hangs (the VM has no hardware breakpoints), 1 otherwise.
probe_criu() {
  local bin=$1; shift
  local d pid rc=0
  d=$(mktemp -d /tmp/migrate-criu-probe.XXXXXX)
  setsid sleep 300 </dev/null >/dev/null 2>&1 &
  pid=$!
  sleep 0.2
  timeout 20 env "$@" "$bin" dump -t "$pid" -D "$d" -o dump.log -v4 >/dev/null 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    kill -9 "$pid" 2>/dev/null || true; { wait "$pid"; } 2>/dev/null || true
    [ "$rc" = 124 ] || { log "probe dump with $bin failed (rc=$rc): $(grep -m3 Error "$d/dump.log" 2>/dev/null | tr '\n' ' ')"; rc=1; }
    rm -rf "$d"; return "$rc"
  fi
  { wait "$pid"; } 2>/dev/null || true      # reap it, so the PID is free for the restore
  if ! timeout 20 env "$@" "$bin" restore -D "$d" -d --pidfile "$d/restored.pid" -o restore.log -v4 >/dev/null 2>&1; then
    log "probe restore with $bin failed: $(grep -m3 Error "$d/restore.log" 2>/dev/null | tr '\n' ' ')"
    rm -rf "$d"; return 1
  fi
  kill -9 "$(cat "$d/restored.pid")" 2>/dev/null || true
  rm -rf "$d"
  return 0
}

# criu_usable BIN: version >= CRIU_MIN, `criu check` passes, and a probe dump/restore works.
criu_usable() {
  local bin=$1 v
  [ -x "$bin" ] || return 1
  v=$(criu_version "$bin")
  [ -n "$v" ] || { log "$bin does not start: $("$bin" --version 2>&1 | head -n2 | tr '\n' ' ')"; return 1; }
  version_ge "$v" "$CRIU_MIN" || { log "$bin is CRIU $v; need >= $CRIU_MIN (older ones cannot dump TCP sockets or start on kernels >= 6.13)"; return 1; }
  timeout 30 "$bin" check >/dev/null 2>&1 || { log "$bin check fails: $("$bin" check 2>&1 | tail -n2 | tr '\n' ' ')"; return 1; }
  probe_criu "$bin" || return 1
}

build_criu() {
  apt_install dpkg-dev build-essential libbsd-dev libcap-dev libgnutls28-dev libnet1-dev \
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev pkgconf protobuf-c-compiler \
    protobuf-compiler python3-protobuf uuid-dev
  local src=/etc/apt/sources.list.d/migrate-sid-src.sources uri keyring
  # Same Debian host and keyring as this host's own entries.
  uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n1)
  uri=${uri:-http://deb.debian.org/debian}
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  mkdir -p "$SRC_DIR"
  local orig
  orig=$(ls "$SRC_DIR"/criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n1 || true)
  if [ -z "$orig" ]; then
    log "fetching CRIU source from Debian sid (deb-src only; no binary packages from sid)"
    printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: %s\n' "$uri" "$keyring" >"$src"
    apt_updated=0; apt_update
    # Only the upstream .orig tarball is used; a missing Debian diff (seen: 404) is harmless.
    (cd "$SRC_DIR" && apt-get source --download-only criu >/tmp/migrate-criu-src.log 2>&1) || true
    rm -f "$src"       # leave the host's apt sources as they were
    orig=$(ls "$SRC_DIR"/criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$orig" ] || { tail -n 20 /tmp/migrate-criu-src.log >&2; die "apt-get source criu did not fetch the CRIU source tarball"; }
  fi
  local ver
  ver=$(basename "$orig" | sed -E 's/^criu_([0-9.]+)\.orig.*/\1/')
  version_ge "$ver" "$CRIU_MIN" || die "Debian's newest CRIU source is $ver, need >= $CRIU_MIN"
  log "building CRIU $ver (about a minute)"
  rm -rf "$SRC_DIR/build"; mkdir -p "$SRC_DIR/build"
  tar -C "$SRC_DIR/build" --strip-components=1 -xf "$orig"
  make -C "$SRC_DIR/build" -j"$(nproc)" criu >/tmp/migrate-criu-build.log 2>&1 || {
    tail -n 30 /tmp/migrate-criu-build.log >&2; die "building CRIU failed (log: /tmp/migrate-criu-build.log)"; }
  install -D -m 755 "$SRC_DIR/build/criu/criu" "$CRIU_REAL"
  changed "built CRIU $ver from Debian's source package into $CRIU_REAL (the distribution's CRIU cannot checkpoint on kernel $(uname -r))"
}

# install_criu_entry BIN: put BIN behind $CRIU_LINK, wrapped with CRIU_FAULT=130 when the
# VM has no working hardware breakpoints (the probe dump hangs without it).
install_criu_entry() {
  local bin=$1 want rc=0
  probe_criu "$bin" || rc=$?
  if [ "$rc" = 0 ]; then
    want="link"
  elif [ "$rc" = 124 ] && probe_criu "$bin" CRIU_FAULT=130; then
    want="wrapper"
  else
    die "CRIU at $bin cannot checkpoint a process on this kernel, with or without CRIU_FAULT=130"
  fi
  mkdir -p "$(dirname "$CRIU_LINK")"
  if [ "$want" = link ]; then
    ln -sfn "$bin" "$CRIU_LINK"
    changed "$CRIU_LINK -> $bin"
  else
    cat >"$CRIU_LINK.tmp" <<EOF
#!/bin/sh
$MARK
# This host has no working hardware breakpoints: a plain 'criu dump' hangs in the parasite
# stage. CRIU_FAULT=130 is CRIU's own switch to do without them.
export CRIU_FAULT=130
exec $bin "\$@"
EOF
    chmod 755 "$CRIU_LINK.tmp"; mv -f "$CRIU_LINK.tmp" "$CRIU_LINK"
    changed "$CRIU_LINK wraps $bin with CRIU_FAULT=130 (a probe dump hung without it: no hardware breakpoints)"
  fi
}

if [ "${MIGRATE_FORCE_CRIU_BUILD:-0}" != 1 ] && criu_usable "$CRIU_LINK"; then
  log "CRIU ready: $CRIU_LINK ($(criu_version "$CRIU_LINK"))"
else
  cand=""
  for c in "$CRIU_REAL" /usr/sbin/criu /usr/bin/criu; do
    [ "${MIGRATE_FORCE_CRIU_BUILD:-0}" = 1 ] && break
    [ -x "$c" ] || continue
    v=$(criu_version "$c")
    if [ -n "$v" ] && version_ge "$v" "$CRIU_MIN" && timeout 30 "$c" check >/dev/null 2>&1; then cand=$c; break; fi
    log "not using $c (version '${v:-does not start}', need >= $CRIU_MIN and a passing 'criu check')"
  done
  if [ -z "$cand" ]; then build_criu; cand=$CRIU_REAL; fi
  install_criu_entry "$cand"
  criu_usable "$CRIU_LINK" || die "CRIU at $CRIU_LINK still fails its probe"
fi
if ! "$CRIU_LINK" check --feature mem_dirty_track >/dev/null 2>&1; then
  log "note: no soft-dirty tracking on this kernel: pre-copy uses hash-based deltas, not criu pre-dump"
fi

# ---------------------------------------------------------------- Podman configuration
# Decide, by detection, what this host needs in containers.conf.
engine=(); containers=()
if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ]; then
  engine+=('runtime = "runc"')   # crun 1.8 fails on cgroup v1/hybrid layouts
fi
if [ ! -d /run/systemd/system ]; then
  engine+=('cgroup_manager = "cgroupfs"' 'events_logger = "file"')
  containers+=('log_driver = "k8s-file"')
fi
capbnd=$(awk '/^CapBnd:/{print $2}' /proc/self/status)
if (( (16#$capbnd >> 24 & 1) == 0 )); then
  # CAP_SYS_RESOURCE is not in the bounding set: containers cannot raise rlimits, so podman's
  # default ulimits for root would make every container fail to start.
  hn=$(ulimit -Hn); hu=$(ulimit -Hu)
  [ "$hn" = unlimited ] && hn=1048576; [ "$hu" = unlimited ] && hu=4194304
  nofile=$(( hn < 1024 ? hn : 1024 )); nproc=$(( hu < 4096 ? hu : 4096 ))
  containers+=("default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]")
fi
want_conf() {
  echo "$MARK"
  echo "# Detected: cgroup fs $(stat -fc %T /sys/fs/cgroup), systemd $([ -d /run/systemd/system ] && echo yes || echo no), CapBnd $capbnd"
  echo "[containers]"; printf '%s\n' "${containers[@]}"
  echo "[engine]";     printf '%s\n' "${engine[@]}"
}
if [ "${#engine[@]}" -gt 0 ] || [ "${#containers[@]}" -gt 0 ]; then
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    log "WARNING: $CONF exists and is not managed by migrate; make sure it has:"
    want_conf | sed 's/^/    /' >&2
  elif ! cmp -s <(want_conf) "$CONF" 2>/dev/null; then
    mkdir -p "$(dirname "$CONF")"
    want_conf >"$CONF"
    changed "wrote $CONF: ${engine[*]} ${containers[*]}"
  fi
fi

# ---------------------------------------------------------------- kernel settings
# CRIU's lazy dump (post-copy) moves a process's pages through pipes of up to 64 MiB.
# Without CAP_SYS_RESOURCE in the bounding set a pipe cannot grow past fs.pipe-max-size
# (1 MiB by default), and the dump fails with "page-pipe: tee: Operation not permitted".
PIPE_MAX=$((64 << 20))
SYSCTL_CONF=/etc/sysctl.d/90-migrate.conf
capbnd_now=$(awk '/^CapBnd:/{print $2}' /proc/self/status)
if (( (16#$capbnd_now >> 24 & 1) == 0 )); then
  cur=$(cat /proc/sys/fs/pipe-max-size)
  if [ "$cur" -lt "$PIPE_MAX" ]; then
    sysctl -qw "fs.pipe-max-size=$PIPE_MAX" || die "cannot raise fs.pipe-max-size to $PIPE_MAX"
    changed "fs.pipe-max-size $cur -> $PIPE_MAX (no CAP_SYS_RESOURCE: CRIU's lazy dump needs pipes that large)"
  fi
  want_sysctl=$(printf '%s\nfs.pipe-max-size = %s\n' "$MARK" "$PIPE_MAX")
  if [ "$(cat "$SYSCTL_CONF" 2>/dev/null)" != "$want_sysctl" ]; then
    mkdir -p "$(dirname "$SYSCTL_CONF")"
    printf '%s\n' "$want_sysctl" >"$SYSCTL_CONF"
    changed "wrote $SYSCTL_CONF (fs.pipe-max-size across reboots)"
  fi
fi

# ---------------------------------------------------------------- summary
if [ "${#changes[@]}" -eq 0 ]; then
  log "host is ready; nothing changed"
else
  log "host is ready; ${#changes[@]} change(s):"
  printf '  - %s\n' "${changes[@]}" >&2
fi
