#!/usr/bin/env bash
# Installs the Debian packages gpucell's build, demo and tests need. Idempotent:
# does nothing when everything is already there.
set -euo pipefail

PACKAGES=(
    qemu-system-x86     # the VMM
    qemu-utils
    busybox-static      # example image and test guests
    kmod                # depmod for the guest kernel's modules
    cpio
    xz-utils
    zstd
    e2fsprogs           # mkfs.ext4 -d, debugfs (tests read ext4 images)
    erofs-utils         # mkfs.erofs, fsck.erofs / dump.erofs
    umoci               # real OCI tools to build test images
    skopeo
    runc                # baseline in the sandbox benchmark
    hyperfine           # benchmarks
    pciutils
    libc6-dev           # static glibc for the agent
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages ${missing[*]}; run as root (or install them) and retry" >&2
    exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
