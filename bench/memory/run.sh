#!/usr/bin/env bash
# Host memory per sandbox beyond guest RAM, and many sandboxes at once.
#   1. ONE sandbox (`gpucell run -m MEM IMAGE -- sh -c 'echo up; read x'`), booted and
#      holding: QEMU's PSS (/proc/PID/smaps_rollup) minus the guest RAM it touched (the
#      Pss of QEMU's guest RAM mapping in /proc/PID/smaps, the one mapping of the guest's
#      size), and the `gpucell run` process's own PSS beside it; ROUNDS times.
#   2. MANY sandboxes of MANY_MEM at once: all started together, each waits on its stdin
#      once its workload runs; when every one is up (or one failed), the totals are taken,
#      each gets a line on stdin and must exit 0, and no QEMU of the state dir may remain.
#      Wall time from the first start to the last up, and to the last exit.
# Writes bench/results/memory.md. Needs python3, umoci (the demo image), a built gpucell
# and a guest in the state dir.
# usage: bench/memory/run.sh   (env: GPUCELL, GPUCELL_STATE_DIR, ACCEL, MEM, ROUNDS, MANY,
#                               MANY_MEM, BOOT_TIMEOUT, OUT)
# BOOT_TIMEOUT (default 600s) is each run's --boot-timeout: many TCG guests booting at
# once on few cores take far longer than one.
set -euo pipefail
export GPUCELL_NETWORK=${GPUCELL_NETWORK:-none}
cd "$(dirname "$0")/../.."
GPUCELL=${GPUCELL:-$( [ -x target/release/gpucell ] && echo target/release/gpucell || echo target/debug/gpucell )}
STATE=${GPUCELL_STATE_DIR:-$PWD/target/test-state}
ACCEL=${ACCEL:-tcg}
MEM=${MEM:-512}
ROUNDS=${ROUNDS:-3}
MANY=${MANY:-20}
MANY_MEM=${MANY_MEM:-256}
OUT=${OUT:-bench/results/memory.md}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600s}
[ -f "$STATE/guest/default/vmlinux" ] || { echo "no guest in $STATE: run $GPUCELL --state-dir $STATE guest build" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
IMAGE=$(scripts/make-demo-image.sh "$work/oci" demo | tail -n1)
export GPUCELL_STATE_DIR=$STATE GPUCELL_ACCEL=$ACCEL
"$GPUCELL" run "$IMAGE" -- true >/dev/null   # image and guest cached from here on

exec python3 - "$GPUCELL" "$IMAGE" "$STATE" "$ACCEL" "$MEM" "$ROUNDS" "$MANY" "$MANY_MEM" "$OUT" "$BOOT_TIMEOUT" <<'PY'
import datetime, os, platform, statistics, subprocess, sys, time, threading
gpucell, image, state, accel, mem, rounds, many, many_mem, out, boot_timeout = sys.argv[1:]
mem, rounds, many, many_mem = int(mem), int(rounds), int(many), int(many_mem)
WORKLOAD = ["sh", "-c", "echo up; read x; echo bye"]

def children(pid):
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return []

def qemu_of(pid):
    """The QEMU below a `gpucell run` process (its child or grandchild)."""
    todo = children(pid)
    while todo:
        c = todo.pop()
        try:
            if "qemu-system" in open(f"/proc/{c}/cmdline", "rb").read().split(b"\0")[0].decode():
                return c
        except OSError:
            continue
        todo += children(c)
    return None

def pss_kib(pid):
    for l in open(f"/proc/{pid}/smaps_rollup"):
        if l.startswith("Pss:"):
            return int(l.split()[1])
    return 0

def guest_ram_pss_kib(pid, size_mib):
    """Pss of the mapping of exactly the guest's size (QEMU's RAM block)."""
    best, cur_size = 0, None
    for l in open(f"/proc/{pid}/smaps"):
        f = l.split()
        if "-" in f[0] and len(f) >= 5 and ":" not in f[0]:
            a, b = (int(x, 16) for x in f[0].split("-"))
            cur_size = (b - a) // 1024
        elif f[0] == "Pss:" and cur_size is not None and abs(cur_size - size_mib * 1024) <= 4096:
            best = max(best, int(f[1]))
    return best

def start(size):
    return subprocess.Popen([gpucell, "run", "--boot-timeout", boot_timeout, "-m", f"{size}m",
                             image, "--"] + WORKLOAD,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def wait_up(p):
    line = p.stdout.readline()
    return line.strip() == "up"

def finish(p):
    try:
        p.stdin.write("go\n"); p.stdin.close()
    except BrokenPipeError:
        pass
    rest = p.stdout.read(); err = p.stderr.read(); p.wait()
    return p.returncode == 0 and "bye" in rest, err

def leftover_qemus():
    left = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                c = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if b"qemu-system" in c and state.encode() in c:
                left.append(int(d))
    return left

# 1. One sandbox.
one = []
for _ in range(rounds):
    p = start(mem)
    if not wait_up(p):
        sys.exit(f"the sandbox did not come up: {p.stderr.read()[-2000:]}")
    time.sleep(1)  # let the boot's last page faults settle
    q = qemu_of(p.pid)
    total, ram = pss_kib(q), guest_ram_pss_kib(q, mem)
    one.append((total / 1024, ram / 1024, (total - ram) / 1024, pss_kib(p.pid) / 1024))
    ok, err = finish(p)
    if not ok:
        sys.exit(f"the sandbox did not stop cleanly: {err[-2000:]}")

# 2. Many at once.
avail0 = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
t0 = time.monotonic()
procs = [start(many_mem) for _ in range(many)]
up_at = [None] * many
def waiter(i):
    if wait_up(procs[i]):
        up_at[i] = time.monotonic() - t0
threads = [threading.Thread(target=waiter, args=(i,)) for i in range(many)]
for t in threads: t.start()
for t in threads: t.join()
all_up = time.monotonic() - t0
n_up = sum(1 for u in up_at if u is not None)
qs = [qemu_of(p.pid) for p in procs]
qemu_pss = [pss_kib(q) / 1024 for q in qs if q]
over = [(pss_kib(q) - guest_ram_pss_kib(q, many_mem)) / 1024 for q in qs if q]
sup_pss = [pss_kib(p.pid) / 1024 for p in procs if p.poll() is None]
avail1 = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
results = [finish(p) for p in procs]
all_done = time.monotonic() - t0
n_ok = sum(1 for ok, _ in results if ok)
time.sleep(0.5)
left = leftover_qemus()

def st(xs):
    return (statistics.median(xs), min(xs), max(xs)) if xs else (0, 0, 0)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
load = " ".join(open("/proc/loadavg").read().split()[:3])
L = ["# Host memory per sandbox, and many sandboxes at once\n",
     f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu}, {os.cpu_count()} vCPUs, "
     f"kernel {platform.release()}, load average at the end {load} (shared machine); accelerator **{accel}**; `{gpucell}`",
     f"- Command: `bench/memory/run.sh` (MEM={mem} ROUNDS={rounds} MANY={many} MANY_MEM={many_mem}); workload `sh -c 'echo up; read x; echo bye'`\n",
     f"## One sandbox of {mem} MiB, booted and idle ({rounds} rounds, MiB)\n",
     "| | median | min | max |", "|---|---:|---:|---:|"]
for i, name in enumerate(["QEMU PSS", "guest RAM touched (Pss of the RAM mapping)",
                          "**QEMU beyond guest RAM** (goal ≤ 30)", "`gpucell run` process PSS"]):
    m = st([r[i] for r in one])
    L.append(f"| {name} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} |")
L.append("")
L.append(f"## {many} sandboxes of {many_mem} MiB at once\n")
L.append(f"- up: **{n_up}/{many}**; stopped cleanly (exit 0, workload's last line seen): **{n_ok}/{many}**; "
         f"QEMU processes left: {len(left)}")
L.append(f"- wall time from the first start to the last workload up: {all_up:.1f} s "
         f"(first up after {min(u for u in up_at if u) if n_up else 0:.1f} s); to the last exit: {all_done:.1f} s")
m = st(qemu_pss); o = st(over); s = st(sup_pss)
L.append(f"- per sandbox while all were up (MiB, median/min/max): QEMU PSS {m[0]:.1f}/{m[1]:.1f}/{m[2]:.1f}; "
         f"beyond guest RAM {o[0]:.1f}/{o[1]:.1f}/{o[2]:.1f}; `gpucell run` PSS {s[0]:.1f}/{s[1]:.1f}/{s[2]:.1f}")
L.append(f"- MemAvailable dropped by {(avail0 - avail1) / 1024:.0f} MiB with all up "
         f"({(avail0 - avail1) / 1024 / max(n_up, 1):.0f} MiB per sandbox, page cache and other jobs included)")
L.append("")
for i, (ok, err) in enumerate(results):
    if not ok:
        L.append(f"- sandbox {i} failed: {err.strip()[-300:]}")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
sys.exit(0 if n_up == many and n_ok == many and not left else 1)
PY
