# One sandbox with both a private network and an edu function, under real KVM in L1
# (where vhost-net exists): the workload reads the edu registers, downloads from "the
# internet" (a network namespace of L1 with an HTTP server, L1's only uplink), is
# refused the metadata address, and answers on its published port; afterwards no tap,
# nftables table or record is left. L1 plays the provider's host: every rule is in L1.

if ! have_guest_artifacts; then
    skip sandbox-net "no guest artifacts in L1 (build.sh ran with NESTED_BUILD_GUEST=0)"
    exit 0
fi
if ! nft --version >/dev/null 2>&1 || ! /usr/sbin/ip -V >/dev/null 2>&1; then
    skip sandbox-net "no nft or iproute2 in L1 (NESTED_TOOLS)"
    exit 0
fi
if ! have_run_device || ! gpucell run --help 2>/dev/null | grep -q -- '--publish'; then
    skip sandbox-net "gpucell run has no --device or --publish"
    exit 0
fi
edu_reset_all
GC_TIMEOUT=180
IP=/usr/sbin/ip

# "The internet": a namespace held by a sleeping process, a veth to it.
unshare -n sleep 100000 &
inet=$!
sleep 0.2
$IP link add gcup0 type veth peer name gcin0
$IP link set gcin0 netns "$inet"
$IP addr add 203.0.113.2/24 dev gcup0
$IP link set gcup0 up
nsenter -t "$inet" -n $IP addr add 203.0.113.1/24 dev gcin0
nsenter -t "$inet" -n $IP link set gcin0 up
nsenter -t "$inet" -n $IP link set lo up
$IP route add default via 203.0.113.1
echo 1 >/proc/sys/net/ipv4/ip_forward
mkdir -p /tmp/www && echo internet-ok >/tmp/www/index.html
nsenter -t "$inet" -n busybox httpd -p 203.0.113.1:80 -h /tmp/www
printf '[network]\ndefault = "private"\ndns = ["203.0.113.1"]\n' >/tmp/net.toml

edu_policy on
bdf=$(pci_by_id | head -1)
edu_pool "$bdf" || fail pool "gpucell gpu bind $bdf: $(gc_summary /tmp/pool-bind)"
# The workload serves on its published port until the host's request has come.
script='edu-probe; get() { printf "GET / HTTP/1.0\r\n\r\n" | nc -w 5 "$1" "$2" | tail -n 1; }
get 203.0.113.1 80
if get 169.254.169.254 80 >/dev/null 2>&1 && [ -n "$(get 169.254.169.254 80)" ]; then echo meta-reach; else echo meta-refused; fi
printf "HTTP/1.0 200 OK\r\n\r\npublished-ok\n" | nc -l -p 80 -w 60 >/dev/null; echo served'
gc /tmp/net1 --config /tmp/net.toml --json run --network private --memory 256m --boot-timeout 120s \
    --device "$bdf" -p 8080:80 "$EDU_IMAGE" -- sh -c "$script" &
run=$!
got=
for _ in $(seq 150); do
    kill -0 "$run" 2>/dev/null || break
    got=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 203.0.113.2 8080 2>/dev/null | tail -n 1)
    [ "$got" = published-ok ] && break
    sleep 1
done
wait $run
probe=$(edu_probe_ok /tmp/net1.out)
ok=$?
net=$(run_summary /tmp/net1 | jq -c '.network | {guest_address, vhost, setup_ms, publish}')
if [ "$(cat /tmp/net1.rc)" = 0 ] && [ $ok = 0 ] && grep -qx internet-ok /tmp/net1.out &&
    grep -qx meta-refused /tmp/net1.out && grep -qx served /tmp/net1.out && [ "$got" = published-ok ]; then
    pass run-net-device "--device $bdf --network private -p 8080:80: $probe; internet-ok; metadata refused; published port answered; $net"
else
    fail run-net-device "rc $(cat /tmp/net1.rc); $probe; published: ${got:-nothing}; $net; $(gc_summary /tmp/net1)"
fi
vhost=$(run_summary /tmp/net1 | jq -r '.network.vhost')
if [ -c /dev/vhost-net ] && [ "$vhost" = true ]; then
    pass vhost-net "/dev/vhost-net in L1 and the sandbox used it"
elif [ -c /dev/vhost-net ]; then
    fail vhost-net "/dev/vhost-net exists but network.vhost is $vhost"
else
    skip vhost-net "no /dev/vhost-net in L1"
fi
taps=$($IP -o link show | grep -c ': gcn' || true)
tables=$(nft list tables | grep -c gpucell_ || true)
recs=$(ls "$GPUCELL_STATE/net" 2>/dev/null | grep -c json || true)
if [ "$taps" = 0 ] && [ "$tables" = 0 ] && [ "$recs" = 0 ]; then
    pass net-clean "no tap, table or record left"
else
    fail net-clean "left: $taps taps, $tables tables, $recs records"
fi
# --egress-rate: the tc policer (rtnetlink, a police action built from raw attributes)
# on the tap's ingress. The sink times 8 MiB (67 Mbit) from its first byte: at 8 Mbit/s
# at least ~7 s (the sender's own clock would stop once its socket buffer took it all).
# The sink's nc gets a stdin that stays open: busybox nc ends the connection at its
# stdin's EOF.
rm -f /tmp/sink.elapsed
nsenter -t "$inet" -n sh -c 'sleep 120 | busybox nc -l -p 9 | { head -c 1 >/dev/null; s=$(date +%s); cat >/dev/null; echo $(( $(date +%s) - s )) >/tmp/sink.elapsed; }' &
sink=$!
sleep 0.3
gc /tmp/net2 --config /tmp/net.toml --json run --network private --memory 256m --boot-timeout 120s --egress-rate 8m \
    "$EDU_IMAGE" -- sh -c 'yes 0123456789abcdef | head -c 8388608 | nc -w 30 203.0.113.1 9; echo sent; sleep 6' &
run=$!
# What the kernel holds on the tap while the sandbox runs (tc, where L1 has it).
for _ in $(seq 100); do
    tap=$($IP -o link show | sed -n 's/^[0-9]*: \(gcn[0-9a-f]*\).*/\1/p' | head -1)
    [ -n "$tap" ] && break
    sleep 0.2
done
for _ in $(seq 120); do [ -s /tmp/sink.elapsed ] && break; sleep 0.5; done
if [ -n "$tap" ] && [ -x /usr/sbin/tc ]; then
    { /usr/sbin/tc -s qdisc show dev "$tap"; /usr/sbin/tc -s -d filter show dev "$tap" ingress; } >/tmp/tc.out 2>&1
    show tc /tmp/tc.out 40
fi
wait $run
for _ in $(seq 30); do [ -s /tmp/sink.elapsed ] && break; sleep 1; done
kill "$sink" 2>/dev/null
elapsed=$(cat /tmp/sink.elapsed 2>/dev/null)
rate=$(run_summary /tmp/net2 | jq -r '.network.egress.rate_bps')
if [ "$(cat /tmp/net2.rc)" = 0 ] && [ "$rate" = 8000000 ] && [ "${elapsed:-0}" -ge 5 ] && [ "$elapsed" -le 60 ]; then
    pass egress-rate "--egress-rate 8m: 8 MiB received in ${elapsed} s (policed on the tap's ingress)"
else
    fail egress-rate "rc $(cat /tmp/net2.rc), rate $rate, 8 MiB received in ${elapsed:-?} s; $(gc_summary /tmp/net2)"
fi
kill "$inet" 2>/dev/null
$IP link del gcup0 2>/dev/null
pkill -f 'httpd -p 203.0.113.1' 2>/dev/null
true
