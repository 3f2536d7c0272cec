#!/usr/bin/env python3
"""Writes data/nvidia-flavours.toml from the Debian archive.

Usage: scripts/nvidia-flavour-table.py APT_DIR DOCS_DIR > data/nvidia-flavours.toml

APT_DIR is an apt state dir as `gpucell guest build` keeps it (`<state>/guest/apt`: its
own sources.list, lists and cache, updated). DOCS_DIR holds the `nvidia-driver` .debs of
each flavour's version (for their supported-gpus.json); they are downloaded there when
missing. Nothing of the system's apt configuration is read or changed.
"""
import gzip
import json
import os
import subprocess
import sys

FLAVOURS = [
    {
        "name": "nvidia-550",
        "branch": "550",
        "version": "550.163.01",
        "debian_version": "550.163.01-2",
        "suite": "trixie",
        "module_kind": "open",
        "kernel_source": "nvidia-open-kernel-source",
        "source_packages": "nvidia-graphics-drivers, nvidia-open-gpu-kernel-modules",
        "patches": ["pci-resize-resource-exclude-bars"],
        "architectures": ["Turing", "Ampere", "Ada", "Hopper"],
        "max_cuda": "12.4",
        "tools": [("nvidia-persistenced", "550.163.01-1")],
        "why": "Debian trixie (stable): the H200 (0x2335) needs at least 550. trixie rather "
        "than trixie-backports: a stable suite changes only in point releases, so the "
        "pinned digests stay valid longest.",
    },
    {
        "name": "nvidia-535",
        "branch": "535",
        "version": "535.261.03",
        "debian_version": "535.261.03-1",
        "suite": "bookworm",
        "module_kind": "open",
        "kernel_source": "nvidia-open-kernel-source",
        "source_packages": "nvidia-graphics-drivers, nvidia-open-gpu-kernel-modules",
        "patches": ["pci-resize-resource-exclude-bars"],
        "architectures": ["Turing", "Ampere", "Ada", "Hopper"],
        "max_cuda": "12.2",
        "tools": [("nvidia-persistenced", "535.171.04-1~deb12u1")],
        "why": "Debian bookworm's open modules (535.261.03) with the userspace of the same "
        "version; bookworm-security's 535.309.01 has no open module, and the "
        "proprietary one would serve only pre-Turing GPUs, which gpucell does not target.",
    },
]
DRIVER_PACKAGES = [
    ("firmware-nvidia-gsp", "firmware"),
    ("libcuda1", "library"),
    ("libnvidia-ml1", "library"),
    ("libnvidia-ptxjitcompiler1", "library"),
    ("libnvidia-nvvm4", "library"),
    ("libnvidia-pkcs11-openssl3", "library"),
    ("libnvidia-cfg1", "library"),
    ("nvidia-smi", "tool"),
]
# What nvidia-smi, nvidia-persistenced and the CUDA probe need to run in the guest,
# which has no C library of its own: bookworm's, whatever the driver's suite.
RUNTIME = [
    "libc6",
    "libtirpc3",
    "libgssapi-krb5-2",
    "libkrb5-3",
    "libk5crypto3",
    "libcom-err2",
    "libkrb5support0",
    "libkeyutils1",
    "libssl3",
]


def apt_opts(d):
    return [
        f"-oDir::Etc::SourceList={d}/sources.list",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={d}/lists",
        f"-oDir::Cache={d}/cache",
        "-oDir::Cache::pkgcache=",
        "-oDir::Cache::srcpkgcache=",
        "-oAPT::Default-Release=bookworm",
        "-oAPT::Sandbox::User=root",
    ]


def show(apt, pkg, version=None):
    spec = f"{pkg}={version}" if version else pkg
    out = subprocess.run(
        ["apt-cache", *apt, "show", "--no-all-versions", spec],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fields = {}
    for line in out.split("\n\n")[0].splitlines():
        if ":" in line and not line.startswith(" "):
            k, v = line.split(":", 1)
            fields[k] = v.strip()
    return {
        "name": pkg,
        "version": fields["Version"],
        "file": fields["Filename"].rsplit("/", 1)[-1],
        "size": int(fields["Size"]),
        "sha256": fields["SHA256"].lower(),
    }


def device_ids(apt, docs, version):
    deb = os.path.join(docs, f"nvidia-driver_{version}_amd64.deb".replace(":", "%3a"))
    if not os.path.exists(deb):
        subprocess.run(
            ["apt-get", *apt, "download", "-q", f"nvidia-driver={version}"],
            check=True,
            cwd=docs,
        )
    out = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", deb], check=True, capture_output=True
    ).stdout
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(out)) as t:
        member = t.extractfile("./usr/share/doc/nvidia-driver/supported-gpus.json.gz")
        chips = json.loads(gzip.decompress(member.read()))["chips"]
    ids = sorted(
        {int(c["devid"], 16) for c in chips if "kernelopen" in c.get("features", [])}
    )
    return ids


def pkg_lines(kind, p, role=None):
    lines = [f"[[{kind}]]", f'name = "{p["name"]}"', f'version = "{p["version"]}"']
    if role:
        lines.append(f'role = "{role}"')
    lines += [f'file = "{p["file"]}"', f'size = {p["size"]}', f'sha256 = "{p["sha256"]}"']
    return lines


def main():
    apt = apt_opts(sys.argv[1])
    docs = sys.argv[2]
    os.makedirs(docs, exist_ok=True)
    out = [HEADER.strip(), "", "schema = 1", ""]
    for f in FLAVOURS:
        v = f["debian_version"]
        ids = device_ids(apt, docs, v)
        out += [
            f"# {f['why']}",
            "[[flavour]]",
            f'name = "{f["name"]}"',
            f'branch = "{f["branch"]}"',
            f'version = "{f["version"]}"',
            f'debian_version = "{v}"',
            f'suite = "{f["suite"]}"',
            f'source_packages = "{f["source_packages"]}"',
            f'module_kind = "{f["module_kind"]}"',
            f"patches = {json.dumps(f['patches'])}",
            f"architectures = {json.dumps(f['architectures'])}",
            f'max_cuda = "{f["max_cuda"]}"',
            f'device_ids_source = "nvidia-driver {v}: usr/share/doc/nvidia-driver/supported-gpus.json.gz, chips with the kernelopen feature"',
            "device_ids = [",
        ]
        for i in range(0, len(ids), 10):
            out.append("  " + ", ".join(f"0x{d:04x}" for d in ids[i : i + 10]) + ",")
        out += ["]", ""]
        out += pkg_lines("flavour.package", show(apt, f["kernel_source"], v), "module-source")
        out.append("")
        for name, role in DRIVER_PACKAGES:
            out += pkg_lines("flavour.package", show(apt, name, v), role)
            out.append("")
        for name, tv in f["tools"]:
            out += pkg_lines("flavour.package", show(apt, name, tv), "tool")
            out.append("")
    out.append(PATCHES.strip())
    out.append("")
    out.append("# The C library and what nvidia-persistenced links (bookworm), for every flavour.")
    for name in RUNTIME:
        out += pkg_lines("runtime", show(apt, name))
        out.append("")
    print("\n".join(out).rstrip() + "\n", end="")


HEADER = """
# NVIDIA driver flavours gpucell can build (`gpucell guest build --flavour NAME`).
# Generated by scripts/nvidia-flavour-table.py from the Debian archive; edit that script,
# not this file, then rerun it. Read by crates/guest/src/driver/table.rs, which checks:
# the userspace packages (role library/firmware/tool, except nvidia-persistenced, a
# separately versioned tool) carry exactly `debian_version`; one module-source package;
# digests are 64 hex digits; patches name files in data/nvidia-patches/.
#
# roles: module-source (the kernel module source tarball), firmware (GSP firmware),
# library (flattened onto the driver disk), tool (nvidia-smi, nvidia-persistenced).
# `runtime` packages give the guest a C library to run the tools with.
"""

PATCHES = """
# Source patches, applied by exact text replacement (the text must occur exactly once)
# and only where the kernel headers need them: `when_header` (relative to the kernel's
# -common headers) must contain `when_contains`.
#
# Debian backported upstream 337b1b566db0 ("PCI: Fix restoring BARs on BAR resize
# rollback path") into 6.1.187 (ABI 6.1.0-53 and later): pci_resize_resource() gained
# an `exclude_bars` argument. Open 535.261.03 and 550.163.01 lack NVIDIA's later conftest
# for it and fail with "too few arguments to function 'pci_resize_resource'". Passing 0
# is what newer NVIDIA sources do under NV_PCI_RESIZE_RESOURCE_HAS_EXCLUDE_BARS_ARG.
[[patch]]
name = "pci-resize-resource-exclude-bars"
file = "nvidia/nv-pci.c"
find = "pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size);"
replace = "pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size, 0);"
when_header = "include/linux/pci.h"
when_contains = "int exclude_bars);"
"""

if __name__ == "__main__":
    main()
