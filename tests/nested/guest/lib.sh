# Helpers for scenarios running inside the nested test host (L1). Sourced by
# /init and by every scenario (busybox sh). A scenario reports each check with
# pass/fail/skip; run.sh on the outer host collects them.
#
# Results channel: the second serial port (/dev/ttyS1), which the outer QEMU
# writes to a file of its own, so kernel messages on the console cannot mix
# into result lines. Every line is also echoed on the console for the log.
# Line format:  NESTED-RESULT name=<scenario>/<check> ok=1|0|skip detail=<text>

NESTED_CHANNEL=/dev/ttyS1
[ -c "$NESTED_CHANNEL" ] || NESTED_CHANNEL=/dev/console
NESTED_RESULTS=/run/nested-results
NESTED_EDU_ID=0x1234:0x11e8
# KVM in L1 runs on a TCG-emulated CPU: a guest kernel needs 10-13 s to boot there, more
# than the KVM probe's default limit of 10 s.
export GPUCELL_KVM_PROBE_TIMEOUT=90
# Sandboxes get no network unless a scenario asks for one (45-sandbox-net does):
# each scenario tests one thing.
export GPUCELL_NETWORK=none

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# Value of a key=value argument on the kernel command line.
cmdline_arg() {
    tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -1
}

emit() {
    echo "$*" >"$NESTED_CHANNEL"
    [ "$NESTED_CHANNEL" = /dev/console ] || echo "$*" >/dev/console
}

# result CHECK OK DETAIL...: OK is 1, 0 or skip. One line, at most 400 bytes of detail.
result() {
    _name=$1 _ok=$2
    shift 2
    _detail=$(printf '%s' "$*" | tr '\n\r\t' '   ' | cut -c1-400)
    echo "${SCENARIO:-unknown}/$_name $_ok" >>"$NESTED_RESULTS"
    emit "NESTED-RESULT name=${SCENARIO:-unknown}/$_name ok=$_ok detail=$_detail"
}
pass() { result "$1" 1 "$(shift; echo "$*")"; }
fail() { result "$1" 0 "$(shift; echo "$*")"; }
skip() { result "$1" skip "$(shift; echo "$*")"; }

# Number of results a scenario has reported so far.
result_count() {
    [ -f "$NESTED_RESULTS" ] || { echo 0; return; }
    grep -c "^$1/" "$NESTED_RESULTS"
}

# Prints a labelled file to the console (the L1 log), at most $3 lines.
show() {
    [ -s "$2" ] || return 0
    head -n "${3:-40}" "$2" | sed "s|^|  $1: |" >/dev/console
}

# gc OUT ARGS...: runs `gpucell ARGS` (GC_TIMEOUT s limit, default 60), stdout in OUT.out, stderr
# in OUT.err, exit status in OUT.rc; returns the exit status.
gc() {
    _out=$1
    shift
    _quar_before=$(quarantined_bdfs | sort | tr '\n' ' ')
    gc_once "$_out" "$@"
    if [ "$_rc" = 125 ] && gc_l2_stalled "$_out.err"; then
        # The L2 guest never ran its agent and printed nothing: KVM in L1 runs on
        # TCG's emulated SVM, which now and then stalls a guest before its kernel
        # prints. That is the emulator, not gpucell: the run is redone once from the
        # same state (functions the stalled run quarantined are released first) and
        # the stall is reported (summarize.sh shows it, not as a result).
        emit "NESTED-STALL scenario=${SCENARIO:-unknown} detail=gpucell $* : $(head -c 200 "$_out.err" | tr '\n\r\t' '   ')"
        for _b in $(quarantined_bdfs); do
            case " $_quar_before " in *" $_b "*) ;; *) gpucell gpu release "$_b" >/dev/null 2>&1 ;; esac
        done
        gc_once "$_out" "$@"
    fi
    return "$_rc"
}

gc_once() {
    _out=$1
    shift
    echo "L1: \$ gpucell $*" >/dev/console
    timeout -s KILL "${GC_TIMEOUT:-60}" gpucell "$@" >"$_out.out" 2>"$_out.err"
    _rc=$?
    echo "$_rc" >"$_out.rc"
    show stdout "$_out.out" "${GC_SHOW:-40}"
    show stderr "$_out.err" "${GC_SHOW:-40}"
    echo "L1:   exit status $_rc" >/dev/console
}

# True if a gpucell run failed because its guest never reached the agent and its
# console stayed empty (the stall gc redoes once).
gc_l2_stalled() {
    grep -q 'the agent did not connect' "$1" && grep -q 'the guest console printed nothing' "$1"
}

# True if the last gc call for OUT failed because the command is not built yet.
gc_not_built() {
    [ "$(cat "$1.rc")" != 0 ] && grep -q 'is not built yet' "$1.err"
}

# gc_stub ARGS...: true if `gpucell ARGS` (without operands) is still a
# placeholder that says it is not built yet. Such placeholders take no
# operands, so calling them with a BDF fails on argument parsing instead.
gc_stub() {
    timeout -s KILL 60 gpucell "$@" 2>&1 | grep -q 'is not built yet'
}

# One-line summary of a gc result for a detail field.
gc_summary() {
    echo "exit $(cat "$1.rc"): $(head -c 200 "$1.err" | tr '\n' ' ')"
}

# PCI functions with vendor:device $1 (default: QEMU edu), one BDF per line.
pci_by_id() {
    for _d in /sys/bus/pci/devices/*; do
        [ "$(cat "$_d/vendor"):$(cat "$_d/device")" = "${1:-$NESTED_EDU_ID}" ] && basename "$_d"
    done
}

pci_driver() {
    if [ -L "/sys/bus/pci/devices/$1/driver" ]; then
        basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
    else
        echo none
    fi
}

iommu_group() {
    basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group" 2>/dev/null)" 2>/dev/null
}

# Binds a function to vfio-pci the way gpucell does on a real host:
# driver_override, unbind from the current driver, drivers_probe.
sysfs_bind_vfio() {
    _dev=/sys/bus/pci/devices/$1
    echo vfio-pci >"$_dev/driver_override" || return 1
    [ -L "$_dev/driver" ] && { echo "$1" >"$_dev/driver/unbind" || return 1; }
    echo "$1" >/sys/bus/pci/drivers_probe
}

# Undoes sysfs_bind_vfio: unbind, clear driver_override, reprobe.
sysfs_unbind_vfio() {
    _dev=/sys/bus/pci/devices/$1
    [ -L "$_dev/driver" ] && { echo "$1" >"$_dev/driver/unbind" || return 1; }
    echo >"$_dev/driver_override" || return 1
    echo "$1" >/sys/bus/pci/drivers_probe
}

# run_l2_edu BDF ACCEL OUT: boots an L2 QEMU with BDF passed through by
# vfio-pci on a PCIe root port; its init reads the edu registers and prints
#   L2-EDU ident=0x... inverse=0x... fact5=0x...
# L2's serial output goes to OUT. Returns QEMU's exit status (124/137: timeout).
run_l2_edu() {
    timeout -s KILL "${L2_TIMEOUT:-120}" qemu-system-x86_64 \
        -M q35 -accel "$2" -m 256M -smp 1 \
        -nodefaults -display none -monitor none -serial "file:$3" -no-reboot \
        -kernel /nested/l2/kernel -initrd /nested/l2/edu-initramfs.cpio \
        -append "console=ttyS0 quiet panic=-1" \
        -device pcie-root-port,id=rp0,bus=pcie.0,chassis=1 \
        -device "vfio-pci,host=$1,bus=rp0" >"$3.qemu" 2>&1
}

# Hook for sandbox scenarios (`gpucell run --device BDF ...` inside L1): true
# if build.sh found `gpucell guest build` output on the outer host and copied
# it to /var/lib/gpucell/guest/default (gpucell's default state dir in L1).
have_guest_artifacts() {
    [ -f /etc/nested/guest-artifacts ] && [ -d /var/lib/gpucell/guest/default ]
}

# --- sandboxes with devices (`gpucell run --device`) ---

# The test image build.sh puts into L1: busybox + /usr/bin/edu-probe.
EDU_IMAGE=oci:/nested/images/edu-probe:latest
GPUCELL_STATE=/var/lib/gpucell
# KVM in L1 is real but slow: the boot probe's limit is too short there, so
# sandboxes are started with --accel kvm; a guest kernel needs 10-13 s to boot.
export GPUCELL_ACCEL=kvm
# VFIO pins all guest memory and charges it to QEMU's RLIMIT_MEMLOCK; QEMU runs
# as nobody (-runas), without CAP_IPC_LOCK. The kernel's default limit (8 MiB,
# as under systemd) is far too small: gpucell raises it for its QEMU, and
# 40-sandbox-device/run-device-memlock checks that under the default limit. The
# other scenarios lift the limit so that each of them tests one thing.
ulimit -l unlimited 2>/dev/null

# True if `gpucell run` accepts --device (else prints nothing and fails).
have_run_device() {
    gpucell run --help 2>/dev/null | grep -q -- '--device'
}

# edu_policy on|off: lists edu (1234:11e8) under allow_no_reset in the
# allocator's policy.toml (on), so a released edu is checked and returned
# instead of quarantined for lacking a reset method; off removes the file.
edu_policy() {
    mkdir -p "$GPUCELL_STATE/devices"
    if [ "$1" = on ]; then
        echo 'allow_no_reset = ["1234:11e8"]' >"$GPUCELL_STATE/devices/policy.toml"
    else
        rm -f "$GPUCELL_STATE/devices/policy.toml"
    fi
}

# Allocation and quarantine records (empty output when the file is missing).
alloc_bdfs() {
    [ -f "$GPUCELL_STATE/devices/allocations.json" ] || return 0
    jq -r '.allocations[].bdf' "$GPUCELL_STATE/devices/allocations.json"
}
quarantined_bdfs() {
    [ -f "$GPUCELL_STATE/devices/quarantine.json" ] || return 0
    jq -r '.devices[].bdf' "$GPUCELL_STATE/devices/quarantine.json"
}
quarantine_reason() {
    [ -f "$GPUCELL_STATE/devices/quarantine.json" ] || return 0
    jq -r --arg b "$1" '.devices[] | select(.bdf == $b) | .reason' "$GPUCELL_STATE/devices/quarantine.json"
}

# PIDs of the processes that hold /dev/vfio/GROUP open (an L2 QEMU). A jailed QEMU's
# node lives in its own root: its link reads /dev/vfio/GROUP, or the jail's staging
# directory followed by it where the jail used chroot (this host's initramfs root).
vfio_holders() {
    for _p in /proc/[0-9]*; do
        ls -l "$_p/fd" 2>/dev/null | grep -q " /\(.*/\)\{0,1\}dev/vfio/$1\$" && basename "$_p"
    done
}

# wait_for SECS CMD...: polls CMD every 0.5 s until it succeeds or SECS pass.
wait_for() {
    _until=$(($(date +%s) + $1))
    shift
    while ! "$@"; do
        [ "$(date +%s)" -lt "$_until" ] || return 1
        sleep 0.5
    done
}

# edu_probe_ok FILE: true if FILE holds a right EDU-PROBE line; prints the line.
edu_probe_ok() {
    _l=$(grep '^EDU-PROBE' "$1" 2>/dev/null | head -1 | tr -d '\r')
    echo "${_l:-no EDU-PROBE line}"
    case "$_l" in *" ident=0x010000ed fact5=0x00000078 ok=1"*) return 0 ;; esac
    return 1
}

# edu_pool BDF...: hands functions to sandboxes the way an operator does,
# `gpucell gpu bind BDF` (vfio-pci), so the allocator finds them free as they are.
edu_pool() {
    for _b in "$@"; do
        gc /tmp/pool-bind gpu bind "$_b" >/dev/null || return 1
    done
}

# edu_first_pooled: the usual start of a scenario with one function: every edu
# function reset, the pool's reset policy on, the first function in the pool; sets
# $bdf and $grp (its IOMMU group).
edu_first_pooled() {
    edu_reset_all
    edu_policy on
    bdf=$(pci_by_id | head -1)
    grp=$(iommu_group "$bdf")
    edu_pool "$bdf" || fail pool "gpucell gpu bind $bdf: $(gc_summary /tmp/pool-bind)"
}

# Leaves every edu function unbound (as the scenarios expect to find them),
# whatever a scenario or gpucell left behind.
edu_reset_all() {
    for _b in $(pci_by_id); do
        [ "$(pci_driver "$_b")" = none ] || sysfs_unbind_vfio "$_b" 2>/dev/null
        echo >"/sys/bus/pci/devices/$_b/driver_override" 2>/dev/null
    done
    rm -f "$GPUCELL_STATE/devices/allocations.json" "$GPUCELL_STATE/devices/quarantine.json"
}

# run_summary OUT: the `gpucell --json run` summary object from OUT.err (the last
# pretty-printed object there; log lines may come before it).
run_summary() {
    awk '/^\{$/ { buf = ""; on = 1 } on { buf = buf $0 "\n" } END { printf "%s", buf }' "$1.err"
}
