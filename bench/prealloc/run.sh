#!/usr/bin/env bash
# Preallocation time per GiB of guest RAM, the part of a GPU VM's start that grows with its
# memory (VFIO pins all guest RAM before boot, so every page is touched up front).
# Only QEMU is needed (no gpucell build): each sample starts QEMU with `-machine none -S`,
# a memory backend and a QMP monitor on stdio; QEMU preallocates while it creates the
# backend and the machine's RAM, before its main loop answers the first QMP command, so
# the time from spawn to that answer is the allocation (plus QEMU's start, which the
# `prealloc=off` row measures and which is subtracted); then `quit` over QMP. Rows:
#   - `-m N -mem-prealloc` (the machine's default RAM backend, one thread: serial);
#   - the backends gpucell uses, `prealloc=on,prealloc-threads=T` for each T in THREADS:
#     `memory-backend-ram` (4 KiB pages) and `memory-backend-memfd,hugetlb=on` with
#     2 MiB / 1 GiB pages where the host has enough of them
#     reserved and free (/sys/kernel/mm/hugepages/*/free_hugepages), else skipped with
#     the reason.
# usage: bench/prealloc/run.sh   (env: QEMU, SIZES_GIB, THREADS, RUNS, PAGES, OUT)
#   QEMU       QEMU binary (default qemu-system-x86_64 on PATH)
#   SIZES_GIB  guest RAM sizes in GiB (default "1 2 4"; each must fit in free host RAM)
#   THREADS    preallocation thread counts (default "1 2 4 8 16", capped at host cores)
#   RUNS       samples per row (default 5)
#   PAGES      page sizes to try (default "4K 2M 1G")
#   OUT        markdown result (default bench/results/prealloc.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
QEMU=${QEMU:-qemu-system-x86_64}
SIZES_GIB=${SIZES_GIB:-1 2 4}
NCPU=$(nproc)
THREADS=${THREADS:-$(for t in 1 2 4 8 16; do if [ "$t" -le "$NCPU" ]; then echo "$t"; fi; done | xargs)}
RUNS=${RUNS:-5}
PAGES=${PAGES:-4K 2M 1G}
OUT=${OUT:-bench/results/prealloc.md}
command -v "$QEMU" >/dev/null || { echo "missing QEMU: $QEMU (set QEMU=)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "missing python3" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"

exec python3 - "$QEMU" "$SIZES_GIB" "$THREADS" "$RUNS" "$PAGES" "$OUT" "$*" <<'PY'
import datetime, os, platform, statistics, subprocess, sys, time

qemu, sizes, threads, runs, pages, out, _ = sys.argv[1:]
sizes = [int(s) for s in sizes.split()]
threads = [int(t) for t in threads.split()]
runs = int(runs)
pages = pages.split()
PAGE_KIB = {"4K": 4, "2M": 2048, "1G": 1024 * 1024}
QMP_IN = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'


def sample(args):
    """Seconds from spawn to QEMU's first QMP answer, and to its exit.

    QEMU greets on the monitor before it builds the machine (so the greeting can come
    before `-m` RAM exists), but answers commands only from its main loop, after every
    backend and the machine's RAM are created and preallocated: the answer to
    `qmp_capabilities`, sent at once, marks the end of the allocation."""
    cmd = [qemu, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
           "-S", "-qmp", "stdio"] + args
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdin.write(QMP_IN)
    p.stdin.flush()
    t1 = None
    for line in p.stdout:
        if line.startswith(b'{"return"'):
            t1 = time.monotonic()
            break
    p.stdin.close()
    p.stdout.read()
    p.wait()
    t2 = time.monotonic()
    if t1 is None or p.returncode != 0:
        err = p.stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}, no QMP answer: {err}")
    return t1 - t0, t2 - t0


def backend(gib, page, prealloc, nthreads):
    # gpucell's backends: anonymous RAM for 4 KiB pages, a hugetlb memfd for hugepages.
    kind = "ram" if page == "4K" else "memfd"
    o = f"memory-backend-{kind},id=m0,size={gib}G,prealloc={'on' if prealloc else 'off'}"
    if prealloc:
        o += f",prealloc-threads={nthreads}"
    if page != "4K":
        o += f",hugetlb=on,hugetlbsize={page}"
    return ["-object", o]


def hugepages_free(page):
    d = f"/sys/kernel/mm/hugepages/hugepages-{PAGE_KIB[page]}kB"
    try:
        return int(open(f"{d}/free_hugepages").read()), int(open(f"{d}/nr_hugepages").read())
    except OSError:
        return None


def mem_available_gib():
    for l in open("/proc/meminfo"):
        if l.startswith("MemAvailable:"):
            return int(l.split()[1]) / 2**20
    return 0.0


rows, skipped = [], []
for gib in sizes:
    for page in pages:
        if page == "4K":
            if gib > mem_available_gib() * 0.9:
                skipped.append(f"{gib} GiB, 4 KiB pages: MemAvailable is {mem_available_gib():.1f} GiB")
                continue
        else:
            hp = hugepages_free(page)
            need = gib * 2**20 // PAGE_KIB[page]
            if hp is None:
                skipped.append(f"{gib} GiB, {page} pages: this kernel has no {page} hugepage pool")
                continue
            if hp[0] < need:
                skipped.append(f"{gib} GiB, {page} pages: {hp[0]} free of {hp[1]} reserved, "
                               f"{need} needed (reserve with /sys/kernel/mm/hugepages/"
                               f"hugepages-{PAGE_KIB[page]}kB/nr_hugepages, or for 1G pages "
                               f"reliably hugepagesz={page} hugepages=N on the kernel command line: "
                               f"a running host's memory is often too fragmented for them)")
                continue
        variants = [("prealloc=off (QEMU start, subtracted)", backend(gib, page, False, 0), 0)]
        if page == "4K":
            variants.append(("-m -mem-prealloc (serial)", ["-m", f"{gib}G", "-mem-prealloc"], 1))
        for t in threads:
            variants.append((f"prealloc-threads={t}", backend(gib, page, True, t), t))
        # Rounds interleave the variants, so a change in the machine's load hits all alike.
        samples = {name: [] for name, _, _ in variants}
        for _ in range(runs):
            for name, args, _ in variants:
                samples[name].append(sample(args))
            print(f"{gib} GiB {page}: round done", file=sys.stderr)
        base = statistics.median(s[0] for s in samples[variants[0][0]])
        one = samples.get("prealloc-threads=1")
        serial = max(statistics.median(s[0] for s in one) - base, 0.0) if one else None
        for name, _, t in variants:
            g = [s[0] for s in samples[name]]
            med = statistics.median(g)
            alloc = max(med - base, 0.0)
            rows.append((gib, page, name, med, min(g), max(g),
                         statistics.median(s[1] for s in samples[name]), alloc,
                         alloc / gib, serial))

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.machine())
qv = subprocess.run([qemu, "-version"], capture_output=True, text=True).stdout.splitlines()[0]
load = " ".join(open("/proc/loadavg").read().split()[:3])
thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip() \
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled") else "?"
env = " ".join(f"{k}='{os.environ[k]}'" for k in ("QEMU", "SIZES_GIB", "THREADS", "RUNS", "PAGES")
               if k in os.environ)
L = ["# Guest RAM preallocation per GiB\n",
     f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu}, "
     f"{os.cpu_count()} CPUs, {mem_available_gib():.0f} GiB available, kernel {platform.release()}, "
     f"load average at the end {load}; transparent hugepages: {thp}",
     f"- {qv} (`{qemu}`)",
     f"- Command: `{(env + ' ') if env else ''}bench/prealloc/run.sh` ({runs} rounds, variants interleaved)",
     "- `spawn→QMP` is the time from starting QEMU (`-machine none -S -qmp stdio`) to its answer "
     "to `qmp_capabilities`, which comes from the main loop, after the memory is created and "
     "preallocated; `alloc` is "
     "that median minus the `prealloc=off` row's; `exit` adds the QMP `quit` and the unmap.\n",
     "| GiB | pages | variant | spawn→QMP median s | min | max | exit median s | alloc s | alloc s/GiB | speedup vs 1 thread |",
     "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
for gib, page, name, med, lo, hi, ex, alloc, per, serial in rows:
    sp = f"{serial / alloc:.2f}x" if serial and alloc > 0 and "off" not in name else "-"
    L.append(f"| {gib} | {page} | {name} | {med:.3f} | {lo:.3f} | {hi:.3f} | {ex:.3f} | "
             f"{alloc:.3f} | {per:.3f} | {sp} |")
if skipped:
    L.append("\nSkipped:\n")
    L += [f"- {s}" for s in skipped]
L.append("")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
