# Shared by the scripts: build settings and helpers. Source it, don't run it.
# Build tags the containers libraries need for a pure-Go remote client (no gpgme, btrfs or
# devicemapper headers).
GO_TAGS="remote exclude_graphdriver_btrfs btrfs_noversion exclude_graphdriver_devicemapper containers_image_openpgp"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="/usr/local/sbin:/usr/local/bin:/usr/local/go/bin:$PATH"
export GOFLAGS="${GOFLAGS:--mod=mod}"

# build_binaries: bin/migrate and bin/memload (static, so they also run inside containers).
build_binaries() {
  (cd "$REPO" && CGO_ENABLED=0 go build -tags "$GO_TAGS" -o bin/migrate ./cmd/migrate \
    && CGO_ENABLED=0 go build -o bin/memload ./testbed/memload)
}
