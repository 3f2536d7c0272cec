#!/usr/bin/env bash
# Guest kernels side by side under one load: Debian's generic kernel (linux-image-amd64),
# Debian's cloud kernel (linux-image-cloud-amd64) and gpucell's microVM kernel
# (`gpucell guest build --kernel microvm`), each as an uncompressed PVH vmlinux.
#   1. boot: QEMU (q35, same flags as the sandbox bench's floor) booting each kernel with
#      the same busybox initramfs that runs `true` and powers off (hyperfine, wall time);
#   2. `gpucell --json run IMAGE -- true` with a guest of each kernel (same agent, same
#      image), rounds interleaved across the kernels: `kernel_boot` (guest uptime when
#      the agent says hello) and `total`.
# Each kernel gets its own state dir under $BASE, so the guests do not replace each other.
# Writes bench/results/kernel.md. Needs hyperfine, umoci, busybox-static, cpio, a static
# agent (`make agent`) and, for the microVM kernel, its build (cached after the first).
# usage: bench/kernel/run.sh   (env: GPUCELL, BASE, RUNS, ACCEL, OUT, KERNELS, AGENT)
set -euo pipefail
export GPUCELL_NETWORK=${GPUCELL_NETWORK:-none}
cd "$(dirname "$0")/../.."
GPUCELL=${GPUCELL:-$( [ -x target/release/gpucell ] && echo target/release/gpucell || echo target/debug/gpucell )}
BASE=${BASE:-$PWD/target/bench-kernel}
RUNS=${RUNS:-10}
ACCEL=${ACCEL:-tcg}
OUT=${OUT:-bench/results/kernel.md}
KERNELS=${KERNELS:-generic cloud microvm}
AGENT=${AGENT:-target/x86_64-unknown-linux-gnu/release/gpucell-agent}
QEMU=${QEMU:-$(command -v qemu-system-x86_64)}
MEM=512

for t in hyperfine umoci cpio python3 "$QEMU" "$GPUCELL"; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
[ -f "$AGENT" ] || { echo "no static agent at $AGENT: run make agent" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One guest per kernel, each in its own state dir (cached after the first run).
build_guest() {
    local k=$1 state=$BASE/$1
    case $k in
    generic) "$GPUCELL" --state-dir "$state" guest build --agent "$AGENT" --kernel debian ;;
    microvm) "$GPUCELL" --state-dir "$state" guest build --agent "$AGENT" --kernel microvm ;;
    cloud)
        local pkg deb
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
        mkdir -p "$BASE/debs"
        deb=$(ls "$BASE"/debs/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
        if [ -z "$deb" ]; then
            (cd "$BASE/debs" && apt-get download -q "$pkg" >/dev/null 2>&1)
            deb=$(ls "$BASE"/debs/"${pkg}"_*.deb | head -n1)
        fi
        # The cloud kernel's bzImage is LZ4-compressed, which `guest build` does not unpack
        # (XZ only): its vmlinux is cut out here, for the boot rows only.
        mkdir -p "$state"
        rm -rf "$work/cloud" && dpkg-deb -x "$deb" "$work/cloud"
        local bz off
        bz=$(ls "$work"/cloud/boot/vmlinuz-*)
        off=$(grep -obUaP '\x02\x21\x4c\x18' "$bz" | head -n1 | cut -d: -f1)
        tail -c +$((off + 1)) "$bz" | lz4 -dc >"$state/vmlinux" 2>/dev/null || true
        file "$state/vmlinux" | grep -q 'ELF 64-bit' || { echo "cloud: no vmlinux from $bz" >&2; exit 1; }
        basename "$deb" >"$state/package" ;;
    *) echo "unknown kernel $k" >&2; exit 1 ;;
    esac >/dev/null
}
for k in $KERNELS; do
    t0=$(date +%s.%N)
    build_guest "$k"
    echo "$k guest build: $(python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)") s" >>"$work/build-times.txt"
done
cat "$work/build-times.txt"

kernel_of() { [ "$1" = cloud ] && echo "$BASE/cloud/vmlinux" || echo "$BASE/$1/guest/default/vmlinux"; }
RUN_KERNELS=$(for k in $KERNELS; do [ "$k" = cloud ] || echo "$k"; done)

IMAGE=$(scripts/make-demo-image.sh "$work/oci" demo | tail -n1)
for k in $RUN_KERNELS; do
    GPUCELL_STATE_DIR=$BASE/$k GPUCELL_ACCEL=$ACCEL "$GPUCELL" run "$IMAGE" -- true >/dev/null
done

# 1. The same busybox init on each kernel.
crates/sandbox/tests/data/busybox-initrd.sh "$work/floor.cpio" true
cmds=()
for k in $KERNELS; do
    kernel=$(kernel_of "$k")
    c="$QEMU -nodefaults -no-user-config -display none -no-reboot -machine q35 -accel $ACCEL -cpu $([ "$ACCEL" = kvm ] && echo host || echo max) -smp 1 -m ${MEM}M -kernel $kernel -initrd $work/floor.cpio -append 'console=ttyS0 panic=-1 quiet' -chardev stdio,id=console,signal=off -serial chardev:console -nic none"
    out=$(eval "$c" </dev/null)
    grep -q 'floor-exit 0' <<<"$out" || { echo "$k: busybox boot did not run its command: $out" >&2; exit 1; }
    cmds+=(-n "$k" "$c </dev/null >/dev/null")
done
hyperfine --style basic --warmup 1 --runs "$RUNS" --export-json "$work/h.json" "${cmds[@]}"

# 2. gpucell run with each kernel's guest, interleaved.
for _ in $(seq 1 "$RUNS"); do
    for k in $RUN_KERNELS; do
        # --json prints the run report on stderr (stdout is the workload's).
        GPUCELL_STATE_DIR=$BASE/$k GPUCELL_ACCEL=$ACCEL "$GPUCELL" --json run "$IMAGE" -- true \
            2>"$work/run.err" >/dev/null || { cat "$work/run.err" >&2; exit 1; }
        python3 -c 'import json,sys; t=open(sys.argv[2]).read(); d=json.JSONDecoder().raw_decode(t[t.index("{"):])[0]; print(sys.argv[1], json.dumps(d["timings_ms"]))' \
            "$k" "$work/run.err" >>"$work/runs.txt"
    done
done

python3 - "$work/h.json" "$work/runs.txt" "$OUT" "$ACCEL" "$RUNS" "$QEMU" "$BASE" "$KERNELS" "$work/build-times.txt" "$GPUCELL" "$(echo $RUN_KERNELS)" <<'PY'
import json, os, platform, statistics, subprocess, sys, datetime
h, runs_file, out, accel, runs, qemu, base, kernels, builds, gpucell, run_kernels = sys.argv[1:]
kernels = kernels.split(); run_kernels = run_kernels.split()
res = {r["command"]: r["times"] for r in json.load(open(h))["results"]}
runs = {}
for line in open(runs_file):
    k, j = line.split(" ", 1)
    runs.setdefault(k, []).append(json.loads(j))
def stats(xs):
    return statistics.median(xs), min(xs), max(xs)
def manifest(k):
    return json.load(open(f"{base}/{k}/guest/default/manifest.json"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
qv = subprocess.run([qemu, "-version"], capture_output=True, text=True).stdout.splitlines()[0]
load = open("/proc/loadavg").read().split()[:3]
ref = "generic" if "generic" in run_kernels else run_kernels[0]
L = ["# Guest kernels: Debian generic vs cloud vs gpucell microVM\n"]
L.append(f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC by `bench/kernel/run.sh` "
         f"({runs and len(next(iter(runs.values())))} rounds, kernels interleaved; boot rows by hyperfine, 1 warm-up). "
         f"Machine: {cpu}, {os.cpu_count()} vCPUs, kernel {platform.release()}, load average at the end "
         f"{' '.join(load)}; {qv}; accelerator **{accel}**; guest 1 vCPU, 512 MiB, q35, PVH vmlinux; `{gpucell}`.\n")
L.append("| kernel | package | vmlinux MiB | init image KiB | modules in init image |")
L.append("|---|---|---|---|---|")
for k in kernels:
    if k == "cloud":
        pkg = open(f"{base}/cloud/package").read().strip()
        L.append(f"| {k} | {pkg} | {os.path.getsize(base + '/cloud/vmlinux')/2**20:.1f} | - | - |")
        continue
    m = manifest(k)
    L.append(f"| {k} | {m['kernel_package']} {m['kernel_package_version']} | {m['vmlinux']['size']/2**20:.1f} | "
             f"{m['initramfs']['size']/1024:.0f} | {len(m['modules'])} |")
L.append("")
L.append("## Boot to a busybox init that runs `true` and powers off (wall s, same initramfs)\n")
L.append("| kernel | median | min | max | vs " + ref + " |")
L.append("|---|---|---|---|---|")
for k in kernels:
    med, lo, hi = stats(res[k])
    L.append(f"| {k} | {med:.3f} | {lo:.3f} | {hi:.3f} | {med/statistics.median(res[ref]):.0%} |")
L.append("")
L.append("## `gpucell --json run IMAGE -- true` (ms)\n")
L.append("| kernel | kernel_boot median | min | max | vs " + ref + " | total median | min | max | vs " + ref + " |")
L.append("|---|---|---|---|---|---|---|---|---|")
for k in run_kernels:
    kb = stats([r["kernel_boot"] for r in runs[k]]); tt = stats([r["total"] for r in runs[k]])
    rkb = statistics.median([r["kernel_boot"] for r in runs[ref]]); rtt = statistics.median([r["total"] for r in runs[ref]])
    L.append(f"| {k} | {kb[0]:.0f} | {kb[1]} | {kb[2]} | {kb[0]/rkb:.0%} | {tt[0]:.0f} | {tt[1]} | {tt[2]} | {tt[0]/rtt:.0%} |")
L.append("")
if "cloud" in kernels:
    L.append("The cloud kernel's bzImage is LZ4-compressed, which `gpucell guest build` does not unpack yet "
             "(XZ only), so it has boot rows but no `gpucell run` rows.\n")
L.append("Guest builds in this run (cached ones take seconds):\n")
for line in open(builds):
    L.append(f"- {line.strip()}")
L.append("")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
