# A sandbox whose QEMU is killed (SIGKILL, as the OOM killer would) while its
# workload runs: gpucell run must fail, and its edu function must be cleaned and
# given back (edu has no reset method; with allow_no_reset the allocator checks
# its config space and returns it), with /dev/vfio/<group> closed. Then the same
# when the gpucell process itself is killed: its QEMU goes too (pipe watchdog),
# and the next allocation finds the owner gone and reclaims the function.

have_guest_artifacts && have_run_device || {
    skip kill "needs guest artifacts and gpucell run --device"
    exit 0
}
edu_first_pooled
GC_TIMEOUT=180
gc /tmp/k1 --json run --memory 256m --boot-timeout 120s --device "$bdf" "$EDU_IMAGE" -- sh -c 'edu-probe; echo waiting; sleep 300' &
pk=$!
# (stops waiting when the run ends early)
probed() { grep -q '^waiting' /tmp/k1.out 2>/dev/null || ! kill -0 $pk 2>/dev/null; }
if ! wait_for 150 probed || ! grep -q '^waiting' /tmp/k1.out; then
    fail qemu-killed "the workload never started: $(head -c 200 /tmp/k1.err 2>/dev/null | tr '\n' ' ')"
    kill -9 $pk 2>/dev/null
    wait $pk
    edu_reset_all
    exit 0
fi
qemu=$(vfio_holders "$grp" | head -1)
kill -9 "$qemu"
wait $pk
rc=$(cat /tmp/k1.rc)
drv=$(pci_driver "$bdf")
if [ -n "$qemu" ] && [ "$rc" != 0 ] && [ -z "$(alloc_bdfs)" ] && [ -z "$(quarantined_bdfs)" ] &&
    [ "$drv" = vfio-pci ] && [ -z "$(vfio_holders "$grp")" ]; then
    pass qemu-killed "QEMU (pid $qemu) killed: gpucell exit $rc, $bdf checked and returned (on vfio-pci, no record, /dev/vfio/$grp closed)"
else
    fail qemu-killed "QEMU pid '${qemu}' killed: gpucell exit $rc; allocated [$(alloc_bdfs)], quarantined [$(quarantined_bdfs)], driver $drv, holders [$(vfio_holders "$grp")]; $(tail -c 300 /tmp/k1.err | tr '\n' ' ')"
fi

# The gpucell process killed outright: no release runs in it.
gc /tmp/k2 --json run --memory 256m --boot-timeout 120s --device "$bdf" "$EDU_IMAGE" -- sh -c 'echo waiting; sleep 300' &
pk=$!
started() { grep -q '^waiting' /tmp/k2.out 2>/dev/null || ! kill -0 $pk 2>/dev/null; }
if wait_for 150 started && grep -q '^waiting' /tmp/k2.out; then
    owner=$(jq -r '.allocations[0].owner.pid' "$GPUCELL_STATE/devices/allocations.json" 2>/dev/null)
    kill -9 "$owner"
    gone() { [ -z "$(vfio_holders "$grp")" ]; }
    if wait_for 30 gone; then
        recorded=$(alloc_bdfs | tr '\n' ' ')
        # The next use of the pool (here: an explicit release) reclaims it.
        gc /tmp/k2r --json gpu release "$bdf"
        action=$(jq -r '.results[0].action // .results[0].result' /tmp/k2r.out 2>/dev/null)
        if [ -n "$recorded" ] && [ "$action" = reclaimed ] && [ -z "$(alloc_bdfs)" ] && [ -z "$(quarantined_bdfs)" ]; then
            pass owner-killed "gpucell (pid $owner) killed: its QEMU exited, the record stayed [$recorded], gpu release reclaimed $bdf"
        else
            fail owner-killed "gpucell (pid $owner) killed: record [$recorded], release: $(head -c 200 /tmp/k2r.out | tr '\n' ' '); allocated [$(alloc_bdfs)], quarantined [$(quarantined_bdfs)]"
        fi
    else
        fail owner-killed "gpucell (pid $owner) killed but /dev/vfio/$grp is still held by $(vfio_holders "$grp")"
        kill -9 $(vfio_holders "$grp") 2>/dev/null
    fi
else
    fail owner-killed "the workload never started: $(head -c 200 /tmp/k2.err | tr '\n' ' ')"
    kill -9 $pk 2>/dev/null
fi
wait $pk 2>/dev/null
edu_reset_all
