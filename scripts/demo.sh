#!/usr/bin/env bash
# The main job on an embedded default, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
GPUCELL=${GPUCELL:-target/release/gpucell}
FIXTURE=${FIXTURE:-../shared/fixtures/hosts/h200x4-vm}

echo "== gpucell doctor (this machine)"
"$GPUCELL" doctor || true
echo "== gpucell gpu list (this machine)"
"$GPUCELL" gpu list
if [ -d "$FIXTURE" ]; then
    echo "== gpucell doctor (bundled H200 capture: $FIXTURE)"
    "$GPUCELL" --host-root "$FIXTURE" doctor || true
    echo "== gpucell gpu list (bundled H200 capture)"
    "$GPUCELL" --host-root "$FIXTURE" gpu list
fi
