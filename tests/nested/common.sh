# Shared settings and helpers for tests/nested/{build,run}.sh. Sourced, not run.
# shellcheck shell=bash

NESTED_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$NESTED_SRC/../.." && pwd)
# Everything built or downloaded lives here; delete it to start from scratch.
NESTED_OUT=${NESTED_OUT:-$REPO_ROOT/target/nested}
# Cargo's target dir for the gpucell binaries copied into L1.
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
QEMU=${NESTED_QEMU:-/usr/bin/qemu-system-x86_64}
QEMU_MODULE_DIR=/usr/lib/x86_64-linux-gnu/qemu
# Kernel modules L1 needs (dependencies are added from modules.dep).
# kvm_amd and kvm_intel are both shipped; L1's init loads the one its CPU
# supports (TCG's -cpu max has SVM; NESTED_ACCEL=kvm on an Intel host has VMX).
# tun, vhost_net, veth, nftables and the tc policer for the sandbox-network scenario.
NESTED_MODULES=${NESTED_MODULES:-"vfio vfio_iommu_type1 vfio-pci kvm_amd kvm_intel vhost_vsock tun vhost_net veth nf_tables nft_chain_nat nft_masq nft_nat nft_reject_inet nft_fib_inet nft_ct sch_ingress cls_u32 act_police"}
# Binaries copied into L1: the CLI and the node daemon.
NESTED_BINS=${NESTED_BINS:-"gpucell gpucelld"}
# Binaries copied from the same directory only when they are there: the containerd shim
# and the CRI pod test tool (48-shim-edu skips without them).
NESTED_OPTIONAL_BINS=${NESTED_OPTIONAL_BINS-"containerd-shim-gpucell-v1 gpucell-test-cri-pod"}
# containerd and ctr (Debian's, as scripts/fetch-containerd.sh unpacks them) copied into L1
# when both are in this directory; empty: never. They add ~71 MB to the initramfs.
NESTED_CONTAINERD_DIR=${NESTED_CONTAINERD_DIR-$CARGO_TARGET_DIR/containerd/usr/bin}
# Extra host tools copied into L1 with their libraries: jq for JSON in the
# scenarios, mkfs.erofs for gpucell's image store (the guest's root disk).
NESTED_TOOLS=${NESTED_TOOLS:-"/usr/bin/jq /usr/bin/mkfs.erofs /usr/sbin/nft /usr/sbin/ip /usr/sbin/tc"}
# Where the gpucell binaries copied into L1 come from.
GPUCELL_BIN_DIR=${NESTED_GPUCELL_BIN_DIR:-$CARGO_TARGET_DIR/release}
# Guest artifacts (`gpucell guest build`) for sandboxes inside L1. By default
# build.sh builds them into $NESTED_OUT/state with the static agent (NESTED_AGENT,
# else the `make agent` output); NESTED_BUILD_GUEST=0 leaves them out, and
# NESTED_GUEST_DIR takes an existing build instead.
if [ -n "${NESTED_GUEST_DIR:-}" ]; then
    NESTED_BUILD_GUEST=0
elif [ "${NESTED_BUILD_GUEST:-1}" = 1 ]; then
    NESTED_BUILD_GUEST=1
    NESTED_GUEST_DIR=$NESTED_OUT/state/guest/default
else
    NESTED_GUEST_DIR=
fi
# A built NVIDIA driver flavour (`gpucell guest build --flavour nvidia-550`, its
# <state>/guest/<flavour> dir) copied into L1 for the driver scenario; empty: none.
NESTED_DRIVER_GUEST_DIR=${NESTED_DRIVER_GUEST_DIR:-}
NESTED_AGENT_BIN=${NESTED_AGENT:-$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/gpucell-agent}
# Initramfs compression: none (fastest boot under TCG, see docs) or gzip (gzip -1).
NESTED_COMPRESS=${NESTED_COMPRESS:-none}

# Firmware QEMU opens for direct kernel boot (found with `strace -e openat` on
# q35/pc/microvm with -nodefaults, bzImage and PVH vmlinux). The vgabios ROM is
# only read if a scenario asks for a display adapter; kept for that case.
QEMU_FIRMWARE=(
    /usr/share/seabios/bios-256k.bin
    /usr/share/seabios/bios.bin
    /usr/share/seabios/vgabios-stdvga.bin
    /usr/share/qemu/kvmvapic.bin
    /usr/share/qemu/linuxboot.bin
    /usr/share/qemu/linuxboot_dma.bin
    /usr/share/qemu/pvh.bin
    /usr/share/qemu/qboot.rom
    /usr/share/qemu/bios-microvm.bin
)
# Option ROMs only present if ipxe-qemu is installed (virtio-net etc. ask for them).
QEMU_FIRMWARE_OPTIONAL=(/usr/share/qemu/efi-virtio.rom /usr/share/qemu/efi-e1000e.rom)

log() { printf 'nested: %s\n' "$*" >&2; }
die() {
    printf 'nested: error: %s\n' "$*" >&2
    exit 1
}

# Prints a cache key for the given files: path, size and mtime of each
# (symlinks followed), hashed. Missing files are part of the key too.
files_key() {
    local f
    for f in "$@"; do
        if [ -e "$f" ]; then stat -L -c '%n %s %Y' "$f"; else echo "$f missing"; fi
    done | sha256sum | cut -d' ' -f1
}

# Prints a hash of the content of the given files or directories.
content_key() {
    find "$@" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

# up_to_date NAME KEY OUTPUT: true if OUTPUT exists and was built with KEY.
up_to_date() {
    [ -e "$3" ] && [ -f "$NESTED_OUT/stamps/$1" ] && [ "$(cat "$NESTED_OUT/stamps/$1")" = "$2" ]
}
stamp() {
    mkdir -p "$NESTED_OUT/stamps"
    printf '%s\n' "$2" >"$NESTED_OUT/stamps/$1"
}

# Prints the shared libraries a dynamic executable loads (resolved paths, the
# dynamic loader included). Prints nothing for static executables.
shared_libs() {
    ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | sort -u
}

# Copies a file into a staging root at the same absolute path, following symlinks.
stage_file() {
    local root=$1 f=$2
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
}

# Writes an uncompressed newc cpio of directory $1 to $2 (atomically).
make_cpio() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible -R 0:0) >"$2.tmp"
    mv "$2.tmp" "$2"
}

# The kernel files resolved by build.sh (kernel/current holds the release).
kernel_release() { cat "$NESTED_OUT/kernel/current" 2>/dev/null; }
kernel_dir() { echo "$NESTED_OUT/kernel/$(kernel_release)"; }
