#!/bin/bash
# make test-gpu: the in-guest half of gpucell's CUDA support on a machine with a real NVIDIA
# driver (docs/cuda.md): the CDI spec generated from the machine's driver root, the agent's
# own container setup (namespaces, overlay, injection, ldcache, environment) run outside a
# VM by `gpucell-agent container-test`, and a CUDA program compiled here with nvcc, run in
# the container and directly on the machine.
#
#   scripts/test-gpu.sh            run (skips, exit 0, where /dev/nvidiactl is absent)
#   scripts/test-gpu.sh prepare    on a build machine: put the static agent and busybox in
#                                  tests/gpu/prebuilt/ (the only binaries the run uses)
#
# Needs on the GPU machine: root, bash, coreutils, nvcc (NVCC, default
# /usr/local/cuda/bin/nvcc), the driver (GPU_DRIVER_ROOT, default /usr/local/nvidia when it
# holds the libraries, else /). No cargo, no network. Every step prints what it does, and a
# failing step does not stop the others. With OUT set, the log goes to $OUT/test-gpu.log,
# the summary to $OUT/test-gpu.json, the CDI spec to $OUT/nvidia-cdi.json.
set -u

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
prebuilt=tests/gpu/prebuilt

if [ "${1:-}" = prepare ]; then
    agent=target/x86_64-unknown-linux-gnu/release/gpucell-agent
    busybox=${BUSYBOX:-/bin/busybox}
    [ -x "$agent" ] || { echo "no $agent: run make agent first" >&2; exit 1; }
    [ -x "$busybox" ] || { echo "no $busybox: apt-get install busybox-static" >&2; exit 1; }
    mkdir -p "$prebuilt"
    install -m 0755 "$agent" "$prebuilt/gpucell-agent"
    install -m 0755 "$busybox" "$prebuilt/busybox"
    (cd "$prebuilt" && sha256sum gpucell-agent busybox >SHA256SUMS)
    ls -l "$prebuilt"
    echo "carry: $prebuilt ($(du -sh "$prebuilt" | cut -f1))"
    exit 0
fi

out=${OUT:-}
summary_json() { # STATUS REASON: the summary of a run that did not start
    [ -n "$out" ] || return 0
    mkdir -p "$out"
    printf '{"test_gpu":{"status":"%s","reason":"%s"}}\n' "$1" "$2" >"$out/test-gpu.json"
}
if [ ! -e /dev/nvidiactl ]; then
    echo "SKIP: /dev/nvidiactl is absent (no NVIDIA driver here)"
    summary_json skip "/dev/nvidiactl is absent"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "SKIP: needs root (namespaces, mounts, device nodes)"
    summary_json skip "not root"
    exit 0
fi

work=$(mktemp -d /tmp/gpucell-test-gpu.XXXXXX)
log=${out:+$out/test-gpu.log}
log=${log:-$work/test-gpu.log}
[ -n "$out" ] && mkdir -p "$out"
exec > >(tee "$log") 2>&1
tee_pid=$!
trap 'exec >&- 2>&-; wait "$tee_pid" 2>/dev/null; rm -rf "$work"' EXIT

started=$(date +%s.%N)
steps=()
passed=0 failed=0 skipped=0
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

# step NAME FUNCTION: runs it, records pass (0), skip (77) or fail (anything else).
step() {
    local name=$1 fn=$2 t0 rc status
    echo
    echo "=== $name"
    t0=$(date +%s.%N)
    "$fn"
    rc=$?
    case $rc in
    0) status=pass passed=$((passed + 1)) ;;
    77) status=skip skipped=$((skipped + 1)) ;;
    *) status=fail failed=$((failed + 1)) ;;
    esac
    echo "=== $name: ${status^^} ($(elapsed "$t0") s)"
    steps+=("{\"name\":\"$name\",\"status\":\"$status\",\"rc\":$rc,\"seconds\":$(elapsed "$t0")}")
}

say() { echo "+ $*"; }
need() { # FILE WHAT: skip the step when a previous one did not make FILE
    [ -e "$1" ] && return 0
    echo "skipped: $2 is missing (an earlier step failed)"
    return 77
}

# --- what is used ------------------------------------------------------------------------
agent=""
for c in "$prebuilt/gpucell-agent" "${GPUCELL_AGENT:-}" target/x86_64-unknown-linux-gnu/release/gpucell-agent; do
    [ -n "$c" ] && [ -f "$c" ] && { agent=$c; break; }
done
busybox=""
for c in "$prebuilt/busybox" /bin/busybox /usr/bin/busybox; do
    [ -f "$c" ] && { busybox=$c; break; }
done
nvcc=${NVCC:-/usr/local/cuda/bin/nvcc}
nvcc_flags=${NVCC_FLAGS:--O2 -cudart static -gencode arch=compute_90,code=sm_90 -gencode arch=compute_75,code=compute_75}
if [ -z "${GPU_DRIVER_ROOT:-}" ]; then
    if ls /usr/local/nvidia/lib64/libcuda.so.* >/dev/null 2>&1; then
        GPU_DRIVER_ROOT=/usr/local/nvidia
    else
        GPU_DRIVER_ROOT=/
    fi
fi
# Where the driver's libcuda.so.1 and nvidia-smi are (for running on the machine directly).
driver_lib="" smi=""
for d in lib64 lib usr/lib/x86_64-linux-gnu usr/lib64 usr/local/nvidia/lib64; do
    [ -e "${GPU_DRIVER_ROOT%/}/$d/libcuda.so.1" ] && { driver_lib=${GPU_DRIVER_ROOT%/}/$d; break; }
done
for d in bin usr/bin usr/local/nvidia/bin; do
    [ -x "${GPU_DRIVER_ROOT%/}/$d/nvidia-smi" ] && { smi=${GPU_DRIVER_ROOT%/}/$d/nvidia-smi; break; }
done
[ -n "$smi" ] || smi=$(command -v nvidia-smi || true)
direct_env=(env "LD_LIBRARY_PATH=${driver_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")

machine() {
    say "uname -a"; uname -a
    case $(uname -r) in 4.4.0*) echo "(kernel 4.4.0: likely gVisor)" ;; esac
    say "cat /proc/driver/nvidia/version"; cat /proc/driver/nvidia/version 2>&1
    say "ls -l /dev/nvidia*"; ls -l /dev/nvidia* 2>&1
    say "ls /proc/driver/nvidia/gpus"; ls /proc/driver/nvidia/gpus 2>&1
    say "driver root $GPU_DRIVER_ROOT, libcuda.so.1 in ${driver_lib:-?}, nvidia-smi ${smi:-?}"
    ls -l "$GPU_DRIVER_ROOT" 2>&1 | head -20
    ls "${driver_lib:-/nonexistent}" 2>&1 | head -60
    say "nvidia-smi (directly)"; "${direct_env[@]}" timeout 60 "${smi:-nvidia-smi}" 2>&1 | head -30
    say "$nvcc --version"; "$nvcc" --version 2>&1 | tail -2
    say "agent ${agent:-MISSING}, busybox ${busybox:-MISSING}"
    [ -n "$agent" ] && ls -l "$agent"
    [ -n "$busybox" ] && ls -l "$busybox"
    [ -n "$agent" ] && [ -n "$busybox" ]
}

build() {
    say "$nvcc $nvcc_flags -o gpucheck tests/gpu/cuda/gpucheck.cu"
    # shellcheck disable=SC2086
    timeout 240 "$nvcc" $nvcc_flags -o "$work/gpucheck" tests/gpu/cuda/gpucheck.cu || return 1
    local cc
    for cc in gcc cc; do
        command -v "$cc" >/dev/null && break
        cc=""
    done
    if [ -n "$cc" ]; then
        say "$cc -O2 -o cuprobe tests/gpu/cuda/cuprobe.c -ldl"
        "$cc" -O2 -o "$work/cuprobe" tests/gpu/cuda/cuprobe.c -ldl || return 1
    else
        say "$nvcc -O2 -o cuprobe tests/gpu/cuda/cuprobe.c -ldl"
        "$nvcc" -O2 -o "$work/cuprobe" tests/gpu/cuda/cuprobe.c -ldl || return 1
    fi
    ls -l "$work/gpucheck" "$work/cuprobe"
    say "ldd gpucheck"; ldd "$work/gpucheck" 2>&1
}

make_root() {
    need "$work/gpucheck" gpucheck || return 77
    [ -n "$busybox" ] || { echo "no busybox"; return 1; }
    install -m 0755 "$agent" "$work/gpucell-agent" || return 1
    if [ -n "${driver_lib:-}" ]; then say "ldd libcuda.so.1"; ldd "$driver_lib/libcuda.so.1" 2>&1; fi
    tests/gpu/make-root.sh "$work/root" "$busybox" "$work/gpucheck" "$work/cuprobe" || return 1

    ls -l "$work/root/usr/bin" "$work/root/usr/lib/x86_64-linux-gnu"
}

# ct LABEL [--env K=V]... -- CMD...: CMD in the agent's container; its stdout in
# $work/ct-LABEL.out, its summary line in $work/ct-LABEL.json; returns the harness's status.
ct() {
    local label=$1 rc
    shift
    local spec=()
    [ -e "$work/nvidia-cdi.json" ] || spec=(--spec-out "$work/nvidia-cdi.json")
    say "gpucell-agent container-test --rootfs ROOT --driver-root $GPU_DRIVER_ROOT --cuda-probe /usr/bin/cuprobe -- $*"
    timeout 200 "$work/gpucell-agent" container-test --rootfs "$work/root" \
        --driver-root "$GPU_DRIVER_ROOT" --timeout 150 ${spec[@]+"${spec[@]}"} \
        --cuda-probe /usr/bin/cuprobe -- "$@" >"$work/ct-$label.out" 2>"$work/ct-$label.err"
    rc=$?
    cat "$work/ct-$label.err" "$work/ct-$label.out"
    grep '^{"container_test"' "$work/ct-$label.out" | tail -1 >"$work/ct-$label.json"
    [ -n "$out" ] && [ -e "$work/nvidia-cdi.json" ] && cp "$work/nvidia-cdi.json" "$out/"
    echo "(container-test exit $rc)"
    return $rc
}

all=(--env NVIDIA_VISIBLE_DEVICES=all)

# The container alone, nothing injected: tells a setup failure from an injection one.
in_plain() {
    need "$work/root" "the workload root" || return 77
    ct plain -- /bin/sh -c 'echo "container up: $(hostname), pid $$, $(ls /dev | wc -l) /dev entries"' || return 1
    grep -q '^container up: gpucell-test, pid 1,' "$work/ct-plain.out"
}

in_smi() {
    need "$work/root" "the workload root" || return 77
    ct smi "${all[@]}" -- /bin/sh -c 'nvidia-smi -L && nvidia-smi' || return 1
    grep -qE '^GPU [0-9]+: ' "$work/ct-smi.out" || { echo "no GPU listed"; return 1; }
    grep -E '^GPU [0-9]+: ' "$work/ct-smi.out" | grep -q H200 || echo "note: the GPU listed is not an H200"
}

in_files() {
    need "$work/root" "the workload root" || return 77
    ct files "${all[@]}" -- /bin/sh -c '
        echo "# device nodes"; ls -l /dev/nvidia*
        echo "# ld.so.conf.d"; cat /etc/ld.so.conf.d/00-gpucell-nvidia.conf
        echo "# ldconfig -p"; ldconfig -p | grep -E "libcuda|libnvidia-ml|libnvidia-ptxjit"
        echo "# driver mounts"; grep -E "nvidia|libcuda" /proc/self/mounts | head -50
        echo "# params"; grep ModifyDeviceFiles /proc/driver/nvidia/params
        echo "# nvidia-smi on PATH: $(command -v nvidia-smi)"' || return 1
    grep -q 'libcuda.so.1 (libc6,x86-64) =>' "$work/ct-files.out"
}

in_vectoradd() {
    need "$work/root" "the workload root" || return 77
    ct vectoradd "${all[@]}" -- gpucheck vectoradd || return 1
    grep -q '^vectoradd OK' "$work/ct-vectoradd.out"
}

in_query() {
    need "$work/root" "the workload root" || return 77
    ct query "${all[@]}" -- gpucheck query || return 1
    grep -qE '^devices=[1-9]' "$work/ct-query.out"
}

in_bandwidth() {
    need "$work/root" "the workload root" || return 77
    ct bandwidth "${all[@]}" -- gpucheck bandwidth || return 1
    grep -q '^{"bandwidth"' "$work/ct-bandwidth.out"
}

direct() {
    need "$work/gpucheck" gpucheck || return 77
    local rc=0
    say "directly: gpucheck query, vectoradd, bandwidth (LD_LIBRARY_PATH=$driver_lib)"
    "${direct_env[@]}" timeout 120 "$work/gpucheck" query || rc=1
    "${direct_env[@]}" timeout 120 "$work/gpucheck" vectoradd >"$work/direct-vectoradd.out" || rc=1
    cat "$work/direct-vectoradd.out"
    "${direct_env[@]}" timeout 120 "$work/gpucheck" bandwidth >"$work/direct-bandwidth.out" || rc=1
    cat "$work/direct-bandwidth.out"
    grep -q '^vectoradd OK' "$work/direct-vectoradd.out" || rc=1
    grep -q '^{"bandwidth"' "$work/direct-bandwidth.out" || rc=1
    return $rc
}

in_none() {
    need "$work/root" "the workload root" || return 77
    ct none --env NVIDIA_VISIBLE_DEVICES=none -- /bin/sh -c '
        if ls /dev | grep -qE "^nvidia[0-9]+$"; then echo "GPU node present"; else echo "no GPU node"; fi
        ls -l /dev/nvidia*
        gpucheck query; echo "query_rc=$?"
        nvidia-smi -L; echo "smi_rc=$?"' || return 1
    local o=$work/ct-none.out rc=0
    grep -q '^no GPU node$' "$o" || { echo "FAIL: a GPU node is visible"; rc=1; }
    grep -q '^devices=0' "$o" || { echo "FAIL: CUDA found a device"; rc=1; }
    grep -q '^query_rc=0' "$o" && { echo "FAIL: gpucheck query succeeded"; rc=1; }
    grep -qE '^GPU [0-9]+: ' "$o" && { echo "FAIL: nvidia-smi lists a GPU"; rc=1; }
    return $rc
}

in_refused() {
    need "$work/root" "the workload root" || return 77
    ct refused "${all[@]}" --env 'NVIDIA_REQUIRE_CUDA=cuda>=99.0' -- /bin/sh -c 'echo WORKLOAD-RAN'
    local rc=$? ok=0
    [ $rc = 126 ] || { echo "FAIL: container-test exit $rc, expected 126 (refused)"; ok=1; }
    grep -q 'unsatisfied condition: cuda>=99.0, please update your driver' "$work/ct-refused.err" ||
        { echo "FAIL: no toolkit-like refusal"; ok=1; }
    grep -q WORKLOAD-RAN "$work/ct-refused.out" && { echo "FAIL: the workload ran"; ok=1; }
    return $ok
}

in_required_met() {
    need "$work/root" "the workload root" || return 77
    # What nvidia/cuda:13.0 images ask for.
    ct required "${all[@]}" --env 'NVIDIA_REQUIRE_CUDA=cuda>=13.0' -- gpucheck vectoradd || return 1
    grep -q '^vectoradd OK' "$work/ct-required.out"
}

step machine machine
step build build
step root make_root
step container-plain in_plain
step container-nvidia-smi in_smi
step container-injected-files in_files
step container-vectoradd in_vectoradd
step container-query in_query
step container-bandwidth in_bandwidth
step direct-gpucheck direct
step container-visible-none in_none
step container-require-refused in_refused
step container-require-met in_required_met

json_or_null() { # FILE PATTERN: the last line of FILE matching PATTERN, else null
    local l=""
    [ -e "$1" ] && l=$(grep "$2" "$1" | tail -1)
    echo "${l:-null}"
}
bw_in=$(json_or_null "$work/ct-bandwidth.out" '^{"bandwidth"')
bw_direct=$(json_or_null "$work/direct-bandwidth.out" '^{"bandwidth"')
injection=$(json_or_null "$work/ct-smi.json" '^{"container_test"')
vectoradd=$(json_or_null "$work/ct-vectoradd.json" '^{"container_test"')
status=pass
[ $failed -gt 0 ] && status=fail
summary=$(printf '{"test_gpu":{"status":"%s","passed":%d,"failed":%d,"skipped":%d,"seconds":%s,"kernel":"%s","driver_root":"%s","steps":[%s],"container_smi":%s,"container_vectoradd":%s,"bandwidth_container":%s,"bandwidth_direct":%s}}' \
    "$status" "$passed" "$failed" "$skipped" "$(elapsed "$started")" "$(uname -r)" "$GPU_DRIVER_ROOT" \
    "$(IFS=,; echo "${steps[*]}")" "$injection" "$vectoradd" "$bw_in" "$bw_direct")
echo
echo "=== summary: $passed passed, $failed failed, $skipped skipped"
echo "bandwidth in the container: $bw_in"
echo "bandwidth directly:         $bw_direct"
echo "$summary"
[ -n "$out" ] && echo "$summary" >"$out/test-gpu.json"
[ $failed -eq 0 ]
