#!/usr/bin/env bash
# Patch size against full size for linux/arm64 agent releases, and the
# time hangar release sign --delta-from takes to make each patch:
#   (a) a rebuild that changes only the version string,
#   (b) a small code change (the hangar_patchtest build tag),
#   (c) a dependency upgrade (fxamacker/cbor v2.9.0 -> the module's version),
# each from the same base. Needs the Go module proxy for (c).
# Usage: scripts/delta-sizes.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
PKG=github.com/hangarfleet/hangar
build() { # dir version tags out
	(cd "$1" && CGO_ENABLED=0 GOOS=linux GOARCH=arm64 go build -trimpath -tags "$3" \
		-ldflags "-s -w -X $PKG/agent.BuildVersion=$2 -X $PKG/agent.BuildTime=1795000000" -o "$4" ./agent/cmd/hangar-agent)
}
go build -o "$work/hangar" ./controlplane/cmd/hangar
"$work/hangar" release keygen --out "$work/release" --force >/dev/null

# The base: this tree, built against cbor v2.9.0 (so that (c) upgrades it).
old="$work/src-old"
rm -rf "$old" && mkdir -p "$old"
git ls-files -z | xargs -0 -I{} cp --parents {} "$old/"
(cd "$old" && go get github.com/fxamacker/cbor/v2@v2.9.0 >/dev/null 2>&1 && go mod tidy >/dev/null 2>&1)
build "$old" 1.0.0 "" "$work/agent-1.0.0"
build "$old" 1.0.1 "" "$work/agent-1.0.1-version"
build "$old" 1.0.1 hangar_patchtest "$work/agent-1.0.1-code"
build . 1.0.1 "" "$work/agent-1.0.1-deps"

for kind in version code deps; do
	new="$work/agent-1.0.1-$kind"
	echo "== $kind: $(stat -c %s "$new") bytes"
	"$work/hangar" release sign --key "$work/release.key" --artifact "$new" --version 1.0.1 --hardware rev-b \
		--arch arm64 --counter 2 --delta-from "$work/agent-1.0.0@1.0.0"
done
