# The nested host's own facts (checked through sysfs, procfs and /dev), then
# what `gpucell doctor` says about them. The first half proves the harness
# gives a real IOMMU, real vfio modules and a usable /dev/kvm; the second half
# checks that gpucell sees the same.

groups=$(ls /sys/kernel/iommu_groups 2>/dev/null | wc -l)
if [ -d /sys/class/iommu ] && [ -n "$(ls /sys/class/iommu)" ] && [ "$groups" -gt 0 ]; then
    pass iommu "$(ls /sys/class/iommu | tr '\n' ' ')with $groups IOMMU groups"
else
    fail iommu "no IOMMU in /sys/class/iommu or no groups in /sys/kernel/iommu_groups ($groups); is intel_iommu=on on the L1 command line?"
fi

missing=
for m in vfio vfio_iommu_type1 vfio_pci kvm kvm_amd vhost_vsock; do
    [ -d "/sys/module/$m" ] || missing="$missing $m"
done
if [ -z "$missing" ]; then
    pass modules-loaded "vfio vfio_iommu_type1 vfio_pci kvm kvm_amd vhost_vsock in /sys/module"
else
    fail modules-loaded "not in /sys/module:$missing"
fi

if [ -c /dev/kvm ] && grep -qw svm /proc/cpuinfo; then
    pass dev-kvm "/dev/kvm present, CPU has svm"
else
    fail dev-kvm "/dev/kvm: $(ls -l /dev/kvm 2>&1); svm flag: $(grep -cw svm /proc/cpuinfo)"
fi

if [ -c /dev/vfio/vfio ] && [ -c /dev/vhost-vsock ]; then
    pass dev-nodes "/dev/vfio/vfio and /dev/vhost-vsock present"
else
    fail dev-nodes "$(ls -l /dev/vfio/vfio /dev/vhost-vsock 2>&1 | tr '\n' ' ')"
fi

# gpucell doctor: text and JSON. L1 has no GPU, so doctor may well exit
# non-zero; what must hold is that its IOMMU, vfio and KVM checks pass.
gc /tmp/doctor doctor
gc /tmp/doctor-json --json doctor
if gc_not_built /tmp/doctor-json; then
    skip doctor "gpucell doctor is not built yet ($(gc_summary /tmp/doctor-json))"
elif ! jq -e . /tmp/doctor-json.out >/dev/null 2>&1; then
    fail doctor-json "gpucell --json doctor printed no valid JSON ($(gc_summary /tmp/doctor-json))"
else
    pass doctor-json "valid JSON, exit $(cat /tmp/doctor-json.rc)"
    # A check counts as passed if some object names it (any string value
    # matching the topic) and has a passing status field.
    for topic in iommu vfio kvm; do
        verdict=$(jq -r --arg t "$topic" '
            [.. | objects
             | select([.[]? | strings | test($t; "i")] | any)
             | (.status // .state // .result // .ok // .passed // empty)
             | tostring | ascii_downcase]
            | if length == 0 then "absent"
              elif any(. == "ok" or . == "pass" or . == "passed" or . == "true") then "ok"
              else "failed:" + join(",") end' /tmp/doctor-json.out 2>&1)
        case "$verdict" in
        ok) pass "doctor-$topic" "doctor reports the $topic check as passing" ;;
        absent) fail "doctor-$topic" "no $topic check with a status field in doctor JSON" ;;
        *) fail "doctor-$topic" "doctor $topic check: $verdict" ;;
        esac
    done
fi
