#!/usr/bin/env python3
"""Turns hyperfine's JSON export into bench/results/image.md."""
import argparse
import datetime
import json
import platform
import statistics
import subprocess


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--image-mb", type=int)
    ap.add_argument("--tree-mb", type=int)
    ap.add_argument("--layout")
    ap.add_argument("--erofs-size", type=int)
    ap.add_argument("--ext4-size", type=int)
    ap.add_argument("--inproc")
    a = ap.parse_args()
    index = json.load(open(f"{a.layout}/index.json"))
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    a.layers = len(json.load(open(f"{a.layout}/blobs/sha256/{digest}"))["layers"])
    res = {r["command"]: r for r in json.load(open(a.results))["results"]}
    med = {k: statistics.median(v["times"]) for k, v in res.items()}
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("# Image store benchmark: OCI image to guest filesystem image\n")
    print(f"- Date: {now}; machine: {nproc} CPUs, {cpu_model()}, kernel {platform.release()}")
    print(f"- Image: {a.layers} layers, {a.image_mb} MB of compressed blobs, {a.tree_mb} MB unpacked "
          "(real files from this machine's /usr, built with umoci by bench/image/make-image.sh)")
    print(f"- Disk sizes: erofs {a.erofs_size / 1e6:.0f} MB, ext4 {a.ext4_size / 1e6:.0f} MB")
    print(f"- Command: `bench/image/run.sh` (hyperfine, {len(next(iter(res.values()))['times'])} runs each, 1 warm-up; "
          "source blobs in the page cache)\n")
    print("| pipeline | median | min | max | stddev |")
    print("|---|---:|---:|---:|---:|")
    for k, v in res.items():
        t = v["times"]
        sd = statistics.stdev(t) if len(t) > 1 else 0.0
        print(f"| {k} | {med[k]*1000:.0f} ms | {min(t)*1000:.0f} ms | {max(t)*1000:.0f} ms | {sd*1000:.0f} ms |")
    print()
    def ratio(x, y):
        if x in med and y in med:
            print(f"- {x} / {y}: **{med[x] / med[y]:.2f}x** (median)")
    ratio("gpucell cold (erofs)", "umoci unpack + mkfs.erofs")
    ratio("gpucell cold (ext4)", "umoci unpack + mkfs.ext4 -d")
    ratio("gpucell cold (ext4)", "gpucell cold (erofs)")
    for k in ("gpucell cached (erofs)", "gpucell cached (ext4)"):
        if k in med:
            print(f"- {k}: {med[k]*1000:.1f} ms median, the whole `gpucell image disk` process "
                  f"(goal < 50 ms: {'met' if med[k] < 0.05 else 'NOT met'})")
    if a.inproc:
        imp, disk = [], []
        for line in open(a.inproc):
            kind, _, ms = line.strip().rpartition(" ")
            (imp if kind == "image imported" else disk).append(int(ms))
        if imp and disk:
            tot = [x + y for x, y in zip(imp, disk)]
            print(f"- In-process time `gpucell run` waits for (import + `guest_disk`, from the logs, "
                  f"{len(tot)} cold runs, erofs): median {statistics.median(tot)} ms "
                  f"(min {min(tot)}, max {max(tot)}); import alone median {statistics.median(imp)} ms. "
                  "The unpack tree is deleted afterwards by a background thread.")
    print("\ngpucell cold includes importing the layout into the store (copy + sha256 of every "
          "blob), unpacking with diff_id verification, mkfs, fsync and the atomic rename; the "
          "baseline pipelines skip the copy and the fsyncs. gpucell unpacks the transient tree "
          "on tmpfs (/dev/shm) when it fits; the baseline unpacks to disk (the bench work "
          "directory): most of the cold difference is that choice, on this VM's slow disk.")


main()
