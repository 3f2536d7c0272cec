#!/usr/bin/env bash
# Makes a ~200 MB, 4+ layer OCI image from this machine's /usr, without network, with
# umoci: one `umoci repack` per directory copied in. Usage: make-image.sh LAYOUT_DIR
set -euo pipefail
layout=${1:?usage: make-image.sh LAYOUT_DIR}
target_mb=${TARGET_MB:-200}
candidates=(/usr/lib/python3.11 /usr/lib/python3 /usr/libexec /usr/share/vim /usr/share/perl
            /usr/share/icons /usr/lib/gcc /usr/share/man /usr/share/locale /usr/bin)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$layout:bench"
umoci unpack --image "$layout:bench" "$work/bundle" >/dev/null
total=0
layers=0
for dir in "${candidates[@]}"; do
    [ -d "$dir" ] || continue
    mb=$(du -sm "$dir" | cut -f1)
    mkdir -p "$work/bundle/rootfs$(dirname "$dir")"
    cp -a "$dir" "$work/bundle/rootfs$(dirname "$dir")/"
    umoci repack --refresh-bundle --image "$layout:bench" "$work/bundle"
    total=$((total + mb))
    layers=$((layers + 1))
    echo "layer $layers: $dir (${mb} MB), total ${total} MB" >&2
    if [ "$total" -ge "$target_mb" ] && [ "$layers" -ge 4 ]; then
        break
    fi
done
umoci config --image "$layout:bench" --os linux --architecture amd64 --config.cmd /bin/sh
echo "$layout:bench: $layers layers, ${total} MB unpacked" >&2
