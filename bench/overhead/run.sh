#!/usr/bin/env bash
# gpucell's own overhead: `gpucell run IMAGE -- true` (image and guest cached) side by side
# with the floor, the same QEMU, machine flags and guest kernel booting a trivial busybox
# init that runs `true` and powers off (no agent, image disk, QMP, seccomp or privilege
# drop). Rounds interleave the commands, so a change in the machine's load hits all alike;
# each sample is wall time from spawn to exit. Also:
#   - floor variants, to see what a QEMU flag or kernel word is worth before gpucell
#     adopts it (FLOOR_VARIANTS: `tb32` = `-accel tcg,tb-size=32`; `words` = kernel
#     words `no_timer_check cryptomgr.notests`);
#   - gpucell's phases from `--json` (its report on stderr), `spawn` among them: the
#     process's `main` to QEMU's spawn;
#   - the same span seen from outside: `strace -f -e trace=execve` (seccomp-filtered, so
#     only the two execve calls stop), gpucell's execve to QEMU's.
# Writes bench/results/overhead.md. Needs python3, cpio, busybox-static, umoci (the demo
# image), strace (optional), a built gpucell and a guest in the state dir.
# usage: bench/overhead/run.sh   (env: GPUCELL, GPUCELL_STATE_DIR, RUNS, ACCEL, OUT, QEMU,
#                                 FLOOR_VARIANTS, STRACE_RUNS)
set -euo pipefail
export GPUCELL_NETWORK=${GPUCELL_NETWORK:-none}
cd "$(dirname "$0")/../.."
GPUCELL=${GPUCELL:-$( [ -x target/release/gpucell ] && echo target/release/gpucell || echo target/debug/gpucell )}
STATE=${GPUCELL_STATE_DIR:-$PWD/target/test-state}
RUNS=${RUNS:-10}
ACCEL=${ACCEL:-tcg}
OUT=${OUT:-bench/results/overhead.md}
QEMU=${QEMU:-$(command -v qemu-system-x86_64)}
FLOOR_VARIANTS=${FLOOR_VARIANTS:-tb32 words}
STRACE_RUNS=${STRACE_RUNS:-5}
for t in python3 cpio "$QEMU" "$GPUCELL"; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
KERNEL=$STATE/guest/default/vmlinux
[ -f "$KERNEL" ] || { echo "no guest in $STATE: run $GPUCELL --state-dir $STATE guest build" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
IMAGE=$(scripts/make-demo-image.sh "$work/oci" demo | tail -n1)
export GPUCELL_STATE_DIR=$STATE GPUCELL_ACCEL=$ACCEL
"$GPUCELL" run "$IMAGE" -- true >/dev/null   # image and guest cached from here on
crates/sandbox/tests/data/busybox-initrd.sh "$work/floor.cpio" true

exec python3 - "$GPUCELL" "$IMAGE" "$QEMU" "$KERNEL" "$work" "$RUNS" "$ACCEL" "$OUT" "$FLOOR_VARIANTS" "$STRACE_RUNS" <<'PY'
import datetime, json, os, platform, re, shutil, statistics, subprocess, sys, time
gpucell, image, qemu, kernel, work, runs, accel, out, variants, strace_runs = sys.argv[1:]
runs, strace_runs = int(runs), int(strace_runs)
WORDS = "no_timer_check cryptomgr.notests"

def floor_cmd(accel_opt=accel, extra_words=""):
    cpu = "host" if accel == "kvm" else "max"
    append = "console=ttyS0 panic=-1 quiet" + (" " + extra_words if extra_words else "")
    return [qemu, "-name", "gpucell-floor", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-machine", "q35", "-accel", accel_opt, "-cpu", cpu, "-smp", "1",
            "-m", "512M", "-kernel", kernel, "-initrd", f"{work}/floor.cpio", "-append", append,
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console", "-nic", "none"]

cmds = {"floor": floor_cmd()}
if "tb32" in variants.split() and accel == "tcg":
    cmds["floor tb-size=32"] = floor_cmd(accel_opt="tcg,tb-size=32")
if "words" in variants.split():
    cmds["floor + " + WORDS] = floor_cmd(extra_words=WORDS)
cmds["gpucell"] = [gpucell, "--json", "run", image, "--", "true"]

def once(name, cmd):
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if name == "gpucell":
        if p.returncode != 0:
            sys.exit(f"gpucell run failed ({p.returncode}): {p.stderr[-2000:]}")
        t = p.stderr
        rep = json.JSONDecoder().raw_decode(t[t.index("{"):])[0]
        return dt, rep["timings_ms"]
    if "floor-exit 0" not in p.stdout:
        sys.exit(f"{name}: the busybox init did not run its command: {p.stdout[-2000:]} {p.stderr[-2000:]}")
    return dt, None

for name, cmd in cmds.items():   # one warm-up each
    once(name, cmd)
samples = {n: [] for n in cmds}
phases = []
for r in range(runs):
    for name, cmd in cmds.items():
        dt, ph = once(name, cmd)
        samples[name].append(dt)
        if ph:
            phases.append(ph)
    print(f"round {r + 1}/{runs}: " + ", ".join(f"{n} {samples[n][-1]:.3f}" for n in cmds), file=sys.stderr)

# gpucell's execve to QEMU's execve, from outside.
external = []
if shutil.which("strace") and strace_runs > 0:
    for _ in range(strace_runs):
        log = f"{work}/strace.txt"
        p = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-ttt", "-e", "trace=execve",
                            "-e", "signal=none", "-o", log, gpucell, "run", image, "--", "true"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        ex = [l for l in open(log) if "execve(" in l and "= 0" in l]
        g = next((float(l.split()[1]) for l in ex if "gpucell" in l.split("execve(")[1].split(",")[0]), None)
        q = next((float(l.split()[1]) for l in ex if "qemu-system" in l.split("execve(")[1].split(",")[0]), None)
        if p.returncode == 0 and g is not None and q is not None:
            external.append((q - g) * 1000)

def st(xs):
    return statistics.median(xs), min(xs), max(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
qv = subprocess.run([qemu, "-version"], capture_output=True, text=True).stdout.splitlines()[0]
load = " ".join(open("/proc/loadavg").read().split()[:3])
fl = st(samples["floor"])
L = ["# gpucell's own overhead: `gpucell run IMAGE -- true` vs the floor\n",
     f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu}, {os.cpu_count()} vCPUs, "
     f"kernel {platform.release()}, load average at the end {load} (a shared machine: read ratios)",
     f"- {qv}; accelerator **{accel}**; guest 1 vCPU, 512 MiB, q35; kernel `{kernel}`; `{gpucell}`",
     f"- Command: `bench/overhead/run.sh` (RUNS={runs}: rounds interleave the commands, 1 warm-up each; wall time spawn to exit)\n",
     "| command | median s | min | max | stddev | vs floor (medians) | per-round ratio median |",
     "|---|---:|---:|---:|---:|---:|---:|"]
for name in cmds:
    m = st(samples[name])
    pr = statistics.median(a / b for a, b in zip(samples[name], samples["floor"]))
    L.append(f"| {name} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} | {m[0] / fl[0]:.3f}x | {pr:.3f}x |")
L.append("")
for name in cmds:
    if name.startswith("floor") and name != "floor":
        g = statistics.median(samples["gpucell"]) / statistics.median(samples[name])
        pr = statistics.median(a / b for a, b in zip(samples["gpucell"], samples[name]))
        L.append(f"- gpucell vs `{name}`: {g:.3f}x (medians), {pr:.3f}x (per-round ratio median)")
L.append("")
keys = [k for k in phases[0] if all(isinstance(p.get(k), int) for p in phases)]
L.append(f"## gpucell's phases (`--json`, the same {len(phases)} runs, ms)\n")
L.append("| phase | median | min | max |")
L.append("|---|---:|---:|---:|")
for k in keys:
    m = st([p[k] for p in phases])
    L.append(f"| {k} | {m[0]:.0f} | {m[1]} | {m[2]} |")
L.append("")
if external:
    m = st(external)
    L.append(f"gpucell's execve to QEMU's execve (strace, {len(external)} runs, no `--json`): "
             f"median {m[0]:.1f} ms, min {m[1]:.1f}, max {m[2]:.1f} (goal: under 20 ms; strace adds its own stops).\n")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
