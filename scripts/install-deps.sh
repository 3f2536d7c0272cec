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
    gcc                 # the nested test host's edu-probe helper (static C)
    binutils            # readelf (nested test host build)
    jq                  # JSON checks inside the nested test host
    nftables            # the sandbox network's firewall and NAT (gpucell applies them with nft -f)
    iproute2            # tests build their own namespaces and veth pairs
    curl                # the network tests' HTTP client in the namespaces they make
    make                # NVIDIA driver flavours: the driver's own Makefile ...
    gcc-12              # ... with the compiler of the guest kernel's headers
    flex                # the microVM guest kernel, compiled from linux-source-6.1:
    bison               #   Kconfig's parser,
    bc                  #   the timeconst header,
    libelf-dev          #   objtool and the ORC unwinder,
    libssl-dev          #   the module signing and certificate tools (scripts/)
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The guest build resolves Debian's kernel package with apt-cache: the package lists
# must know it.
lists_ok=1
apt-cache show linux-image-amd64 >/dev/null 2>&1 || lists_ok=0
if [ ${#missing[@]} -eq 0 ] && [ $lists_ok = 1 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages ${missing[*]}; run as root (or install them) and retry" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
[ ${#missing[@]} -eq 0 ] && exit 0
echo "install-deps: installing ${missing[*]}"
apt-get install -y -qq --no-install-recommends "${missing[@]}"
