# `gpucell gpu list/bind/unbind` against the real kernel. The edu functions are
# not GPUs, so `gpu list` must list none; `gpu bind`/`unbind` take any PCI function (the device allocator hands out
# BDFs), so binding an edu function must work and be visible in sysfs.

# gpu list (schema gpucell.gpu-list/v1). L1 has an IOMMU and no GPU: the
# edu functions (class "unclassified") must not show up as GPUs.
gc /tmp/list --json gpu list
if gc_not_built /tmp/list; then
    skip gpu-list "gpucell gpu list is not built yet ($(gc_summary /tmp/list))"
elif [ "$(cat /tmp/list.rc)" != 0 ]; then
    fail gpu-list "$(gc_summary /tmp/list)"
elif ! jq -e '.schema == "gpucell.gpu-list/v1"' /tmp/list.out >/dev/null 2>&1; then
    fail gpu-list "no gpucell.gpu-list/v1 document: $(head -c 200 /tmp/list.out)"
else
    summary=$(jq -c '{iommu_groups_present, gpus: [.gpus[].bdf], warnings}' /tmp/list.out)
    if jq -e '.iommu_groups_present == true and (.gpus | length) == 0' /tmp/list.out >/dev/null; then
        pass gpu-list "$summary"
    else
        fail gpu-list "expected IOMMU groups and no GPUs on the nested host: $summary"
    fi
fi

bdf=$(pci_by_id | tail -1)
if [ -z "$bdf" ]; then
    fail edu-present "no edu (1234:11e8) function in /sys/bus/pci/devices"
    exit 0
fi
grp=$(iommu_group "$bdf")
before=$(pci_driver "$bdf")

if gc_stub gpu bind; then
    skip gpu-bind "gpucell gpu bind is not built yet"
else
    gc /tmp/bind gpu bind "$bdf"
    drv=$(pci_driver "$bdf")
    if [ "$(cat /tmp/bind.rc)" = 0 ] && [ "$drv" = vfio-pci ] && [ -c "/dev/vfio/$grp" ]; then
        pass gpu-bind "$bdf bound to vfio-pci, /dev/vfio/$grp present"
    else
        fail gpu-bind "$bdf: $(gc_summary /tmp/bind); driver now $drv; /dev/vfio/$grp: $(ls /dev/vfio/$grp 2>&1)"
    fi
fi

if gc_stub gpu unbind; then
    skip gpu-unbind "gpucell gpu unbind is not built yet"
else
    gc /tmp/unbind gpu unbind "$bdf"
    drv=$(pci_driver "$bdf")
    if [ "$(cat /tmp/unbind.rc)" = 0 ] && [ "$drv" = "$before" ] && [ ! -e "/dev/vfio/$grp" ]; then
        pass gpu-unbind "$bdf back to driver $before, /dev/vfio/$grp gone"
    else
        fail gpu-unbind "$bdf: $(gc_summary /tmp/unbind); driver now $drv (was $before); /dev/vfio/$grp: $(ls /dev/vfio/$grp 2>&1)"
    fi
fi
# Leave the function as found for later scenarios, whatever gpucell did.
[ "$(pci_driver "$bdf")" = "$before" ] || sysfs_unbind_vfio "$bdf"
