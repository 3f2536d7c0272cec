#!/usr/bin/env bash
# NVIDIA driver flavour benchmarks (BENCHMARKS.md, "NVIDIA driver flavours"):
#   1. cold build of FLAVOUR into an empty state dir (downloads, compile, disk), then
#      the cached rebuild;
#   2. sizes of the parts from the manifest;
#   3. the boot cost the flavour adds to a GPU-less `gpucell run -- true` (hyperfine,
#      default vs FLAVOUR, same image), under GPUCELL_ACCEL (default tcg).
# Usage: bench/flavours/run.sh [FLAVOUR]   (needs `make agent`, `cargo build -p gpucell`)
set -euo pipefail
# Boot cost without a network (the network bench, bench/net, measures that).
export GPUCELL_NETWORK=${GPUCELL_NETWORK:-none}
cd "$(dirname "$0")/../.."
FLAVOUR=${1:-nvidia-550}
GPUCELL=${GPUCELL:-target/debug/gpucell}
AGENT=${AGENT:-target/x86_64-unknown-linux-gnu/release/gpucell-agent}
WORK=${BENCH_WORK:-$(mktemp -d /tmp/gpucell-bench-flavours.XXXXXX)}
OUT=bench/results/flavours-$(date -u +%Y%m%dT%H%M%S).txt
RUNS=${RUNS:-6}
export GPUCELL_ACCEL=${GPUCELL_ACCEL:-tcg}
{
    echo "date: $(date -u '+%F %T UTC'); machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r)"
    echo "== cold build of $FLAVOUR into $WORK/state"
    /usr/bin/time -f "cold: %e s wall, %U s user, %S s sys" \
        "$GPUCELL" --state-dir "$WORK/state" guest build --flavour "$FLAVOUR" --agent "$AGENT" 2>&1 |
        grep -E 'compile: done|disk built|cold:'
    /usr/bin/time -f "cached: %e s wall" \
        "$GPUCELL" --state-dir "$WORK/state" guest build --flavour "$FLAVOUR" --agent "$AGENT" 2>&1 | grep cached:
    "$GPUCELL" --state-dir "$WORK/state" guest build --agent "$AGENT" >/dev/null
    echo "== sizes (bytes)"
    jq -c '.driver.sizes' "$WORK/state/guest/$FLAVOUR/manifest.json"
    echo "== GPU-less run: default vs $FLAVOUR"
    scripts/make-demo-image.sh "$WORK/img" >/dev/null
    R="$GPUCELL --state-dir $WORK/state run"
    hyperfine -w 1 -r "$RUNS" -N "$R --guest default oci:$WORK/img:demo true" \
        "$R --guest $FLAVOUR oci:$WORK/img:demo true" 2>&1 | grep -E 'Benchmark|Time|Range'
} | tee "$OUT"
echo "written to $OUT (work dir $WORK kept: remove it when done)"
