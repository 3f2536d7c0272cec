#!/bin/bash
# Builds a small workload root for the GPU harness: busybox (static) with its applets, the
# machine's ldconfig (the image's own ldconfig is what injection runs), and each PROGRAM in
# /usr/bin with the shared libraries it links (glibc, libstdc++, ...), in a merged-/usr
# layout (/lib -> usr/lib, /lib64 -> usr/lib64) whose library directory is
# /usr/lib/x86_64-linux-gnu, as on Debian and Ubuntu images.
#
# Usage: tests/gpu/make-root.sh ROOT BUSYBOX [PROGRAM]...
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 ROOT BUSYBOX [PROGRAM]..." >&2
    exit 2
fi
root=$1
busybox=$2
shift 2
libdir=usr/lib/x86_64-linux-gnu

mkdir -p "$root"/{bin,sbin,etc,dev,proc,sys,tmp,root,usr/bin,usr/sbin,$libdir,usr/lib64}
ln -sfn usr/lib "$root/lib"
ln -sfn usr/lib64 "$root/lib64"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    case $applet in busybox | ldconfig) continue ;; esac
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

# The shared libraries PROGRAM links, one path per line ("not found" ones left out).
libs_of() {
    local out
    if command -v ldd >/dev/null 2>&1; then
        out=$(ldd "$1" 2>/dev/null || true)
    else
        out=$(/lib64/ld-linux-x86-64.so.2 --list "$1" 2>/dev/null || true)
    fi
    printf '%s\n' "$out" | awk '/=> \// { print $3; next } /^[ \t]*\/[^ ]+ \(/ { print $1 }'
}

copy_libs() {
    local lib
    for lib in $(libs_of "$1"); do
        [ -e "$lib" ] || continue
        case $(basename "$lib") in
        ld-linux-x86-64.so.2)
            cp -L "$lib" "$root/usr/lib64/ld-linux-x86-64.so.2"
            cp -L "$lib" "$root/$libdir/ld-linux-x86-64.so.2"
            ;;
        *) [ -e "$root/$libdir/$(basename "$lib")" ] || cp -L "$lib" "$root/$libdir/" ;;
        esac
    done
}

ldconfig_src=""
for c in /sbin/ldconfig.real /usr/sbin/ldconfig.real /sbin/ldconfig /usr/sbin/ldconfig; do
    if [ -f "$c" ] && is_elf "$c"; then
        ldconfig_src=$c
        break
    fi
done
if [ -n "$ldconfig_src" ]; then
    install -m 0755 "$ldconfig_src" "$root/sbin/ldconfig"
    copy_libs "$ldconfig_src"
else
    echo "make-root: no ELF ldconfig on this machine: the root gets none (injection warns)" >&2
fi

for prog in "$@"; do
    install -m 0755 "$prog" "$root/usr/bin/$(basename "$prog")"
    copy_libs "$prog"
done

# A distribution image carries all of glibc, not only what the programs link: the driver's
# libraries (injected later) need libdl, libpthread, librt and libm, which a program built
# against glibc >= 2.34 no longer links. Take them from beside the libc the programs use,
# plus the libraries of each LIBS_OF file (e.g. the driver's libcuda) that resolve here.
libc_path=$(libs_of /bin/sh | grep '/libc[.]so[.]6$' | head -1 || true)
libc_dir=${libc_path%/*}
for name in libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libgcc_s.so.1 libz.so.1; do
    if [ -n "$libc_path" ] && [ -e "$libc_dir/$name" ] && [ ! -e "$root/$libdir/$name" ]; then
        cp -L "$libc_dir/$name" "$root/$libdir/"
    fi
done
for f in ${LIBS_OF:-}; do
    if [ -e "$f" ]; then copy_libs "$f"; fi
done
echo "make-root: $root: busybox, ldconfig from ${ldconfig_src:-nowhere}, $# program(s), $(ls "$root/$libdir" | wc -l) libraries"
