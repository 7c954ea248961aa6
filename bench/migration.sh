#!/usr/bin/env bash
# Live migration of a QEMU guest with its firewall state, back and forth
# between two lab hosts, timed.
#
# Shape: `palisade lab up --controller --hosts 3 --vms 1 --qemu vm1 --qemu-nic tap --standby vm1@hv2`:
# vm1 a QEMU guest (TCG unless KVM works) on a tap on hv1, pre-staged on
# hv2; vm3 a namespace VM on hv3; a controller on the underlay. vm1 holds
# one real TCP connection (a line stream from vm3's `palisade lab serve
# stream 80`).
#
# Series, each --count migrations alternating hv1 -> hv2 -> hv1 ...:
#   baseline   `palisade lab migrate --no-state`: the lab drives QEMU itself
#              and moves no firewall state (no export, no import, no quiesce)
#   state-N    `palisade lab migrate --ordered`: ordered through the
#              controller and carried out by the source host's agent, the
#              state moving over the agents' mutual-TLS channel: every
#              connection while the guest runs (pre-copy, staged by the
#              destination agent), then only what changed since, in the
#              guest's pause (delta, applied to the staged copy and imported
#              before QEMU moves the device state). The vNIC's table holds N
#              extra connections (--conns, default "1000 50000"): SYNTHETIC
#              ones, copies of the real stream's record with their own ports
#              (`palisade lab synth-state`), imported into the agent the
#              guest runs on before the series. They see no packets (so a
#              delta holds the real stream's connection and little else);
#              TCP established connections do not expire during a run.
#
# Printed per series: switchover p50/p99 (the state move inside the
# guest's pause: the source's delta export with the quiesce, the transfer,
# the destination's apply and import: the blackout the firewall adds, the
# pause being otherwise QEMU's), pre-copy p50/p99 (the source agent's
# connect, export, send and the destination's staging, while the guest
# runs; from the source agent's log), prestage p50/p99 (destination QEMU
# started until it waits; the vNIC's port and compiled policy are there
# from `lab up`), connections moved (min/max), connections reset (the
# first migration's count minus the series' minimum), state bytes per
# connection (pre-copy + delta over the connections moved); the baseline's
# line gives the guest's pause without the firewall (paused p50/p99).
# Then, per state series, where the switchover's time went (p50/p99 us,
# from the agents' logs): the source's worker locks, change export,
# quiesce and encode, its whole delta export, the send with the
# destination's answer, the destination's decode and apply; and the
# delta's connections. Each series' run time is printed first.
# Raw JSON lines are kept in the output directory.
#
# Usage: sudo bench/migration.sh [--count N] [--conns "1000 50000"]
#            [--exe target/release/palisade] [--out DIR]
set -euo pipefail

COUNT=100
CONNS="1000 50000"
EXE=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --count) COUNT=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --exe) EXE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
if [ -z "$EXE" ]; then
    cargo build --release -q -p palisade
    EXE="${CARGO_TARGET_DIR:-target}/release/palisade"
fi
EXE=$(realpath "$EXE")
OUT=${OUT:-$(mktemp -d /tmp/palisade-migration-bench.XXXXXX)}
mkdir -p "$OUT"
NAME=pmigc
STATE=/run/palisade/lab-$NAME
SERVER_PID=""

cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    # The lab's logs (controller, agents) stay with the results.
    mkdir -p "$OUT/logs" && cp "$STATE"/logs/*.log "$OUT/logs/" 2>/dev/null || true
    "$EXE" lab down --name "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$EXE" lab down --name "$NAME" >/dev/null 2>&1 || true
"$EXE" lab up --controller --name "$NAME" --hosts 3 --vms 1 --qemu vm1 --qemu-nic tap --standby vm1@hv2 \
    --conn-capacity 262144 >"$OUT/up.log"
VM3=$(ip netns exec "$NAME-vm-vm3" ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)

# The real connection: vm3 streams lines to the guest.
ip netns exec "$NAME-vm-vm3" "$EXE" lab serve stream 80 >/dev/null 2>&1 &
SERVER_PID=$!
sleep 0.5
# (nc's stdin is a pipe that stays open: a closed stdin would half-close
# the connection, and the template must be an established one.)
"$EXE" lab exec --name "$NAME" vm1 -- sh -c "sleep 100000 | nc $VM3 80 >/dev/null 2>&1 &"
sleep 1

HOST=hv1
other() { if [ "$1" = hv1 ]; then echo hv2; else echo hv1; fi; }
agent() { # agent HOST ACTION [BLOB-FILE] -> body on stdout
    local sock="$STATE/$1/agent.sock"
    if [ $# -ge 3 ]; then
        curl -sS --fail-with-body --unix-socket "$sock" --data-binary @"$3" "http://agent/vnics/vm1.0/$2"
    else
        curl -sS --fail-with-body --unix-socket "$sock" -X POST "http://agent/vnics/vm1.0/$2"
    fi
}
ORDERED=0
lines() { wc -l <"$STATE/logs/$1.log" 2>/dev/null || echo 0; }
series() { # series NAME [migrate options...]
    local name=$1; shift
    : >"$OUT/$name.jsonl"
    : >"$OUT/$name.precopy"
    local from1 from2 started
    from1=$(lines hv1)
    from2=$(lines hv2)
    started=$(date +%s)
    for _ in $(seq "$COUNT"); do
        local to
        to=$(other "$HOST")
        if [ "$ORDERED" = 1 ]; then
            "$EXE" lab migrate --name "$NAME" vm1 --to "$to" --ordered --json "$@" >>"$OUT/$name.jsonl"
            # The source agent logs its pre-copy: "... staged on HOST in N us".
            grep -o 'pre-copy of [0-9]* connections staged on [a-z0-9]* in [0-9]* us' "$STATE/logs/$HOST.log" \
                | tail -n 1 >>"$OUT/$name.precopy" || true
        else
            "$EXE" lab migrate --name "$NAME" vm1 --to "$to" --no-announce --json "$@" >>"$OUT/$name.jsonl"
        fi
        HOST=$to
    done
    echo "$name: $COUNT migrations in $(( $(date +%s) - started )) s" >>"$OUT/runtime.txt"
    # Where each pause went (the agents log it once the pause is over):
    # the source's delta (locks, export, quiesce, encode), its send and the
    # destination's answer, the destination's decode and apply.
    { tail -n +"$((from1 + 1))" "$STATE/logs/hv1.log"; tail -n +"$((from2 + 1))" "$STATE/logs/hv2.log"; } \
        | grep -E 'switchover of |: delta of [0-9]+ connections|: commit of ' >"$OUT/$name.phases" || true
    # Housekeeping's lock holds, when the agents log them (PALISADE_LOG_HOLDS=1
    # in the environment, which the lab's agents inherit): sweep passes and
    # snapshot rounds, with their times on the migration lines' clock.
    { tail -n +"$((from1 + 1))" "$STATE/logs/hv1.log" | sed 's/^/hv1: /'
      tail -n +"$((from2 + 1))" "$STATE/logs/hv2.log" | sed 's/^/hv2: /'; } \
        | grep -E ': sweep of [0-9]+ slots|: snapshot round of ' >"$OUT/$name.holds" || true
}

# The template: the guest's connection as its agent holds it now. The
# export quiesces the port; the resume right after forwards again.
agent "$HOST" export >"$OUT/template.blob"
agent "$HOST" resume >/dev/null
# The state series first: ordered, over the agents' channel. The baseline
# runs last: its migrations bypass the controller, which learns of each from
# the guest's announcement (a detected migration, a follow order), and an
# ordered migration after them would start from where the controller last
# placed the VM, not always where it runs.
ORDERED=1
for n in $CONNS; do
    "$EXE" lab synth-state --template "$OUT/template.blob" --count "$n" --out "$OUT/synth-$n.blob" >/dev/null
    agent "$HOST" import "$OUT/synth-$n.blob" >/dev/null
    series "state-$n"
done
ORDERED=0
series baseline --no-state

uptime
python3 - "$OUT" "$COUNT" "$CONNS" <<'EOF'
import json, math, sys
out, count, conns = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()

def pct(xs, p):
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")

def top(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return max(xs) if xs else float("nan")

def load(name):
    return [json.loads(l) for l in open(f"{out}/{name}.jsonl") if l.strip()]

def precopy(name):
    try:
        return [int(l.split()[-2]) / 1e3 for l in open(f"{out}/{name}.precopy") if l.strip()]
    except FileNotFoundError:
        return []

print(f"migrations per series: {count} (alternating hv1 <-> hv2), raw results in {out}")
print(open(f"{out}/runtime.txt").read().rstrip())
print(f"{'series':<12} {'paused p50/p99 ms':>18} {'switchover p50/p99':>19} {'pre-copy p50/p99':>17} "
      f"{'prestage p50/p99':>17} {'moved min/max':>14} {'reset':>6} {'B/conn':>7}")
for name in ["baseline"] + [f"state-{n}" for n in conns]:
    rs = load(name)
    paused = [r["paused_ms"] for r in rs]
    sw = [r["switchover_ms"] for r in rs]
    pre = [r["prestage_ms"] for r in rs]
    pc = precopy(name)
    moved = [r["connections"] for r in rs]
    bpc = (sum(r["state_bytes"] for r in rs) / sum(moved)) if sum(moved) else 0
    reset = (moved[0] - min(moved)) if name != "baseline" else "-"
    print(f"{name:<12} {pct(paused,50):8.1f}/{pct(paused,99):<9.1f} {pct(sw,50):9.2f}/{pct(sw,99):<9.2f} "
          f"{pct(pc,50):8.2f}/{pct(pc,99):<8.2f} {pct(pre,50):8.1f}/{pct(pre,99):<8.1f} "
          f"{min(moved):6}/{max(moved):<7} {reset!s:>6} {bpc:7.1f}")

# The pause's phases, p50/p99 us, from the agents' logs.
import re
phases = [
    ("lock", r"delta of .*: lock (\d+) us"),
    ("export", r"delta of .* export (\d+) us"),
    ("quiesce", r"quiesce (\d+) us"),
    ("encode", r"encode (\d+) us"),
    ("delta(src)", r"delta export (\d+) us"),
    ("send+apply", r"send and destination apply (\d+) us"),
    ("decode(dst)", r"commit of .* decode (\d+) us"),
    ("apply(dst)", r"commit of .* apply (\d+) us"),
    ("delta conns", r"delta of (\d+) connections"),
]
print()
# (With 100 samples the p99 is the second slowest: the max is printed too.)
print("pause phases p50/p99/max (us; delta conns: count) " + " ".join(f"{n:>20}" for n, _ in phases))
for n in conns:
    try:
        text = open(f"{out}/state-{n}.phases").read()
    except FileNotFoundError:
        continue
    cells = []
    for _, rx in phases:
        xs = [float(m) for m in re.findall(rx, text)]
        cells.append(f"{pct(xs,50):6.0f}/{pct(xs,99):.0f}/{top(xs):<6.0f}")
    print(f"{'state-' + n:<50} " + " ".join(f"{c:>20}" for c in cells))

# The commit's round trip, split by the clock readings both agents log of
# it (one monotonic clock on the host): the source's write, request sent
# until the destination read its first bytes (the write, the crossing and
# the destination thread's wake-up), the destination's work until it began
# its answer (read, decode, apply), answer begun until the source read it.
trips = [
    ("write(src)", 0), ("to dst", 1), ("at dst", 2), ("back", 3),
]
print()
print("round trip p50/p99/max (us)                        " + " ".join(f"{n:>20}" for n, _ in trips) + "      paired")
slowest = {}
for n in conns:
    try:
        text = open(f"{out}/state-{n}.phases").read()
    except FileNotFoundError:
        continue
    src = [tuple(int(x) for x in m) for m in re.findall(
        r"written in (\d+) us; request begun at (\d+) ns, answer read at (\d+) ns", text)]
    dst = [tuple(int(x) for x in m) for m in re.findall(
        r"first bytes at (\d+) ns, answer begun at (\d+) ns", text)]
    # The destination's lock wait for each commit, when it logs it.
    waits = {int(f): int(w) for f, w in re.findall(
        r"first bytes at (\d+) ns, answer begun at \d+ ns; workers' locks waited for (\d+) us", text)}
    rows = []
    for w, s0, a in src:
        match = [(f, b) for f, b in dst if s0 <= f <= a and f <= b <= a]
        if len(match) == 1:
            f, b = match[0]
            rows.append((w, (f - s0) / 1e3, (b - f) / 1e3, (a - b) / 1e3, s0, a, waits.get(f)))
    cells = [f"{pct([r[i] for r in rows],50):6.0f}/{pct([r[i] for r in rows],99):.0f}/{top([r[i] for r in rows]):<6.0f}"
             for _, i in trips]
    print(f"{'state-' + n:<50} " + " ".join(f"{c:>20}" for c in cells) + f"  {len(rows):4}/{len(src):<4}")
    slowest[n] = sorted(rows, key=lambda r: r[5] - r[4], reverse=True)[:5]

# The five slowest round trips of each series, each with the destination's
# wait for the workers' locks and the housekeeping holds (sweep passes,
# snapshot rounds; logged with PALISADE_LOG_HOLDS=1) that overlap it.
for n, rows in slowest.items():
    try:
        holds = [(int(b), int(e), l.split(": ", 1)[0] + " " + l.split("palisade agent: ", 1)[-1].split(";")[0])
                 for l in open(f"{out}/state-{n}.holds")
                 for b, e in re.findall(r"from (\d+) ns to (\d+) ns", l)]
    except FileNotFoundError:
        holds = []
    print()
    print(f"state-{n}: slowest round trips (us): total, write(src), to dst, at dst, back; dst lock wait; overlapping holds ({len(holds)} logged)")
    for w, to, at, back, s0, a, wait in rows:
        over = [h for b, e, h in holds if b <= a and e >= s0]
        print(f"  {(a - s0) / 1e3:8.0f} {w:6} {to:8.0f} {at:8.0f} {back:8.0f}  wait {wait if wait is not None else '-':>5}  "
              + ("; ".join(over) if over else "none"))
EOF
