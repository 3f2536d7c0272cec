# `gpucell gpu list/bind/unbind` against the real kernel. The edu functions are
# not GPUs: `gpu list` must not crash on them and must print valid JSON;
# `gpu bind`/`unbind` take any PCI function (the device allocator hands out
# BDFs), so binding an edu function must work and be visible in sysfs.

gc /tmp/list --json gpu list
if gc_not_built /tmp/list; then
    skip gpu-list "gpucell gpu list is not built yet ($(gc_summary /tmp/list))"
elif [ "$(cat /tmp/list.rc)" != 0 ]; then
    fail gpu-list "$(gc_summary /tmp/list)"
elif ! jq -e . /tmp/list.out >/dev/null 2>&1; then
    fail gpu-list "output is not valid JSON: $(head -c 200 /tmp/list.out)"
else
    pass gpu-list "valid JSON: $(jq -c '[.. | objects | (.bdf // .address // empty)]' /tmp/list.out 2>&1 | head -c 200)"
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
