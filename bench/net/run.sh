#!/usr/bin/env bash
# Network benchmarks, in one run, all inside namespaces this script makes (topo.sh):
#   floor:    the TCP test from the "host" namespace straight to the "internet" one;
#   private:  the same test from a workload under `gpucell run --network private`
#             (tap, virtio-net, nftables policy and NAT);
#   user:     the same guest kernel under the same QEMU flags with QEMU's user-mode
#             (slirp) networking instead, from a bare busybox init (no agent);
# then the time a private network adds to a run's start (medians of RUNS runs of
# `-- true` with --network none and private; the host side's own setup time).
# The TCP test is crates/net/examples/netbench (throughput of one stream, then 1-byte
# round trips). Writes bench/results/net.md.
# Needs root, ip, nft, umoci, busybox-static, cpio, a built guest.
# usage: bench/net/run.sh   (env: GPUCELL, GPUCELL_STATE_DIR, RUNS, SECONDS_PER_TEST, ACCEL, OUT)
set -euo pipefail
cd "$(dirname "$0")/../.."
GPUCELL=${GPUCELL:-target/release/gpucell}
STATE=${GPUCELL_STATE_DIR:-/var/lib/gpucell}
RUNS=${RUNS:-5}
SECS=${SECONDS_PER_TEST:-5}
ACCEL=${ACCEL:-tcg}
OUT=${OUT:-bench/results/net.md}
QEMU=${QEMU:-$(command -v qemu-system-x86_64)}
P=gcbench
NB=target/x86_64-unknown-linux-gnu/release/examples/netbench

for t in ip nft umoci cpio jq "$QEMU" "$GPUCELL"; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (namespaces, taps)" >&2; exit 1; }
[ -f "$STATE/guest/default/manifest.json" ] || { echo "no guest in $STATE" >&2; exit 1; }
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release -p gpucell-net \
    --example netbench --target x86_64-unknown-linux-gnu

work=$(mktemp -d)
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    bench/net/topo.sh down $P
    rm -rf "$work"
}
trap cleanup EXIT
bench/net/topo.sh down $P
bench/net/topo.sh up $P
ip netns exec $P-inet "$NB" server 203.0.113.1:5201 &
server=$!
sleep 0.5

# The image: the demo image plus netbench.
scripts/make-demo-image.sh "$work/img" demo >/dev/null
umoci unpack --image "$work/img:demo" "$work/bundle" >/dev/null
cp "$NB" "$work/bundle/rootfs/bin/netbench"
umoci repack --image "$work/img:bench" "$work/bundle" >/dev/null
IMAGE="oci:$work/img:bench"
mkdir -p "$work/state"
ln -s "$(realpath "$STATE")/guest" "$work/state/guest"
printf '[network]\ndns = ["203.0.113.1"]\n' > "$work/config.toml"
gc() { ip netns exec $P-host "$GPUCELL" --state-dir "$work/state" --config "$work/config.toml" run --accel "$ACCEL" "$@"; }

echo "floor..." >&2
floor=$(ip netns exec $P-host "$NB" client 203.0.113.1:5201 "$SECS")
echo "private..." >&2
private=$(gc --network private "$IMAGE" -- /bin/netbench client 203.0.113.1:5201 "$SECS")

echo "user-mode..." >&2
# A bare init on the guest's own initramfs (its modules), netbench and busybox.
mkdir -p "$work/initrd/bin"
(cd "$work/initrd" && cpio -id --quiet < "$(realpath "$STATE")/guest/default/initramfs.cpio")
rm -f "$work/initrd/init"
cp /bin/busybox "$work/initrd/bin/busybox"
cp "$NB" "$work/initrd/bin/netbench"
cat > "$work/initrd/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev && mount -t proc proc /proc && mount -t sysfs sys /sys
for m in \$(cut -d' ' -f1 /modules/order); do insmod /modules/\$m 2>/dev/null; done
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
while [ "\$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ]; do sleep 0.05; done
echo "BENCH \$(/bin/netbench client 203.0.113.1:5201 $SECS)"
poweroff -f
INIT
chmod +x "$work/initrd/init"
(cd "$work/initrd" && find . | cpio -o -H newc --quiet > "$work/user.cpio")
user=$(ip netns exec $P-host timeout 300 "$QEMU" -nodefaults -no-user-config -display none -no-reboot \
    -machine q35 -accel "$ACCEL" -cpu max -smp 1 -m 512M \
    -kernel "$STATE/guest/default/vmlinux" -initrd "$work/user.cpio" \
    -append "console=ttyS0 panic=-1 quiet" -serial stdio \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 | sed -n 's/^BENCH //p' | tr -d '\r')

echo "start times..." >&2
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for mode in none private; do
    for _ in $(seq "$RUNS"); do
        gc --json --network $mode "$IMAGE" -- true 2>&1 >/dev/null | sed -n '/^{/,$p' > "$work/r.json"
        jq -r '[.timings_ms.total, .timings_ms.sandbox, (.network.setup_ms // 0)] | @tsv' "$work/r.json"
    done > "$work/t-$mode"
done
col() { cut -f"$1" "$work/t-$2" | median; }

row() { echo "| $1 | $(jq -r .throughput_mbit <<<"$2") | $(jq -r .rtt_us_p50 <<<"$2") | $(jq -r .rtt_us_p99 <<<"$2") |"; }
mkdir -p "$(dirname "$OUT")"
{
    echo "# Network benchmark ($(date -u +%F), accel $ACCEL, $(nproc) CPUs, ${SECS}s per test)"
    echo
    echo "TCP from the workload to the \"internet\" namespace (netbench: one stream, then 1-byte round trips)."
    echo
    echo "| path | throughput (Mbit/s) | RTT p50 (µs) | RTT p99 (µs) |"
    echo "|---|---|---|---|"
    row "floor: plain namespace" "$floor"
    row "gpucell --network private (tap, virtio-net, nftables, NAT)" "$private"
    row "QEMU user-mode networking (same kernel and flags)" "$user"
    echo
    echo "Start: median of $RUNS runs of \`gpucell run -- true\` (ms)."
    echo
    echo "| network | total | sandbox | host-side setup |"
    echo "|---|---|---|---|"
    echo "| none | $(col 1 none) | $(col 2 none) | - |"
    echo "| private | $(col 1 private) | $(col 2 private) | $(col 3 private) |"
} > "$OUT"
cat "$OUT"
