#!/bin/sh
# Builds a minimal busybox initramfs: with `gpucell.probe=1` on the kernel command line
# its init prints the probe marker; otherwise it runs the given command, prints
# "floor-exit <code>" and powers off. Used by the accelerator probe tests and as the
# "floor" of the sandbox benchmark (the same kernel and QEMU with a trivial init).
# usage: busybox-initrd.sh OUT.cpio [CMD ARGS...]   (needs busybox-static and cpio)
set -eu
out=$1; shift
cmd=${*:-true}
bb=$(command -v busybox)
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
mkdir -p "$d/bin" "$d/proc" "$d/dev" "$d/sys"
cp "$bb" "$d/bin/busybox"
ln -s busybox "$d/bin/sh"
cat > "$d/init" <<INIT
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
if grep -q 'gpucell.probe=1' /proc/cmdline; then echo gpucell-probe-ok; poweroff -f; fi
echo floor-start
$cmd
echo "floor-exit \$?"
poweroff -f
INIT
chmod 755 "$d/init"
(cd "$d" && find . | cpio -o -H newc --quiet) > "$out"
