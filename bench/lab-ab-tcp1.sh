#!/usr/bin/env bash
# Single-stream TCP of several palisade binaries alternated on ONE lab (the
# shape of bench/lab-throughput.sh: two hosts, one VM each, one zone, VXLAN
# underlay with MTU 1600, the VMs' offloads on), with the Linux bridge in
# between as the reference: per round, each binary's two agents are started,
# iperf3 -t SECONDS runs once (after a 1 s warm-up), the agents are stopped;
# then the same VMs on a Linux bridge + kernel vxlan in each host. On a
# shared machine only figures of the same minutes compare (bench/README.md).
#
# usage: bench/lab-ab-tcp1.sh ROUNDS SECONDS MODE LABEL=BIN [LABEL=BIN...]
#   MODE plain  rates, and the agents' CPU seconds (user + system) per Gbit
#        perf   also `perf record -e cpu-clock -g` of both agents during each test
#        stat   also `perf stat` of the agents' system calls and context switches
# Output lines go to stdout and $OUT/ab.log (OUT: default /tmp/lab-ab); perf
# and stat files to $OUT. Run as root; needs iperf3, jq (and perf for those
# modes). The lab (`abtcp1`) is removed on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 4 ] || { sed -n "2,18p" "$0" >&2; exit 2; }
rounds=$1 seconds=$2 mode=$3; shift 3
name=abtcp1
out=${OUT:-/tmp/lab-ab}; mkdir -p "$out"
tmp=$(mktemp -d /tmp/lab-ab.XXXXXX); state=$tmp/lab
first_bin=${1#*=}
bins=("$@")
cleanup() {
  set +e
  [ -n "${srv:-}" ] && kill $srv 2>/dev/null
  for p in ${apids:-}; do kill $p 2>/dev/null; done
  sleep 0.5
  ip -n "$ns1" link del brb 2>/dev/null; ip -n "$ns1" link del vxb 2>/dev/null
  ip -n "$ns2" link del brb 2>/dev/null; ip -n "$ns2" link del vxb 2>/dev/null
  "$first_bin" lab down --name $name --state-dir "$state" >/dev/null 2>&1
  rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p $tmp/policy
sed -n "/^cat >\"\$tmp\/policy\/inventory.yaml\" <<'EOF'/,/^EOF/p" "$here/lab-throughput.sh" | sed '1d;$d' >$tmp/policy/inventory.yaml
sed -n "/^cat >\"\$tmp\/policy\/policy.yaml\" <<'EOF'/,/^EOF/p" "$here/lab-throughput.sh" | sed '1d;$d' >$tmp/policy/policy.yaml
"$first_bin" lab up --policy $tmp/policy --name $name --state-dir "$state" --no-agents --vm-offloads >$tmp/up.log 2>&1 || { cat $tmp/up.log; exit 1; }
plan() { jq -r "$1" "$state/lab.json"; }
ns1=$(plan '.plan.hosts[] | select(.name=="hv1") | .ns'); ns2=$(plan '.plan.hosts[] | select(.name=="hv2") | .ns')
ul1=$(plan '.plan.hosts[] | select(.name=="hv1") | .underlay_ip'); ul2=$(plan '.plan.hosts[] | select(.name=="hv2") | .underlay_ip')
ulp1=$(plan '.plan.hosts[] | select(.name=="hv1") | .underlay_port'); ulp2=$(plan '.plan.hosts[] | select(.name=="hv2") | .underlay_port')
uns=$(plan '.plan.underlay_ns'); cns=$(plan '.plan.vms[] | select(.name=="client") | .ns'); sns=$(plan '.plan.vms[] | select(.name=="server") | .ns')
cif=$(plan '.plan.vms[] | select(.name=="client") | .vnics[0].host_if'); sif=$(plan '.plan.vms[] | select(.name=="server") | .vnics[0].host_if')
sip=$(plan '.plan.vms[] | select(.name=="server") | .vnics[0].ips[0]')
ip -n $ns1 link set ul0 mtu 1600; ip -n $ns2 link set ul0 mtu 1600
ip -n $uns link set $ulp1 mtu 1600; ip -n $uns link set $ulp2 mtu 1600; ip -n $uns link set br0 mtu 1600
ip netns exec $sns iperf3 -s -p 5201 >$tmp/srv.log 2>&1 & srv=$!
sleep 0.5
clk=$(getconf CLK_TCK)
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
run_iperf() { # label -> prints gbps
  local label=$1 i
  for i in $(seq 15); do ip netns exec $cns timeout 10 iperf3 -c $sip -p 5201 -t 1 >/dev/null 2>&1 && break; sleep 1; done
  ip netns exec $cns timeout $((seconds+30)) iperf3 -c $sip -p 5201 -t $seconds -J >$tmp/$label.json
  jq -r '.end.sum_received.bits_per_second/1e9*1000|round/1000' $tmp/$label.json
}
for r in $(seq $rounds); do
  for lb in "${bins[@]}" bridge; do
    label=${lb%%=*}; bin=${lb#*=}
    if [ $label = bridge ]; then
      for x in "$ns1 $cif $ul1 $ul2" "$ns2 $sif $ul2 $ul1"; do read -r n i l rm <<<"$x"
        ip -n $n link add vxb type vxlan id 10 local $l remote $rm dstport 4789 dev ul0; ip -n $n link set vxb mtu 1500
        ip -n $n link add brb type bridge; ip -n $n link set $i master brb; ip -n $n link set vxb master brb
        ip -n $n link set vxb up; ip -n $n link set brb up; done
      g=$(run_iperf r$r-bridge)
      echo "round $r bridge gbps $g load $(cut -d' ' -f1-3 /proc/loadavg) $(date -u +%T)" | tee -a $out/ab.log
      for n in $ns1 $ns2; do ip -n $n link del brb; ip -n $n link del vxb; done
      continue
    fi
    apids=""
    for h in hv1 hv2; do ns=$([ $h = hv1 ] && echo $ns1 || echo $ns2)
      ip netns exec $ns $bin agent --config $state/agents/$h.toml >$tmp/agent-$label-$h.log 2>&1 & apids="$apids $!"; done
    for h in hv1 hv2; do for a in $(seq 300); do grep -q "agent ready" $tmp/agent-$label-$h.log && break; sleep 0.1; done; done
    for i in $(seq 15); do ip netns exec $cns timeout 10 iperf3 -c $sip -p 5201 -t 1 >/dev/null 2>&1 && break; sleep 1; done
    t1=$(ticks $apids)
    extra=""
    if [ $mode = perf ]; then
      perf record -e cpu-clock -g -o $out/perf-$label-r$r.data -p $(echo $apids | tr ' ' ,) -- sleep $((seconds+2)) >/dev/null 2>&1 & pp=$!
    elif [ $mode = stat ]; then
      perf stat -e 'syscalls:sys_enter_sendmmsg,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_poll,syscalls:sys_enter_ppoll,syscalls:sys_enter_getsockopt,raw_syscalls:sys_enter,context-switches' -p $(echo $apids | tr ' ' ,) -o $out/stat-$label-r$r.txt -- sleep $((seconds+1)) & pp=$!
    fi
    g=$(run_iperf r$r-$label)
    t2=$(ticks $apids)
    [ -n "${pp:-}" ] && wait $pp 2>/dev/null || true; pp=""
    cpu=$(awk -v t=$((t2-t1)) -v c=$clk -v g=$g -v s=$seconds 'BEGIN{printf "%.3f", (t/c)/(g*s)}')
    echo "round $r $label gbps $g agents_cpu_s_per_gbit $cpu load $(cut -d' ' -f1-3 /proc/loadavg) $(date -u +%T)" | tee -a $out/ab.log
    for p in $apids; do kill $p; done; for p in $apids; do while kill -0 $p 2>/dev/null; do sleep 0.1; done; done; apids=""
    sleep 0.5
  done
done
