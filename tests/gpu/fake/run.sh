#!/bin/bash
# scripts/test-gpu.sh against a fake NVIDIA machine, as root, on a machine without a GPU:
# it checks the harness's plumbing (steps, logs, summary), not CUDA. In a private mount
# namespace, /dev becomes a tmpfs with the usual nodes plus nvidiactl, nvidia0 and
# nvidia-uvm (no driver behind them); the driver root holds a gcc-built libcuda and
# libnvidia-ml (tests/gpu/fake) and a shell nvidia-smi; nvcc is tests/gpu/fake/nvcc. There
# is no /proc/driver/nvidia, so the GPUs come from the /dev nodes, as under gVisor.
#
# Usage: tests/gpu/fake/run.sh        (OUT, when set, receives the log and the summary)
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "SKIP: needs root (a mount namespace, device nodes)"
    exit 0
fi
for tool in gcc unshare; do
    command -v "$tool" >/dev/null || { echo "SKIP: $tool is missing"; exit 0; }
done
repo=$(cd "$(dirname "$0")/../../.." && pwd)
if [ "${1:-}" != inner ]; then
    exec unshare -m --propagation private "$0" inner
fi
cd "$repo"
base=$(mktemp -d /tmp/gpucell-fake-gpu.XXXXXX)
trap 'umount -l /dev 2>/dev/null || true; rm -rf "$base"' EXIT
v=580.159.04
mkdir -p "$base/driver/lib64" "$base/driver/bin"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$base/driver/lib64/libcuda.so.$v" tests/gpu/fake/libcuda.c
echo 'int nvmlInit_v2(void) { return 0; }' >"$base/ml.c"
gcc -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -o "$base/driver/lib64/libnvidia-ml.so.$v" "$base/ml.c"
ln -s "libcuda.so.$v" "$base/driver/lib64/libcuda.so.1"
install -m 0755 tests/gpu/fake/nvidia-smi "$base/driver/bin/nvidia-smi"

mount -t tmpfs -o mode=0755 tmpfs /dev
for n in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0" \
    "nvidiactl 195 255" "nvidia0 195 0" "nvidia-uvm 235 0"; do
    set -- $n
    mknod -m 0666 "/dev/$1" c "$2" "$3"
done
mkdir -p /dev/pts /dev/shm
ln -s /proc/self/fd /dev/fd
GPU_DRIVER_ROOT=$base/driver NVCC=$repo/tests/gpu/fake/nvcc scripts/test-gpu.sh
