#!/bin/bash
# usage: tests/nested/timing-report.sh [RESULTS_LOG]
# Prints the results of `tests/nested/run.sh timing` (default: the last run's
# results.log) as a Markdown table of gpucell run phases, and the cost of
# pinning guest memory per GiB (vm_start with a device minus without one).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
log_file=${1:-$NESTED_OUT/runs/latest/results.log}
[ -f "$log_file" ] || die "no $log_file; run tests/nested/run.sh timing first"
command -v jq >/dev/null || die "jq is missing"

all=$(grep -a '^NESTED-RESULT name=timing/' "$log_file" | tr -d '\r' || true)
pin=$(echo "$all" | grep ' name=timing/pin-[a-z]*-[0-9]*m-[0-9a-z]* ok=1 ' || true)
rows=$(echo "$all" | grep ' name=timing/[a-z]*-[0-9]*m-[0-9a-z]* ok=1 ' | grep -v ' name=timing/pin-' || true)
to_json() {
    sed -n 's/.*[ =]memory=\([0-9]*\)m pages=\([0-9a-z]*\) device=\([a-z]*\) wall_s=\([0-9.]*\) timings_ms=\(.*\)$/{"memory":\1,"pages":"\2","device":"\3","wall_s":\4,"t":\5}/p' | jq -s .
}
if [ -n "$pin" ]; then
    echo "QEMU alone (-S -daemonize): start time in ms, without and with the edu function by vfio-pci:"
    echo
    echo "| memory | pages | no device | edu by VFIO | pinning cost | per GiB |"
    echo "|---|---|---|---|---|---|"
    echo "$pin" | to_json | jq -r '
        group_by([.memory, .pages])[] | (map({key: .device, value: .t.qemu_start}) | from_entries) as $m
        | .[0] as $r | select($m.none != null and $m.edu != null)
        | "| \($r.memory) MiB | \($r.pages) | \($m.none) | \($m.edu) | \($m.edu - $m.none) | \((($m.edu - $m.none) * 1024 / $r.memory) | floor) |"'
    echo
fi
[ -n "$rows" ] || { echo "(no gpucell run timings)"; exit 0; }
# One JSON object per run: {device, memory, pages, wall_s, timings_ms}.
echo "gpucell run --json phases (ms), L1 clock:"
echo
runs=$(echo "$rows" | to_json)
keys=$(echo "$runs" | jq -r '[.[].t | keys[]] | unique | map(select(. != "total")) + ["total"] | join(" ")')
printf '| device | memory | pages | L1 wall (s) |'
for k in $keys; do printf ' %s |' "$k"; done
printf '\n|---|---|---|---|'
for k in $keys; do printf -- '---|'; done
printf '\n'
echo "$runs" | jq -r --arg keys "$keys" '.[] | [.device, "\(.memory) MiB", .pages, (.wall_s | tostring)] +
    [($keys | split(" "))[] as $k | (.t[$k] // "-" | tostring)] | "| " + join(" | ") + " |"'
echo
echo "Pinning (vm_start with the edu device minus without, same memory and pages):"
echo
echo "$runs" | jq -r '
    (map(select(.device == "none")) | map({key: "\(.memory)-\(.pages)", value: .t.vm_start}) | from_entries) as $base
    | .[] | select(.device != "none") | . as $r | $base["\(.memory)-\(.pages)"] as $b
    | select($b != null and $r.t.vm_start != null)
    | "- \($r.memory) MiB, \($r.pages) pages: +\($r.t.vm_start - $b) ms (\((($r.t.vm_start - $b) * 1024 / $r.memory) | floor) ms per GiB)"'
