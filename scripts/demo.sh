#!/usr/bin/env bash
# The main job on an embedded default, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
GPUCELL=${GPUCELL:-target/release/gpucell}
FIXTURE=${FIXTURE:-tests/fixtures/hosts/h200x4-vm}

echo "== gpucell doctor (this machine)"
"$GPUCELL" doctor || true
echo "== gpucell gpu list (this machine)"
"$GPUCELL" gpu list
if [ -d "$FIXTURE" ]; then
    echo "== gpucell doctor (bundled H200 capture: $FIXTURE)"
    "$GPUCELL" --host-root "$FIXTURE" doctor || true
    echo "== gpucell gpu list (bundled H200 capture)"
    "$GPUCELL" --host-root "$FIXTURE" gpu list
fi

echo "== gpucell run: a busybox image built here (umoci + Debian's busybox-static), in a microVM"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
IMAGE=$(scripts/make-demo-image.sh "$work/demo-oci" demo | tail -n1)
echo "image: $IMAGE"
echo "host : $(uname -sr) hostname=$(hostname) /work: $(ls -d /work 2>/dev/null || echo absent)"
# The demo needs no network: --network none (the default, private, is in docs/network.md).
"$GPUCELL" run --network none "$IMAGE" -- sh -c '
    echo "guest: $(uname -a)"
    echo "guest: hostname=$(hostname) pid of this shell=$$ user=$(id -un)"
    echo "guest: /work: $(ls -d /work/main 2>/dev/null || echo absent)"
    echo "guest: network interfaces: $(ls /proc/sys/net/ipv4/conf | grep -v -e all -e default | tr "\n" " ")"
'
echo "== gpucell run --json (summary on stderr: exit code, phase times, what was passed)"
echo "hello through stdin" | "$GPUCELL" --json run --network none -e GREETING=hi "$IMAGE" -- sh -c 'echo "$GREETING: $(cat)"; exit 3' || echo "(exit code $?)"
