#!/usr/bin/env bash
# Run every fuzz test of a decoder of untrusted bytes for a while each.
#   scripts/fuzz.sh          20000 inputs each, a few seconds (CI, through scripts/test.sh)
#   scripts/fuzz.sh 10m      10 minutes each (by hand, before a release)
# CI counts inputs rather than time: with a duration, Go 1.26's fuzz coordinator may fail a
# target with a bare "context deadline exceeded" at the end (go.dev/issue/75804, fixed in
# Go 1.27), no input to blame.
# A failure leaves its input in the package's testdata/fuzz/FUZZNAME/: commit it with the
# fix, and it stays a seed for ever.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"
time=${1:-20000x}
targets=(
  ./pageserver:FuzzReceive ./pageserver:FuzzServe ./pages:FuzzDecodeMemory ./pages:FuzzDecode ./pages:FuzzDecodeRecords ./pages:FuzzParsePageMap ./pages:FuzzParseHashes ./pages:FuzzMemoryFile
  ./checkpoint:FuzzParseDumpStats ./volumes:FuzzDecode ./volumes:FuzzDecodePatch
  ./transfer:FuzzJournalEntry ./transfer:FuzzBodyReader ./transfer:FuzzPushEvents ./transfer:FuzzLazyIndex ./transfer:FuzzPrelude
)
for t in "${targets[@]}"; do
  pkg=${t%%:*} name=${t##*:}
  echo "fuzz: $pkg $name for $time" >&2
  go test -tags "$GO_TAGS" -run '^$' -fuzz "^${name}\$" -fuzztime "$time" -fuzzminimizetime 5s -timeout 2h "$pkg"
done
