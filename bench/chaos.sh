#!/usr/bin/env bash
# Chaos benchmark: the lab's agents killed with SIGKILL 50 times at random
# (seeded) moments under 10,000 idle TCP connections held open across the
# two hosts and a long-lived stream, each time restarted after a random
# 50-300 ms. Prints per kill the stream's stall, how long new connections
# could not be opened, and what a closed zone received while its agent was
# down; then the totals against their goals.
#
# What "new-flow stall after a restart" measures, exactly: from the moment
# the test runs the restart command (`ip netns exec HOST palisade agent
# --config ...`, the first one when both agents were killed) to the moment a
# new TCP connection from web-1 (hv1) to app-2 (hv2), port 8080, completes
# its handshake through both agents. A prober in web-1 starts a fresh
# connection every 10 ms from the kill on (a SYN lost while the path is down
# is not waited for), and reports when the first one completes; the test
# subtracts the time between the kill and the restart command (the random
# 50-300 ms the agents are held down). So it counts the whole process
# start (exec, configuration, policy, engines, state import, sockets), the
# workers' first packets and up to 10 ms of probe granularity; not the time
# the agents were held down. The figure is per round, p50/p99 over rounds.
#
# A round that kills both agents restarts them at the same time, each from
# its own thread, as two hosts would (each host's supervisor restarts its
# own agent; a real host runs one agent), so the stall is the slower of the
# two starts plus the path. Each agent's own start (launch to its `agent
# ready` line) is printed beside it. The stream stall (kill to the stream's
# next line) includes the held-down time and is printed for reference.
# Where a round's stall went is printed beside it: each restarted agent's
# start-up phases, its `after ready` line (when its workers ran, when it
# decided its first new connection, when its first snapshot round ran and
# how long it held a worker) and when it first saw a probe's connection
# (its flow records). PALISADE_CHAOS_SNIFF=1 adds every SYN and SYN-ACK of
# the probes on every interface of both hosts and the edge router, timed.
# The load average before and after the run is printed: on a shared
# machine the tail is mostly the agents waiting for a core.
# By default the lab runs the debug build (target/debug/palisade, workspace
# crates at opt-level 1); --release builds the test and the binary with the
# release profile (what users run) and runs that. The build it ran is
# printed first (profile, the profile settings the environment overrides,
# the binary). For a shorter release build, LTO can be turned off:
# `CARGO_PROFILE_RELEASE_LTO=false bash bench/chaos.sh --release` (what
# users run has it on: the figures then say so).
#
#   sudo bash bench/chaos.sh [--kills N] [--flows N] [--seed N] [--release]
#
# It runs the lab_e2e chaos test (crates/palisade/tests/lab_e2e.rs,
# `agents_killed_with_sigkill_at_random_moments_keep_every_established_connection`)
# with larger figures; needs root, iproute2, busybox, python3. The same
# seed replays the same moments (the machine's timing still varies).
set -euo pipefail
kills=50 flows=10000 seed="" profile=()
while [ $# -gt 0 ]; do
    case "$1" in
        --kills) kills="$2"; shift 2 ;;
        --flows) flows="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --release) profile=(--release); shift ;;
        *) echo "usage: $0 [--kills N] [--flows N] [--seed N] [--release]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
export PALISADE_CHAOS_KILLS="$kills" PALISADE_CHAOS_FLOWS="$flows"
[ -n "$seed" ] && export PALISADE_CHAOS_SEED="$seed"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
# Built first, so that the load averages below frame the run only.
if ! cargo test -q "${profile[@]}" -p palisade --test lab_e2e --no-run >"$out" 2>&1; then
    echo "the build failed:" >&2
    tail -20 "$out" >&2
    exit 1
fi
# Which build this is: the profile, what the environment changes of it, and
# the binary the lab runs (the test's, built beside it).
if [ ${#profile[@]} -gt 0 ]; then
    build="release profile (lto ${CARGO_PROFILE_RELEASE_LTO:-thin, as in Cargo.toml}, codegen-units ${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-1})"
    dir=release
else
    build="debug: dev profile (workspace crates opt-level ${CARGO_PROFILE_DEV_OPT_LEVEL:-1}, dependencies 2)"
    dir=debug
fi
exe="${CARGO_TARGET_DIR:-target}/$dir/palisade"
echo "chaos build: $build; binary $exe ($(stat -c '%s bytes, built %y' "$exe" 2>/dev/null || echo 'not found'))"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
cargo test -q "${profile[@]}" -p palisade --test lab_e2e \
    agents_killed_with_sigkill_at_random_moments_keep_every_established_connection \
    -- --exact --nocapture >"$out" 2>&1 || status=$?
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
grep -E '^(chaos|round)' "$out" || true
echo "load average (1, 5, 15 min): $load_before before the run, $load_after after it ($(nproc) cores)"
summary=$(grep -E '^chaos: seed .* kills, ' "$out" | tail -1 || true)
if [ -z "$summary" ]; then
    echo "the run did not finish (exit $status):" >&2
    grep -E 'panicked|assert' -A2 "$out" >&2 || tail -20 "$out" >&2
    exit 1
fi
lost=$(sed -E 's/.* ([0-9]+) lost,.*/\1/' <<<"$summary")
p50=$(sed -E 's/.*new-flow stall after a restart p50 ([0-9]+) ms p99 ([0-9]+) ms.*/\1/' <<<"$summary")
p99=$(sed -E 's/.*new-flow stall after a restart p50 ([0-9]+) ms p99 ([0-9]+) ms.*/\2/' <<<"$summary")
agent50=$(sed -E 's/.*one agent.s start p50 ([0-9]+) ms p99 ([0-9]+) ms.*/\1/' <<<"$summary")
agent99=$(sed -E 's/.*one agent.s start p50 ([0-9]+) ms p99 ([0-9]+) ms.*/\2/' <<<"$summary")
closed=$(sed -E 's/.*closed-zone packets while down ([0-9]+).*/\1/' <<<"$summary")
echo
printf '%-52s %8s  %s\n' "figure" "value" "goal"
printf '%-52s %8s  %s\n' "established connections lost (of $flows held + stream)" "$lost" "0"
printf '%-52s %8s  %s\n' "new-flow stall after a restart, p50 (ms)" "$p50" "<= 100"
printf '%-52s %8s  %s\n' "new-flow stall after a restart, p99 (ms)" "$p99" "<= 100"
printf '%-52s %8s  %s\n' "  one agent's start to ready, p50 (ms)" "$agent50" "-"
printf '%-52s %8s  %s\n' "  one agent's start to ready, p99 (ms)" "$agent99" "-"
printf '%-52s %8s  %s\n' "packets a closed zone received while down" "$closed" "0"
echo "(build: $build)"
exit "$status"
