# Timings of sandbox runs inside L1 (not part of the default run; `run.sh
# timing`): guest memory 256 MiB, 1 GiB and 4 GiB, with and without hugepages,
# with an edu function passed by --device and without one (the difference in
# vm_start is what pinning guest memory for VFIO costs). One result per run:
#   timing/<device>-<memory>-<pages>  detail: memory=.. pages=.. device=.. timings_ms={...}
# tests/nested/timing-report.sh turns them into a table. Numbers are L1's, a
# TCG-emulated host: compare them with each other, not with real hardware.

have_guest_artifacts || {
    skip timing "no guest artifacts in L1"
    exit 0
}
edu_reset_all
edu_policy on
bdf=$(pci_by_id | head -1)
huge_flag=$(gpucell run --help 2>/dev/null | grep -o -- '--huge[a-z-]*' | head -1)
devices="none"
have_run_device && devices="none edu" || skip device-runs "gpucell run has no --device option yet: runs without a device only"
[ -n "$huge_flag" ] || skip hugepage-runs "gpucell run has no hugepage option: hugepages are reserved in L1 but not used by QEMU"
GC_TIMEOUT=600
hp_dir=/sys/kernel/mm/hugepages/hugepages-2048kB
mkdir -p /dev/hugepages
mount -t hugetlbfs -o pagesize=2M,mode=1777 hugetlbfs /dev/hugepages

# reserve_hugepages MiB: sets the 2 MiB pool to MiB/2 pages plus 32 spare; 0 frees it.
reserve_hugepages() {
    want=0
    [ "$1" = 0 ] || want=$(($1 / 2 + 32))
    echo "$want" >"$hp_dir/nr_hugepages"
    [ "$(cat "$hp_dir/nr_hugepages")" -ge "$want" ]
}

# QEMU alone, without gpucell: time to start a stopped VM (-S -daemonize: the
# parent returns once the machine is built, VFIO DMA mappings included), with
# and without the edu function, 4 KiB pages or hugetlbfs with preallocation.
# The difference is the kernel's cost of pinning and mapping guest memory.
sysfs_bind_vfio "$bdf"
for mem in 256 1024 4096; do
    for pages in 4k 2m; do
        for dev in none edu; do
            name=pin-$dev-${mem}m-$pages
            args="-M q35 -accel kvm -m ${mem}M -smp 1 -nodefaults -display none -S -daemonize -pidfile /tmp/pin.pid"
            if [ "$pages" = 2m ]; then
                if ! reserve_hugepages "$mem"; then
                    fail "$name" "could not reserve $((mem / 2 + 32)) hugepages: only $(cat "$hp_dir/nr_hugepages")"
                    continue
                fi
                args="$args -object memory-backend-file,id=ram,size=${mem}M,mem-path=/dev/hugepages,share=on,prealloc=on -machine memory-backend=ram"
            fi
            [ "$dev" = none ] || args="$args -device pcie-root-port,id=rp0,bus=pcie.0,chassis=1 -device vfio-pci,host=$bdf,bus=rp0"
            t0=$(uptime_s)
            # shellcheck disable=SC2086 # word-split argument list
            timeout -s KILL 300 qemu-system-x86_64 $args >/tmp/pin.err 2>&1
            rc=$?
            t1=$(uptime_s)
            [ -f /tmp/pin.pid ] && kill -9 "$(cat /tmp/pin.pid)" 2>/dev/null
            wait_for 30 sh -c '! kill -0 "$(cat /tmp/pin.pid)" 2>/dev/null'
            rm -f /tmp/pin.pid
            [ "$pages" = 4k ] || reserve_hugepages 0
            ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 1000 }')
            if [ "$rc" = 0 ]; then
                pass "$name" "memory=${mem}m pages=$pages device=$dev wall_s=0 timings_ms={\"qemu_start\":$ms}"
            else
                fail "$name" "qemu exit $rc: $(head -c 300 /tmp/pin.err | tr '\n' ' ')"
            fi
        done
    done
done
sysfs_unbind_vfio "$bdf"

for dev in $devices; do
    for mem in 256 1024 4096; do
        for pages in 4k 2m; do
            name=$dev-${mem}m-$pages
            extra=
            if [ "$pages" = 2m ]; then
                [ -n "$huge_flag" ] || continue
                if ! reserve_hugepages "$mem"; then
                    fail "$name" "could not reserve $((mem / 2 + 32)) hugepages: only $(cat "$hp_dir/nr_hugepages") ($(grep MemFree /proc/meminfo))"
                    reserve_hugepages 0
                    continue
                fi
                extra=$huge_flag
            fi
            # The function is on no driver: gpucell binds it (the bind phase).
            dev_args=
            [ "$dev" = none ] || dev_args="--device $bdf"
            t0=$(uptime_s)
            # shellcheck disable=SC2086 # optional flags
            gc "/tmp/t-$name" --json run --boot-timeout 300s --memory "${mem}m" $extra $dev_args "$EDU_IMAGE" -- sh -c 'edu-probe; exit 0'
            rc=$?
            wall=$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')
            [ "$pages" = 4k ] || reserve_hugepages 0
            timings=$(run_summary "/tmp/t-$name" | jq -c '(.timings_ms // {}) + (if .devices_ms then {bind: .devices_ms.bind, release: .devices_ms.release} else {} end)' 2>/dev/null)
            probe=ok
            [ "$dev" = none ] || probe=$(edu_probe_ok "/tmp/t-$name.out" >/dev/null && echo ok || echo bad)
            if [ "$rc" = 0 ] && [ "$probe" = ok ]; then
                pass "$name" "memory=${mem}m pages=$pages device=$dev wall_s=$wall timings_ms=$timings"
            else
                fail "$name" "memory=${mem}m pages=$pages device=$dev probe=$probe $(gc_summary "/tmp/t-$name")"
            fi
            edu_reset_all
        done
    done
done
umount /dev/hugepages
