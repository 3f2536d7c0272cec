#!/usr/bin/env bash
# Makes the first-run benchmark's image, without network: the demo image's busybox layer
# (scripts/make-demo-image.sh, so `-- true` runs) and LAYERS layers of LAYER_MB MB of
# incompressible data each (/dev/urandom), one `umoci repack` per layer.
# usage: make-image.sh LAYOUT_DIR   (env: LAYERS, default 4; LAYER_MB, default 50)
set -euo pipefail
layout=${1:?usage: make-image.sh LAYOUT_DIR}
layers=${LAYERS:-4}
layer_mb=${LAYER_MB:-50}
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$repo/scripts/make-demo-image.sh" "$layout" first-run >/dev/null
umoci unpack --image "$layout:first-run" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/data"
for i in $(seq "$layers"); do
    head -c "${layer_mb}M" /dev/urandom > "$work/bundle/rootfs/data/layer-$i.bin"
    umoci repack --refresh-bundle --image "$layout:first-run" "$work/bundle" >/dev/null
done
umoci gc --layout "$layout"
echo "$layout:first-run: busybox + $layers x ${layer_mb} MB of random data" >&2
