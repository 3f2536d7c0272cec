# A driver flavour (nvidia-550, built on the outer machine by `make test` and copied
# in through NESTED_DRIVER_GUEST_DIR) with an edu function passed: the agent finds its
# driver disk, sees no NVIDIA GPU among the passed functions, loads nothing, leaves the
# edu function alone (edu-probe in the container still drives it through VFIO) and says
# so in the run summary's `driver` report.

FLAVOUR=nvidia-550
if [ ! -f "/var/lib/gpucell/guest/$FLAVOUR/manifest.json" ]; then
    skip driver-edu "no $FLAVOUR guest in L1 (set NESTED_DRIVER_GUEST_DIR to a built flavour; make test does)"
    exit 0
fi
if ! have_run_device; then
    skip driver-edu "gpucell run has no --device option yet"
    exit 0
fi
edu_reset_all
edu_policy on
GC_TIMEOUT=240
bdf=$(pci_by_id | head -1)
edu_pool "$bdf" || fail pool "gpucell gpu bind $bdf: $(gc_summary /tmp/pool-bind)"
gc /tmp/drv1 --json run --guest "$FLAVOUR" --memory 512m --boot-timeout 180s --device "$bdf" "$EDU_IMAGE" -- edu-probe
probe=$(edu_probe_ok /tmp/drv1.out)
ok=$?
driver=$(run_summary /tmp/drv1 | jq -c '.driver')
if [ "$(cat /tmp/drv1.rc)" = 0 ] && [ $ok = 0 ] &&
    echo "$driver" | jq -e '(.gpus == []) and (.message | test("no NVIDIA GPU was passed")) and (.message | test("1234:11e8"))' >/dev/null; then
    pass driver-edu "--guest $FLAVOUR --device $bdf: $probe; driver report $driver"
else
    fail driver-edu "--guest $FLAVOUR --device $bdf: $probe; driver report $driver; $(gc_summary /tmp/drv1)"
fi
edu_reset_all
