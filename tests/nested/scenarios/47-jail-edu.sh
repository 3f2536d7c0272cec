# The jailed QEMU under real KVM, with an edu function passed through, checked from
# L1 while it runs: /proc/<qemu>/status shows its seccomp filter (Seccomp 2), no
# effective capability, NoNewPrivs 1 and a uid of its own (not 0, and another one for
# a second sandbox running beside it); /proc/<qemu>/root shows only its view (QEMU's
# files, the guest's, its run directory, its own /dev with only its vfio group);
# its cgroup has the memory, cpu and pids limits the run report names.

have_guest_artifacts && have_run_device || {
    skip jail "needs guest artifacts and gpucell run --device"
    exit 0
}
edu_first_pooled
GC_TIMEOUT=240

# status_field PID FIELD: the value of FIELD in /proc/PID/status, blanks squeezed.
status_field() {
    awk -v f="$2:" '$1 == f { $1 = ""; sub(/^ /, ""); print; exit }' "/proc/$1/status" 2>/dev/null
}
# cg_value PID CONTROLLER V1_FILE V2_FILE: a limit of PID's cgroup (v2, or the v1
# hierarchy of CONTROLLER).
cg_value() {
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        _path=$(awk -F: '$1 == "0" { print $3 }' "/proc/$1/cgroup")
        cat "/sys/fs/cgroup$_path/$4" 2>/dev/null
    else
        _path=$(awk -F: -v c="$2" '{ n = split($2, a, ","); for (i = 1; i <= n; i++) if (a[i] == c) print $3 }' "/proc/$1/cgroup")
        cat "/sys/fs/cgroup/$2$_path/$3" 2>/dev/null
    fi
}
# The jailed QEMU of a run: the process holding its vfio group, or any other QEMU.
qemu_pids() {
    for _p in /proc/[0-9]*; do
        tr '\0' ' ' <"$_p/cmdline" 2>/dev/null | grep -q 'qemu-system.*gpucell-' && basename "$_p"
    done
}

gc /tmp/ja --json run --memory 256m --boot-timeout 120s --device "$bdf" "$EDU_IMAGE" -- sh -c 'edu-probe; sleep 40' &
pa=$!
a_running() { grep -q '^EDU-PROBE' /tmp/ja.out 2>/dev/null; }
if ! wait_for 150 a_running; then
    fail a-running "the jailed run's workload did not start: $(gc_summary /tmp/ja)"
    wait $pa
    edu_reset_all
    exit 0
fi
qa=$(vfio_holders "$grp" | head -1)
st="Seccomp=$(status_field "$qa" Seccomp) CapEff=$(status_field "$qa" CapEff) NoNewPrivs=$(status_field "$qa" NoNewPrivs) Uid=$(status_field "$qa" Uid)"
uid_a=$(status_field "$qa" Uid | cut -d' ' -f1)
case "$st" in
"Seccomp=2 CapEff=0000000000000000 NoNewPrivs=1 Uid="*)
    if [ -n "$uid_a" ] && [ "$uid_a" != 0 ]; then
        pass status "QEMU $qa (holding /dev/vfio/$grp): $st"
    else
        fail status "QEMU $qa runs as uid 0: $st"
    fi
    ;;
*) fail status "QEMU [$qa] holding /dev/vfio/$grp: $st" ;;
esac

# Its root: only the view (no /etc, /root, /tmp, /init or /nested of L1), its /dev
# only the nodes it uses, /dev/vfio only its own group.
top=$(ls -A "/proc/$qa/root" 2>&1 | tr '\n' ' ')
devs=$(ls -A "/proc/$qa/root/dev" 2>&1 | tr '\n' ' ')
vfio=$(ls -A "/proc/$qa/root/dev/vfio" 2>&1 | tr '\n' ' ')
bad=
for n in $top; do
    case "$n" in usr | lib | lib64 | lib32 | bin | sbin | dev | proc | sys | var) ;; *) bad="$bad $n" ;; esac
done
for n in $devs; do
    case "$n" in null | zero | urandom | kvm | vhost-vsock | vhost-net | vfio) ;; *) bad="$bad dev/$n" ;; esac
done
if [ -z "$bad" ] && [ -n "$top" ] && [ "$vfio" = "$grp vfio " ] && [ -e "/proc/$qa/root/dev/kvm" ]; then
    pass root "/proc/$qa/root: $top; dev: $devs; dev/vfio: $vfio"
else
    fail root "/proc/$qa/root: $top; dev: $devs; dev/vfio: $vfio; not in the view:$bad"
fi

mem=$(cg_value "$qa" memory memory.limit_in_bytes memory.max)
pids=$(cg_value "$qa" pids pids.max pids.max)
cpu=$(cg_value "$qa" cpu cpu.cfs_quota_us cpu.max | cut -d' ' -f1)

# A second sandbox beside it (no device): another uid.
gc /tmp/jb --json run --memory 256m --boot-timeout 120s "$EDU_IMAGE" -- sh -c 'echo b-up; sleep 5' &
pb=$!
b_running() { grep -q '^b-up' /tmp/jb.out 2>/dev/null; }
if wait_for 120 b_running; then
    qb=$(qemu_pids | grep -v "^$qa\$" | head -1)
    uid_b=$(status_field "$qb" Uid | cut -d' ' -f1)
    if [ -n "$uid_b" ] && [ "$uid_b" != 0 ] && [ "$uid_b" != "$uid_a" ] && [ "$(status_field "$qb" Seccomp)" = 2 ]; then
        pass uids "two jailed QEMUs at once: $qa as uid $uid_a, $qb as uid $uid_b"
    else
        fail uids "QEMU $qa as uid $uid_a, [$qb] as uid [$uid_b], Seccomp $(status_field "$qb" Seccomp)"
    fi
else
    fail uids "the second run's workload did not start: $(gc_summary /tmp/jb)"
fi
wait $pb
wait $pa

# The limits QEMU ran under are the report's, and set (not "max").
jail=$(run_summary /tmp/ja | jq -c '.jail')
want=$(echo "$jail" | jq -r '[.cgroup.memory_bytes, .cgroup.pids_max, .cgroup.cpu_quota_us] | map(tostring) | join(" ")')
if [ "$(cat /tmp/ja.rc)" = 0 ] && [ "$mem $pids $cpu" = "$want" ] &&
    echo "$jail" | jq -e --argjson u "$uid_a" '.enabled and .uid == $u and .status.seccomp == "2"' >/dev/null; then
    pass cgroup "memory $mem, pids $pids, cpu quota $cpu (as the report says: $(echo "$jail" | cut -c1-250))"
else
    fail cgroup "read memory $mem, pids $pids, cpu quota $cpu; report: $(echo "$jail" | cut -c1-250); $(gc_summary /tmp/ja)"
fi
left=$(qemu_pids)
[ -z "$left" ] && [ -z "$(alloc_bdfs)" ] &&
    pass cleaned "no QEMU left, $bdf back in the pool" ||
    fail cleaned "QEMU left [$left], allocated [$(alloc_bdfs)]"
edu_reset_all
