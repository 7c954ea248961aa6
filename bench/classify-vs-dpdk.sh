#!/usr/bin/env bash
# Palisade's packet classifier against DPDK's ACL library (dpdk-test-acl), side
# by side, in one run, on the same ClassBench rule sets and traces.
#
# For each set it prints Palisade's single and batched lookup rate (from
# `palisade bench classify --json`, release build, which also checks every
# header against the linear-scan oracle), DPDK's rate for each algorithm, and
# the ratio Palisade/DPDK against DPDK's best algorithm. Everything runs
# sequentially (one core each), so run it on an otherwise idle machine.
#
# usage: bench/classify-vs-dpdk.sh [--sets acl1_10k,fw1_100k] [--algs scalar,avx2,...]
#                                  [--data DIR] [--palisade BIN] [--iter N]
# A benchmark, not a test: CI does not run it. Needs root for dpdk-test-acl.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
data="$here/../shared/classbench"
sets="acl1_1k,fw1_1k,ipc1_1k,acl1_10k,fw1_10k,ipc1_10k,acl1_100k,fw1_100k,ipc1_100k"
algs="scalar,sse,avx2,avx512x16,avx512x32"
iter=20
palisade=""

while [ $# -gt 0 ]; do
    case "$1" in
        --sets) sets="$2"; shift 2 ;;
        --algs) algs="$2"; shift 2 ;;
        --data) data="$2"; shift 2 ;;
        --palisade) palisade="$2"; shift 2 ;;
        --iter) iter="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

[ -d "$data" ] || { echo "no ClassBench data at $data (use --data)" >&2; exit 1; }

if ! command -v dpdk-test-acl >/dev/null 2>&1; then
    echo "dpdk-test-acl missing: installing dpdk-dev" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev >/dev/null
fi

if [ -z "$palisade" ]; then
    (cd "$here" && cargo build --release -q -p palisade)
    target=$(cd "$here" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    palisade="$target/release/palisade"
fi
[ -x "$palisade" ] || { echo "no palisade binary at $palisade" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; rm -rf /run/dpdk/rte' EXIT

# A JSON number by key (the objects printed are flat, one line).
jnum() { sed -n "s/.*\"$2\":\([0-9.eE+-]*\).*/\1/p" <<<"$1"; }

summary=""
for set in ${sets//,/ }; do
    rules="$data/$set"
    trace="$data/${set}_trace"
    [ -f "$rules" ] && [ -f "$trace" ] || { echo "$set: missing $rules or $trace" >&2; exit 1; }

    # Palisade first, then DPDK right after, so both see the same machine load.
    json=$("$palisade" bench classify --rules "$rules" --trace "$trace" --json) || {
        echo "$set: palisade bench failed (mismatches against the oracle?): $json" >&2; exit 1; }
    echo "palisade $set: $json"
    single=$(jnum "$json" mpps_single)
    batch=$(jnum "$json" mpps_batch)

    # dpdk-test-acl reads five columns; ClassBench traces have seven.
    awk -v OFS='\t' 'NF { print $1, $2, $3, $4, $5 }' "$trace" > "$tmp/trace5"
    nrules=$(grep -c '^@' "$rules")
    ntrace=$(wc -l < "$tmp/trace5")
    best=0; best_alg=none
    for alg in ${algs//,/ }; do
        # v22.11 may crash in rte_acl_free at exit after printing: read the line, ignore the status.
        out=$(stdbuf -oL dpdk-test-acl --no-huge --no-pci --no-shconf -l 0 -m 4096 --force-max-simd-bitwidth=512 -- \
            --rulesf="$rules" --tracef="$tmp/trace5" --rulenum="$nrules" --tracenum="$ntrace" \
            --iter="$iter" --verbose=0 --alg="$alg" 2>&1 || true)
        rm -rf /run/dpdk/rte
        pps=$(sed -n 's/.*cycles\/pkt, \([0-9.]*\) pkt\/sec.*/\1/p' <<<"$out" | tail -n 1)
        if [ -z "$pps" ]; then
            echo "dpdk $set $alg: no result line" >&2
            continue
        fi
        mpps=$(awk -v p="$pps" 'BEGIN { printf "%.3f", p / 1e6 }')
        echo "dpdk $set $alg: $mpps Mpps"
        if awk -v a="$mpps" -v b="$best" 'BEGIN { exit !(a > b) }'; then best=$mpps; best_alg=$alg; fi
    done
    if [ "$best_alg" = none ]; then
        ratio="n/a"
    else
        ratio=$(awk -v s="$single" -v b="$batch" -v d="$best" 'BEGIN { printf "%.2fx, %.2fx", b / d, s / d }')
    fi
    summary+=$(printf '%-10s %8s %10s %10s %10s %10s  %s' "$set" "$nrules" "$single" "$batch" "$best" "$best_alg" "$ratio")$'\n'
done
echo
printf '%-10s %8s %10s %10s %10s %10s  %s\n' set rules pal_single pal_batch dpdk_best best_alg 'ratio (batch/dpdk, single/dpdk)'
printf '%s' "$summary"
