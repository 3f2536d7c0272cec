# Two sandboxes at once, each with its own edu function (`--device` names
# functions; a count of "any free device" exists only for GPUs, `--gpus N`).
# While both run, both functions are recorded for different sandboxes, and a
# third run naming a busy function is refused at once, naming the holder
# (gpucell run does not wait for a device; docs/devices.md).

have_guest_artifacts && have_run_device || {
    skip concurrent "needs guest artifacts and gpucell run --device"
    exit 0
}
edu_reset_all
edu_policy on
a=$(pci_by_id | sed -n 1p)
b=$(pci_by_id | sed -n 2p)
[ -n "$b" ] || {
    fail concurrent "needs two edu functions, found: $(pci_by_id | tr '\n' ' ')"
    exit 0
}
edu_pool "$a" "$b" || fail pool "gpucell gpu bind: $(gc_summary /tmp/pool-bind)"
GC_TIMEOUT=240
# B starts once A's workload runs (A then sleeps through B's boot and B's checks):
# two L2 guests booting at once under L1's emulated SVM can crash (see docs).
gc /tmp/ca --json run --memory 256m --boot-timeout 120s --device "$a" "$EDU_IMAGE" -- sh -c 'edu-probe; sleep 45' &
pa=$!
a_running() { grep -q '^EDU-PROBE' /tmp/ca.out 2>/dev/null; }
wait_for 120 a_running || fail a-running "the first run's workload did not start: $(gc_summary /tmp/ca)"
gc /tmp/cb --json run --memory 256m --boot-timeout 120s --device "$b" "$EDU_IMAGE" -- sh -c 'edu-probe; sleep 5' &
pb=$!
two_allocated() { [ "$(alloc_bdfs | sort -u | grep -c .)" -ge 2 ]; }
if wait_for 120 two_allocated; then
    recs=$(jq -c '[.allocations[] | {bdf, sandbox}]' "$GPUCELL_STATE/devices/allocations.json")
    sandboxes=$(jq -r '.allocations[].sandbox' "$GPUCELL_STATE/devices/allocations.json" | sort -u | grep -c .)
    if [ "$sandboxes" -ge 2 ]; then
        pass both-allocated "two sandboxes hold different functions at once: $recs"
    else
        fail both-allocated "both functions recorded for one sandbox: $recs"
    fi
    t0=$(date +%s)
    gc /tmp/cc --json run --memory 256m --boot-timeout 120s --device "$a" "$EDU_IMAGE" -- edu-probe
    rc=$?
    secs=$(($(date +%s) - t0))
    if [ "$rc" != 0 ] && grep -q "$a" /tmp/cc.err && grep -qi 'in use\|busy' /tmp/cc.err; then
        pass third-refused "a third run for busy $a refused in ${secs}s, exit $rc: $(grep -i "in use\|busy" /tmp/cc.err | head -1)"
    else
        fail third-refused "a third run for busy $a: $(gc_summary /tmp/cc)"
    fi
else
    fail both-allocated "the two runs never held two functions at once; records: $(alloc_bdfs | tr '\n' ' ')"
fi
wait $pa
wait $pb
bdf_a=$a bdf_b=$b
for r in a b; do
    # An L2 that reset itself while booting, before printing anything (QEMU exits 0:
    # a triple fault under L1's emulated SVM, see docs), is run again once, alone.
    note=
    if [ "$(cat /tmp/c$r.rc)" != 0 ] && grep -q 'stopped before its agent connected (QEMU exit status: 0)' /tmp/c$r.err &&
        grep -q 'the guest console printed nothing' /tmp/c$r.err; then
        eval "dev=\$bdf_$r"
        gc /tmp/c$r --json run --memory 256m --boot-timeout 120s --device "$dev" "$EDU_IMAGE" -- edu-probe
        note=" (rerun alone: the concurrent L2 reset itself during boot, an emulator fault)"
    fi
    # Each guest sees exactly one edu function: its own. Each sandbox has a vsock
    # port of its own, so neither falls back to virtio-serial.
    seen=$(grep -c '^EDU-PROBE' /tmp/c$r.out)
    chan=$(run_summary /tmp/c$r | jq -r '.channel // "none"')
    probe=$(edu_probe_ok /tmp/c$r.out) && [ "$(cat /tmp/c$r.rc)" = 0 ] && [ "$seen" = 1 ] &&
        [ "$chan" = vsock ] &&
        pass "run-$r" "$probe (channel $chan)$note" ||
        fail "run-$r" "$probe ($seen edu functions seen, channel $chan)$note; $(gc_summary /tmp/c$r)"
done
[ -z "$(alloc_bdfs)" ] && [ -z "$(quarantined_bdfs)" ] &&
    pass all-returned "both functions back in the pool after the runs" ||
    fail all-returned "after the runs: allocated [$(alloc_bdfs | tr '\n' ' ')], quarantined [$(quarantined_bdfs | tr '\n' ' ')]"
edu_reset_all
