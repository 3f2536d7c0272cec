#!/usr/bin/env bash
# Benchmark: `ctr run --rm` of busybox `true` through the gpucell shim, against
# `gpucell run` of the same image and against `ctr run --rm` with runc, side by side in
# one hyperfine run. Starts its own containerd (Debian's, fetched into target/containerd
# by scripts/fetch-containerd.sh) with the native snapshotter. Needs root, umoci,
# busybox-static, hyperfine and a guest built in $GPUCELL_STATE_DIR (default
# target/test-state). Writes bench/results/shim.md.
# Binaries: target/debug unless BIN_DIR names others (the VM and mkfs dominate; the
# build profile barely shows). Accelerator: GPUCELL_ACCEL, default tcg on the project's
# machines (see docs/shim.md), kvm on a real host.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
runs=${RUNS:-5}
bin=${BIN_DIR:-$repo/target/debug}
state=${GPUCELL_STATE_DIR:-$repo/target/test-state}
export GPUCELL_ACCEL=${GPUCELL_ACCEL:-tcg}
out=$repo/bench/results/shim.md

for tool in umoci hyperfine tar; do
    command -v "$tool" >/dev/null || { echo "bench/shim: $tool missing (scripts/install-deps.sh)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/shim: run as root (containerd)" >&2; exit 1; }
[ -f "$state/guest/default/manifest.json" ] || { echo "bench/shim: no guest in $state: run gpucell guest build" >&2; exit 1; }
[ -x "$bin/containerd-shim-gpucell-v1" ] && [ -x "$bin/gpucell" ] || \
    { echo "bench/shim: build first: cargo build -p gpucell -p gpucell-shim" >&2; exit 1; }
"$repo/scripts/fetch-containerd.sh" "$repo/target/containerd" >/dev/null
ctd=$repo/target/containerd/usr/bin

work=$(mktemp -d /tmp/gsb.XXXX)
cleanup() {
    [ -n "${ctd_pid:-}" ] && kill "$ctd_pid" 2>/dev/null && wait "$ctd_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/state"
ln -s "$state/guest" "$work/state/guest"
cat > "$work/config.toml" <<CFG
version = 2
root = "$work/root"
state = "$work/st"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/c.sock"
[ttrpc]
  address = "$work/c.sock.ttrpc"
CFG
PATH="$bin:$ctd:$PATH" GPUCELL_STATE_DIR="$work/state" \
    "$ctd/containerd" --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
ctd_pid=$!
for _ in $(seq 100); do "$ctd/ctr" -a "$work/c.sock" version >/dev/null 2>&1 && break; sleep 0.1; done

image=docker.io/library/gpucell-demo:latest
"$repo/scripts/make-demo-image.sh" "$work/oci" demo >/dev/null
python3 - "$work/oci/index.json" "$image" <<'PY'
import json, sys
p, name = sys.argv[1], sys.argv[2]
j = json.load(open(p))
for m in j["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = name
json.dump(j, open(p, "w"))
PY
tar -C "$work/oci" -cf "$work/image.tar" .
"$ctd/ctr" -a "$work/c.sock" images import --snapshotter native "$work/image.tar" >/dev/null

ctr="$ctd/ctr -a $work/c.sock run --rm --snapshotter native"
hyperfine --style basic --runs "$runs" --warmup 1 --export-markdown "$work/table.md" \
    -n "ctr run --rm, gpucell shim" "sh -c '$ctr --runtime io.containerd.gpucell.v1 $image b\$\$ true'" \
    -n "gpucell run" "$bin/gpucell --state-dir $work/state run oci:$work/oci:demo true" \
    -n "ctr run --rm, runc" "sh -c '$ctr $image b\$\$ true'"

{
    echo "# containerd shim benchmark"
    echo
    echo "\`ctr run --rm\` of busybox \`true\` (containerd $("$ctd/containerd" --version | awk '{print $3}'), native snapshotter)"
    echo "through containerd-shim-gpucell-v1, \`gpucell run\` of the same image, and runc; accelerator $GPUCELL_ACCEL;"
    echo "$runs runs after one warm-up; $(nproc) CPUs; $(date -u +%Y-%m-%dT%H:%MZ). bench/shim/run.sh."
    echo
    cat "$work/table.md"
} > "$out"
cat "$out"
