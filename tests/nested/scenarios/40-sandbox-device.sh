# gpucell run inside L1 under real KVM: a sandbox without devices first (the
# guest artifacts, the image store and the agent work in L1), then with an edu
# function passed by `--device BDF`, where edu-probe in the container maps BAR0
# and reads the identification and factorial registers. The function is first
# handed to sandboxes with `gpucell gpu bind` (vfio-pci). With edu listed under
# allow_no_reset, it must come back to the pool after the run: no allocation
# record, not quarantined, still on vfio-pci. Then a function left on no driver
# at all: the allocator must bind it itself (docs/devices.md, "Binding").

if ! have_guest_artifacts; then
    skip sandbox "no guest artifacts in L1 (build.sh ran with NESTED_BUILD_GUEST=0)"
    exit 0
fi
edu_reset_all
GC_TIMEOUT=180

gc /tmp/run0 --json run --memory 256m --boot-timeout 120s "$EDU_IMAGE" -- sh -c 'echo sandbox-up; id -u'
if [ "$(cat /tmp/run0.rc)" = 0 ] && grep -q '^sandbox-up' /tmp/run0.out; then
    pass run-plain "gpucell run under KVM in L1: $(run_summary /tmp/run0 | jq -c '{accel: .accel.accel, channel, kernel_boot_ms: .timings_ms.kernel_boot, total_ms: .timings_ms.total}')"
else
    fail run-plain "$(gc_summary /tmp/run0)"
fi

if ! have_run_device; then
    skip run-device "gpucell run has no --device option yet"
    exit 0
fi

edu_policy on
bdf=$(pci_by_id | head -1)
grp=$(iommu_group "$bdf")
edu_pool "$bdf" || fail pool "gpucell gpu bind $bdf: $(gc_summary /tmp/pool-bind)"
gc /tmp/run1 --json run --memory 256m --boot-timeout 120s --device "$bdf" "$EDU_IMAGE" -- edu-probe
probe=$(edu_probe_ok /tmp/run1.out)
ok=$?
# The phases of a device run are in the summary: the binding (none here, bound
# above) and the time until the agent saw the device.
phases=$(run_summary /tmp/run1 | jq -c '{bind_ms: .devices_ms.bind, devices_visible_ms: .timings_ms.devices_visible}')
if [ "$(cat /tmp/run1.rc)" = 0 ] && [ $ok = 0 ] &&
    echo "$phases" | jq -e '(.bind_ms == 0) and (.devices_visible_ms | type == "number")' >/dev/null; then
    pass run-device "--device $bdf: $probe; $phases; $(run_summary /tmp/run1 | jq -c '{devices, timings_ms}' | cut -c1-250)"
else
    fail run-device "--device $bdf: $probe; phases $phases; $(gc_summary /tmp/run1)"
fi

left=$(alloc_bdfs)
quar=$(quarantined_bdfs)
drv=$(pci_driver "$bdf")
if [ -z "$left" ] && [ -z "$quar" ] && [ "$drv" = vfio-pci ] && [ -z "$(vfio_holders "$grp")" ]; then
    pass returned "$bdf back in the pool after the run: no allocation, not quarantined, on vfio-pci, /dev/vfio/$grp closed"
else
    fail returned "$bdf after the run: allocated [$left], quarantined [$quar], driver $drv, /dev/vfio/$grp held by [$(vfio_holders "$grp")]"
fi

# The same with the kernel's default RLIMIT_MEMLOCK (8 MiB, as systemd gives a
# service): QEMU pins the guest's 256 MiB for VFIO as nobody, so gpucell must
# raise the limit for it (lib.sh lifts it for the other checks).
(
    ulimit -l 8192
    gc /tmp/run3 --json run --memory 256m --boot-timeout 120s --device "$bdf" "$EDU_IMAGE" -- edu-probe
)
probe=$(edu_probe_ok /tmp/run3.out)
ok=$?
if [ "$(cat /tmp/run3.rc)" = 0 ] && [ $ok = 0 ]; then
    pass run-device-memlock "--device $bdf with RLIMIT_MEMLOCK 8 MiB: $probe"
else
    fail run-device-memlock "--device $bdf with RLIMIT_MEMLOCK 8 MiB: $probe; $(gc_summary /tmp/run3); dmesg: $(dmesg | grep -i memlock | tail -1)"
fi

# A function on no driver: its group is viable for the kernel, but /dev/vfio/N
# exists only once a function of the group is on vfio-pci.
other=$(pci_by_id | sed -n 2p)
gc /tmp/run2 --json run --memory 256m --boot-timeout 120s --device "$other" "$EDU_IMAGE" -- edu-probe
probe=$(edu_probe_ok /tmp/run2.out)
ok=$?
if [ "$(cat /tmp/run2.rc)" = 0 ] && [ $ok = 0 ]; then
    pass run-unbound "--device $other (on no driver before): $probe; now on $(pci_driver "$other"); bound in $(run_summary /tmp/run2 | jq -c '.devices_ms.bind') ms"
else
    fail run-unbound "--device $other (on no driver before): $probe; $(gc_summary /tmp/run2)"
fi
edu_reset_all
