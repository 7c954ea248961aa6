#!/usr/bin/env bash
# Throughput of three datapaths on one lab shape, back to back, same traffic:
#
#   palisade  the Palisade agents (AF_PACKET with virtio-net headers, read
#             with recvmmsg + VXLAN over UDP), stateful policy: client -> server
#             icmp, tcp/5201, udp/5201 only
#   ovs       Open vSwitch userspace datapath (datapath_type=netdev, AF_PACKET
#             ports, userspace VXLAN via br-phy), equivalent ct() rules, with
#             its userspace TSO (other_config:userspace-tso-enable=true)
#   bridge    Linux bridge + kernel vxlan device, no filtering (upper reference)
#   qemu-vhost-user, qemu-tap, qemu-bridge
#             the same two VMs as QEMU guests (a second lab, `lab up --qemu`)
#             behind the Palisade agents, attached through vhost-user (guest
#             memory shared with the agent, the guests' offloads on) or a tap
#             (AF_PACKET, the guests' offloads off); or, for reference, the
#             same guests on their taps enslaved to a Linux bridge with a
#             kernel vxlan device in each host (no agents, no filtering; the
#             lab's taps have no virtio-net header, so the guests' offloads
#             are off there too): four TCP downloads, one
#             after the other, of --qemu-mib MiB from the server's busybox
#             httpd, timed together in the client guest. QEMU runs under TCG unless KVM works (reported as
#             `accel`): under TCG the guests' CPU emulation, not the datapath,
#             limits the figure.
#
# Shape: `palisade lab up` with two hosts (hv1, hv2), one namespace VM on each
# (client on hv1, server on hv2), both in ONE zone, so frames cross the VXLAN
# underlay between the host namespaces and no router is involved. The underlay
# MTU is 1600 (ul0, underlay bridge and its ports, OVS br-phy) so that 1500-byte
# VM frames plus 50 bytes of VXLAN never fragment. The VMs' eth0 keep their
# offloads ON (TX checksum and TSO, as real virtio-net guests run; the lab's
# --vm-offloads) unless `--offloads off` (the lab's default: TX checksum
# offload, and with it TSO, off), for all three datapaths.
#
# Traffic per datapath: a 1 s TCP warm-up (also the connectivity check), a
# check that the server cannot open a TCP connection to the client (the
# stateful rule; the bridge does not filter, so there it connects), iperf3
# TCP with 1 stream and with 8 streams (-P 8) for --seconds each, then iperf3
# UDP with 64-byte payloads at unlimited rate (`-u -l 64 -b 0`), reporting
# packets/s the server received and the loss. For each TCP test, CPU:
# `cpu_s_per_gbit` is the CPU time of the test's processes (the datapath's
# own: agents or ovs-vswitchd, none for the bridge, which runs in the
# kernel; iperf3's client and server, as iperf3 reports them, which holds
# the kernel work done in their context; the ksoftirqd threads) per Gbit
# moved, `datapath_cpu_s_per_gbit` the datapath's processes alone. (The
# machine is shared: /proc/stat's busy time, reported as
# `machine_busy_cores`, counts other work too.) One JSON line per datapath,
# then a summary line
# with the ratios.
#
# usage: bench/lab-throughput.sh [--palisade BIN] [--seconds N] [--only LIST] [--workers N]
#                                [--offloads on|off] [--ovs-tso on|off] [--qemu-mib N]
#                                [--af-packet-rx socket|ring] [--fast-path kernel|off]
#   --palisade BIN  the palisade binary (lab + agent); default: build
#                   `cargo build --release -p palisade` here and use that
#   --seconds N     iperf3 duration of each test (default 5)
#   --only LIST     comma-separated subset of palisade,ovs,bridge,qemu-vhost-user,qemu-tap,
#                   qemu-bridge (default: all but qemu-tap and qemu-bridge)
#   --workers N     Palisade's datapath workers per agent (default: the lab's, 2)
#   --offloads X    the VMs' NIC offloads (default on; off: the lab's default)
#   --ovs-tso X     OVS's userspace TSO (default on)
#   --qemu-mib N    size of the QEMU guests' download (default 64)
#   --af-packet-rx X  how the Palisade agents' interface ports receive
#                   (the agents' `af_packet_rx`; default: the agent's, socket)
#   --fast-path X   the Palisade agents' `fast_path` (kernel: established flows
#                   forwarded by the in-kernel flow cache; default: the agent's, off)
# Run as root. A benchmark, not a test: CI does not run it. Needs iperf3, jq,
# ethtool, Open vSwitch (Debian openvswitch-switch; its kernel module is not
# used). Everything it starts is stopped on exit (trap), the lab removed.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
palisade=""
seconds=5
only="palisade,ovs,bridge,qemu-vhost-user"
qemu_mib=64
workers=""
offloads=on
ovs_tso=on
af_packet_rx=""
fast_path=""
name="plbench"

while [ $# -gt 0 ]; do
    case "$1" in
        --palisade) palisade="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --offloads) offloads="$2"; shift 2 ;;
        --ovs-tso) ovs_tso="$2"; shift 2 ;;
        --qemu-mib) qemu_mib="$2"; shift 2 ;;
        --af-packet-rx) af_packet_rx="$2"; shift 2 ;;
        --fast-path) fast_path="$2"; shift 2 ;;
        -h|--help) sed -n '2,67p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

die() { echo "lab-throughput: $*" >&2; exit 1; }
log() { echo "lab-throughput: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (namespaces, veths, OVS)"
case "$seconds" in ''|*[!0-9]*|0) die "--seconds wants a positive integer" ;; esac
case "$workers" in ''|[1-9]|[1-9][0-9]) ;; *) die "--workers wants 1 to 64" ;; esac
case "$offloads" in on|off) ;; *) die "--offloads wants on or off" ;; esac
case "$ovs_tso" in on|off) ;; *) die "--ovs-tso wants on or off" ;; esac
case "$af_packet_rx" in ''|socket|ring) ;; *) die "--af-packet-rx wants socket or ring" ;; esac
case "$fast_path" in ''|kernel|off) ;; *) die "--fast-path wants kernel or off" ;; esac
case "$qemu_mib" in ''|*[!0-9]*|0) die "--qemu-mib wants a positive integer" ;; esac
for t in ip ethtool iperf3 jq ovsdb-tool ovsdb-server ovs-vswitchd ovs-vsctl ovs-ofctl ovs-appctl; do
    command -v "$t" >/dev/null 2>&1 || die "\`$t\` is not installed (iperf3, jq, ethtool, openvswitch-switch)"
done
ovs_schema=/usr/share/openvswitch/vswitch.ovsschema
[ -f "$ovs_schema" ] || die "no $ovs_schema (install openvswitch-switch)"

if [ -z "$palisade" ]; then
    (cd "$here" && cargo build --release -q -p palisade)
    target=$(cd "$here" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
    palisade="$target/release/palisade"
fi
[ -x "$palisade" ] || die "no palisade binary at $palisade"
palisade=$(cd "$(dirname "$palisade")" && pwd)/$(basename "$palisade")
"$palisade" lab up --help >/dev/null 2>&1 || die "$palisade has no \`lab\` subcommand"
lab_offloads=()
if [ "$offloads" = on ]; then
    case "$("$palisade" lab up --help 2>&1)" in
        *--vm-offloads*) ;;
        *) die "$palisade's lab has no --vm-offloads (use --offloads off)" ;;
    esac
    lab_offloads=(--vm-offloads)
fi

tmp=$(mktemp -d /tmp/lab-throughput.XXXXXX)
state="$tmp/lab"
pids_file="$tmp/pids"   # every background process this script started, one pid a line
: >"$pids_file"

# ---------------------------------------------------------------- cleanup ---
# Each undo step is idempotent and ignores what is already gone, so cleanup
# can run after a failure at any point (and phases call the same steps).

stop_pid() { # pid: TERM, wait up to 3 s, then KILL
    local p=$1 i
    kill -0 "$p" 2>/dev/null || return 0
    kill "$p" 2>/dev/null || true
    for i in $(seq 30); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
}

stop_recorded() { # stop every process listed in $pids_file
    local p
    while read -r p; do [ -n "$p" ] && stop_pid "$p"; done <"$pids_file"
    : >"$pids_file"
}

ovs_down() { # host-ns dir underlay-ip: remove bridges, stop daemons, give the IP back to ul0
    local ns=$1 d=$2 ip=$3 f pid
    if [ -S "$d/db.sock" ]; then
        ovs-vsctl --db="unix:$d/db.sock" --timeout=5 -- --if-exists del-br br-int -- --if-exists del-br br-phy \
            >/dev/null 2>&1 || true
    fi
    for f in ovs-vswitchd ovsdb-server; do
        # Read the pid first: a daemon removes its pidfile as it exits.
        pid=$(cat "$d/$f.pid" 2>/dev/null || true)
        ovs-appctl -t "$d/$f.ctl" exit >/dev/null 2>&1 || true
        [ -n "$pid" ] && stop_pid "$pid"
    done
    [ -e "/run/netns/$ns" ] || return 0
    for f in br-int br-phy ovs-netdev; do ip -n "$ns" link del "$f" >/dev/null 2>&1 || true; done
    ip -n "$ns" link set ul0 promisc off >/dev/null 2>&1 || true
    ip -n "$ns" -4 addr show dev ul0 2>/dev/null | grep -q "inet $ip/" ||
        ip -n "$ns" addr add "$ip/24" dev ul0 >/dev/null 2>&1 || true
}

bridge_down() { # host-ns
    local ns=$1
    [ -e "/run/netns/$ns" ] || return 0
    ip -n "$ns" link del brb >/dev/null 2>&1 || true
    ip -n "$ns" link del vxb >/dev/null 2>&1 || true
}

hosts_known=0
cleanup() {
    local rc=$?
    set +e
    stop_recorded
    if [ "$hosts_known" = 1 ]; then
        ovs_down "$ns1" "$tmp/ovs-hv1" "$ul1"
        ovs_down "$ns2" "$tmp/ovs-hv2" "$ul2"
        bridge_down "$ns1"
        bridge_down "$ns2"
    fi
    if [ -f "$tmp/qlab/lab.json" ] || ip netns list | grep -q "^${name}q-"; then
        "$palisade" lab down --name "${name}q" --state-dir "$tmp/qlab" >/dev/null 2>&1 ||
            log "WARNING: \`palisade lab down --name ${name}q --state-dir $tmp/qlab\` failed"
    fi
    if [ -f "$state/lab.json" ] || ip netns list | grep -q "^$name-"; then
        "$palisade" lab down --name "$name" --state-dir "$state" >/dev/null 2>&1 ||
            log "WARNING: \`palisade lab down --name $name --state-dir $state\` failed"
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -------------------------------------------------------------------- lab ---

# Two hosts, one VM each, one zone: the client may open icmp, tcp/5201 and
# udp/5201 to the server; nothing may open towards the client.
mkdir -p "$tmp/policy"
cat >"$tmp/policy/inventory.yaml" <<'EOF'
# Written by bench/lab-throughput.sh: two hosts, one VM each, one L2 zone.
datacenter: { name: bench, default: deny }
clusters:
  - { name: bench, hosts: [hv1, hv2] }
zones:
  - { name: blue, vlan: 10, default: deny, on_failure: closed }
vms:
  - name: client
    uuid: 00000000-0000-4000-8000-0000000000c1
    cluster: bench
    host: hv1
    tags: { role: client }
    vnics:
      - { name: client.0, mac: "02:00:0a:0a:00:0a", ips: [10.10.0.10], zone: blue }
  - name: server
    uuid: 00000000-0000-4000-8000-0000000000c2
    cluster: bench
    host: hv2
    tags: { role: server }
    vnics:
      - { name: server.0, mac: "02:00:0a:0a:00:0b", ips: [10.10.0.11], zone: blue }
EOF
cat >"$tmp/policy/policy.yaml" <<'EOF'
# Written by bench/lab-throughput.sh: only the client opens, only these services.
version: 1
groups:
  clients: { tags: { role: client } }
  servers: { tags: { role: server } }
services:
  ping: icmp
  iperf: [tcp/5201, udp/5201]
rules:
  datacenter:
    - { id: bench-icmp, from: clients, to: servers, service: ping, action: allow }
    - { id: bench-iperf, from: clients, to: servers, service: iperf, action: allow }
    - { id: bench-http, from: clients, to: servers, service: tcp/80, action: allow }
EOF

if ip netns list | grep -q "^$name-"; then
    die "namespaces $name-* exist (an earlier run?); remove them with \`$palisade lab down --name $name\`"
fi
log "building lab $name (state $state)"
"$palisade" lab up --policy "$tmp/policy" --name "$name" --state-dir "$state" --no-agents "${lab_offloads[@]}" \
    >"$tmp/lab-up.log" 2>&1 ||
    { cat "$tmp/lab-up.log" >&2; die "palisade lab up failed"; }

# Names and addresses from the lab's own plan, not guessed.
plan() { jq -r "$1" "$state/lab.json"; }
ns1=$(plan '.plan.hosts[] | select(.name=="hv1") | .ns')
ns2=$(plan '.plan.hosts[] | select(.name=="hv2") | .ns')
ul1=$(plan '.plan.hosts[] | select(.name=="hv1") | .underlay_ip')
ul2=$(plan '.plan.hosts[] | select(.name=="hv2") | .underlay_ip')
ulport1=$(plan '.plan.hosts[] | select(.name=="hv1") | .underlay_port')
ulport2=$(plan '.plan.hosts[] | select(.name=="hv2") | .underlay_port')
uns=$(plan '.plan.underlay_ns')
cns=$(plan '.plan.vms[] | select(.name=="client") | .ns')
sns=$(plan '.plan.vms[] | select(.name=="server") | .ns')
cif=$(plan '.plan.vms[] | select(.name=="client") | .vnics[0].host_if')
sif=$(plan '.plan.vms[] | select(.name=="server") | .vnics[0].host_if')
cip=$(plan '.plan.vms[] | select(.name=="client") | .vnics[0].ips[0]')
sip=$(plan '.plan.vms[] | select(.name=="server") | .vnics[0].ips[0]')
hosts_known=1
for v in ns1 ns2 ul1 ul2 ulport1 ulport2 uns cns sns cif sif cip sip; do
    [ -n "${!v}" ] && [ "${!v}" != null ] || die "lab plan lacks $v (lab.json format changed?)"
done

# What the VMs' NICs really do (checked, not assumed).
vm_offloads_now=$offloads
set_vm_offloads() { # on|off: both VMs' eth0
    local ns
    for ns in "$cns" "$sns"; do
        if [ "$1" = on ]; then
            ip netns exec "$ns" ethtool -K eth0 tx on tso on gso on >/dev/null 2>&1 || true
        else
            ip netns exec "$ns" ethtool -K eth0 tx off >/dev/null 2>&1 || true
        fi
    done
    vm_offloads_now=$1
}
log "client eth0: $(ip netns exec "$cns" ethtool -k eth0 2>/dev/null |
    grep -E '^(tx-checksumming|.tx-tcp-segmentation):' | tr -s '\n\t' '  ')(--offloads $offloads)"

# Underlay MTU 1600 everywhere a VXLAN packet travels.
ip -n "$ns1" link set ul0 mtu 1600
ip -n "$ns2" link set ul0 mtu 1600
ip -n "$uns" link set "$ulport1" mtu 1600
ip -n "$uns" link set "$ulport2" mtu 1600
ip -n "$uns" link set br0 mtu 1600

# ---------------------------------------------------------------- traffic ---

start_bg() { # logfile cmd...: start in the background, record the pid
    local out=$1
    shift
    "$@" >"$out" 2>&1 &
    echo $! >>"$pids_file"
    echo $!
}

ncpu=$(nproc)
clk=$(getconf CLK_TCK)
dp_pids=""   # the datapath's own processes, set by each phase before measuring

cpu_jiffies() { # "busy total" over all CPUs (busy: user nice system irq softirq; total adds idle iowait steal)
    awk '/^cpu /{b=$2+$3+$4+$7+$8; print b, b+$5+$6+$9}' /proc/stat
}

proc_ticks() { # PID...: CPU ticks (user + system) of these processes
    local t=0 p v
    for p in "$@"; do
        v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        t=$((t + v))
    done
    echo "$t"
}

busy_cores() { # busy0 total0 busy1 total1: CPUs busy on average between the samples
    awk -v n="$ncpu" -v b0="$1" -v t0="$2" -v b1="$3" -v t1="$4" \
        'BEGIN { d = t1 - t0; printf "%.4f", (d > 0 ? (b1 - b0) / d * n : 0) }'
}

ksoftirqd=$(pgrep -x 'ksoftirqd/[0-9]+' | tr '\n' ' ' || true)

# One iperf3 TCP test with $2 streams; prints a JSON object with its rate and CPU.
#
# CPU: the test's processes (the datapath's, iperf3's client and server as
# iperf3 reports them, and the kernel's ksoftirqd threads, which run the
# network receive work that is not done in a process's own context) over the
# test, per Gbit moved. The machine is shared, so /proc/stat alone cannot
# tell this run's CPU from other work; its busy cores are reported beside.
# Where a test loses packets or time (the `losses` object of each TCP test, and
# of the UDP test without the TCP and round-trip fields):
# counters read before and after the test, their differences reported.
#   client_retrans_segs, client_lost_retransmit, client_sack_recoveries: the
#     sender's TCP (nstat in the client VM: TcpRetransSegs,
#     TcpExtTCPLostRetransmit, TcpExtTCPSackRecovery)
#   server_ofo_segs: segments the receiver queued out of order
#     (TcpExtTCPOFOQueue: a loss or reordering on the way)
#   server_udp_rcvbuf_errors: datagrams the server VM's sockets dropped for
#     a full receive buffer (UdpRcvbufErrors; the UDP test's receiver)
#   hosts_udp_rcvbuf_errors: datagrams the host namespaces' UDP sockets
#     dropped for a full receive buffer (UdpRcvbufErrors: the underlay
#     sockets of the agents; the kernel vxlan device counts elsewhere)
#   agents_drops, agents_kernel_drops, agents_tx_errors: the Palisade
#     agents' own counters (palisade_drops_total, the AF_PACKET rings'
#     PACKET_STATISTICS drops, send errors), summed over both hosts; null
#     for the other datapaths
#   rtt_ms_median, rtt_ms_max: round trips of ICMP echoes the client sends
#     to the server every 100 ms during the test (busybox ping), i.e. the
#     queueing and batching delay a packet meets beside the stream.
nstat_of() { # ns counter...: absolute values, one "name value" a line
    local ns=$1
    shift
    ip netns exec "$ns" nstat -asz "$@" 2>/dev/null | awk 'NR > 1 {print $1, $2}'
}

counter() { # file name: the value of name in a "name value" file, 0 if absent
    awk -v n="$2" '$1 == n {v = $2} END {print v + 0}' "$1"
}

agent_counters() { # file: "name value" lines summed over both agents' metrics (none: no agents)
    local h ns port
    : >"$1"
    [ "${agents_up:-0}" = 1 ] || return 0
    for h in hv1 hv2; do
        ns=$([ $h = hv1 ] && echo "$ns1" || echo "$ns2")
        port=$(awk -F'"' '/^metrics = /{print $2}' "$state/agents/$h.toml")
        [ -n "$port" ] || continue
        ip netns exec "$ns" curl -s --max-time 2 "http://$port/metrics" 2>/dev/null |
            awk '/^palisade_drops_total/ {d += $NF}
                 /^palisade_port_kernel_drops_total/ {k += $NF}
                 /^palisade_port_tx_errors_total/ {t += $NF}
                 END {print "drops", d + 0; print "kernel_drops", k + 0; print "tx_errors", t + 0}' |
            sed "s/^/$h /" >>"$1"
    done
}

loss_snapshot() { # prefix: write $prefix.{client,server,hosts,agents}
    nstat_of "$cns" TcpRetransSegs TcpExtTCPLostRetransmit TcpExtTCPSackRecovery TcpExtTCPTimeouts >"$1.client"
    # (Its second column, hexadecimal: frames the per-CPU backlog dropped, e.g. a full veth queue.)
    echo "softnet_drops $(( $(cut -d' ' -f2 /proc/net/softnet_stat | sed 's/^/+0x/' | tr -d '\n') ))" >"$1.softnet"
    nstat_of "$sns" TcpExtTCPOFOQueue UdpRcvbufErrors >"$1.server"
    { nstat_of "$ns1" UdpRcvbufErrors; nstat_of "$ns2" UdpRcvbufErrors; } >"$1.hosts"
    agent_counters "$1.agents"
}

sum_of() { # file name: the sum of name's values ("name value" or "host name value" lines)
    awk -v n="$2" '$(NF - 1) == n {v += $NF} END {print v + 0}' "$1"
}

losses_json() { # before-prefix after-prefix ping-log
    local b=$1 a=$2 rtts
    rtts=$(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' "$3" | sort -n)
    jq -cn \
        --argjson cr "$(($(counter "$a.client" TcpRetransSegs) - $(counter "$b.client" TcpRetransSegs)))" \
        --argjson cl "$(($(counter "$a.client" TcpExtTCPLostRetransmit) - $(counter "$b.client" TcpExtTCPLostRetransmit)))" \
        --argjson cs "$(($(counter "$a.client" TcpExtTCPSackRecovery) - $(counter "$b.client" TcpExtTCPSackRecovery)))" \
        --argjson ct "$(($(counter "$a.client" TcpExtTCPTimeouts) - $(counter "$b.client" TcpExtTCPTimeouts)))" \
        --argjson sn "$(($(counter "$a.softnet" softnet_drops) - $(counter "$b.softnet" softnet_drops)))" \
        --argjson so "$(($(counter "$a.server" TcpExtTCPOFOQueue) - $(counter "$b.server" TcpExtTCPOFOQueue)))" \
        --argjson ur "$(($(sum_of "$a.hosts" UdpRcvbufErrors) - $(sum_of "$b.hosts" UdpRcvbufErrors)))" \
        --argjson sr "$(($(counter "$a.server" UdpRcvbufErrors) - $(counter "$b.server" UdpRcvbufErrors)))" \
        --arg agents "$([ -s "$a.agents" ] && echo yes)" \
        --argjson ad "$(($(sum_of "$a.agents" drops) - $(sum_of "$b.agents" drops)))" \
        --argjson ak "$(($(sum_of "$a.agents" kernel_drops) - $(sum_of "$b.agents" kernel_drops)))" \
        --argjson at "$(($(sum_of "$a.agents" tx_errors) - $(sum_of "$b.agents" tx_errors)))" \
        --argjson ak1 "$(($(grep '^hv1 ' "$a.agents" | sum_of /dev/stdin kernel_drops) - $(grep '^hv1 ' "$b.agents" | sum_of /dev/stdin kernel_drops)))" \
        --arg rtts "$rtts" '
        ($rtts | split("\n") | map(select(length > 0) | tonumber)) as $r
        | { client_retrans_segs: $cr, client_lost_retransmit: $cl, client_sack_recoveries: $cs,
            client_timeouts: $ct, server_ofo_segs: $so, server_udp_rcvbuf_errors: $sr,
            hosts_udp_rcvbuf_errors: $ur, softnet_drops: $sn,
            agents_drops: (if $agents == "yes" then $ad else null end),
            agents_kernel_drops: (if $agents == "yes" then $ak else null end),
            agents_kernel_drops_hv1: (if $agents == "yes" then $ak1 else null end),
            agents_tx_errors: (if $agents == "yes" then $at else null end),
            rtt_ms_median: (if ($r | length) > 0 then $r[($r | length) / 2 | floor] else null end),
            rtt_ms_max: (if ($r | length) > 0 then $r[-1] else null end) }'
}

tcp_test() { # datapath streams
    local dp=$1 p=$2 out="$tmp/tcp$2-$1.json" j1 j2 w1 w2 d1 d2 k1 k2 during pinger losses
    loss_snapshot "$tmp/loss-before"
    pinger=$(start_bg "$tmp/ping-$dp-$p.log" ip netns exec "$cns" busybox ping -i 0.1 -w "$seconds" "$sip")
    j1=$(cpu_jiffies)
    d1=$(proc_ticks $dp_pids)
    k1=$(proc_ticks $ksoftirqd)
    w1=$(date +%s.%N)
    ip netns exec "$cns" timeout $((seconds + 30)) iperf3 -c "$sip" -p 5201 -P "$p" -t "$seconds" -J >"$out" ||
        { cat "$out" >&2; die "$dp: iperf3 TCP -P $p failed"; }
    w2=$(date +%s.%N)
    j2=$(cpu_jiffies)
    d2=$(proc_ticks $dp_pids)
    k2=$(proc_ticks $ksoftirqd)
    stop_pid "$pinger"
    loss_snapshot "$tmp/loss-after"
    losses=$(losses_json "$tmp/loss-before" "$tmp/loss-after" "$tmp/ping-$dp-$p.log")
    # shellcheck disable=SC2086
    during=$(busy_cores $j1 $j2)
    jq -c --argjson during "$during" --argjson dpt "$((d2 - d1))" --argjson kst "$((k2 - k1))" \
        --argjson clk "$clk" --argjson w1 "$w1" --argjson w2 "$w2" --argjson losses "$losses" '
        (.end.sum_received.bits_per_second / 1e9) as $g
        | ($w2 - $w1) as $wall
        | (.end.sum_received.seconds) as $secs
        | ($dpt / $clk) as $dps
        | ($kst / $clk) as $kss
        | ((.end.cpu_utilization_percent.host_total + .end.cpu_utilization_percent.remote_total) / 100 * $secs) as $ips
        | ($dps + $kss + $ips) as $all
        | { gbps: ($g * 1000 | round / 1000),
            retransmits: .end.sum_sent.retransmits,
            cpu_s_per_gbit: (if $g > 0 then ($all / ($g * $secs) * 1000 | round / 1000) else null end),
            datapath_cpu_s_per_gbit: (if $g > 0 then ($dps / ($g * $secs) * 1000 | round / 1000) else null end),
            datapath_cores: ($dps / $wall * 100 | round / 100),
            ksoftirqd_cores: ($kss / $wall * 100 | round / 100),
            iperf_client_cpu_pct: (.end.cpu_utilization_percent.host_total * 10 | round / 10),
            iperf_server_cpu_pct: (.end.cpu_utilization_percent.remote_total * 10 | round / 10),
            machine_busy_cores: ($during * 100 | round / 100),
            losses: $losses }' "$out"
}

# Measure the current datapath; write $tmp/result-$dp.json.
measure() { # datapath expect-reverse-blocked(true|false)
    local dp=$1 expect_blocked=$2 srv i ok=0 rsrv blocked tcp1 tcp8 udp vm_tso rtt_idle udp_losses
    # (tx-tcp-segmentation itself: the "tcp-segmentation-offload" summary line says "on"
    # while TSO is off for want of checksum offload.)
    vm_tso=$(ip netns exec "$cns" ethtool -k eth0 2>/dev/null | awk '$1 == "tx-tcp-segmentation:" {print $2}')
    srv=$(start_bg "$tmp/iperf-server-$dp.log" ip netns exec "$sns" iperf3 -s -p 5201)
    sleep 0.5
    # Warm-up and connectivity: up to 15 tries (ARP, MAC learning, OVS's tunnel ARP).
    for i in $(seq 15); do
        if ip netns exec "$cns" timeout 10 iperf3 -c "$sip" -p 5201 -t 1 >"$tmp/warmup-$dp.log" 2>&1; then
            ok=1
            break
        fi
        sleep 1
    done
    [ "$ok" = 1 ] || { cat "$tmp/warmup-$dp.log" >&2; die "$dp: client cannot reach the server"; }

    # Stateful check: the server may not open a connection to the client.
    rsrv=$(start_bg "$tmp/iperf-reverse-$dp.log" ip netns exec "$cns" iperf3 -s -p 5201)
    sleep 0.5
    if ip netns exec "$sns" timeout 2 bash -c "exec 3<>/dev/tcp/$cip/5201" 2>/dev/null; then
        blocked=false
    else
        blocked=true
    fi
    stop_pid "$rsrv"
    [ "$blocked" = "$expect_blocked" ] ||
        log "WARNING: $dp: reverse TCP connection blocked=$blocked, expected $expect_blocked"

    # Round trip with no other traffic: the datapath's own delay.
    ip netns exec "$cns" busybox ping -i 0.05 -c 20 "$sip" >"$tmp/ping-idle-$dp.log" 2>&1 || true
    rtt_idle=$(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' "$tmp/ping-idle-$dp.log" | sort -n |
        awk '{v[NR] = $1} END {if (NR) print v[int((NR + 1) / 2)]; else print "null"}')
    tcp1=$(tcp_test "$dp" 1)
    sleep 1
    tcp8=$(tcp_test "$dp" 8)
    sleep 1
    loss_snapshot "$tmp/loss-before"
    ip netns exec "$cns" timeout $((seconds + 30)) iperf3 -c "$sip" -p 5201 -u -l 64 -b 0 -t "$seconds" -J \
        >"$tmp/udp-$dp.json" || { cat "$tmp/udp-$dp.json" >&2; die "$dp: iperf3 UDP failed"; }
    loss_snapshot "$tmp/loss-after"
    : >"$tmp/ping-none"
    udp_losses=$(losses_json "$tmp/loss-before" "$tmp/loss-after" "$tmp/ping-none" |
        jq -c '{server_udp_rcvbuf_errors, hosts_udp_rcvbuf_errors, softnet_drops, agents_drops, agents_kernel_drops, agents_kernel_drops_hv1,
                agents_tx_errors}')
    stop_pid "$srv"

    # The server's counts: packets is the highest sequence number seen, so
    # packets - lost_packets is what arrived.
    udp=$(jq -c '.end as $e | {
        sent_kpps: ($e.sum_sent.packets / $e.sum_sent.seconds / 1e3),
        rx_kpps: (($e.sum_received.packets - $e.sum_received.lost_packets) / $e.sum_received.seconds / 1e3),
        loss_pct: $e.sum_received.lost_percent } | with_entries(.value |= (. * 100 | round / 100))' "$tmp/udp-$dp.json" |
        jq -c --argjson l "$udp_losses" '. + {losses: $l}')
    jq -cn --arg dp "$dp" --argjson tcp1 "$tcp1" --argjson tcp8 "$tcp8" --argjson udp "$udp" --argjson blocked "$blocked" \
        --argjson s "$seconds" --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" --arg off "$vm_offloads_now" \
        --argjson rtt_idle "$rtt_idle" \
        --arg tso "$vm_tso" --arg ovstso "$ovs_tso" --arg afrx "${af_packet_rx:-socket}" --arg fp "${fast_path:-off}" \
        '{datapath: $dp, shape: "2 hosts, 1 VM each, one zone, VXLAN underlay (MTU 1600)", seconds: $s,
          vm_offloads: $off, vm_tso: $tso}
         + (if $dp == "ovs" then {ovs_userspace_tso: $ovstso} else {} end)
         + (if $dp == "palisade" then {af_packet_rx: $afrx, fast_path: $fp} else {} end)
         + {rtt_idle_ms: $rtt_idle, tcp1: $tcp1, tcp8: $tcp8, udp64: $udp, reverse_tcp_blocked: $blocked,
            loadavg_after: $load}' |
        tee "$tmp/result-$dp.json"
}

# ---------------------------------------------------------------- phases ---

phase_palisade() {
    local h ns a p
    declare -A pid
    for h in hv1 hv2; do
        ns=$([ $h = hv1 ] && echo "$ns1" || echo "$ns2")
        [ -z "$workers" ] || sed -i "s/^workers = .*/workers = $workers/" "$state/agents/$h.toml"
        if [ -n "$af_packet_rx" ]; then
            # A top-level key: before the first table.
            sed -i '/^af_packet_rx = /d' "$state/agents/$h.toml"
            sed -i "0,/^\[/s//af_packet_rx = \"$af_packet_rx\"\n[/" "$state/agents/$h.toml"
        fi
        if [ -n "$fast_path" ]; then
            sed -i '/^fast_path = /d' "$state/agents/$h.toml"
            sed -i "0,/^\[/s//fast_path = \"$fast_path\"\n[/" "$state/agents/$h.toml"
        fi
        start_bg "$tmp/agent-$h.log" ip netns exec "$ns" "$palisade" agent --config "$state/agents/$h.toml" >/dev/null
        pid[$h]=$(tail -1 "$pids_file")
    done
    for h in hv1 hv2; do
        for a in $(seq 300); do
            grep -q "agent ready" "$tmp/agent-$h.log" 2>/dev/null && break
            kill -0 "${pid[$h]}" 2>/dev/null || { tail -20 "$tmp/agent-$h.log" >&2; die "palisade: agent $h exited"; }
            [ "$a" = 300 ] && { tail -20 "$tmp/agent-$h.log" >&2; die "palisade: agent $h not ready in 30 s"; }
            sleep 0.1
        done
    done
    if [ "$fast_path" = kernel ]; then
        # Measured with the fast path it asked for, or not at all.
        for h in hv1 hv2; do
            grep -q "kernel fast path on" "$tmp/agent-$h.log" ||
                { grep "fast path" "$tmp/agent-$h.log" >&2; die "palisade: agent $h runs without the kernel fast path"; }
            log "agent $h: $(grep -m1 "kernel fast path on" "$tmp/agent-$h.log")"
        done
    fi
    dp_pids="${pid[hv1]} ${pid[hv2]}"
    agents_up=1
    measure palisade true
    agents_up=0
    dp_pids=""
    stop_recorded
    for h in hv1 hv2; do
        p="$tmp/agent-$h.log"
        grep -qiE "panic|error" "$p" && { log "palisade agent $h log (tail):"; tail -5 "$p" >&2; }
    done
    return 0
}

ovs_up() { # host-ns dir vm-if local-ip remote-ip
    local ns=$1 d=$2 vmif=$3 lip=$4 rip=$5 vs mac
    mkdir -p "$d"
    ovsdb-tool create "$d/conf.db" "$ovs_schema"
    # Separate database, sockets and logs per host; both daemons run inside
    # the host namespace, so vswitchd's taps (br-phy) and routes are there.
    ip netns exec "$ns" ovsdb-server "$d/conf.db" --remote="punix:$d/db.sock" --pidfile="$d/ovsdb-server.pid" \
        --unixctl="$d/ovsdb-server.ctl" --log-file="$d/ovsdb-server.log" --detach 2>>"$d/start.log"
    vs="ovs-vsctl --db=unix:$d/db.sock --timeout=10"
    $vs --no-wait init
    # Userspace TSO is read when vswitchd starts: set it first.
    $vs --no-wait set Open_vSwitch . other_config:userspace-tso-enable="$([ "$ovs_tso" = on ] && echo true || echo false)"
    ip netns exec "$ns" env OVS_RUNDIR="$d" ovs-vswitchd "unix:$d/db.sock" --pidfile="$d/ovs-vswitchd.pid" \
        --unixctl="$d/ovs-vswitchd.ctl" --log-file="$d/ovs-vswitchd.log" --detach 2>>"$d/start.log"
    # Userspace tunnelling: the underlay IP lives on br-phy (an OVS internal
    # port, a tap), with ul0 as br-phy's uplink; see OVS "userspace-tunneling".
    mac=$(ip netns exec "$ns" cat /sys/class/net/ul0/address)
    $vs add-br br-phy -- set bridge br-phy datapath_type=netdev other-config:hwaddr="$mac" \
        -- add-port br-phy ul0 -- set interface br-phy mtu_request=1600
    ip -n "$ns" addr flush dev ul0
    ip -n "$ns" addr add "$lip/24" dev br-phy
    ip -n "$ns" link set br-phy up
    $vs add-br br-int -- set bridge br-int datapath_type=netdev fail-mode=secure \
        -- add-port br-int "$vmif" -- set interface "$vmif" ofport_request=1 \
        -- add-port br-int vx0 -- set interface vx0 type=vxlan ofport_request=2 \
        options:remote_ip="$rip" options:local_ip="$lip" options:key=10
    # Same rules as the Palisade policy: ARP switched, IPv4 through conntrack,
    # new connections only client -> server for icmp and tcp/udp 5201,
    # established/related both ways, everything else dropped. Both hosts
    # enforce (as both Palisade agents do).
    cat >"$d/flows.txt" <<EOF
table=0,priority=100,arp,actions=NORMAL
table=0,priority=90,ip,actions=ct(table=1)
table=0,priority=0,actions=drop
table=1,priority=100,ct_state=+trk+est,ip,actions=NORMAL
table=1,priority=100,ct_state=+trk+rel,ip,actions=NORMAL
table=1,priority=90,ct_state=+trk+new,tcp,nw_src=$cip,nw_dst=$sip,tp_dst=5201,actions=ct(commit),NORMAL
table=1,priority=90,ct_state=+trk+new,udp,nw_src=$cip,nw_dst=$sip,tp_dst=5201,actions=ct(commit),NORMAL
table=1,priority=90,ct_state=+trk+new,icmp,nw_src=$cip,nw_dst=$sip,actions=ct(commit),NORMAL
table=1,priority=0,actions=drop
EOF
    # (ovs-ofctl replace-flows fails to negotiate a flow format here; del + add does not.)
    ovs-ofctl del-flows "unix:$d/br-int.mgmt"
    ovs-ofctl add-flows "unix:$d/br-int.mgmt" "$d/flows.txt"
}

phase_ovs() {
    ovs_up "$ns1" "$tmp/ovs-hv1" "$cif" "$ul1" "$ul2"
    ovs_up "$ns2" "$tmp/ovs-hv2" "$sif" "$ul2" "$ul1"
    dp_pids="$(cat "$tmp/ovs-hv1/ovs-vswitchd.pid" "$tmp/ovs-hv2/ovs-vswitchd.pid" 2>/dev/null | tr '\n' ' ')"
    if [ "$ovs_tso" = on ]; then
        grep -qi "Userspace TCP Segmentation Offloading support enabled" "$tmp/ovs-hv1/ovs-vswitchd.log" ||
            log "WARNING: ovs: userspace TSO not reported enabled in ovs-vswitchd.log"
    fi
    measure ovs true
    dp_pids=""
    ovs_down "$ns1" "$tmp/ovs-hv1" "$ul1"
    ovs_down "$ns2" "$tmp/ovs-hv2" "$ul2"
}

bridge_up() { # host-ns vm-if local-ip remote-ip
    local ns=$1 vmif=$2 lip=$3 rip=$4
    ip -n "$ns" link add vxb type vxlan id 10 local "$lip" remote "$rip" dstport 4789 dev ul0
    ip -n "$ns" link set vxb mtu 1500
    ip -n "$ns" link add brb type bridge
    ip -n "$ns" link set "$vmif" master brb
    ip -n "$ns" link set vxb master brb
    ip -n "$ns" link set vxb up
    ip -n "$ns" link set brb up
}

phase_bridge() {
    bridge_up "$ns1" "$cif" "$ul1" "$ul2"
    bridge_up "$ns2" "$sif" "$ul2" "$ul1"
    measure bridge false
    bridge_down "$ns1"
    bridge_down "$ns2"
}

failed=0
log "palisade: $palisade ($("$palisade" --version 2>/dev/null || echo unknown version)); $seconds s per test; VM offloads $offloads"
for dp in palisade ovs bridge; do
    case ",$only," in *",$dp,"*) ;; *) continue ;; esac
    log "measuring $dp"
    # A failing datapath is reported and the others still run: the phase runs
    # in a subshell with errexit of its own, and cleans up after it below.
    set +e
    (set -e; "phase_$dp")
    rc=$?
    set -e
    if [ "$rc" != 0 ] && [ "$dp" = ovs ] && [ "$offloads" = on ]; then
        # Open vSwitch 3.1's userspace datapath drops every offloaded packet it
        # would tunnel ("Tunneling packets with HW offload flags is not
        # supported"), with or without its userspace TSO: measure it as it
        # can run, with the VMs' offloads off, and say so.
        for h in hv1 hv2; do
            log "ovs-vswitchd.log of $h (warnings, tail):"
            grep -v "|INFO|" "$tmp/ovs-$h/ovs-vswitchd.log" 2>/dev/null | tail -3 >&2 || true
        done
        stop_recorded
        ovs_down "$ns1" "$tmp/ovs-hv1" "$ul1"
        ovs_down "$ns2" "$tmp/ovs-hv2" "$ul2"
        rm -rf "$tmp/ovs-hv1" "$tmp/ovs-hv2"
        log "ovs: no connectivity with the VMs' offloads on; measuring it again with them off"
        set_vm_offloads off
        set +e
        (set -e; phase_ovs)
        rc=$?
        set -e
        set_vm_offloads on
    fi
    if [ "$rc" != 0 ]; then
        failed=1
        jq -cn --arg dp "$dp" --argjson rc "$rc" '{datapath: $dp, error: "phase failed", rc: $rc}' |
            tee "$tmp/result-$dp.json"
        if [ "$dp" = ovs ]; then
            for h in hv1 hv2; do
                log "ovs-vswitchd.log of $h (tail):"
                grep -v "^.*|INFO|" "$tmp/ovs-$h/ovs-vswitchd.log" 2>/dev/null | tail -8 >&2 || true
            done
        fi
        stop_recorded
        ovs_down "$ns1" "$tmp/ovs-hv1" "$ul1"
        ovs_down "$ns2" "$tmp/ovs-hv2" "$ul2"
        bridge_down "$ns1"
        bridge_down "$ns2"
    fi
done

# QEMU guests behind the agents (a lab of their own): one timed download.
phase_qemu() { # vhost-user|tap (behind the agents) or bridge (taps on a Linux bridge, no agents)
    local nic=$1 q="${name}q" qs="$tmp/qlab" dp="qemu-$1" extra=()
    [ "$nic" = bridge ] && { nic=tap; extra=(--no-agents); }
    log "$dp: building lab $q with QEMU guests on $nic ${extra[*]}"
    "$palisade" lab up --policy "$tmp/policy" --name "$q" --state-dir "$qs" --qemu --qemu-nic "$nic" "${extra[@]}" \
        >"$tmp/qlab-up.log" 2>&1 || { cat "$tmp/qlab-up.log" >&2; return 1; }
    if [ "$dp" = qemu-bridge ]; then
        # The guests' taps on a bridge with a vxlan device in each host, as
        # phase_bridge does for the namespace VMs (underlay MTU 1600 likewise).
        local qj="$qs/lab.json" h
        for h in hv1 hv2; do
            local hns hul hport
            hns=$(jq -r ".plan.hosts[] | select(.name==\"$h\") | .ns" "$qj")
            hport=$(jq -r ".plan.hosts[] | select(.name==\"$h\") | .underlay_port" "$qj")
            ip -n "$hns" link set ul0 mtu 1600
            ip -n "$(jq -r '.plan.underlay_ns' "$qj")" link set "$hport" mtu 1600
        done
        ip -n "$(jq -r '.plan.underlay_ns' "$qj")" link set br0 mtu 1600
        local q1 q2 u1 u2 ct st
        q1=$(jq -r '.plan.hosts[] | select(.name=="hv1") | .ns' "$qj")
        q2=$(jq -r '.plan.hosts[] | select(.name=="hv2") | .ns' "$qj")
        u1=$(jq -r '.plan.hosts[] | select(.name=="hv1") | .underlay_ip' "$qj")
        u2=$(jq -r '.plan.hosts[] | select(.name=="hv2") | .underlay_ip' "$qj")
        ct=$(jq -r '.plan.vms[] | select(.name=="client") | .vnics[0].host_if' "$qj")
        st=$(jq -r '.plan.vms[] | select(.name=="server") | .vnics[0].host_if' "$qj")
        bridge_up "$q1" "$ct" "$u1" "$u2"
        bridge_up "$q2" "$st" "$u2" "$u1"
    fi
    local ip accel
    ip=$(jq -r '.plan.vms[] | select(.name=="server") | .vnics[0].ips[0]' "$qs/lab.json")
    accel=$(jq -r '.guests.client.accel | join(" ")' "$qs/lab.json")
    qexec() { "$palisade" lab exec --name "$q" --state-dir "$qs" --timeout 900 "$@"; }
    qexec server -- dd if=/dev/zero of=/www/big bs=1048576 count="$qemu_mib" >/dev/null 2>&1
    qexec client -- wget -q -O /dev/null "http://$ip/" # warm-up, and the connectivity check
    # Timed in the guest (its uptime, 10 ms resolution), console round trips excluded.
    local out
    out=$(qexec client -- sh -c "a=\$(cut -d' ' -f1 /proc/uptime); for i in 1 2 3 4; do \
        wget -q -O /dev/null http://$ip/big || exit 1; done; b=\$(cut -d' ' -f1 /proc/uptime); echo \$a \$b")
    local t0 t1
    read -r t0 t1 <<<"$out"
    local features
    features=$(qexec client -- cat /sys/class/net/eth0/device/features)
    jq -cn --arg dp "$dp" --arg accel "$accel" --argjson mib "$qemu_mib" --arg t0 "$t0" --arg t1 "$t1" \
        --arg f "$features" '
        (($t1|tonumber) - ($t0|tonumber)) as $s |
        {datapath: $dp, accel: $accel, downloaded_mib: (4 * $mib), seconds: $s,
         tcp1: {gbps: (if $s > 0 then (4 * $mib * 8388608 / $s / 1e9 * 1000 | round / 1000) else null end)},
         guest_offloads: {csum: ($f[0:1] == "1"), tso4: ($f[11:12] == "1")}}' | tee "$tmp/result-$dp.json"
    "$palisade" lab down --name "$q" --state-dir "$qs" >/dev/null
}
for dp in qemu-vhost-user qemu-tap qemu-bridge; do
    case ",$only," in *",$dp,"*) ;; *) continue ;; esac
    set +e
    (set -e; phase_qemu "${dp#qemu-}")
    rc=$?
    set -e
    if [ "$rc" != 0 ]; then
        failed=1
        jq -cn --arg dp "$dp" --argjson rc "$rc" '{datapath: $dp, error: "phase failed", rc: $rc}' |
            tee "$tmp/result-$dp.json"
        "$palisade" lab down --name "${name}q" --state-dir "$tmp/qlab" >/dev/null 2>&1 || true
    fi
done

# Summary: the ratios issue 23 names (single-stream TCP Palisade/bridge and
# Palisade/OVS, 64-byte UDP received packets Palisade/OVS), the 8-stream ones,
# and each datapath's CPU per Gbit/s.
get() { jq -r "$2 // empty" "$tmp/result-$1.json" 2>/dev/null || true; }
jq -cn \
    --arg p1 "$(get palisade .tcp1.gbps)" --arg o1 "$(get ovs .tcp1.gbps)" --arg b1 "$(get bridge .tcp1.gbps)" \
    --arg p8 "$(get palisade .tcp8.gbps)" --arg o8 "$(get ovs .tcp8.gbps)" --arg b8 "$(get bridge .tcp8.gbps)" \
    --arg pu "$(get palisade .udp64.rx_kpps)" --arg ou "$(get ovs .udp64.rx_kpps)" --arg bu "$(get bridge .udp64.rx_kpps)" \
    --arg pc "$(get palisade .tcp1.cpu_s_per_gbit)" --arg oc "$(get ovs .tcp1.cpu_s_per_gbit)" \
    --arg bc "$(get bridge .tcp1.cpu_s_per_gbit)" \
    --arg pc8 "$(get palisade .tcp8.cpu_s_per_gbit)" --arg oc8 "$(get ovs .tcp8.cpu_s_per_gbit)" \
    --arg bc8 "$(get bridge .tcp8.cpu_s_per_gbit)" \
    --arg qv "$(get qemu-vhost-user .tcp1.gbps)" --arg qt "$(get qemu-tap .tcp1.gbps)" \
    --arg qb "$(get qemu-bridge .tcp1.gbps)" \
    --arg qa "$( (get qemu-vhost-user .accel; get qemu-tap .accel; get qemu-bridge .accel) | head -n1)" \
    --arg bin "$palisade" --arg when "$(date -u +%FT%TZ)" --argjson s "$seconds" --arg off "$offloads" \
    --arg povm "$(get palisade .vm_offloads)" --arg oovm "$(get ovs .vm_offloads)" --arg bovm "$(get bridge .vm_offloads)" '
    def num: if . == "" then null else tonumber end;
    def ratio(a; b): if (a|num) == null or (b|num) == null or (b|num) == 0 then null
                     else ((a|num) / (b|num) * 1000 | round / 1000) end;
    {summary: true, at: $when, seconds: $s, vm_offloads: $off, palisade_binary: $bin,
     vm_offloads_measured: {palisade: $povm, ovs: $oovm, bridge: $bovm},
     tcp1_gbps: {palisade: ($p1|num), ovs: ($o1|num), bridge: ($b1|num)},
     tcp8_gbps: {palisade: ($p8|num), ovs: ($o8|num), bridge: ($b8|num)},
     udp64_rx_kpps: {palisade: ($pu|num), ovs: ($ou|num), bridge: ($bu|num)},
     qemu_guest_tcp1_gbps: {vhost_user: ($qv|num), tap: ($qt|num), bridge: ($qb|num),
                            accel: (if $qa == "" then null else $qa end)},
     qemu_guest_vhost_user_over_bridge: ratio($qv; $qb),
     tcp1_cpu_s_per_gbit: {palisade: ($pc|num), ovs: ($oc|num), bridge: ($bc|num)},
     tcp8_cpu_s_per_gbit: {palisade: ($pc8|num), ovs: ($oc8|num), bridge: ($bc8|num)},
     ratios: {tcp1_palisade_over_bridge: ratio($p1; $b1), tcp1_palisade_over_ovs: ratio($p1; $o1),
              udp64_kpps_palisade_over_ovs: ratio($pu; $ou),
              tcp8_palisade_over_bridge: ratio($p8; $b8), tcp8_palisade_over_ovs: ratio($p8; $o8),
              udp64_kpps_palisade_over_bridge: ratio($pu; $bu)},
     goals: {tcp1_palisade_over_bridge: 0.8, tcp1_palisade_over_ovs: 3, udp64_kpps_palisade_over_ovs: 2}}'
# A datapath that could not be measured makes the run fail (after the summary).
exit "$failed"
