# Proof that the nested host gives real VFIO and KVM: bind an edu function to
# vfio-pci (with gpucell if `gpu bind` exists, else through sysfs as gpucell
# does), check sysfs and /dev/vfio, pass it to an L2 QEMU running under KVM,
# and read the edu registers from inside L2.

expected=$(cmdline_arg nested.edu)
bdfs=$(pci_by_id)
count=$(echo "$bdfs" | grep -c .)
if [ "$count" -ge 1 ] && { [ -z "$expected" ] || [ "$count" -eq "$expected" ]; }; then
    pass edu-present "$count edu functions: $(echo $bdfs)"
else
    fail edu-present "found $count edu functions (expected ${expected:-at least 1}): $(echo $bdfs)"
    exit 0
fi
bdf=$(echo "$bdfs" | head -1)
grp=$(iommu_group "$bdf")
members=$(ls "/sys/kernel/iommu_groups/$grp/devices" | tr '\n' ' ')
if [ "$members" = "$bdf " ]; then
    pass edu-group "$bdf alone in IOMMU group $grp"
else
    fail edu-group "$bdf IOMMU group '$grp' holds: $members"
fi

how=sysfs
if gc_stub gpu bind; then
    sysfs_bind_vfio "$bdf"
elif gc /tmp/bind gpu bind "$bdf"; then
    how=gpucell
else
    fail gpucell-bind "gpucell gpu bind $bdf: $(gc_summary /tmp/bind); binding through sysfs instead"
    sysfs_bind_vfio "$bdf"
fi
drv=$(pci_driver "$bdf")
if [ "$drv" = vfio-pci ] && [ -c "/dev/vfio/$grp" ]; then
    pass bind "$bdf bound to vfio-pci by $how, /dev/vfio/$grp present"
else
    fail bind "$bdf driver is $drv after binding by $how; /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
    exit 0
fi

t0=$(uptime_s)
run_l2_edu "$bdf" kvm /tmp/l2.log
rc=$?
t1=$(uptime_s)
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
show L2 /tmp/l2.log 60
show L2-qemu /tmp/l2.log.qemu 20
line=$(grep '^L2-EDU' /tmp/l2.log | head -1 | tr -d '\r')
val() { echo "$line" | tr ' ' '\n' | sed -n "s/^$1=//p" | tr 'A-F' 'a-f'; }
if [ -z "$line" ]; then
    fail l2-boot "L2 QEMU (KVM) exit status $rc after ${secs}s, no L2-EDU line; qemu: $(head -c 200 /tmp/l2.log.qemu | tr '\n' ' ')"
elif [ "$line" = "L2-EDU none" ]; then
    fail l2-boot "L2 booted under KVM in ${secs}s but sees no edu function"
else
    pass l2-boot "L2 booted under KVM with $bdf by vfio-pci; qemu launch to poweroff ${secs}s (L1 clock)"
    [ "$(val ident)" = 0x010000ed ] && pass edu-ident "identification register $(val ident)" ||
        fail edu-ident "identification register $(val ident), expected 0x010000ed"
    [ "$(val inverse)" = 0xedcba987 ] && pass edu-inverse "inverse(0x12345678) = $(val inverse)" ||
        fail edu-inverse "inverse(0x12345678) = $(val inverse), expected 0xedcba987"
    [ "$(val fact5)" = 0x00000078 ] && pass edu-factorial "factorial(5) = $(val fact5)" ||
        fail edu-factorial "factorial(5) = $(val fact5), expected 0x00000078"
    # edu-probe (the helper of the sandbox test image) in L2, by mmap of resource0.
    probe=$(grep '^EDU-PROBE' /tmp/l2.log | head -1 | tr -d '\r')
    probe_rc=$(sed -n 's/^L2-EDU-PROBE exit=\([0-9]*\).*/\1/p' /tmp/l2.log | head -1)
    case "$probe" in
    *" ident=0x010000ed fact5=0x00000078 ok=1"*)
        [ "$probe_rc" = 0 ] && pass edu-probe "$probe" || fail edu-probe "$probe but exit status ${probe_rc:-missing}" ;;
    *) fail edu-probe "edu-probe in L2 printed '${probe:-nothing}', exit status ${probe_rc:-missing}" ;;
    esac
fi

if [ "$how" = gpucell ] && gc /tmp/unbind gpu unbind "$bdf"; then
    how=gpucell
else
    how=sysfs
    sysfs_unbind_vfio "$bdf"
fi
if [ "$(pci_driver "$bdf")" = none ] && [ ! -e "/dev/vfio/$grp" ]; then
    pass unbind "$bdf released by $how: no driver, /dev/vfio/$grp gone"
else
    fail unbind "$bdf after unbind by $how: driver $(pci_driver "$bdf"), /dev/vfio/$grp: $(ls /dev/vfio/$grp 2>&1)"
fi
