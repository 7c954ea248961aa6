#!/usr/bin/env bash
# Palisade's TCP connection tracking against Linux netfilter's, packet by
# packet, on every TCP packet of the shared captures (../shared/pcaps), in a
# strict zone (vs nf_conntrack_tcp_loose=0, be_liberal=0) and a liberal one
# (vs loose=1, be_liberal=1). It runs the root test
# crates/palisade/tests/conntrack_linux.rs over the whole corpus (CI runs it
# without the two largest captures), prints the agreement of each mode and
# every packet the two disagree on, and keeps the report in --out.
# bench/README.md explains the method and each remaining difference.
#
# usage: sudo bench/conntrack-vs-linux.sh [--out FILE] [--captures SUBSTRING]
# Needs root, iproute2 and nftables (installed when missing).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out="$here/target/conntrack-vs-linux.txt"
captures=""

while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --captures) captures="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces, TAPs, nftables)" >&2; exit 1; }
if ! command -v nft >/dev/null 2>&1; then
    echo "nft missing: installing nftables" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null
fi
mkdir -p "$(dirname "$out")"

cd "$here"
export PALISADE_CT_FULL=1 PALISADE_CT_REPORT="$out"
if [ -n "$captures" ]; then
    export PALISADE_CT_CAPTURES="$captures"
fi
cargo test --release -q -p palisade --test conntrack_linux -- --nocapture >/dev/null 2>"$out.stderr" || status=$?
cat "$out"
if [ "${status:-0}" -ne 0 ]; then
    echo "the comparison failed (exit ${status}); see $out.stderr" >&2
    exit "$status"
fi
