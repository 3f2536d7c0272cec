#!/usr/bin/env bash
# Fetches containerd and ctr from Debian into DIR without installing them (apt-get
# download + dpkg -x), for the shim's tests and benchmark. Cached: nothing is done when
# DIR/usr/bin/containerd and DIR/usr/bin/ctr exist.
# usage: scripts/fetch-containerd.sh DIR      ->  DIR/usr/bin/{containerd,ctr}
set -euo pipefail
dir=${1:?usage: fetch-containerd.sh DIR}
if [ -x "$dir/usr/bin/containerd" ] && [ -x "$dir/usr/bin/ctr" ]; then
    exit 0
fi
command -v apt-get >/dev/null || { echo "apt-get is missing: fetch containerd by hand into $dir" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
download() { (cd "$work" && apt-get download -q containerd) >&2; }
if ! download; then
    apt-get update -q >&2
    download
fi
mkdir -p "$dir"
dpkg -x "$work"/containerd_*.deb "$dir"
"$dir/usr/bin/containerd" --version
