#!/usr/bin/env bash
# Profiles changecast (release, pinned to core 0) under the account-wide workload (b) with
# perf: writes bench/out/profile-<time>/perf.txt (flat profile) and prints its head.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
cargo build --release --bin changecast --example loadgen >&2 || exit 1
DIR="$ROOT/bench/out/profile-$(date +%Y%m%d-%H%M%S)"; mkdir -p "$DIR"
LOADGEN="$ROOT/target/release/examples/loadgen"
CONNS="${CONNS:-2000}"; BUSINESSES="${BUSINESSES:-4}"; RATE="${RATE:-2000}"; PORT="${PORT:-18199}"
"$LOADGEN" init --db "$DIR/app.db" --users "$CONNS" --businesses "$BUSINESSES" > /dev/null
SECRET=profile-secret WRITE_DELAY="${WD:-20ms}"
. "$ROOT/bench/changecast_toml.sh"
changecast_toml business "$DIR/app.db" "$PORT" "${HISTORY:-memory}" "$DIR/history.db" > "$DIR/changecast.toml"
taskset -c 0 "$ROOT/target/release/changecast" serve --config "$DIR/changecast.toml" > "$DIR/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
sleep 1
timeout 60 taskset -c 1 "$LOADGEN" run --url "ws://127.0.0.1:$PORT/v1/ws" --secret profile-secret --conns "$CONNS" \
  --businesses "$BUSINESSES" --db "$DIR/app.db" --rate "$RATE" --duration 8 --ready-file "$DIR/ready" > "$DIR/loadgen.json" &
LG=$!
for _ in $(seq 1 300); do [ -f "$DIR/ready" ] && break; sleep 0.05; done
sleep 1
perf record -F 499 -g -p "$PID" -o "$DIR/perf.data" -- sleep 5 2> "$DIR/perf-record.err"
wait $LG
perf report -i "$DIR/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -v '^$' > "$DIR/perf.txt"
perf report -i "$DIR/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -40 > "$DIR/perf-flat.txt"
cat "$DIR/loadgen.json"
cat "$DIR/perf-flat.txt"
echo "profile: $DIR" >&2
