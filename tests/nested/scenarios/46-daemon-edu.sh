# The node daemon in L1 (real KVM and VFIO): a deployment holding an edu function,
# then `kill -9` of gpucelld and a new one: the sandbox must be adopted with the same
# QEMU still holding /dev/vfio/<group> and the function still recorded for it; a stop
# must then return the function to the pool (no record, not quarantined, on vfio-pci,
# no holder of the group).

if ! have_guest_artifacts || ! have_run_device || ! command -v gpucelld >/dev/null; then
    skip daemon-edu "needs guest artifacts, gpucell run --device and gpucelld in L1"
    exit 0
fi
edu_first_pooled
sock=/run/gpucell/gpucell.sock
start_daemon() {
    gpucelld serve --socket "$sock" >>/tmp/gpucelld.log 2>&1 &
    dpid=$!
    ready() { gpucell ps --socket "$sock" >/dev/null 2>&1; }
    wait_for 30 ready
}
status() { gpucell --json ps --socket "$sock" | jq -c '.sandboxes[] | select(.id == "edu1")'; }
start_daemon
GC_TIMEOUT=60
gc /tmp/dd deploy --socket "$sock" --id edu1 --memory 256m --boot-timeout 120s --device "$bdf" \
    "$EDU_IMAGE" -- sh -c 'edu-probe; echo waiting; sleep 300'
probed() { gpucell logs --socket "$sock" edu1 2>/dev/null | grep -q '^waiting'; }
if ! wait_for 180 probed; then
    fail daemon-deploy "the workload never started: $(status); $(tail -c 300 /tmp/gpucelld.log | tr '\n' ' ')"
    kill -9 "$dpid"
    exit 0
fi
qemu=$(vfio_holders "$grp" | head -1)
before=$(status)
if echo "$before" | jq -e --arg b "$bdf" '.state == "running" and .devices == [$b]' >/dev/null; then
    pass daemon-deploy "edu1 running with $bdf (QEMU pid $qemu holds /dev/vfio/$grp)"
else
    fail daemon-deploy "$before"
fi

kill -9 "$dpid"
start_daemon
after=$(status)
if echo "$after" | jq -e --arg b "$bdf" '.state == "running" and .devices == [$b] and .restarts == 0' >/dev/null &&
    [ "$(vfio_holders "$grp" | head -1)" = "$qemu" ] && [ "$(alloc_bdfs)" = "$bdf" ]; then
    pass daemon-adopt "after kill -9 of gpucelld: edu1 adopted, the same QEMU ($qemu) holds $bdf"
else
    fail daemon-adopt "after: $after; holders [$(vfio_holders "$grp")]; allocated [$(alloc_bdfs)]"
fi

gc /tmp/ds stop --socket "$sock" -w edu1
drv=$(pci_driver "$bdf")
if [ "$(cat /tmp/ds.rc)" = 0 ] && [ -z "$(alloc_bdfs)" ] && [ -z "$(quarantined_bdfs)" ] &&
    [ "$drv" = vfio-pci ] && [ -z "$(vfio_holders "$grp")" ]; then
    pass daemon-stop "stopped: $bdf returned (on vfio-pci, no record, /dev/vfio/$grp closed)"
else
    fail daemon-stop "stop exit $(cat /tmp/ds.rc): allocated [$(alloc_bdfs)], quarantined [$(quarantined_bdfs)], driver $drv, holders [$(vfio_holders "$grp")]; $(status)"
fi
kill -9 "$dpid" 2>/dev/null
edu_reset_all
