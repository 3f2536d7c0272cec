#!/usr/bin/env bash
# Benchmark: a ~200 MB multi-layer OCI image turned into the guest filesystem image by
# gpucell (cold: empty store; cached: second run) side by side with
# `umoci unpack` + `mkfs.erofs` (and + `mkfs.ext4 -d`) on the same image, in one
# hyperfine run. Writes bench/results/image.md. Needs root (umoci unpack keeps owners).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
runs=${RUNS:-7}
work=${BENCH_WORK:-/var/tmp/gpucell-bench-image}
target=${CARGO_TARGET_DIR:-$repo/target}
mkdir -p "$work"

for tool in umoci mkfs.erofs mkfs.ext4 hyperfine python3; do
    command -v "$tool" >/dev/null || { echo "bench/image: $tool missing (scripts/install-deps.sh)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/image: run as root (both pipelines keep file owners)" >&2; exit 1; }

(cd "$repo" && cargo build --release -p gpucell --quiet)
bin="$target/release/gpucell"
layout="$work/layout"
[ -f "$layout/index.json" ] || "$here/make-image.sh" "$layout"
ref="oci:$layout:bench"
image_mb=$(du -sm "$layout/blobs" | cut -f1)

# Warm the page cache for the source blobs so every command starts from the same state.
cat "$layout"/blobs/sha256/* >/dev/null

# ext4 image size for the baseline: unpacked size + 30%.
umoci unpack --image "$layout:bench" "$work/probe" >/dev/null
tree_mb=$(du -sm "$work/probe/rootfs" | cut -f1)
ext4_mb=$(( tree_mb * 13 / 10 + 32 ))
rm -rf "$work/probe"

# Cached state, built once before measuring.
rm -rf "$work/cached"
"$bin" --state-dir "$work/cached" image disk "$ref" >/dev/null
GPUCELL_IMAGE_FS=ext4 "$bin" --state-dir "$work/cached" image disk "$ref" >/dev/null

# hyperfine pairs the N --prepare options with the N commands in order.
hyperfine --style basic --runs "$runs" --warmup 1 --export-json "$work/results.json" \
    --prepare "rm -rf $work/cold" \
    --prepare "rm -rf $work/b $work/out.erofs" \
    --prepare "rm -rf $work/cold" \
    --prepare "rm -rf $work/b $work/out.ext4" \
    --prepare "true" \
    --prepare "true" \
    -n "gpucell cold (erofs)" "$bin --state-dir $work/cold image disk $ref" \
    -n "umoci unpack + mkfs.erofs" \
        "umoci unpack --image $layout:bench $work/b >/dev/null && mkfs.erofs --quiet $work/out.erofs $work/b/rootfs" \
    -n "gpucell cold (ext4)" "GPUCELL_IMAGE_FS=ext4 $bin --state-dir $work/cold image disk $ref" \
    -n "umoci unpack + mkfs.ext4 -d" \
        "umoci unpack --image $layout:bench $work/b >/dev/null && mkfs.ext4 -q -F -O ^has_journal -d $work/b/rootfs $work/out.ext4 ${ext4_mb}M" \
    -n "gpucell cached (erofs)" "$bin --state-dir $work/cached image disk $ref" \
    -n "gpucell cached (ext4)" "GPUCELL_IMAGE_FS=ext4 $bin --state-dir $work/cached image disk $ref"

# What `gpucell run` waits for: import + guest_disk inside the process, from the logs
# (the unpack tree is then deleted in the background while the VM boots).
: > "$work/inproc.txt"
for _ in $(seq "$runs"); do
    rm -rf "$work/cold"; sync
    RUST_LOG=info "$bin" --state-dir "$work/cold" image disk "$ref" 2>&1 >/dev/null \
        | sed 's/\x1b\[[0-9;]*m//g' | grep -oE '(image imported|guest disk built).*elapsed_ms=[0-9]+' \
        | sed -E 's/^(image imported|guest disk built).*elapsed_ms=([0-9]+)/\1 \2/' >> "$work/inproc.txt"
done

erofs_size=$(stat -c %s "$work"/cached/images/disks/*.erofs)
ext4_size=$(stat -c %s "$work"/cached/images/disks/*.ext4)
rm -rf "$work/cold" "$work/b" "$work/out.erofs" "$work/out.ext4"

python3 "$here/report.py" "$work/results.json" --layout "$layout" \
    --image-mb "$image_mb" --tree-mb "$tree_mb" \
    --erofs-size "$erofs_size" --ext4-size "$ext4_size" --inproc "$work/inproc.txt" > "$repo/bench/results/image.md"
cat "$repo/bench/results/image.md"
