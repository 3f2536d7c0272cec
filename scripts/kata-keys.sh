#!/bin/sh
# Regenerates crates/kata/tests/fixtures/kata-qemu-nvidia-gpu-keys.txt from a checkout of
# kata-containers/kata-containers: the keys its QEMU NVIDIA GPU configuration template
# sets, and the keys its runtime's configuration parser reads in [hypervisor.qemu].
#
#   scripts/kata-keys.sh /path/to/kata-containers > crates/kata/tests/fixtures/kata-qemu-nvidia-gpu-keys.txt
set -eu
kata=${1:?usage: $0 KATA_CHECKOUT}
cd "$kata"
version=$(cat VERSION)
commit=$(git rev-parse HEAD)
echo "# Keys of Kata Containers' QEMU NVIDIA GPU configuration, one section.key per line."
echo "# Source: kata-containers/kata-containers $version (VERSION file; commit $commit),"
echo "# src/runtime/config/configuration-qemu-nvidia-gpu.toml.in: every key set there (not"
echo "# commented out); [agent.@PROJECT_TYPE@] is [agent.kata]."
echo "# Regenerate: scripts/kata-keys.sh (see its header)."
echo "[template]"
awk '/^\[/{s=$0; gsub(/[\[\]]/,"",s); sub(/@PROJECT_TYPE@/,"kata",s); next}
     /^[a-z_0-9]+ *=/{k=$1; sub(/=.*/,"",k); print s"."k}' \
    src/runtime/config/configuration-qemu-nvidia-gpu.toml.in
echo "# Keys the Kata runtime's configuration parser accepts in [hypervisor.qemu] (toml tags of"
echo "# the hypervisor struct in src/runtime/pkg/katautils/config.go at the same commit)."
echo "[parser]"
awk '/^type hypervisor struct/{on=1;next} on&&/^}/{on=0} on' src/runtime/pkg/katautils/config.go |
    grep -o 'toml:"[a-z_0-9]*"' | sed -E 's/toml:"(.*)"/hypervisor.qemu.\1/'
