#!/usr/bin/env bash
# The node daemon, side by side in one run (docs/daemon.md):
#   1. list and status latency (p50, p99) and requests/s under CLIENTS concurrent
#      keep-alive clients on gpucelld's unix socket, against a trivial axum handler on the
#      same kind of socket (the floor);
#   2. deploy → the workload's first output through the daemon, against `gpucell run` to
#      its first output (same image, TCG), RUNS samples each, interleaved;
#   3. gpucelld's RSS idle and with SANDBOXES running sandboxes (and one supervisor's).
# Writes bench/results/daemon.md. Needs a built guest (`gpucell guest build`), umoci and
# busybox-static.
# usage: bench/daemon/run.sh  (env: PROFILE=debug|release, GPUCELL_STATE_DIR, RUNS,
#        CLIENTS, SECONDS_EACH, SANDBOXES, OUT)
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-release}
BIN=target/$PROFILE
SHARED=${GPUCELL_STATE_DIR:-/var/lib/gpucell}
RUNS=${RUNS:-5}
CLIENTS=${CLIENTS:-100}
SECONDS_EACH=${SECONDS_EACH:-5}
SANDBOXES=${SANDBOXES:-10}
OUT=${OUT:-bench/results/daemon.md}
flag=""; [ "$PROFILE" = release ] && flag=--release
cargo build $flag -p gpucell -p gpucell-daemon --bins --example bench_api >&2
for b in gpucell gpucelld examples/bench_api; do
    [ -x "$BIN/$b" ] || { echo "missing: $BIN/$b" >&2; exit 1; }
done
[ -f "$SHARED/guest/default/manifest.json" ] || { echo "no guest in $SHARED" >&2; exit 1; }

work=$(mktemp -d /tmp/gbXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in $(grep -l "$work" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
        kill -9 "$p" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
ln -s "$(realpath "$SHARED/guest")" "$work/guest"
IMAGE=$(scripts/make-demo-image.sh "$work/oci" demo | tail -n1)
export GPUCELL_ACCEL=tcg
"$BIN/gpucell" --state-dir "$work" run "$IMAGE" -- true   # the image disk, cached

"$BIN/gpucelld" --state-dir "$work" serve --socket "$work/d.sock" 2>"$work/d.log" &
pids+=($!); DPID=$!
"$BIN/examples/bench_api" floor "$work/floor.sock" & pids+=($!)
for _ in $(seq 100); do [ -S "$work/d.sock" ] && [ -S "$work/floor.sock" ] && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
RSS_IDLE=$(rss "$DPID")

# 1. One sandbox to ask about, then the latency runs.
"$BIN/gpucell" deploy --socket "$work/d.sock" --id probe --accel tcg -m 256m "$IMAGE" -- sleep 100000 >/dev/null
load() { "$BIN/examples/bench_api" load "$1" "$2" "$CLIENTS" "$SECONDS_EACH"; }
{
    load "$work/floor.sock" /
    load "$work/d.sock" /v1/sandboxes
    load "$work/d.sock" /v1/sandboxes/probe
} >"$work/load.jsonl"

# 2. Start latency, interleaved.
first_line_ms() {
    python3 - "$@" <<'PY'
import subprocess, sys, time
t = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
p.stdout.readline()
print(round((time.monotonic() - t) * 1000))
p.wait()
PY
}
for _ in $(seq "$RUNS"); do
    first_line_ms "$BIN/gpucell" --state-dir "$work" run "$IMAGE" -- sh -c 'echo started' >>"$work/run.txt"
    "$BIN/examples/bench_api" start "$work/d.sock" "$IMAGE" >>"$work/deploy.txt"
done

# 3. RSS with SANDBOXES sandboxes.
for i in $(seq 2 "$SANDBOXES"); do
    "$BIN/gpucell" deploy --socket "$work/d.sock" --id "s$i" --accel tcg -m 256m "$IMAGE" -- sleep 100000 >/dev/null
done
for _ in $(seq 600); do
    n=$("$BIN/gpucell" --json ps --socket "$work/d.sock" | grep -c '"state": "running"' || true)
    [ "$n" -ge "$SANDBOXES" ] && break
    sleep 1
done
RSS_FULL=$(rss "$DPID")
SUP=$(pgrep -f "supervise --dir $work/daemon/sandboxes/probe" | head -n1)
RSS_SUP=$(rss "$SUP")

python3 - "$work" "$OUT" "$PROFILE" "$CLIENTS" "$SECONDS_EACH" "$RUNS" "$SANDBOXES" "$n" "$RSS_IDLE" "$RSS_FULL" "$RSS_SUP" <<'PY'
import json, statistics, sys, datetime, platform, os
work, out, profile, clients, secs, runs, sandboxes, running, idle, full, sup = sys.argv[1:]
loads = [json.loads(l) for l in open(f"{work}/load.jsonl")]
run = [int(x) for x in open(f"{work}/run.txt").read().split()]
dep = [int(x) for x in open(f"{work}/deploy.txt").read().split()]
names = {"/": "floor: trivial axum handler", "/v1/sandboxes": "gpucelld GET /v1/sandboxes (1 sandbox)", "/v1/sandboxes/probe": "gpucelld GET /v1/sandboxes/{id}"}
lines = [
    "## Node daemon: API latency, deploy vs. run, memory",
    "",
    f"- Date: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs, kernel {platform.release()}; binaries: {profile} build",
    f"- Command: `PROFILE={profile} RUNS={runs} CLIENTS={clients} SECONDS_EACH={secs} SANDBOXES={sandboxes} bench/daemon/run.sh`",
    "",
    f"API: {clients} concurrent keep-alive clients on a unix socket, {secs} s each, back to back requests",
    "",
    "| target | requests/s | p50 | p99 | max |",
    "|---|---:|---:|---:|---:|",
]
for l in loads:
    lines.append(f"| {names[l['path']]} | {l['rps']:.0f} | {l['p50_ms']:.2f} ms | {l['p99_ms']:.2f} ms | {l['max_ms']:.2f} ms |")
mr, md = statistics.median(run), statistics.median(dep)
lines += [
    "",
    f"Start: time to the workload's first output line (`sh -c 'echo started'`, TCG, image cached), {runs} samples each, interleaved",
    "",
    "| path | median | min | max |",
    "|---|---:|---:|---:|",
    f"| `gpucell run` (process start → first stdout line) | {mr:.0f} ms | {min(run)} ms | {max(run)} ms |",
    f"| daemon (POST /v1/sandboxes → the line's log timestamp) | {md:.0f} ms | {min(dep)} ms | {max(dep)} ms |",
    "",
    f"- daemon / run: **{md / mr:.3f}x** (median)",
    "",
    f"Memory (VmRSS): gpucelld idle {int(idle)/1024:.1f} MiB; with {running} running sandboxes {int(full)/1024:.1f} MiB; one supervisor process {int(sup)/1024:.1f} MiB (each sandbox has one, plus its QEMU)",
]
text = "\n".join(lines) + "\n"
os.makedirs(os.path.dirname(out), exist_ok=True)
open(out, "w").write(text)
print(text)
PY
