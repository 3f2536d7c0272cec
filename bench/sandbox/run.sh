#!/usr/bin/env bash
# Wall time of `gpucell run IMAGE -- true` (image and guest cached) side by side with
#   floor: the same QEMU, machine flags and guest kernel booting a trivial busybox init
#          that runs the same command and powers off (no agent, no image disk, no QMP);
#   runc:  `runc run` of the same image's bundle on the host (no VM at all).
# Then the phase times gpucell reports with --json (medians of N runs).
# Writes bench/results/sandbox.md. Needs hyperfine, umoci, runc, busybox-static, cpio,
# and a built guest (`gpucell guest build`).
# usage: bench/sandbox/run.sh   (env: GPUCELL, GPUCELL_STATE_DIR, RUNS, ACCEL, OUT)
set -euo pipefail
# Boot cost without a network (the network bench, bench/net, measures that).
export GPUCELL_NETWORK=${GPUCELL_NETWORK:-none}
cd "$(dirname "$0")/../.."
GPUCELL=${GPUCELL:-target/release/gpucell}
STATE=${GPUCELL_STATE_DIR:-/var/lib/gpucell}
RUNS=${RUNS:-10}
ACCEL=${ACCEL:-tcg}
OUT=${OUT:-bench/results/sandbox.md}
QEMU=${QEMU:-$(command -v qemu-system-x86_64)}
CPUS=1
MEM=512

for t in hyperfine umoci runc cpio "$QEMU" "$GPUCELL"; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
manifest=$STATE/guest/default/manifest.json
[ -f "$manifest" ] || { echo "no guest in $STATE: run $GPUCELL --state-dir $STATE guest build" >&2; exit 1; }
KERNEL=$STATE/guest/default/vmlinux

work=$(mktemp -d)
trap 'rm -rf "$work"; runc delete -f gpucell-bench >/dev/null 2>&1 || true' EXIT

# The image, cached in the store by a first run.
IMAGE=$(scripts/make-demo-image.sh "$work/oci" demo | tail -n1)
export GPUCELL_STATE_DIR=$STATE GPUCELL_ACCEL=$ACCEL
"$GPUCELL" run "$IMAGE" -- true

# Floor: same kernel, a busybox init running `true`.
crates/sandbox/tests/data/busybox-initrd.sh "$work/floor.cpio" true
floor="$QEMU -name gpucell-floor -nodefaults -no-user-config -display none -no-reboot -machine q35 -accel $ACCEL -cpu $([ "$ACCEL" = kvm ] && echo host || echo max) -smp $CPUS -m ${MEM}M -kernel $KERNEL -initrd $work/floor.cpio -append 'console=ttyS0 panic=-1 quiet' -chardev stdio,id=console,signal=off -serial chardev:console -nic none"
out=$(eval "$floor" </dev/null)
grep -q 'floor-exit 0' <<<"$out" || { echo "floor boot did not run its command: $out" >&2; exit 1; }

# runc: the same image as a bundle.
umoci unpack --image "${IMAGE#oci:}" "$work/bundle" >/dev/null
python3 - "$work/bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c["process"]["args"] = ["true"]; c["process"]["terminal"] = False
json.dump(c, open(p, "w"))
PY
runc_cmd="runc run --bundle $work/bundle gpucell-bench"

hyperfine --style basic --warmup 1 --runs "$RUNS" --export-json "$work/h.json" \
    -n floor "$floor </dev/null >/dev/null" \
    -n gpucell "$GPUCELL run $IMAGE -- true" \
    -n runc "$runc_cmd"

# Phases reported by gpucell itself.
for _ in $(seq 1 "$RUNS"); do
    "$GPUCELL" --json run "$IMAGE" -- true 2>>"$work/phases.txt" >/dev/null
done

python3 - "$work/h.json" "$work/phases.txt" "$OUT" "$ACCEL" "$RUNS" "$QEMU" "$KERNEL" <<'PY'
import json, platform, statistics, subprocess, sys, datetime, re
h, phases_file, out, accel, runs, qemu, kernel = sys.argv[1:]
res = {r["command"]: r for r in json.load(open(h))["results"]}
def row(name):
    r = res[name]; t = r["times"]
    return (statistics.median(t), min(t), max(t), r["stddev"] or 0.0)
text = open(phases_file).read()
objs = []
depth = 0; start = None
for i, ch in enumerate(text):
    if ch == "{":
        if depth == 0: start = i
        depth += 1
    elif ch == "}":
        depth -= 1
        if depth == 0: objs.append(json.loads(text[start:i+1]))
phases = ["image", "accel_select", "vm_start", "kernel_boot", "agent_ready", "process_start", "workload", "shutdown", "sandbox", "total"]
med = {p: statistics.median([o["timings_ms"][p] for o in objs]) for p in phases}
spread = {p: (min(o["timings_ms"][p] for o in objs), max(o["timings_ms"][p] for o in objs)) for p in phases}
floor, gp, rc = row("floor"), row("gpucell"), row("runc")
cpu = next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
qv = subprocess.run([qemu, "-version"], capture_output=True, text=True).stdout.splitlines()[0]
load = open("/proc/loadavg").read().split()[:3]
L = []
L.append("# gpucell run vs. floor vs. runc\n")
L.append(f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC by `bench/sandbox/run.sh` "
         f"(hyperfine, {runs} runs after 1 warm-up, each side by side in one session).\n")
L.append(f"Machine: {cpu}, {subprocess.run(['nproc'],capture_output=True,text=True).stdout.strip()} vCPUs, "
         f"kernel {platform.release()}, load average at the end {' '.join(load)}; {qv}; "
         f"guest kernel `{kernel}`; accelerator **{accel}**; guest 1 vCPU, 512 MiB.\n")
L.append("| command | median s | min s | max s | stddev s | vs floor |")
L.append("|---|---|---|---|---|---|")
for name, r in (("floor (same QEMU + kernel, busybox init runs `true`)", floor), ("gpucell run IMAGE -- true", gp), ("runc run (same bundle, host)", rc)):
    L.append(f"| {name} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[0]/floor[0]:.2f}x |")
L.append("")
over = (gp[0] - floor[0]) / floor[0] * 100
L.append(f"gpucell over the floor: **{over:+.1f}%** (goal: under +10%). gpucell over runc: {gp[0]/rc[0]:.0f}x.\n")
L.append(f"## Phases reported by `gpucell --json run` (median and min-max of {len(objs)} runs, ms)\n")
L.append("| phase | median | min | max |")
L.append("|---|---|---|---|")
for p in phases:
    L.append(f"| {p} | {med[p]:.0f} | {spread[p][0]} | {spread[p][1]} |")
L.append("")
L.append("Notes:")
L.append("- The floor has no agent, image disk, QMP, seccomp or privilege drop: the gap to it is")
L.append("  gpucell's whole cost (host CLI, agent, protocol, virtio-blk/serial, clean shutdown).")
L.append("- `agent_ready` minus `kernel_boot` is QEMU start plus loading the 66 MB vmlinux and the")
L.append("  initramfs before the guest clock starts.")
L.append("- KVM (goal: under 300 ms per run) cannot be measured on this machine: its /dev/kvm cannot")
L.append("  run a stock kernel. Run `ACCEL=kvm bench/sandbox/run.sh` in the nested KVM test host.")
L.append("- A load average well above the vCPU count means other jobs shared the machine; medians")
L.append("  then carry seconds of noise. Re-run on an idle machine before comparing.")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
