#!/usr/bin/env bash
# A few-second smoke run of the benchmark harness: debug changecast on 127.0.0.1 (a free
# port), the loadgen example with 50 connections for ~3 s; fails on any loss or error.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
fail() { echo "bench-smoke: $*" >&2; echo "bench-smoke: 0 passed, 1 failed"; exit 1; }
cargo build --locked --bin changecast --example loadgen >&2 || fail "build failed"
DIR="$(mktemp -d)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
LOADGEN="$TARGET/debug/examples/loadgen"
"$LOADGEN" init --db "$DIR/app.db" --users 50 --businesses 1 > /dev/null || fail "init failed"
cat > "$DIR/changecast.toml" <<TOML
[server]
listen = "127.0.0.1:0"
[source]
type = "sqlite"
path = "$DIR/app.db"
[auth]
jwt_secret = "smoke-secret"
user = { claim = "sub" }
[history]
store = "memory"
[[route]]
name = "orders"
collection = "orders"
on = ["insert"]
to = "\$creator_id"
TOML
"$TARGET/debug/changecast" serve --config "$DIR/changecast.toml" > "$DIR/server.log" 2>&1 &
PID=$!
ADDR=""
for _ in $(seq 1 100); do
  ADDR=$(grep -o 'addr=127\.0\.0\.1:[0-9]*' "$DIR/server.log" | head -1 | cut -d= -f2)
  [ -n "$ADDR" ] && break
  kill -0 "$PID" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ADDR" ] || { cat "$DIR/server.log" >&2; fail "changecast did not start"; }
OUT=$(timeout 30 "$LOADGEN" run --url "ws://$ADDR/v1/ws" --secret smoke-secret --conns 50 --per-user 1-3 \
  --db "$DIR/app.db" --rate 200 --duration 3 --drain 3 --connect-timeout 10 --label smoke) || fail "loadgen failed"
echo "$OUT"
python3 - "$OUT" <<'PY' || fail "losses or errors"
import json, sys
d = json.loads(sys.argv[1])
ok = d["connections"] == 50 and d["lost"] == 0 and d["errors"] == 0 and d["received"] == d["expected"] > 0
sys.exit(0 if ok else 1)
PY
echo "bench-smoke: 1 passed, 0 failed"
