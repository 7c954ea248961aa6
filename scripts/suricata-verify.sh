#!/usr/bin/env bash
# Runs every selected suricata-verify test (../shared/suricata-verify) through
# `palisade ids run` and the tests' own check.py, and prints the tally:
# `suricata-verify: N passed, M failed`.
#
#   scripts/suricata-verify.sh [-v] [TEST...]
#
# PALISADE: the binary to use (default: target/release/palisade, built if missing).
# SURICATA_VERIFY: the test directory (default: ../shared/suricata-verify).
# KEEP: a directory to keep the outputs in (default: a temporary one, removed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sv=${SURICATA_VERIFY:-$root/../shared/suricata-verify}
verbose=()
if [[ ${1:-} == -v ]]; then verbose=(-v); shift; fi
only=("$@")
bin=${PALISADE:-$root/target/release/palisade}
if [[ -z ${PALISADE:-} && ! -x $bin ]]; then
    cargo build --release -q -p palisade --manifest-path "$root/Cargo.toml"
fi
if [[ -n ${KEEP:-} ]]; then
    out=$KEEP
    mkdir -p "$out"
else
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi
while IFS=$'\t' read -r name _upstream pcap settings; do
    [[ $name == \#* || -z $name ]] && continue
    if [[ ${#only[@]} -gt 0 && ! " ${only[*]} " == *" $name "* ]]; then continue; fi
    args=()
    IFS=, read -ra flags <<<"$settings"
    for f in "${flags[@]}"; do
        case $f in
        ips) args+=(--ips) ;;
        checksum-off) args+=(--checksum-off) ;;
        midstream) args+=(--midstream) ;;
        inline-stream) args+=(--inline-stream) ;;
        suricata.yaml) args+=(--suricata-yaml "$sv/tests/$name/suricata.yaml") ;;
        -) ;;
        *) echo "unknown setting $f for $name" >&2; exit 2 ;;
        esac
    done
    mkdir -p "$out/$name"
    if ! "$bin" ids run --rules "$sv/tests/$name/test.rules" --pcap "$sv/tests/$name/$pcap" \
        --eve "$out/$name/eve.json" "${args[@]}" 2>"$out/$name/stderr"; then
        echo "ERROR $name: $(tail -n 1 "$out/$name/stderr")" >&2
    fi
done <"$sv/tests.tsv"
if [[ ${#only[@]} -gt 0 ]]; then
    for name in "${only[@]}"; do
        python3 "$sv/check.py" "${verbose[@]}" "$sv/tests/$name" "$out/$name/eve.json" || true
    done
else
    python3 "$sv/check.py" "${verbose[@]}" --all "$sv/tests" --eve-dir "$out"
fi
