#!/bin/bash
# usage: tests/nested/run.sh [SCENARIO...]
#        tests/nested/run.sh timing    (device-run timings, see docs)
#
# Builds the nested test host (tests/nested/build.sh, cached), boots it under
# TCG with an emulated Intel IOMMU and QEMU edu PCI devices, runs the given
# scenarios (tests/nested/scenarios/*.sh; all of them by default) inside it and
# prints one line per result and a summary. Exits 0 only if every check passed
# (skips are allowed unless NESTED_STRICT=1), 1 on any failure or timeout.
#
# Environment: NESTED_TIMEOUT (whole run, s, default 600), NESTED_SCENARIO_TIMEOUT
# (per scenario, s, default 300), NESTED_EDU_COUNT (default 3), NESTED_MEM,
# NESTED_SMP, NESTED_STRICT, NESTED_ACCEL (tcg), NESTED_QUIET=1 (console only to the log file);
# build settings in tests/nested/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# `timing` (scenarios/timing.sh, not part of the default run) boots sandboxes of
# up to 4 GiB with and without hugepages: it gets a bigger L1 and more time.
timing=0
for s in "$@"; do [ "${s%.sh}" != timing ] || timing=1; done
if [ "$timing" = 1 ]; then
    NESTED_TIMEOUT=${NESTED_TIMEOUT:-3000}
    NESTED_SCENARIO_TIMEOUT=${NESTED_SCENARIO_TIMEOUT:-2700}
    NESTED_MEM=${NESTED_MEM:-9G}
fi
NESTED_TIMEOUT=${NESTED_TIMEOUT:-900}
NESTED_SCENARIO_TIMEOUT=${NESTED_SCENARIO_TIMEOUT:-400}
NESTED_EDU_COUNT=${NESTED_EDU_COUNT:-3}
NESTED_MEM=${NESTED_MEM:-3G}
NESTED_SMP=${NESTED_SMP:-2}
NESTED_STRICT=${NESTED_STRICT:-0}
NESTED_QUIET=${NESTED_QUIET:-0}
# tcg on machines whose KVM cannot run a stock kernel (see docs); kvm on a
# host with working nested virtualization.
NESTED_ACCEL=${NESTED_ACCEL:-tcg}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

t_start=$(now)
scenarios=()
for s in "$@"; do
    s=${s%.sh}
    s=${s##*/}
    [ -f "$NESTED_SRC/scenarios/$s.sh" ] ||
        die "no scenario $s; available: $(cd "$NESTED_SRC/scenarios" && ls | sed 's/\.sh$//' | tr '\n' ' ')"
    scenarios+=("$s")
done
scenario_arg=all
[ ${#scenarios[@]} -eq 0 ] || scenario_arg=$(
    IFS=,
    echo "${scenarios[*]}"
)

"$NESTED_SRC/build.sh"
source "$NESTED_OUT/l1.env"
t_built=$(now)
build_s=$(awk -v a="$t_start" -v b="$t_built" 'BEGIN { printf "%.1f", b - a }')

run_dir=$NESTED_OUT/runs/$(date -u +%Y%m%dT%H%M%S)-$$
mkdir -p "$run_dir"
ln -sfn "$run_dir" "$NESTED_OUT/runs/latest"
# Keep the last 10 runs.
ls -d "$NESTED_OUT"/runs/2* 2>/dev/null | head -n -10 | xargs -r rm -rf
console=$run_dir/console.log
results=$run_dir/results.log
: >"$results"

edu=()
for _ in $(seq "$NESTED_EDU_COUNT"); do edu+=(-device edu); done
qemu_args=(
    -M q35,kernel-irqchip=split -accel "$NESTED_ACCEL" -cpu max -smp "$NESTED_SMP" -m "$NESTED_MEM"
    -device intel-iommu,intremap=on,caching-mode=on "${edu[@]}"
    -nodefaults -display none -monitor none -no-reboot
    -chardev stdio,id=con,signal=off -serial chardev:con
    -chardev "file,id=results,path=$results" -serial chardev:results
    -kernel "$L1_KERNEL" -initrd "$L1_INITRD"
    -append "console=ttyS0 quiet panic=-1 no_timer_check intel_iommu=on iommu=pt nested.scenarios=$scenario_arg nested.edu=$NESTED_EDU_COUNT nested.scenario_timeout=$NESTED_SCENARIO_TIMEOUT"
)
echo "$QEMU ${qemu_args[*]}" >"$run_dir/qemu-cmdline"

qpid=
stop_qemu() {
    [ -n "$qpid" ] || return 0
    if kill -0 "$qpid" 2>/dev/null; then
        kill -TERM "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$qpid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$qpid" 2>/dev/null || true
    fi
    wait "$qpid" 2>/dev/null || true
    qpid=
}
trap stop_qemu EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "booting L1 ($(basename "$L1_KERNEL"), $(du -h "$L1_INITRD" | cut -f1) initramfs, $NESTED_EDU_COUNT edu); log: $console"
t_qemu=$(now)
if [ "$NESTED_QUIET" = 1 ]; then
    "$QEMU" "${qemu_args[@]}" </dev/null >"$console" 2>&1 &
else
    "$QEMU" "${qemu_args[@]}" </dev/null > >(tee "$console") 2>&1 &
fi
qpid=$!
deadline=$(awk -v a="$t_qemu" -v t="$NESTED_TIMEOUT" 'BEGIN { printf "%d", a + t }')
boot_s=
timed_out=0
while kill -0 "$qpid" 2>/dev/null; do
    if [ -z "$boot_s" ] && grep -q NESTED-BOOT "$results"; then boot_s=$(elapsed "$t_qemu"); fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        timed_out=1
        break
    fi
    sleep 0.2
done
if [ "$timed_out" = 1 ]; then
    stop_qemu
    qrc=timeout
else
    qrc=0
    wait "$qpid" || qrc=$?
    qpid=
fi
[ -n "$boot_s" ] || { grep -q NESTED-BOOT "$results" && boot_s=$(elapsed "$t_qemu"); } || boot_s=-
l1_s=$(elapsed "$t_qemu")

# Results, one per line, then the summary.
"$NESTED_SRC/summarize.sh" --results "$results" --qemu-status "$qrc" --timeout "$NESTED_TIMEOUT" \
    --console "$console" --strict "$NESTED_STRICT" \
    --timing "build ${build_s}s, L1 boot ${boot_s}s (host wall), L1 run ${l1_s}s, total $(elapsed "$t_start")s" |
    tee "$run_dir/summary.txt"
exit "${PIPESTATUS[0]}"
