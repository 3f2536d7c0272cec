# A function that fails its cleaning is quarantined. edu has no reset method and,
# without allow_no_reset in policy.toml, that is a failure (the last tenant's state
# may remain): after the run the function must be in quarantine.json with that
# reason, a new run naming it must be refused, and `gpucell gpu release` (its
# config space still answers) must take it out so it can be used again.
# A failing config-space check (a function that stops answering) has no hook in
# the real kernel path; the allocator's tests cover it with a writer that fakes it.

have_guest_artifacts && have_run_device || {
    skip quarantine "needs guest artifacts and gpucell run --device"
    exit 0
}
edu_reset_all
edu_policy off
bdf=$(pci_by_id | head -1)
edu_pool "$bdf" || fail pool "gpucell gpu bind $bdf: $(gc_summary /tmp/pool-bind)"
GC_TIMEOUT=180
gc /tmp/q1 --json run --memory 256m --boot-timeout 120s --device "$bdf" "$EDU_IMAGE" -- edu-probe
probe=$(edu_probe_ok /tmp/q1.out) || fail q-run "$probe; $(gc_summary /tmp/q1)"
reason=$(quarantine_reason "$bdf")
case "$reason" in
*"no reset method"*) pass quarantined "$bdf quarantined after the run: $(echo "$reason" | cut -c1-200)" ;;
*) fail quarantined "$bdf after a run without allow_no_reset: quarantine reason '$reason'; allocated [$(alloc_bdfs)]" ;;
esac

gc /tmp/q2 --json run --memory 256m --boot-timeout 120s --device "$bdf" "$EDU_IMAGE" -- edu-probe
if [ "$(cat /tmp/q2.rc)" != 0 ] && grep -q quarantined /tmp/q2.err && ! grep -q '^EDU-PROBE' /tmp/q2.out; then
    pass refused "a run naming quarantined $bdf is refused: $(grep quarantined /tmp/q2.err | head -1 | cut -c1-200)"
else
    fail refused "a run naming quarantined $bdf: $(gc_summary /tmp/q2)"
fi

gc /tmp/q3 --json gpu release "$bdf"
action=$(jq -r '.results[0].action' /tmp/q3.out 2>/dev/null)
if [ "$(cat /tmp/q3.rc)" = 0 ] && [ "$action" = unquarantined ] && [ -z "$(quarantined_bdfs)" ]; then
    pass released "gpu release $bdf: $action (config space answers)"
else
    fail released "gpu release $bdf: action '$action'; $(gc_summary /tmp/q3); quarantined [$(quarantined_bdfs)]"
fi
edu_reset_all
