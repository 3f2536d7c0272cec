#!/usr/bin/env bash
# Builds (up) or removes (down) the namespaces the network benchmarks run in: an
# "internet" namespace (203.0.113.1) and a "host" namespace (203.0.113.2) whose only
# uplink is the veth to it; gpucell runs inside the host namespace. Nothing is added
# to the machine's own namespace. usage: topo.sh up|down [PREFIX]
set -euo pipefail
p=${2:-gcb}
case ${1:-} in
up)
    ip netns add "$p-inet"
    ip netns add "$p-host"
    for ns in "$p-inet" "$p-host"; do ip -n "$ns" link set lo up; done
    ip -n "$p-host" link add "$p-u0" type veth peer name "$p-i0" netns "$p-inet"
    ip -n "$p-host" addr add 203.0.113.2/24 dev "$p-u0"
    ip -n "$p-inet" addr add 203.0.113.1/24 dev "$p-i0"
    ip -n "$p-host" link set "$p-u0" up
    ip -n "$p-inet" link set "$p-i0" up
    ip -n "$p-host" route add default via 203.0.113.1
    ip netns exec "$p-host" sysctl -qw net.ipv4.ip_forward=1
    ;;
down)
    ip netns del "$p-host" 2>/dev/null || true
    ip netns del "$p-inet" 2>/dev/null || true
    ;;
*) echo "usage: $0 up|down [PREFIX]" >&2; exit 2 ;;
esac
