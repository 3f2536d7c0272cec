#!/usr/bin/env bash
# An image's first run: `gpucell run REGISTRY/IMAGE -- true` of an image not yet in the
# store (a fresh state directory per run, the guest hard-linked in), streamed
# (GPUCELL_IMAGE_STREAM=1: layers unpacked while later ones download, the disk written
# in the same pass) side by side with the sequential path (=0: download all, unpack all,
# write). The image (bench/first-run/make-image.sh): busybox + 4 x 50 MB of random data.
# It is served by bench/first-run/registry.py over plain HTTP on 127.0.0.1 inside a
# network namespace this script makes (`unshare -n`, only `lo` up): nothing leaves the
# machine. RATES lists the registry's bandwidths to measure, in bytes/s (0: loopback,
# uncapped). Rounds alternate the two modes. Reports the run report's phases (`image`,
# time to process start = `spawn` + `agent_ready` + `process_start`), medians and
# spreads, and the layer-by-layer timeline of one run of each mode (from the store's
# `layer fetched` / `layer unpacked` / `disk written` log lines).
# Writes bench/results/first-run.md. Needs root, python3, umoci, busybox-static, a
# release gpucell and a guest in the state dir.
# usage: bench/first-run/run.sh   (env: GPUCELL, GPUCELL_STATE_DIR, RUNS, RATES, ACCEL,
#                                  BENCH_WORK, OUT)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "bench/first-run: run as root (unshare -n)" >&2; exit 1; }
GPUCELL=${GPUCELL:-$( [ -x target/release/gpucell ] && echo target/release/gpucell || echo target/debug/gpucell )}
STATE=${GPUCELL_STATE_DIR:-$PWD/target/test-state}
WORK=${BENCH_WORK:-/var/tmp/gpucell-bench-first-run}
export RUNS=${RUNS:-7} RATES=${RATES:-0 125000000 12500000} ACCEL=${ACCEL:-tcg}
export OUT=${OUT:-$PWD/bench/results/first-run.md}
for t in python3 umoci unshare ip "$GPUCELL"; do
    command -v "$t" >/dev/null || { echo "bench/first-run: missing $t" >&2; exit 1; }
done
[ -f "$STATE/guest/default/vmlinux" ] || { echo "no guest in $STATE: run $GPUCELL --state-dir $STATE guest build" >&2; exit 1; }

if [ -z "${FIRST_RUN_NETNS:-}" ]; then
    mkdir -p "$WORK"
    [ -f "$WORK/layout/index.json" ] || bench/first-run/make-image.sh "$WORK/layout"
    FIRST_RUN_NETNS=1 exec unshare -n "$0" "$@"
fi

ip link set lo up
exec python3 - "$GPUCELL" "$STATE" "$WORK" <<'PY'
import datetime, json, os, platform, re, shutil, statistics, subprocess, sys, time
gpucell, state, work = sys.argv[1:]
gpucell = os.path.abspath(gpucell)
runs, accel, out = int(os.environ["RUNS"]), os.environ["ACCEL"], os.environ["OUT"]
rates = [int(r) for r in os.environ["RATES"].split()]
layout = f"{work}/layout"
image = "127.0.0.1:5000/bench/first-run:first-run"
blob_mb = sum(os.path.getsize(os.path.join(layout, "blobs/sha256", f))
              for f in os.listdir(f"{layout}/blobs/sha256")) / 1e6

def fresh_state(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    subprocess.run(["cp", "-al", f"{state}/guest", f"{path}/guest"], check=True)
    if os.path.isdir(f"{state}/cache"):
        subprocess.run(["cp", "-a", f"{state}/cache", f"{path}/cache"], check=True)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EVENT = re.compile(r"(layer fetched|layer unpacked|disk written).*\bms=(\d+)")
INDEX = re.compile(r"\bindex=(\d+)")

def once(mode):
    path = f"{work}/state-{mode}"
    fresh_state(path)
    env = dict(os.environ, GPUCELL_IMAGE_STREAM="1" if mode == "streamed" else "0",
               GPUCELL_REGISTRY_INSECURE="1", GPUCELL_ACCEL=accel, GPUCELL_NETWORK="none",
               RUST_LOG="gpucell_image=info")
    t0 = time.monotonic()
    p = subprocess.run([gpucell, "--state-dir", path, "--json", "run", image, "--", "true"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    err = ANSI.sub("", p.stderr)
    if p.returncode != 0:
        sys.exit(f"gpucell run ({mode}) failed ({p.returncode}): {err[-3000:]}")
    rep = json.JSONDecoder().raw_decode(err[err.index('{\n'):])[0]
    t = rep["timings_ms"]
    events = []
    for line in err.splitlines():
        m = EVENT.search(line)
        if m:
            i = INDEX.search(line)
            events.append((int(m.group(2)), m.group(1), i.group(1) if i else None))
    shutil.rmtree(path, ignore_errors=True)
    return {"wall": wall, "image": t["image"],
            "to_start": (t.get("spawn") or 0) + t["agent_ready"] + t["process_start"],
            "events": events}

def st(xs):
    return statistics.median(xs), min(xs), max(xs)

results = {}
for rate in rates:
    reg = subprocess.Popen([sys.executable, "bench/first-run/registry.py", "--layout", layout,
                            "--rate", str(rate)], stdout=subprocess.PIPE, text=True)
    try:
        reg.stdout.readline()  # listening
        once("streamed")       # warm-up (page cache of the blobs, the guest)
        samples = {"streamed": [], "sequential": []}
        for r in range(runs):
            order = ["streamed", "sequential"] if r % 2 == 0 else ["sequential", "streamed"]
            for mode in order:
                samples[mode].append(once(mode))
            print(f"rate {rate or 'uncapped'} round {r + 1}/{runs}: " + ", ".join(
                f"{m} image {samples[m][-1]['image']} ms, to start {samples[m][-1]['to_start']} ms"
                for m in samples), file=sys.stderr)
        results[rate] = samples
    finally:
        reg.terminate()
        reg.wait()

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
load = " ".join(open("/proc/loadavg").read().split()[:3])
L = ["# An image's first run: streamed vs sequential conversion\n",
     f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu}, {os.cpu_count()} vCPUs, "
     f"kernel {platform.release()}, load average at the end {load} (a shared machine: read ratios)",
     f"- Image: busybox + 4 x 50 MB of random data, {blob_mb:.0f} MB of blobs, served by bench/first-run/registry.py "
     f"on 127.0.0.1 in a network namespace of its own; accelerator **{accel}**; `{gpucell}`",
     f"- Command: `bench/first-run/run.sh` (RUNS={runs}, rounds alternate the modes, 1 warm-up; a fresh state "
     "directory per run)",
     "- `image`: the run report's image phase (pull + unpack + disk); `to start`: `spawn` + `agent_ready` + "
     "`process_start`, gpucell's start to the workload's start\n",
     "| registry bandwidth | mode | image ms median (min-max) | to start ms median (min-max) | wall s median |",
     "|---|---|---:|---:|---:|"]
for rate, samples in results.items():
    bw = "loopback, uncapped" if rate == 0 else f"{rate * 8 / 1e6:.0f} Mbit/s"
    for mode, xs in samples.items():
        i, s, w = st([x["image"] for x in xs]), st([x["to_start"] for x in xs]), st([x["wall"] for x in xs])
        L.append(f"| {bw} | {mode} | {i[0]:.0f} ({i[1]:.0f}-{i[2]:.0f}) | {s[0]:.0f} ({s[1]:.0f}-{s[2]:.0f}) | {w[0]:.2f} |")
    ri = statistics.median(x["image"] for x in samples["streamed"]) / statistics.median(x["image"] for x in samples["sequential"])
    rs = statistics.median(x["to_start"] for x in samples["streamed"]) / statistics.median(x["to_start"] for x in samples["sequential"])
    L.append(f"| {bw} | **streamed / sequential** | **{ri:.2f}x** | **{rs:.2f}x** | |")
for rate, samples in results.items():
    bw = "loopback, uncapped" if rate == 0 else f"{rate * 8 / 1e6:.0f} Mbit/s"
    for mode, xs in samples.items():
        run = sorted(xs, key=lambda x: x["image"])[len(xs) // 2]
        L.append(f"\n## Timeline of the median run: {mode}, {bw} (ms since the store was opened)\n")
        L.append("| ms | event |\n|---:|---|")
        for ms, what, index in run["events"]:
            L.append(f"| {ms} | {what}{' ' + index if index else ''} |")
text = "\n".join(L) + "\n"
os.makedirs(os.path.dirname(out), exist_ok=True)
open(out, "w").write(text)
print(text)
PY
