# The containerd shim in L1 (real KVM, IOMMU, VFIO): a real containerd (Debian's) with its
# own config, root and state under /run/nested-ctrd, the native snapshotter and the runtime
# io.containerd.gpucell.v1; the edu test image imported offline (`ctr images import` of an
# OCI archive). `ctr run --rm --device /dev/vfio/<group>` of edu-probe must read the edu
# ident and exit 0, and leave the function in the pool (no record, not quarantined, on
# vfio-pci, no holder of the group) with no QEMU or shim left; `ctr run --rm` without
# --device must not see the function.
#
# With NESTED_SHIM_POD=1 (nested.shim_pod=1 on L1's command line), then a pod through
# containerd's CRI plugin, as the kubelet runs one
# (gpucell-test-cri-pod, a test tool): a fake kubelet serves PodResources on its socket and
# gives the pod's second container the edu function; the pod's first container (an init
# container) asks for no device. The pod's VM must boot with the function (learnt from the
# kubelet), so both containers read the edu ident; the second joins the running VM with its
# /dev/vfio node; afterwards the function is back in the pool and nothing is left.

missing=
for b in containerd ctr containerd-shim-gpucell-v1; do
    command -v "$b" >/dev/null || missing="$missing $b"
done
if [ -n "$missing" ]; then
    skip shim-edu "not in L1:$missing (build.sh carries containerd and ctr from NESTED_CONTAINERD_DIR and the shim from the gpucell binaries when present)"
    exit 0
fi
if ! have_guest_artifacts; then
    skip shim-edu "needs guest artifacts in L1"
    exit 0
fi
edu_first_pooled

CTRD=/run/nested-ctrd
SHIM_IMAGE=nested.local/edu-probe:latest
RUNTIME=io.containerd.gpucell.v1
rm -rf "$CTRD"
mkdir -p "$CTRD"
KUBELET_SOCK=/var/lib/kubelet/pod-resources/kubelet.sock
CRI='plugins."io.containerd.grpc.v1.cri"'
SHIM_POD=$(cmdline_arg nested.shim_pod)
mkdir -p "$CTRD/cni/bin" "$CTRD/cni/conf"
if [ "$SHIM_POD" != 1 ]; then
    cat >"$CTRD/config.toml" <<EOF
version = 2
root = "$CTRD/root"
state = "$CTRD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTRD/c.sock"
[ttrpc]
  address = "$CTRD/c.sock.ttrpc"
EOF
else
    cat >"$CTRD/config.toml" <<EOF
version = 2
root = "$CTRD/root"
state = "$CTRD/state"
[grpc]
  address = "$CTRD/c.sock"
[ttrpc]
  address = "$CTRD/c.sock.ttrpc"
[$CRI]
  sandbox_image = "$SHIM_IMAGE"
[$CRI.cni]
  bin_dir = "$CTRD/cni/bin"
  conf_dir = "$CTRD/cni/conf"
[$CRI.containerd]
  snapshotter = "native"
  default_runtime_name = "gpucell"
[$CRI.containerd.runtimes.gpucell]
  runtime_type = "$RUNTIME"
EOF
fi
c() { ctr -a "$CTRD/c.sock" "$@"; }
# Processes of this scenario's containerd world (the shim, its QEMU).
shim_pids() {
    for _p in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$_p/cmdline" | grep -q '[c]ontainerd-shim-gpucell-v1' && basename "$_p"
    done
}
qemu_pids() {
    for _p in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$_p/cmdline" | grep -q '[q]emu-system.*gpucell-' && basename "$_p"
    done
}
# Ends containerd and whatever this scenario started, and leaves the edu functions as found.
finish() {
    for _p in $(shim_pids) $(qemu_pids); do kill -9 "$_p" 2>/dev/null; done
    [ -n "${cpid:-}" ] && kill -9 "$cpid" 2>/dev/null && wait "$cpid" 2>/dev/null
    show containerd "$CTRD/containerd.log" "${1:-0}"
    # Nothing the shim mounted under the bundles is removed through its mount.
    for _m in $(awk -v d="$CTRD/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$_m" 2>/dev/null
    done
    rm -rf "$CTRD" /tmp/shim-img /tmp/shim-img.tar /var/lib/kubelet ${made_etc:-}
    edu_reset_all
}

t0=$(date +%s)
containerd --config "$CTRD/config.toml" >"$CTRD/containerd.log" 2>&1 &
cpid=$!
answers() { c version >/dev/null 2>&1; }
if ! wait_for 60 answers; then
    fail containerd "containerd did not answer within 60 s: $( (grep -E 'level=(fatal|error)' "$CTRD/containerd.log" || tail -c 300 "$CTRD/containerd.log") | tail -3 | cut -c1-300 | tr '\n' ' ')"
    finish 40
    exit 0
fi
# The edu test image as an OCI archive, named for containerd.
rm -rf /tmp/shim-img
cp -a /nested/images/edu-probe /tmp/shim-img
jq --arg n "$SHIM_IMAGE" '.manifests[].annotations["io.containerd.image.name"] = $n' \
    /tmp/shim-img/index.json >/tmp/shim-img/index.json.new &&
    mv /tmp/shim-img/index.json.new /tmp/shim-img/index.json
tar -C /tmp/shim-img -cf /tmp/shim-img.tar .
if ! c images import --snapshotter native /tmp/shim-img.tar >/tmp/shim-import.out 2>&1; then
    fail import "ctr images import: $(head -c 300 /tmp/shim-import.out)"
    finish 40
    exit 0
fi
pass containerd "containerd $(c version 2>/dev/null | awk '$1 == "Version:" {print $2}' | tail -1) up and $SHIM_IMAGE imported in $(($(date +%s) - t0)) s"

# shim_run OUT ID CTR_RUN_ARGS...: `ctr run --rm` of edu-probe through the shim; output in
# OUT.out/OUT.err, exit status in OUT.rc, seconds in OUT.s.
shim_run() {
    _o=$1 _id=$2
    shift 2
    echo "L1: \$ ctr run --rm --snapshotter native --runtime $RUNTIME $* $SHIM_IMAGE $_id edu-probe" >/dev/console
    _t=$(date +%s)
    timeout -s KILL 240 ctr -a "$CTRD/c.sock" run --rm --snapshotter native --runtime "$RUNTIME" "$@" \
        "$SHIM_IMAGE" "$_id" edu-probe >"$_o.out" 2>"$_o.err"
    echo $? >"$_o.rc"
    echo $(($(date +%s) - _t)) >"$_o.s"
    show stdout "$_o.out"
    show stderr "$_o.err"
    echo "L1:   exit status $(cat "$_o.rc") after $(cat "$_o.s") s" >/dev/console
}
# Nothing left of a task: no shim, no QEMU (the shim exits after `ctr run --rm` deletes).
no_leftovers() { [ -z "$(shim_pids)$(qemu_pids)" ]; }

shim_run /tmp/sd sd1 --device "/dev/vfio/$grp"
line=$(edu_probe_ok /tmp/sd.out)
probe_ok=$?
wait_for 30 no_leftovers
drv=$(pci_driver "$bdf")
if [ "$(cat /tmp/sd.rc)" = 0 ] && [ "$probe_ok" = 0 ]; then
    pass shim-device "ctr run --device /dev/vfio/$grp: $line (exit 0, $(cat /tmp/sd.s) s)"
else
    fail shim-device "ctr run --device /dev/vfio/$grp: exit $(cat /tmp/sd.rc): $line; $(head -c 200 /tmp/sd.err | tr '\n' ' ')"
fi
if [ -z "$(alloc_bdfs)" ] && [ -z "$(quarantined_bdfs)" ] && [ "$drv" = vfio-pci ] &&
    [ -z "$(vfio_holders "$grp")" ] && no_leftovers; then
    pass shim-returned "$bdf back in the pool (on vfio-pci, no record, /dev/vfio/$grp closed), no shim or QEMU left"
else
    fail shim-returned "allocated [$(alloc_bdfs)], quarantined [$(quarantined_bdfs)], driver $drv, holders [$(vfio_holders "$grp")], shims [$(shim_pids)], QEMUs [$(qemu_pids)]"
fi

# Without --device the task's VM has no edu function: edu-probe finds none and exits 1.
shim_run /tmp/sn sn1
wait_for 30 no_leftovers
if [ "$(cat /tmp/sn.rc)" = 1 ] && grep -q '^EDU-PROBE none' /tmp/sn.out && [ -z "$(alloc_bdfs)" ] && no_leftovers; then
    pass shim-no-device "ctr run without --device: $(head -1 /tmp/sn.out | tr -d '\r') (exit 1, $(cat /tmp/sn.s) s), nothing allocated or left"
else
    fail shim-no-device "exit $(cat /tmp/sn.rc): $(head -c 200 /tmp/sn.out | tr '\n' ' '); allocated [$(alloc_bdfs)], shims [$(shim_pids)], QEMUs [$(qemu_pids)]; $(head -c 200 /tmp/sn.err | tr '\n' ' ')"
fi

if [ "$SHIM_POD" != 1 ]; then
    skip shim-pod "the CRI pod part runs with NESTED_SHIM_POD=1 (docs/nested-test-host.md)"
    if [ "$(cat /tmp/sd.rc)$(cat /tmp/sn.rc)" = 01 ]; then finish 0; else finish 60; fi
    exit 0
fi
if ! command -v gpucell-test-cri-pod >/dev/null; then
    skip shim-pod "gpucell-test-cri-pod not in L1 (build.sh carries it from the gpucell binaries when present)"
    if [ "$(cat /tmp/sd.rc)$(cat /tmp/sn.rc)" = 01 ]; then finish 0; else finish 60; fi
    exit 0
fi
edu_reset_all
edu_pool "$bdf" || fail pool "gpucell gpu bind $bdf: $(gc_summary /tmp/pool-bind)"
if ! c -n k8s.io images import --snapshotter native /tmp/shim-img.tar >/tmp/shim-import.out 2>&1; then
    fail shim-pod "ctr -n k8s.io images import: $(head -c 300 /tmp/shim-import.out)"
    finish 40
    exit 0
fi
# A host-network pod gets copies of the node's /etc/hosts and resolv.conf; L1 has none.
made_etc=
for f in /etc/hosts /etc/resolv.conf; do
    [ -e "$f" ] || { : >"$f" && made_etc="$made_etc $f"; }
done
echo "L1: \$ gpucell-test-cri-pod (a pod: init without a device, probe with /dev/vfio/$grp from the kubelet)" >/dev/console
t0=$(date +%s)
timeout -s KILL 300 gpucell-test-cri-pod --cri-socket "$CTRD/c.sock" --kubelet-socket "$KUBELET_SOCK" \
    --image "$SHIM_IMAGE" --logs "$CTRD/pod-logs" --device "/dev/vfio/$grp" \
    --device-id "$(echo "$bdf" | tr : -)" --command edu-probe >/tmp/sp.out 2>/tmp/sp.err
echo $? >/tmp/sp.rc
sp_s=$(($(date +%s) - t0))
show pod /tmp/sp.out
show stderr /tmp/sp.err
sed -n 's/^init| //p' /tmp/sp.out >/tmp/sp-init.out
sed -n 's/^probe| //p' /tmp/sp.out >/tmp/sp-probe.out
init_line=$(edu_probe_ok /tmp/sp-init.out)
init_ok=$?
probe_line=$(edu_probe_ok /tmp/sp-probe.out)
probe_ok=$?
wait_for 30 no_leftovers
if [ "$(cat /tmp/sp.rc)" = 0 ] && grep -qx 'init exit=0' /tmp/sp.out && grep -qx 'probe exit=0' /tmp/sp.out &&
    [ "$init_ok" = 0 ] && [ "$probe_ok" = 0 ]; then
    pass shim-pod "CRI pod, $bdf given by the kubelet's PodResources: init (no device) $init_line; probe (/dev/vfio/$grp) $probe_line ($sp_s s)"
else
    fail shim-pod "gpucell-test-cri-pod exit $(cat /tmp/sp.rc): init [$init_line], probe [$probe_line]; $(head -c 300 /tmp/sp.err | tr '\n' ' ')"
fi
drv=$(pci_driver "$bdf")
if [ -z "$(alloc_bdfs)" ] && [ -z "$(quarantined_bdfs)" ] && [ "$drv" = vfio-pci ] &&
    [ -z "$(vfio_holders "$grp")" ] && no_leftovers; then
    pass shim-pod-returned "$bdf back in the pool after the pod, no shim or QEMU left"
else
    fail shim-pod-returned "allocated [$(alloc_bdfs)], quarantined [$(quarantined_bdfs)], driver $drv, holders [$(vfio_holders "$grp")], shims [$(shim_pids)], QEMUs [$(qemu_pids)]"
fi
if [ "$(cat /tmp/sd.rc)$(cat /tmp/sn.rc)$(cat /tmp/sp.rc)" = 010 ]; then finish 0; else finish 60; fi
