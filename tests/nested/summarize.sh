#!/bin/bash
# usage: summarize.sh --results FILE [--qemu-status N|timeout] [--timeout S]
#                     [--console FILE] [--strict 0|1] [--timing TEXT]
#
# Reads the result channel of a nested run (NESTED-BOOT, NESTED-SCENARIO,
# NESTED-RESULT, NESTED-RETRY, NESTED-STALL and NESTED-DONE lines; anything else is ignored), prints one
# line per result, a timing line and "N passed, M failed, K skipped".
# Exits 1 if anything failed, nothing passed, L1 never booted or never
# finished, QEMU failed or timed out, or (strict) anything was skipped.
set -euo pipefail

results='' qrc=0 timeout=- console=console.log strict=0 timing=''
while [ $# -gt 0 ]; do
    case "$1" in
    --results) results=$2 ;;
    --qemu-status) qrc=$2 ;;
    --timeout) timeout=$2 ;;
    --console) console=$2 ;;
    --strict) strict=$2 ;;
    --timing) timing=$2 ;;
    *)
        echo "summarize.sh: unknown argument $1" >&2
        exit 2
        ;;
    esac
    shift 2
done
[ -n "$results" ] && [ -r "$results" ] || {
    echo "summarize.sh: --results FILE is required and must be readable" >&2
    exit 2
}

rc=0
tr -d '\r' <"$results" | awk -v strict="$strict" -v qrc="$qrc" -v timeout="$timeout" \
    -v console="$console" -v timing="$timing" '
    # Value of key=... in a marker line; "detail" runs to the end of the line.
    function field(line, key,    i) {
        i = index(line, " " key "=")
        if (i == 0) return ""
        line = substr(line, i + length(key) + 2)
        if (key == "detail") return line
        sub(/ .*/, "", line)
        return line
    }
    function report(tag, name, detail) { printf "%-4s %-38s %s\n", tag, name, detail }
    /^NESTED-BOOT / { booted = field($0, "uptime") }
    /^NESTED-SCENARIO / { name = field($0, "name"); start[name] = field($0, "uptime"); order[++n] = name }
    /^NESTED-DONE / { done = field($0, "uptime") }
    # L1 died under the emulator; the interrupted scenario and the rest ran again
    # in a fresh L1 (run.sh). Shown, not counted; the scenario before it ends here.
    /^NESTED-RETRY / {
        report("RETRY", "harness/" field($0, "scenario"), field($0, "detail")); retried++
        end_of[n] = field($0, "uptime")
    }
    # An L2 guest stalled under the emulator before printing anything; lib.sh gc
    # redid that run once. Shown, not counted.
    /^NESTED-STALL / { report("STALL", "harness/" field($0, "scenario"), field($0, "detail")); stalls++ }
    /^NESTED-RESULT / {
        name = field($0, "name"); ok = field($0, "ok"); detail = field($0, "detail")
        if (name == "") { report("FAIL", "harness/result", "malformed result line: " $0); failed++ }
        else if (ok == "1") { report("PASS", name, detail); passed++ }
        else if (ok == "skip") { report("SKIP", name, detail); skipped++ }
        else { report("FAIL", name, detail); failed++ }
    }
    END {
        if (qrc == "timeout") { report("FAIL", "harness/timeout", "L1 still running after " timeout "s; killed (see " console ")"); failed++ }
        else if (qrc != 0) { report("FAIL", "harness/qemu", "QEMU exited with status " qrc " (see " console ")"); failed++ }
        if (booted == "") { report("FAIL", "harness/boot", "L1 never reached its init (see " console ")"); failed++ }
        else if (done == "" && qrc != "timeout") { report("FAIL", "harness/done", "L1 stopped before finishing its scenarios (see " console ")"); failed++ }
        if (booted != "") timing = timing sprintf("; L1 clock: init at %ss", booted)
        for (i = 1; i <= n; i++) {
            end = (i in end_of) ? end_of[i] : (i < n) ? start[order[i + 1]] : done
            if (end != "") timing = timing sprintf(", %s %.1fs", order[i], end - start[order[i]])
        }
        printf "timing: %s\n", timing
        printf "%d passed, %d failed, %d skipped%s%s\n", passed, failed, skipped, retried ? sprintf(" (L1 restarted %d time%s after an emulator fault)", retried, retried > 1 ? "s" : "") : "", stalls ? sprintf(" (%d L2 boot stall%s redone)", stalls, stalls > 1 ? "s" : "") : ""
        exit (failed > 0 || passed == 0 || (strict == 1 && skipped > 0)) ? 1 : 0
    }' || rc=$?
# When L1 died before its init finished, its last console lines are the evidence
# (a kernel panic, a triple fault leaves none): show them here, where CI logs end.
if ! grep -q '^NESTED-DONE ' "$results" && [ -r "$console" ]; then
    echo "L1 console, last 15 lines ($console):"
    tail -n 15 "$console" | tr -d '\r' | cut -c1-200 | sed 's/^/  | /'
fi
exit "$rc"
