# Self-test of run.sh's retry after an emulator fault (`make test-nested` runs it
# on its own; not part of the default run). In the first L1 this scenario
# crashes L1's kernel on purpose, as QEMU's emulated SVM now and then does; run.sh
# must see the panic, drop this scenario's partial result and run it again in a
# fresh L1, where it passes. Without the retry the run fails.

if [ "${NESTED_ATTEMPT:-1}" = 1 ]; then
    pass crash-armed "L1 attempt 1: crashing L1's kernel now (sysrq c)"
    sync
    echo c >/proc/sysrq-trigger
    sleep 30
    fail crash "L1 survived sysrq c"
else
    pass retried "L1 attempt $NESTED_ATTEMPT: the scenario ran again after L1 crashed"
fi
