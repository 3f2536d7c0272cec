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
# Environment: NESTED_TIMEOUT (each L1, s, default 900), NESTED_SCENARIO_TIMEOUT
# (per scenario, s, default 400), NESTED_EDU_COUNT (default 3), NESTED_MEM,
# NESTED_SMP, NESTED_STRICT, NESTED_ACCEL (tcg), NESTED_QUIET=1 (console only to the
# log file), NESTED_SILENCE (s of no console output and no result after which L1 counts
# as frozen, default 300), NESTED_RETRY (default 2: after an emulator fault in L1, rerun the
# interrupted scenario and the rest once in a fresh L1; 0: never);
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
    NESTED_SILENCE=${NESTED_SILENCE:-1500}
    NESTED_MEM=${NESTED_MEM:-9G}
fi
NESTED_TIMEOUT=${NESTED_TIMEOUT:-900}
NESTED_SCENARIO_TIMEOUT=${NESTED_SCENARIO_TIMEOUT:-400}
# Seconds of total silence (console and results) after which L1 counts as frozen.
NESTED_SILENCE=${NESTED_SILENCE:-300}
NESTED_EDU_COUNT=${NESTED_EDU_COUNT:-3}
# A driver flavour in L1 (NESTED_DRIVER_GUEST_DIR) adds ~210 MB to its initramfs; with
# 3G the L1 stalled in the driver scenario's sandbox (no console output, killed at the
# L1 timeout), with 5G it passes.
if [ -n "$NESTED_DRIVER_GUEST_DIR" ]; then
    NESTED_MEM=${NESTED_MEM:-5G}
fi
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
results=$run_dir/results.log
: >"$results"

edu=()
for _ in $(seq "$NESTED_EDU_COUNT"); do edu+=(-device edu); done

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

# boot_l1 ATTEMPT SCENARIOS: boots L1 for the comma-separated SCENARIOS (or
# "all"), writing $run_dir/{console,results}-ATTEMPT.log; sets qrc to QEMU's exit
# status, "timeout" or "stalled", and boot_s.
boot_l1() {
    local attempt=$1 arg=$2 deadline t_qemu stall_at=
    console=$run_dir/console-$attempt.log
    att_results=$run_dir/results-$attempt.log
    : >"$att_results"
    local qemu_args=(
        -M q35,kernel-irqchip=split -accel "$NESTED_ACCEL" -cpu max -smp "$NESTED_SMP" -m "$NESTED_MEM"
        -device intel-iommu,intremap=on,caching-mode=on "${edu[@]}"
        -nodefaults -display none -monitor none -no-reboot
        -chardev stdio,id=con,signal=off -serial chardev:con
        -chardev "file,id=results,path=$att_results" -serial chardev:results
        -kernel "$L1_KERNEL" -initrd "$L1_INITRD"
        -append "console=ttyS0 quiet panic=-1 no_timer_check intel_iommu=on iommu=pt nested.scenarios=$arg nested.edu=$NESTED_EDU_COUNT nested.scenario_timeout=$NESTED_SCENARIO_TIMEOUT nested.attempt=$attempt nested.shim_pod=${NESTED_SHIM_POD:-0}"
    )
    echo "$QEMU ${qemu_args[*]}" >"$run_dir/qemu-cmdline-$attempt"
    log "booting L1 ($(basename "$L1_KERNEL"), $(du -h "$L1_INITRD" | cut -f1) initramfs, $NESTED_EDU_COUNT edu, scenarios $arg); log: $console"
    t_qemu=$(now)
    if [ "$NESTED_QUIET" = 1 ]; then
        "$QEMU" "${qemu_args[@]}" </dev/null >"$console" 2>&1 &
    else
        "$QEMU" "${qemu_args[@]}" </dev/null > >(tee "$console") 2>&1 &
    fi
    qpid=$!
    deadline=$(awk -v a="$t_qemu" -v t="$NESTED_TIMEOUT" 'BEGIN { printf "%d", a + t }')
    boot_s=
    qrc=
    local size=0 stalls=0 n csize=0 quiet_since
    quiet_since=$(date +%s)
    while kill -0 "$qpid" 2>/dev/null; do
        if [ -z "$boot_s" ] && grep -q NESTED-BOOT "$att_results"; then boot_s=$(elapsed "$t_qemu"); fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            qrc=timeout
            break
        fi
        # A CPU of L1 stuck for good (an RCU stall or soft lockup warning, then no
        # result for a minute) is the emulator's fault, not a slow test. A new
        # result disarms.
        n=$(stat -c %s "$att_results")
        if [ "$n" != "$size" ]; then
            size=$n
            stall_at=
        fi
        n=$(grep -c 'rcu: INFO: .* detected stalls\|soft lockup - CPU' "$console" || true)
        if [ "$n" -gt "$stalls" ]; then
            stalls=$n
            stall_at=$(date +%s)
        fi
        if [ -n "$stall_at" ] && [ $(($(date +%s) - stall_at)) -ge 60 ]; then
            qrc=stalled
            break
        fi
        # Every CPU of L1 stuck at once prints no warning at all: the console and the
        # results stay silent. No step of a scenario is silent that long (each gpucell
        # call prints before and after, and is killed after at most 180 s).
        n=$(stat -c %s "$console")
        if [ "$n" != "$csize" ] || [ "$size" != "${last_size:-}" ]; then
            csize=$n
            last_size=$size
            quiet_since=$(date +%s)
        fi
        if [ -n "$boot_s" ] && [ $(($(date +%s) - quiet_since)) -ge "$NESTED_SILENCE" ]; then
            qrc=frozen
            break
        fi
        sleep 0.2
    done
    if [ -n "$qrc" ]; then
        stop_qemu
    else
        qrc=0
        wait "$qpid" || qrc=$?
        qpid=
    fi
    [ -n "$boot_s" ] || { grep -q NESTED-BOOT "$att_results" && boot_s=$(elapsed "$t_qemu"); } || boot_s=-
}

# l1_fault: why L1 died under the emulator, or nothing. QEMU 7.2's TCG, emulating
# SVM for KVM inside L1, now and then loses a CPU (double fault with GS base 0,
# a CPU stuck in an L2 guest: see docs/nested-test-host.md).
l1_fault() {
    grep -q '^NESTED-DONE ' "$att_results" && return 0
    grep -q '^NESTED-BOOT ' "$att_results" || return 0
    if [ "$qrc" = stalled ]; then
        echo "an L1 CPU stalled (RCU stall or soft lockup warnings, no result for 60 s)"
    elif [ "$qrc" = frozen ]; then
        echo "L1 froze (no console output and no result for ${NESTED_SILENCE} s)"
    elif [ "$qrc" = 0 ]; then
        local why
        why=$(grep -a -m1 -o 'Kernel panic - not syncing: [^[:cntrl:]]*\|double fault\|general protection fault' "$console" | head -1)
        echo "L1 powered off in the middle (${why:-no panic message: a triple fault})"
    fi
}

# Scenarios: all of them, or the named ones. After an emulator fault, the rest
# (from the one that was running) get another L1, at most NESTED_RETRY times.
NESTED_RETRY=${NESTED_RETRY:-2}
t_l1=$(now)
attempt=1
arg=$scenario_arg
while :; do
    boot_l1 "$attempt" "$arg"
    fault=$(l1_fault)
    last=$(grep -a '^NESTED-SCENARIO ' "$att_results" | tail -1 | sed 's/.* name=\([^ ]*\).*/\1/')
    if [ -n "$fault" ] && [ -n "$last" ] && [ "$attempt" -le "$NESTED_RETRY" ]; then
        # Keep what finished; drop the interrupted scenario's partial results.
        awk -v s="$last" '$0 ~ "^NESTED-SCENARIO name=" s " " { exit } { print }' "$att_results" | tr -d '\r' >>"$results"
        up=$(grep -a "^NESTED-SCENARIO name=$last " "$att_results" | sed 's/.* uptime=\([0-9.]*\).*/\1/')
        echo "NESTED-RETRY scenario=$last uptime=$up detail=$fault during $last; its results dropped, $last and the rest rerun in a fresh L1 (console: $console)" >>"$results"
        # The scenarios still to run, in order.
        if [ "$arg" = all ]; then
            list=$(cd "$NESTED_SRC/scenarios" && ls | sed -n 's/^\([0-9].*\)\.sh$/\1/p')
        else
            list=$(echo "$arg" | tr ',' '\n')
        fi
        arg=$(echo "$list" | awk -v s="$last" '$0 == s { on = 1 } on' | paste -sd, -)
        log "L1 fault in $last ($fault); retrying from $last in a fresh L1"
        attempt=$((attempt + 1))
        continue
    fi
    if [ "$attempt" = 1 ]; then
        tr -d '\r' <"$att_results" >>"$results"
    else
        # The retried L1's boot line is not a second boot of the run.
        tr -d '\r' <"$att_results" | grep -av '^NESTED-BOOT \|^NESTED-RESULT name=l1/' >>"$results"
    fi
    break
done
ln -sfn "$(basename "$console")" "$run_dir/console.log"
l1_s=$(elapsed "$t_l1")
[ "$qrc" != stalled ] && [ "$qrc" != frozen ] || qrc=timeout

# Results, one per line, then the summary.
"$NESTED_SRC/summarize.sh" --results "$results" --qemu-status "$qrc" --timeout "$NESTED_TIMEOUT" \
    --console "$console" --strict "$NESTED_STRICT" \
    --timing "build ${build_s}s, L1 boot ${boot_s}s (host wall), L1 run ${l1_s}s, total $(elapsed "$t_start")s" |
    tee "$run_dir/summary.txt"
exit "${PIPESTATUS[0]}"
