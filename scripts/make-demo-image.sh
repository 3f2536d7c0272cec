#!/usr/bin/env bash
# Builds a small OCI image locally, with no network: Debian's static busybox, a root and
# an unprivileged user (app, uid 1000), /tmp. Uses umoci.
# usage: scripts/make-demo-image.sh OUT_DIR [TAG]    ->  image reference oci:OUT_DIR:TAG
set -euo pipefail
out=${1:?usage: make-demo-image.sh OUT_DIR [TAG]}
tag=${2:-demo}
command -v umoci >/dev/null || { echo "umoci is missing: apt-get install -y umoci" >&2; exit 1; }
busybox=${BUSYBOX:-/bin/busybox}
if ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
    echo "$busybox is not a static busybox: apt-get install -y busybox-static" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:$tag"
umoci unpack --image "$out:$tag" "$work/bundle" >/dev/null
root=$work/bundle/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,home/app,proc,sys,dev,work}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cat > "$root/etc/passwd" <<PW
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PW
cat > "$root/etc/group" <<GR
root:x:0:
app:x:1000:
nogroup:x:65534:
GR
chown 1000:1000 "$root/home/app"
echo "gpucell demo image" > "$root/etc/motd"
umoci repack --image "$out:$tag" "$work/bundle" >/dev/null
umoci config --image "$out:$tag" \
    --config.cmd /bin/sh \
    --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env DEMO=1 \
    --config.workingdir / \
    --config.label org.opencontainers.image.title=gpucell-demo
umoci gc --layout "$out"
echo "oci:$out:$tag"
