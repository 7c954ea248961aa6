#!/usr/bin/env bash
# Builds the fuzz seed corpus: up to 50 distinct Ethernet frames from each capture in ../shared/pcaps.
set -euo pipefail
cd "$(dirname "$0")/.."
find ../shared/pcaps -type f ! -name README ! -name '*.py' -print0 |
    xargs -0 cargo run --release -q -p palisade -- pcap export-frames --out fuzz/corpus/dissect
