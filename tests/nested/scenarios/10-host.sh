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

kvm_vendor=kvm_amd
grep -qw vmx /proc/cpuinfo && kvm_vendor=kvm_intel
missing=
for m in vfio vfio_iommu_type1 vfio_pci kvm $kvm_vendor vhost_vsock; do
    [ -d "/sys/module/$m" ] || missing="$missing $m"
done
if [ -z "$missing" ]; then
    pass modules-loaded "vfio vfio_iommu_type1 vfio_pci kvm $kvm_vendor vhost_vsock in /sys/module"
else
    fail modules-loaded "not in /sys/module:$missing"
fi

if [ -c /dev/kvm ] && grep -qwE 'svm|vmx' /proc/cpuinfo; then
    pass dev-kvm "/dev/kvm present, CPU has $(grep -owE 'svm|vmx' /proc/cpuinfo | head -1)"
else
    fail dev-kvm "/dev/kvm: $(ls -l /dev/kvm 2>&1); svm/vmx flags: $(grep -cwE 'svm|vmx' /proc/cpuinfo)"
fi

if [ -c /dev/vfio/vfio ] && [ -c /dev/vhost-vsock ]; then
    pass dev-nodes "/dev/vfio/vfio and /dev/vhost-vsock present"
else
    fail dev-nodes "$(ls -l /dev/vfio/vfio /dev/vhost-vsock 2>&1 | tr '\n' ' ')"
fi

# gpucell doctor (schema gpucell.doctor/v1: checks[] with id, status
# pass|warn|fail, detail, fix). L1 has no GPU; what must hold is that the
# checks about the host itself pass, and that doctor calls the host ready.
# A "warn" is reported as a skip with doctor's reason (doctor could not
# confirm what the ground truth above shows); NESTED_STRICT=1 fails it.
gc /tmp/doctor doctor
gc /tmp/doctor-json --json doctor
if gc_not_built /tmp/doctor-json; then
    skip doctor "gpucell doctor is not built yet ($(gc_summary /tmp/doctor-json))"
elif ! jq -e '.schema == "gpucell.doctor/v1" and (.checks | type == "array")' /tmp/doctor-json.out >/dev/null 2>&1; then
    fail doctor-json "gpucell --json doctor printed no gpucell.doctor/v1 document ($(gc_summary /tmp/doctor-json))"
else
    jq -c '.checks[] | {id, status, detail}' /tmp/doctor-json.out >/tmp/doctor-checks
    show doctor-check /tmp/doctor-checks 60
    ready=$(jq -r '.ready' /tmp/doctor-json.out)
    if [ "$(cat /tmp/doctor-json.rc)" = 0 ] && [ "$ready" = true ]; then
        pass doctor-ready "ready=true, exit 0, $(jq -c .summary /tmp/doctor-json.out)"
    else
        fail doctor-ready "ready=$ready, exit $(cat /tmp/doctor-json.rc), $(jq -c .summary /tmp/doctor-json.out)"
    fi
    for id in cpu-virtualization kvm iommu interrupt-remapping acs-override vfio qemu; do
        status=$(jq -r --arg id "$id" '[.checks[] | select(.id == $id)][0].status // "absent"' /tmp/doctor-json.out)
        detail=$(jq -r --arg id "$id" '[.checks[] | select(.id == $id)][0].detail // ""' /tmp/doctor-json.out)
        case "$status" in
        pass) pass "doctor-$id" "$detail" ;;
        warn) skip "doctor-$id" "doctor warns: $detail" ;;
        absent) fail "doctor-$id" "no check with id $id in doctor JSON" ;;
        *) fail "doctor-$id" "status $status: $detail" ;;
        esac
    done
fi
