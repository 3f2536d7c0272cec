#!/bin/bash
# shellcheck disable=SC2086,SC2046 # space-separated lists (modules, libraries, tools) are split on purpose
# Builds what the nested test host (L1) boots: a Debian kernel and an initramfs
# holding busybox, the vfio/kvm/vhost modules, QEMU with its libraries and
# firmware, an L2 kernel, the gpucell binaries and the test scenarios.
#
# Everything is cached under target/nested/ (NESTED_OUT). Each part is rebuilt
# only when its inputs changed, so a second run with the same inputs does
# nothing. Prints the paths it produced in $NESTED_OUT/l1.env.
#
# Environment: see tests/nested/common.sh and docs/nested-test-host.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Which kernel image L1 boots and which one L1 hands to L2:
# vmlinux = uncompressed ELF entered by PVH (skips the decompressor, much faster
# under TCG), vmlinuz = the packaged bzImage.
NESTED_L1_KERNEL=${NESTED_L1_KERNEL:-vmlinux}
NESTED_L2_KERNEL=${NESTED_L2_KERNEL:-vmlinux}

check_tools() {
    local missing=() t
    for t in "$QEMU" busybox cpio flock depmod modprobe dpkg-deb apt-get apt-cache xz sha256sum ldd readelf; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    [ -f "$QEMU_MODULE_DIR/accel-tcg-x86_64.so" ] || missing+=("$QEMU_MODULE_DIR/accel-tcg-x86_64.so")
    if [ ${#missing[@]} -gt 0 ]; then
        die "missing ${missing[*]}; install with: apt-get install -y qemu-system-x86 busybox-static kmod cpio xz-utils binutils jq"
    fi
    if ldd "$(command -v busybox)" >/dev/null 2>&1; then
        die "$(command -v busybox) is dynamically linked; install busybox-static"
    fi
}

# Extracts the uncompressed ELF kernel from a bzImage ($1) into $2. Debian's
# amd64 kernels are xz-compressed; zstd and gzip are handled too.
extract_vmlinux() {
    local img=$1 out=$2 off
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$img" | head -1 | cut -d: -f1 || true)
    if [ -n "$off" ]; then
        # (xz stops after its stream; reading from a process substitution
        # keeps tail's SIGPIPE out of pipefail.)
        xz -dc --single-stream < <(tail -c +"$((off + 1))" "$img") >"$out.tmp"
    else
        off=$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$img" | head -1 | cut -d: -f1 || true)
        if [ -n "$off" ]; then
            zstd -qdc < <(tail -c +"$((off + 1))" "$img") >"$out.tmp" || true
        else
            die "$img: no xz or zstd payload found; set NESTED_L1_KERNEL=vmlinuz NESTED_L2_KERNEL=vmlinuz"
        fi
    fi
    # The PVH entry point is ELF note 18 (XEN_ELFNOTE_PHYS32_ENTRY).
    if ! readelf -n "$out.tmp" 2>/dev/null | grep -q 'Unknown note type: (0x00000012)'; then
        rm -f "$out.tmp"
        die "$img: extracted kernel is not an ELF with a PVH entry note; set NESTED_L1_KERNEL=vmlinuz NESTED_L2_KERNEL=vmlinuz"
    fi
    mv "$out.tmp" "$out"
}

# Resolves linux-image-amd64 to its versioned package, downloads and unpacks it,
# runs depmod and extracts vmlinux. Cached per package version.
build_kernel() {
    local pkg ver release kdir key tmp
    pkg=${NESTED_KERNEL_PACKAGE:-$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')}
    if [ -z "$pkg" ]; then
        [ -n "$(kernel_release)" ] || die "apt-cache cannot resolve linux-image-amd64 (run apt-get update) and no kernel is cached in $NESTED_OUT/kernel"
        log "warning: apt-cache cannot resolve linux-image-amd64; using cached kernel $(kernel_release)"
        return
    fi
    ver=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" {print $2}')
    release=${pkg#linux-image-}
    kdir=$NESTED_OUT/kernel/$release
    key="$pkg=$ver"
    if up_to_date "kernel-$release" "$key" "$kdir/vmlinux"; then
        echo "$release" >"$NESTED_OUT/kernel/current"
        return
    fi
    log "kernel: downloading $pkg=$ver"
    mkdir -p "$NESTED_OUT/kernel"
    tmp=$(mktemp -d "$NESTED_OUT/kernel/.tmp.XXXXXX")
    CLEANUP+=("$tmp")
    chmod 755 "$tmp"
    (cd "$tmp" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v -e unsandboxed -e '^Get:' >&2 || true)
    local deb
    deb=$(ls "$tmp"/*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || die "apt-get download $pkg=$ver produced no .deb"
    dpkg-deb -x "$deb" "$tmp/root"
    [ -d "$tmp/root/lib/modules/$release" ] || die "$deb has no lib/modules/$release"
    depmod -b "$tmp/root" "$release"
    cp "$tmp/root/boot/vmlinuz-$release" "$tmp/vmlinuz"
    extract_vmlinux "$tmp/vmlinuz" "$tmp/vmlinux"
    rm -rf "$kdir"
    mkdir -p "$kdir"
    mv "$tmp/root" "$kdir/root"
    mv "$tmp/vmlinuz" "$tmp/vmlinux" "$kdir/"
    rm -rf "$tmp"
    stamp "kernel-$release" "$key"
    echo "$release" >"$NESTED_OUT/kernel/current"
    log "kernel: $release ready ($(du -h "$kdir/vmlinux" | cut -f1) vmlinux)"
}

# Prints the module files (with dependencies first, from modules.dep) for NESTED_MODULES.
module_files() {
    local kdir=$1 release=$2 m
    for m in $NESTED_MODULES; do
        modprobe -d "$kdir/root" -S "$release" --show-depends "$m" ||
            die "kernel module $m not found in $kdir/root/lib/modules/$release"
    done | awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++'
}

# Copies busybox into a staging root with one symlink per applet.
stage_busybox() {
    local root=$1 a
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,root,mnt,var/lib}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list-full); do
        [ -e "$root/$a" ] || ln -s /bin/busybox "$root/$a"
    done
}

# An executable and its libraries into a staging root.
stage_executable() {
    local root=$1 exe=$2 dest=${3:-$2} l
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$exe" "$root$dest"
    for l in $(shared_libs "$exe"); do stage_file "$root" "$l"; done
}

# Part 1: busybox, modules, QEMU, firmware, L2 kernel, tools. The heavy part.
build_base() {
    local release kdir mods key stage l2k m f
    release=$(kernel_release)
    kdir=$(kernel_dir)
    mods=$(module_files "$kdir" "$release")
    l2k=$kdir/$NESTED_L2_KERNEL
    key=$(
        files_key "$QEMU" "$QEMU_MODULE_DIR/accel-tcg-x86_64.so" "$(command -v busybox)" $NESTED_TOOLS \
            "${QEMU_FIRMWARE[@]}" "${QEMU_FIRMWARE_OPTIONAL[@]}" $mods "$l2k" \
            $(shared_libs "$QEMU") $(for f in $NESTED_TOOLS; do shared_libs "$f"; done)
        echo "$NESTED_MODULES $release $NESTED_L2_KERNEL"
        content_key "$NESTED_SRC/build.sh" "$NESTED_SRC/common.sh"
    )
    key=$(echo "$key" | sha256sum | cut -d' ' -f1)
    if up_to_date base "$key" "$NESTED_OUT/parts/base.cpio"; then return; fi
    log "initramfs: building base part (busybox, modules, qemu, firmware, L2 kernel)"
    stage=$NESTED_OUT/stage/base
    rm -rf "$stage"
    stage_busybox "$stage"
    # Modules keep their tree layout; depmod makes modules.dep for modprobe in L1.
    mkdir -p "$stage/lib/modules/$release" "$stage/etc/nested"
    for m in $mods; do
        f=${m#"$kdir/root"}
        case "$f" in
        *.ko.xz) mkdir -p "$stage$(dirname "$f")" && xz -dc "$m" >"$stage${f%.xz}" ;;
        *.ko.zst) mkdir -p "$stage$(dirname "$f")" && zstd -qdc "$m" >"$stage${f%.zst}" ;;
        *) mkdir -p "$stage$(dirname "$f")" && cp "$m" "$stage$f" ;;
        esac
    done
    cp "$kdir/root/lib/modules/$release"/modules.{order,builtin,builtin.modinfo} "$stage/lib/modules/$release/" 2>/dev/null || true
    depmod -b "$stage" "$release"
    echo "$NESTED_MODULES" | tr ' ' '\n' | grep . >"$stage/etc/nested/modules"
    # QEMU and the TCG accelerator module (Debian builds TCG as a loadable module).
    stage_executable "$stage" "$QEMU" /usr/bin/qemu-system-x86_64
    stage_file "$stage" "$QEMU_MODULE_DIR/accel-tcg-x86_64.so"
    for f in "${QEMU_FIRMWARE[@]}"; do
        [ -e "$f" ] || die "QEMU firmware $f is missing; install qemu-system-data and seabios"
        stage_file "$stage" "$f"
    done
    for f in "${QEMU_FIRMWARE_OPTIONAL[@]}"; do [ -e "$f" ] && stage_file "$stage" "$f"; done
    for f in $NESTED_TOOLS; do stage_executable "$stage" "$f"; done
    mkdir -p "$stage/nested/l2"
    cp "$l2k" "$stage/nested/l2/kernel"
    mkdir -p "$NESTED_OUT/parts"
    make_cpio "$stage" "$NESTED_OUT/parts/base.cpio"
    rm -rf "$stage"
    stamp base "$key"
    log "initramfs: base part $(du -h "$NESTED_OUT/parts/base.cpio" | cut -f1)"
}

# The gpucell binaries (cargo build --release -p gpucell -p gpucell-daemon, and the
# containerd shim) and the static agent the guest artifacts need (the same build as
# `make agent`).
build_binaries() {
    [ -z "${NESTED_GPUCELL_BIN_DIR:-}" ] && [ "${NESTED_SKIP_CARGO:-0}" != 1 ] || return 0
    log "cargo build --release -p gpucell -p gpucell-daemon -p gpucell-shim -p gpucell-test-cri-pod"
    (cd "$REPO_ROOT" && CARGO_TARGET_DIR=$CARGO_TARGET_DIR cargo build --release -q -p gpucell -p gpucell-daemon -p gpucell-shim -p gpucell-test-cri-pod) ||
        die "cargo build --release -p gpucell -p gpucell-daemon -p gpucell-shim failed; fix the build or set NESTED_GPUCELL_BIN_DIR to a directory with built binaries"
    [ "$NESTED_BUILD_GUEST" = 1 ] && [ -z "${NESTED_AGENT:-}" ] || return 0
    log "cargo build --release -p gpucell-agent (static)"
    (cd "$REPO_ROOT" && CARGO_TARGET_DIR=$CARGO_TARGET_DIR RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -q -p gpucell-agent --target x86_64-unknown-linux-gnu) ||
        die "the static gpucell-agent build failed; set NESTED_AGENT to a static agent or NESTED_BUILD_GUEST=0"
}

# Guest artifacts for sandboxes inside L1: `gpucell guest build` into
# $NESTED_OUT/state (its own cache makes a second run a no-op).
build_guest() {
    local gpucell=$GPUCELL_BIN_DIR/gpucell
    [ "$NESTED_BUILD_GUEST" = 1 ] || return 0
    if [ ! -x "$NESTED_AGENT_BIN" ]; then
        # The sandbox scenarios then skip, naming the missing guest artifacts.
        log "warning: $NESTED_AGENT_BIN is missing (make agent, or set NESTED_AGENT): L1 gets no guest artifacts"
        NESTED_GUEST_DIR=
        return 0
    fi
    "$gpucell" --state-dir "$NESTED_OUT/state" guest build --agent "$NESTED_AGENT_BIN" >"$NESTED_OUT/guest-build.log" 2>&1 ||
        die "gpucell guest build failed: $(tail -5 "$NESTED_OUT/guest-build.log")"
}

# edu-probe (static C helper that talks to the edu device through sysfs) and a
# small OCI image (busybox + edu-probe) for `gpucell run` inside L1.
build_probe() {
    local dir=$NESTED_OUT/probe key work root a
    key=$(
        content_key "$NESTED_SRC/edu-probe" "$NESTED_SRC/build.sh"
        files_key "$(command -v busybox)" "$(command -v gcc)" "$(command -v umoci)"
    )
    key=$(echo "$key" | sha256sum | cut -d' ' -f1)
    if up_to_date probe "$key" "$dir/image/index.json"; then return; fi
    command -v gcc >/dev/null && command -v umoci >/dev/null ||
        die "gcc and umoci are needed for the test image; apt-get install -y gcc libc6-dev umoci"
    log "edu-probe and its OCI image"
    rm -rf "$dir"
    mkdir -p "$dir"
    gcc -static -O2 -Wall -Wextra -Werror -o "$dir/edu-probe" "$NESTED_SRC/edu-probe/edu-probe.c" ||
        die "compiling edu-probe failed (gcc -static needs libc6-dev)"
    work=$dir/work
    CLEANUP+=("$work")
    umoci init --layout "$dir/image"
    umoci new --image "$dir/image:latest"
    umoci unpack $([ "$(id -u)" = 0 ] || echo --rootless) --image "$dir/image:latest" "$work" >/dev/null
    root=$work/rootfs
    mkdir -p "$root"/{bin,usr/bin,etc,tmp,root,proc,sys,dev}
    chmod 1777 "$root/tmp"
    cp "$(command -v busybox)" "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list); do
        [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
    done
    cp "$dir/edu-probe" "$root/usr/bin/edu-probe"
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    umoci repack --image "$dir/image:latest" "$work" >/dev/null
    umoci config --image "$dir/image:latest" --config.cmd /usr/bin/edu-probe \
        --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin --config.workingdir /
    umoci gc --layout "$dir/image"
    rm -rf "$work"
    stamp probe "$key"
}

# The optional executables of the gpucell part, one path a line: the shim from the
# gpucell binaries' directory, containerd and ctr from NESTED_CONTAINERD_DIR (both or none).
optional_executables() {
    local b
    for b in $NESTED_OPTIONAL_BINS; do
        [ -x "$GPUCELL_BIN_DIR/$b" ] && echo "$GPUCELL_BIN_DIR/$b"
    done
    if [ -n "$NESTED_CONTAINERD_DIR" ] && [ -x "$NESTED_CONTAINERD_DIR/containerd" ] && [ -x "$NESTED_CONTAINERD_DIR/ctr" ]; then
        echo "$NESTED_CONTAINERD_DIR/containerd"
        echo "$NESTED_CONTAINERD_DIR/ctr"
    fi
    return 0
}

# Part 2: the gpucell binaries and the guest artifacts.
build_gpucell() {
    local bindir=$GPUCELL_BIN_DIR key stage b guest_files=() extras=()
    for b in $NESTED_BINS; do
        [ -x "$bindir/$b" ] || die "$bindir/$b is missing; build it with cargo build --release -p gpucell -p gpucell-daemon"
    done
    mapfile -t extras < <(optional_executables)
    if [ -n "$NESTED_GUEST_DIR" ] && [ -d "$NESTED_GUEST_DIR" ]; then
        mapfile -t guest_files < <(find "$NESTED_GUEST_DIR" -type f | LC_ALL=C sort)
    fi
    if [ -n "$NESTED_DRIVER_GUEST_DIR" ] && [ -f "$NESTED_DRIVER_GUEST_DIR/manifest.json" ]; then
        # The manifest names every artifact's digest: it stands for them in the key.
        guest_files+=("$NESTED_DRIVER_GUEST_DIR/manifest.json")
    fi
    key=$(
        # Content, not mtime: cargo relinks binaries whose bytes do not change.
        for b in $NESTED_BINS; do sha256sum <"$bindir/$b" && files_key $(shared_libs "$bindir/$b"); done
        # Which optional executables go in, and their content.
        for b in "${extras[@]}"; do echo "$b" && sha256sum <"$b" && files_key $(shared_libs "$b"); done
        echo "$NESTED_OPTIONAL_BINS $NESTED_CONTAINERD_DIR"
        files_key "${guest_files[@]}"
        echo "$NESTED_BINS $NESTED_GUEST_DIR $NESTED_DRIVER_GUEST_DIR"
        content_key "$NESTED_SRC/build.sh" "$NESTED_SRC/common.sh"
    )
    key=$(echo "$key" | sha256sum | cut -d' ' -f1)
    if up_to_date gpucell "$key" "$NESTED_OUT/parts/gpucell.cpio"; then return; fi
    log "initramfs: building gpucell part from $bindir"
    stage=$NESTED_OUT/stage/gpucell
    rm -rf "$stage"
    mkdir -p "$stage/etc/nested"
    for b in $NESTED_BINS; do stage_executable "$stage" "$bindir/$b" "/usr/local/bin/$b"; done
    for b in "${extras[@]}"; do
        stage_executable "$stage" "$b" "/usr/local/bin/$(basename "$b")"
        log "initramfs: including $b ($(du -h "$b" | cut -f1))"
    done
    # `gpucell guest build` output, so `gpucell run --device` can boot a sandbox
    # inside L1 (gpucell's default state dir there is /var/lib/gpucell).
    if [ ${#guest_files[@]} -gt 0 ]; then
        mkdir -p "$stage/var/lib/gpucell/guest"
        cp -a "$NESTED_GUEST_DIR" "$stage/var/lib/gpucell/guest/default"
        echo "$NESTED_GUEST_DIR" >"$stage/etc/nested/guest-artifacts"
        log "initramfs: including guest artifacts from $NESTED_GUEST_DIR"
    fi
    if [ -n "$NESTED_DRIVER_GUEST_DIR" ] && [ -f "$NESTED_DRIVER_GUEST_DIR/manifest.json" ]; then
        mkdir -p "$stage/var/lib/gpucell/guest"
        cp -a "$NESTED_DRIVER_GUEST_DIR" "$stage/var/lib/gpucell/guest/$(basename "$NESTED_DRIVER_GUEST_DIR")"
        log "initramfs: including the driver flavour $NESTED_DRIVER_GUEST_DIR"
    fi
    make_cpio "$stage" "$NESTED_OUT/parts/gpucell.cpio"
    rm -rf "$stage"
    stamp gpucell "$key"
}

# Part 3: L1 init, the scenario library and scenarios, the L2 initramfs. Small.
build_overlay() {
    local key stage l2
    key=$(
        content_key "$NESTED_SRC/guest" "$NESTED_SRC/scenarios" "$NESTED_SRC/build.sh" "$NESTED_SRC/common.sh"
        files_key "$(command -v busybox)"
        cat "$NESTED_OUT/stamps/probe"
    )
    key=$(echo "$key" | sha256sum | cut -d' ' -f1)
    if up_to_date overlay "$key" "$NESTED_OUT/parts/overlay.cpio"; then return; fi
    log "initramfs: building overlay part (init, scenarios, L2 initramfs)"
    stage=$NESTED_OUT/stage/overlay
    l2=$NESTED_OUT/stage/l2
    rm -rf "$stage" "$l2"
    stage_busybox "$l2"
    install -m 0755 "$NESTED_SRC/guest/l2-edu-init" "$l2/init"
    install -m 0755 "$NESTED_OUT/probe/edu-probe" "$l2/bin/edu-probe"
    mkdir -p "$stage/nested/l2" "$stage/nested/scenarios"
    make_cpio "$l2" "$stage/nested/l2/edu-initramfs.cpio"
    install -m 0755 "$NESTED_SRC/guest/l1-init" "$stage/init"
    install -m 0644 "$NESTED_SRC/guest/lib.sh" "$stage/nested/lib.sh"
    install -m 0644 "$NESTED_SRC"/scenarios/*.sh "$stage/nested/scenarios/"
    # The test image for `gpucell run` (oci:/nested/images/edu-probe:latest) and
    # edu-probe itself for scenarios that run it in L1.
    mkdir -p "$stage/nested/images" "$stage/usr/local/bin"
    cp -a "$NESTED_OUT/probe/image" "$stage/nested/images/edu-probe"
    install -m 0755 "$NESTED_OUT/probe/edu-probe" "$stage/usr/local/bin/edu-probe"
    make_cpio "$stage" "$NESTED_OUT/parts/overlay.cpio"
    rm -rf "$stage" "$l2"
    stamp overlay "$key"
}

# The L1 initramfs: the three parts concatenated (Linux unpacks concatenated
# cpio archives in order, later files replacing earlier ones).
build_initramfs() {
    local parts=("$NESTED_OUT"/parts/{base,gpucell,overlay}.cpio) out key
    case "$NESTED_COMPRESS" in
    none) out=$NESTED_OUT/l1-initramfs.cpio ;;
    gzip) out=$NESTED_OUT/l1-initramfs.cpio.gz ;;
    *) die "NESTED_COMPRESS must be none or gzip, not $NESTED_COMPRESS" ;;
    esac
    key=$(cat "$NESTED_OUT"/stamps/{base,gpucell,overlay} | sha256sum | cut -d' ' -f1)
    if ! up_to_date "initramfs-$NESTED_COMPRESS" "$key" "$out"; then
        if [ "$NESTED_COMPRESS" = gzip ]; then cat "${parts[@]}" | gzip -1 >"$out.tmp"; else cat "${parts[@]}" >"$out.tmp"; fi
        mv "$out.tmp" "$out"
        stamp "initramfs-$NESTED_COMPRESS" "$key"
        log "initramfs: $out $(du -h "$out" | cut -f1)"
    fi
    {
        echo "L1_KERNEL=$(kernel_dir)/$NESTED_L1_KERNEL"
        echo "L1_INITRD=$out"
        echo "KERNEL_RELEASE=$(kernel_release)"
    } >"$NESTED_OUT/l1.env.tmp"
    if cmp -s "$NESTED_OUT/l1.env.tmp" "$NESTED_OUT/l1.env"; then
        rm -f "$NESTED_OUT/l1.env.tmp"
    else
        mv "$NESTED_OUT/l1.env.tmp" "$NESTED_OUT/l1.env"
    fi
}

# Temporary directories, removed on every exit path once the lock is held.
CLEANUP=("$NESTED_OUT/stage")

main() {
    check_tools
    mkdir -p "$NESTED_OUT"
    # One build at a time per output directory (runs may start together).
    exec 9>"$NESTED_OUT/.build.lock"
    flock 9
    trap 'rm -rf "${CLEANUP[@]}" "$NESTED_OUT"/parts/*.tmp "$NESTED_OUT"/*.tmp' EXIT
    build_kernel
    build_base
    build_binaries
    build_guest
    build_probe
    build_gpucell
    build_overlay
    build_initramfs
}

main "$@"
