#!/usr/bin/env bash
# One quick account-wide run, for comparing two builds or settings (not for the tables):
# 2,000 connections, 4 businesses, RATE orders/s (2,000 = 1M deliveries/s) for 5 s, the
# server pinned to core 0 and the load generator to core 1 as in bench/run.sh. Prints the
# load generator's figures, the server's CPU seconds from the moment every connection is
# ready to the end of the drain, deliveries per CPU second, and the server's write system
# calls in that time (/proc/<pid>/io). Bounded: the load generator has `timeout 60`.
#
#   bench/quick.sh                                   # target/release/changecast
#   CHANGECAST=/tmp/other RATE=200 WRITE_DELAY=0ms HISTORY=memory bench/quick.sh
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CHANGECAST="${CHANGECAST:-$ROOT/target/release/changecast}"
LOADGEN="${LOADGEN:-$ROOT/target/release/examples/loadgen}"
RATE="${RATE:-2000}"; HISTORY="${HISTORY:-sqlite}"; WRITE_DELAY="${WRITE_DELAY:-20ms}"
for bin in "$CHANGECAST" "$LOADGEN"; do
  [ -x "$bin" ] || { echo "missing $bin: cargo build --release --bin changecast --example loadgen" >&2; exit 1; }
done
DIR="$(mktemp -d /tmp/changecast-quick.XXXXXX)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SECRET="quick-secret-quick-secret-quick-secret"
"$LOADGEN" init --db "$DIR/app.db" --users 2000 --businesses 4 > /dev/null
. "$ROOT/bench/changecast_toml.sh"
changecast_toml business "$DIR/app.db" "$PORT" "$HISTORY" "$DIR/history.db" > "$DIR/changecast.toml"
taskset -c 0 "$CHANGECAST" serve --config "$DIR/changecast.toml" > "$DIR/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$PORT/readyz" > /dev/null && break; sleep 0.05; done
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
writes() { awk '/^syscw/ {print $2}' "/proc/$PID/io"; }
timeout 60 taskset -c 1 "$LOADGEN" run --url "ws://127.0.0.1:$PORT/v1/ws" --secret "$SECRET" \
  --conns 2000 --businesses 4 --db "$DIR/app.db" --rate "$RATE" --duration 5 \
  --ready-file "$DIR/ready" > "$DIR/loadgen.json" &
LG=$!
for _ in $(seq 1 1500); do [ -f "$DIR/ready" ] && break; sleep 0.02; done
T0=$(cpu); W0=$(writes)
wait $LG
T1=$(cpu); W1=$(writes)
python3 - "$DIR/loadgen.json" "$T0" "$T1" "$W0" "$W1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
cpu = (float(sys.argv[3]) - float(sys.argv[2])) / 100
w = int(sys.argv[5]) - int(sys.argv[4])
keys = ["events_per_s", "p50_ms", "p99_ms", "lost", "errors", "closed_early", "client_busy"]
out = {k: d.get(k) for k in keys}
out.update(server_cpu_s=cpu, deliveries_per_cpu_s=round(d["received"] / cpu) if cpu else None,
           server_writes=w, deliveries_per_write=round(d["received"] / w, 1) if w else None)
print(json.dumps(out))
PY
