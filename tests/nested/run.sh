#!/bin/bash
# usage: tests/nested/run.sh [SCENARIO...]
#
# Builds the nested test host (tests/nested/build.sh, cached), boots it under
# TCG with an emulated Intel IOMMU and QEMU edu PCI devices, runs the given
# scenarios (tests/nested/scenarios/*.sh; all of them by default) inside it and
# prints one line per result and a summary. Exits 0 only if every check passed
# (skips are allowed unless NESTED_STRICT=1), 1 on any failure or timeout.
#
# Environment: NESTED_TIMEOUT (whole run, s, default 600), NESTED_SCENARIO_TIMEOUT
# (per scenario, s, default 300), NESTED_EDU_COUNT (default 3), NESTED_MEM,
# NESTED_SMP, NESTED_STRICT, NESTED_QUIET=1 (console only to the log file);
# build settings in tests/nested/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NESTED_TIMEOUT=${NESTED_TIMEOUT:-600}
NESTED_SCENARIO_TIMEOUT=${NESTED_SCENARIO_TIMEOUT:-300}
NESTED_EDU_COUNT=${NESTED_EDU_COUNT:-3}
NESTED_MEM=${NESTED_MEM:-3G}
NESTED_SMP=${NESTED_SMP:-2}
NESTED_STRICT=${NESTED_STRICT:-0}
NESTED_QUIET=${NESTED_QUIET:-0}

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
    -M q35,kernel-irqchip=split -accel tcg -cpu max -smp "$NESTED_SMP" -m "$NESTED_MEM"
    -device intel-iommu,intremap=on,caching-mode=on "${edu[@]}"
    -nodefaults -display none -monitor none -no-reboot
    -chardev stdio,id=con,signal=off -serial chardev:con
    -chardev "file,id=results,path=$results" -serial chardev:results
    -kernel "$L1_KERNEL" -initrd "$L1_INITRD"
    -append "console=ttyS0 quiet panic=-1 intel_iommu=on iommu=pt nested.scenarios=$scenario_arg nested.edu=$NESTED_EDU_COUNT nested.scenario_timeout=$NESTED_SCENARIO_TIMEOUT"
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
tr -d '\r' <"$results" >"$results.clean"
awk -v strict="$NESTED_STRICT" -v qrc="$qrc" -v timeout="$NESTED_TIMEOUT" -v console="$console" \
    -v boot="$boot_s" -v l1="$l1_s" -v build="$build_s" -v total="$(elapsed "$t_start")" '
    function field(line, key,    i) {
        i = index(line, " " key "=")
        if (i == 0) return ""
        line = substr(line, i + length(key) + 2)
        if (key == "detail") return line
        sub(/ .*/, "", line)
        return line
    }
    /^NESTED-BOOT / { booted = field($0, "uptime") }
    /^NESTED-SCENARIO / { name = field($0, "name"); start[name] = field($0, "uptime"); order[++n] = name }
    /^NESTED-DONE / { done = field($0, "uptime") }
    /^NESTED-RESULT / {
        name = field($0, "name"); ok = field($0, "ok"); detail = field($0, "detail")
        if (ok == "1") { tag = "PASS"; passed++ }
        else if (ok == "skip") { tag = "SKIP"; skipped++ }
        else { tag = "FAIL"; failed++ }
        printf "%-4s %-32s %s\n", tag, name, detail
    }
    END {
        if (qrc == "timeout") { printf "FAIL %-32s %s\n", "harness/timeout", "L1 still running after " timeout "s; killed (see " console ")"; failed++ }
        else if (qrc != 0) { printf "FAIL %-32s %s\n", "harness/qemu", "QEMU exited with status " qrc " (see " console ")"; failed++ }
        if (booted == "") { printf "FAIL %-32s %s\n", "harness/boot", "L1 never reached its init (see " console ")"; failed++ }
        else if (done == "" && qrc != "timeout") { printf "FAIL %-32s %s\n", "harness/done", "L1 stopped before finishing the scenarios (see " console ")"; failed++ }
        timing = sprintf("build %ss, L1 boot %ss (host wall), L1 run %ss, total %ss", build, boot, l1, total)
        if (booted != "") timing = timing sprintf("; L1 clock: init at %ss", booted)
        for (i = 1; i <= n; i++) {
            end = (i < n) ? start[order[i + 1]] : done
            if (end != "") timing = timing sprintf(", %s %.1fs", order[i], end - start[order[i]])
        }
        printf "timing: %s\n", timing
        printf "%d passed, %d failed, %d skipped\n", passed, failed, skipped
        bad = failed > 0 || passed == 0 || (strict == 1 && skipped > 0)
        exit bad ? 1 : 0
    }' "$results.clean" | tee "$run_dir/summary.txt"
exit "${PIPESTATUS[0]}"
