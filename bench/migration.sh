#!/usr/bin/env bash
# Live migration of a QEMU guest with its firewall state, back and forth
# between two lab hosts, timed.
#
# Shape: `palisade lab up --hosts 3 --vms 1 --qemu vm1 --qemu-nic tap --standby vm1@hv2`:
# vm1 a QEMU guest (TCG unless KVM works) on a tap on hv1 (QEMU does not
# migrate the agent's vhost-user NICs: no dirty logging yet), pre-staged
# on hv2; vm3 a namespace VM on hv3. vm1 holds one real TCP connection (a
# line stream from vm3's `palisade lab serve stream 80`).
#
# Series, each --count migrations alternating hv1 -> hv2 -> hv1 ...:
#   baseline   `palisade lab migrate --no-state`: the same migration without
#              the firewall state's move (no export, no import, no quiesce)
#   state-N    with the state move, the vNIC's table holding N extra
#              connections (--conns, default "1000 50000"): SYNTHETIC ones,
#              copies of the real stream's record with their own ports
#              (`palisade lab synth-state`), imported into the agent the
#              guest runs on before the series. They see no packets; TCP
#              established connections do not expire during a run.
#
# Per migration `palisade lab migrate --json` reports (ms): paused (guest
# paused on the source until QEMU completed), switchover (the state move
# inside that pause: source export + destination import), prestage
# (destination QEMU started until it waits for the migration; the vNIC's
# port, socket and compiled policy are there from `lab up`), QEMU's own
# downtime, the connections moved and the blob's bytes.
#
# Printed per series: paused p50/p99, switchover p50/p99 (= the blackout the
# state move adds: it runs while the guest is paused, before QEMU moves the
# device state), prestage p50/p99, connections moved (min/max) and
# connections reset (the first migration's count minus the series' minimum:
# connections lost along the way), state bytes per connection.
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
NAME=pmigb
STATE=/run/palisade/lab-$NAME
SERVER_PID=""

cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    "$EXE" lab down --name "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$EXE" lab down --name "$NAME" >/dev/null 2>&1 || true
"$EXE" lab up --name "$NAME" --hosts 3 --vms 1 --qemu vm1 --qemu-nic tap --standby vm1@hv2 \
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
series() { # series NAME [migrate options...]
    local name=$1; shift
    : >"$OUT/$name.jsonl"
    for _ in $(seq "$COUNT"); do
        local to
        to=$(other "$HOST")
        "$EXE" lab migrate --name "$NAME" vm1 --to "$to" --no-announce --json "$@" >>"$OUT/$name.jsonl"
        HOST=$to
    done
}

series baseline --no-state
# The template: the guest's connections as its agent holds them now (the
# export quiesces the port; the resume right after forwards again).
agent "$HOST" export >"$OUT/template.blob"
agent "$HOST" resume >/dev/null
for n in $CONNS; do
    "$EXE" lab synth-state --template "$OUT/template.blob" --count "$n" --out "$OUT/synth-$n.blob" >/dev/null
    agent "$HOST" import "$OUT/synth-$n.blob" >/dev/null
    series "state-$n"
done

python3 - "$OUT" "$COUNT" "$CONNS" <<'EOF'
import json, sys
out, count, conns = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

def load(name):
    return [json.loads(l) for l in open(f"{out}/{name}.jsonl") if l.strip()]

base = load("baseline")
bp = [r["paused_ms"] for r in base]
print(f"migrations per series: {count} (alternating hv1 <-> hv2), raw results in {out}")
print(f"{'series':<12} {'paused p50/p99 ms':>18} {'switchover p50/p99':>19} {'added p50/p99':>14} "
      f"{'prestage p50/p99':>17} {'moved min/max':>14} {'reset':>6} {'B/conn':>7} {'qemu dt p50':>11}")
for name in ["baseline"] + [f"state-{n}" for n in conns]:
    rs = load(name)
    paused = [r["paused_ms"] for r in rs]
    sw = [r["switchover_ms"] for r in rs]
    pre = [r["prestage_ms"] for r in rs]
    moved = [r["connections"] for r in rs]
    dt = [r["qemu_downtime_ms"] for r in rs if r["qemu_downtime_ms"] is not None]
    added = (pct(paused, 50) - pct(bp, 50), pct(paused, 99) - pct(bp, 99))
    bpc = (sum(r["state_bytes"] for r in rs) / sum(moved)) if sum(moved) else 0
    reset = (moved[0] - min(moved)) if name != "baseline" else "-"
    print(f"{name:<12} {pct(paused,50):8.1f}/{pct(paused,99):<9.1f} {pct(sw,50):9.2f}/{pct(sw,99):<9.2f} "
          f"{added[0]:6.1f}/{added[1]:<7.1f} {pct(pre,50):8.1f}/{pct(pre,99):<8.1f} "
          f"{min(moved):6}/{max(moved):<7} {reset!s:>6} {bpc:7.1f} {pct(dt,50) if dt else '-':>11}")
EOF
