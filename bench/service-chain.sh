#!/usr/bin/env bash
# What a service chain costs on the lab: added latency and throughput of a
# north-south flow steered through a bump-in-the-wire appliance VM, against
# the same flow unchained, and after the offload signal takes it off the chain.
#
# Shape: `palisade lab up` on examples/three-tier plus an appliance VM ips-1
# on hv1 (two vNICs in the web zone, bridged inside its namespace by a Linux
# bridge with an nftables bridge-family ruleset that counts what it forwards;
# the agent's health probes, UDP to 3785, pass uncounted; requests for
# "/X-EVIL", which the bench never makes, are dropped: the lab's appliance,
# `palisade lab appliance`, as the end-to-end tests build it). The rule
# web-from-internet (http, https) carries `redirect: ns-ips` in the chained
# mode; the unchained mode is the same policy without the redirect (the
# agents reload it). Client: the lab's internet namespace; server: web-1.
#
# Per mode:
#   chained    HTTP GET timing (curl's time_connect: the TCP handshake's
#              round trip; time_total: connect to last byte), --requests
#              sequential requests, median and p90; iperf3 -c web-1 -p 443
#              for --seconds (one stream)
#   unchained  the same with the redirect removed
#   two_stage  the redirect through ns-two, a chain of two stages: fw-1 (a
#              second appliance VM on hv1, bridged and counting like ips-1)
#              then ips-1; the same HTTP and iperf3 figures, and both
#              appliances' counters
#   external   the redirect through ns-ext, a chain of one external
#              appliance reached over the underlay: a namespace behind the
#              edge router (198.51.100.2; the edge router joins the underlay
#              at 192.168.100.254 and every host routes 198.51.100.0/24
#              through it) bridging two Linux VXLAN devices (VNIs 7001 and
#              7002, to hv1's tunnel endpoint) with the same counting
#              ruleset (GRO off on the VXLAN devices: merged packets would
#              leave as one tunnel-GSO packet, one oversized datagram at the
#              agent); the same HTTP and iperf3 figures, and its counter
#   offloaded  chained, then an iperf3 stream offloaded (`POST /flows/offload`
#              allow on its data connection) after 2 s; its throughput over the
#              intervals after the offload, and the appliance's counter over
#              them (it must stay still)
# Output: one JSON line per mode, the machine's load average before and after.
#
# usage: bench/service-chain.sh [--palisade BIN] [--seconds N] [--requests N]
#   --palisade BIN  the palisade binary; default: `cargo build --release -p palisade` here
#   --seconds N     iperf3 duration (default 5)
#   --requests N    HTTP requests per mode (default 50)
# Run as root. A benchmark, not a test. Needs iperf3, jq, curl, nft, busybox.
# The appliances (bridges, rulesets) are built by `palisade lab appliance`.
# The lab is removed on exit.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
palisade=""
seconds=5
requests=50
while [ $# -gt 0 ]; do
    case "$1" in
    --palisade) palisade=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
log() { echo "service-chain: $*" >&2; }
die() { log "$*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
for t in iperf3 jq curl nft busybox python3 ethtool; do
    command -v "$t" >/dev/null || die "needs $t"
done
if [ -z "$palisade" ]; then
    (cd "$here" && cargo build --release -q -p palisade) || die "build failed"
    palisade="${CARGO_TARGET_DIR:-$here/target}/release/palisade"
fi

name=pchb
tmp=$(mktemp -d /tmp/palisade-service-chain.XXXXXX)
state="$tmp/lab"
pids=()
cleanup() {
    rc=$?
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    "$palisade" lab down --name "$name" --state-dir "$state" >/dev/null 2>&1 || true
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The policy: three-tier + ips-1 and fw-1 (in every mode: the lab is built
# once), with or without the redirect; the lab's (`lab chain-policy`), as
# the end-to-end tests write it.
write_policy() { # redirect(yes|no|two|ext) version
    local chain
    case "$1" in
    yes) chain=(--chain vm) ;;
    no) chain=(--chain vm --no-redirect) ;;
    two) chain=(--chain two-stage) ;;
    ext) chain=(--chain external) ;;
    esac
    "$palisade" lab chain-policy --example "$here/examples/three-tier" --out "$tmp/policy" \
        --with-vms ips-1,fw-1 --on-failure closed --policy-version "$2" "${chain[@]}"
}
write_policy yes 1

ip netns list | grep -q "^$name-" && die "namespaces $name-* exist; \`$palisade lab down --name $name\`"
log "lab up ($name)"
"$palisade" lab up --policy "$tmp/policy" --name "$name" --state-dir "$state" >"$tmp/lab-up.log" 2>&1 ||
    { cat "$tmp/lab-up.log" >&2; die "lab up failed"; }
plan() { jq -r "$1" "$state/lab.json"; }
inet=$(plan '.plan.internet_ns')
wns=$(plan '.plan.vms[] | select(.name=="web-1") | .ns')
wip=$(plan '.plan.vms[] | select(.name=="web-1") | .vnics[0].ips[0]')
sock="$state/hv1/agent.sock"
for v in inet wns wip; do
    [ -n "${!v}" ] && [ "${!v}" != null ] || die "lab plan lacks $v"
done

# The appliances' bridges and counting ruleset: the lab's (`lab appliance`),
# as the end-to-end tests build them.
appliance() { "$palisade" lab appliance --name "$name" --state-dir "$state" "$@"; }
appliance bridge ips-1 --table ips
appliance bridge fw-1 --table fw
counted() { appliance counters ips-1 --table ips | sed -n 1p; }
fw_counted() { appliance counters fw-1 --table fw | sed -n 1p; }

mkdir -p "$tmp/www"
head -c 1024 /dev/zero | tr '\0' x >"$tmp/www/index.html"
ip netns exec "$wns" busybox httpd -f -p 80 -h "$tmp/www" & pids+=($!)
ip netns exec "$wns" iperf3 -s -p 443 >/dev/null 2>&1 & pids+=($!)
sleep 1

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
load_before=$(loadavg)

# Sequential HTTP GETs: median and p90 of time_connect and time_total, in ms.
http_times() {
    for _ in $(seq "$requests"); do
        ip netns exec "$inet" curl -s -o /dev/null -m 2 -w '%{time_connect} %{time_total}\n' "http://$wip/" || true
    done | awk '$2 > 0' >"$tmp/times"
    python3 - "$tmp/times" <<'EOF'
import sys, json
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
def q(xs, p):
    xs = sorted(xs); return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 3) if xs else None
c = [r[0] for r in rows]; t = [r[1] for r in rows]
print(json.dumps({"requests": len(rows), "connect_ms_median": q(c, .5), "connect_ms_p90": q(c, .9),
                  "total_ms_median": q(t, .5), "total_ms_p90": q(t, .9)}))
EOF
}
iperf_gbps() { # seconds
    ip netns exec "$inet" timeout $(($1 + 20)) iperf3 -c "$wip" -p 443 -t "$1" -J >"$tmp/iperf.json"
    jq '.end.sum_received.bits_per_second / 1e9 * 1000 | round / 1000' "$tmp/iperf.json"
}

mode() { # name
    local c0 c1 h g
    c0=$(counted)
    h=$(http_times)
    g=$(iperf_gbps "$seconds")
    c1=$(counted)
    echo "{\"mode\":\"$1\",\"http\":$h,\"iperf3_gbps\":$g,\"appliance_packets\":$((c1 - c0))}"
}

log "chained"
mode chained

log "offloaded: a stream offloaded after 2 s"
total=$((seconds + 3))
ip netns exec "$inet" timeout $((total + 20)) iperf3 -c "$wip" -p 443 -t "$total" -i 1 -J >"$tmp/off.json" &
client=$!
pids+=("$client")
sleep 2
offloaded=0
flows=$(curl -s --unix-socket "$sock" http://agent/flows)
for sport in $(echo "$flows" | jq -r '.[] | select(.dst.port == 443) | .src.port'); do
    body="{\"src\":\"$(echo "$flows" | jq -r "[.[] | select(.src.port == $sport)][0].src.addr")\",\"dst\":\"$wip\",\"protocol\":\"tcp\",\"src_port\":$sport,\"dst_port\":443,\"verdict\":\"allow\"}"
    if curl -s --unix-socket "$sock" -X POST -d "$body" http://agent/flows/offload | grep -q offloaded; then
        offloaded=$((offloaded + 1))
    fi
done
sleep 1
c0=$(counted)
wait "$client" || true
c1=$(counted)
# Intervals from the fourth second on (the offload was at 2 s).
g=$(jq '[.intervals[3:][].sum.bits_per_second] | (add / length) / 1e9 * 1000 | round / 1000' "$tmp/off.json")
echo "{\"mode\":\"offloaded\",\"connections_offloaded\":$offloaded,\"iperf3_gbps_after_offload\":$g,\"appliance_packets_after_offload\":$((c1 - c0))}"

log "unchained: the redirect removed"
write_policy no 2
sleep 3
mode unchained

log "two_stage: through fw-1 then ips-1"
write_policy two 3
sleep 3
f0=$(fw_counted)
line=$(mode two_stage)
f1=$(fw_counted)
echo "${line%\}},\"fw_packets\":$((f1 - f0))}"

log "external: through an appliance over the underlay"
xns=$(appliance external --zone web --table ips)
ext_counted() { appliance counters --netns "$xns" --table ips | sed -n 1p; }
write_policy ext 4
sleep 3
x0=$(ext_counted)
line=$(mode external)
x1=$(ext_counted)
echo "${line%\}},\"external_packets\":$((x1 - x0))}"

echo "{\"loadavg_before\":\"$load_before\",\"loadavg_after\":\"$(loadavg)\",\"nproc\":$(nproc)}"
