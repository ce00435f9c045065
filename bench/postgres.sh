#!/usr/bin/env bash
# The PostgreSQL source next to the SQLite source (issue 15), on loopback:
#
#   catch-up  changes per second read from the source: CATCHUP_ROWS orders are written while
#             changecast is stopped, then changecast starts and the time until
#             changecast_changes_total{collection="orders",op="insert"} reaches them is taken
#             (reading the slot / change log, decoding, routing to nobody, history untouched);
#   rate R    commit→client latency at R changes/s (RATES, default 1,000 and 10,000): the
#             load generator's per-user workload (CONNS connections, one per user, each change
#             to one user) with its writer inserting into SQLite or PostgreSQL; p50/p99 from
#             the row's insert time to its receipt, losses and errors counted as in run.sh.
#
#   bench/postgres.sh                        # RUNS=1, 5 s per rate
#   RUNS=3 RATES="1000 10000" DURATION=10 bench/postgres.sh
#   PROFILE=debug RATES=1000 DURATION=2 CONNS=100 CATCHUP_ROWS=5000 bench/postgres.sh   # a smoke
#
# Server pinned to core 0, load generator and writer to core 1, PostgreSQL unpinned (it is the
# database, like SQLite's writer); every run is bounded (timeout) and every process started here
# is stopped by its pid. Results: bench/out/pg-<time>/results.jsonl and table.md.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
RUNS="${RUNS:-1}"
RATES="${RATES:-1000 10000}"
DURATION="${DURATION:-5}"
CONNS="${CONNS:-1000}"
CATCHUP_ROWS="${CATCHUP_ROWS:-100000}"
SOURCES="${SOURCES:-sqlite postgres}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
SECRET="bench-secret-$$"
OUT="$ROOT/bench/out/pg-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
PROFILE="${PROFILE:-release}"
LOADGEN="$ROOT/target/$PROFILE/examples/loadgen"
CHANGECAST="$ROOT/target/$PROFILE/changecast"
log() { echo "[bench-pg] $*" >&2; }

PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
[ -x "$PG_BIN/initdb" ] || { log "PostgreSQL not found: apt-get install postgresql, or set PG_BIN"; exit 1; }
log "building $PROFILE binaries"
if [ "$PROFILE" = release ]; then
  cargo build --release --bin changecast --example loadgen >&2 || exit 1
else
  cargo build --bin changecast --example loadgen >&2 || exit 1
fi

# --- PostgreSQL: a throwaway cluster (as `postgres` when run as root) ---------------------
PGDIR="$(mktemp -d)"
AS=()
if [ "$(id -u)" = 0 ]; then chown postgres "$PGDIR"; AS=(runuser -u postgres --); fi
PGPORT="${PGPORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
"${AS[@]}" "$PG_BIN/initdb" -D "$PGDIR/data" -U postgres -A trust -E UTF8 --no-sync --locale C > "$OUT/initdb.log" 2>&1 \
  || { cat "$OUT/initdb.log" >&2; exit 1; }
"${AS[@]}" "$PG_BIN/postgres" -D "$PGDIR/data" -c port="$PGPORT" -c listen_addresses=127.0.0.1 \
  -c unix_socket_directories="$PGDIR" -c wal_level=logical -c max_connections=100 \
  > "$OUT/postgres.log" 2>&1 &
PGPID=$!
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  kill -INT "$PGPID" 2>/dev/null && wait "$PGPID" 2>/dev/null
  rm -rf "$PGDIR"
}
trap cleanup EXIT
psql_() { "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres "$@"; }
for _ in $(seq 1 100); do psql_ -d postgres -c 'SELECT 1' > /dev/null 2>&1 && break; sleep 0.1; done
psql_ -d postgres -c 'SELECT 1' > /dev/null || { cat "$OUT/postgres.log" >&2; exit 1; }
log "PostgreSQL $(psql_ -d postgres -c 'SHOW server_version') on 127.0.0.1:$PGPORT"

# db_for SOURCE DIR RUN_ID: the --db the load generator and the config use (a fresh database).
db_for() {
  case "$1" in
    sqlite) echo "$2/app.db" ;;
    postgres) psql_ -d postgres -c "CREATE DATABASE bench_$3" > /dev/null; echo "postgres://postgres@127.0.0.1:$PGPORT/bench_$3" ;;
  esac
}
# config SOURCE DB DIR RUN_ID: a changecast config (per-user route, durable history) on stdout;
# slots are per cluster, so each run has its own (dropped by drop_slot after the run).
config() {
  local src
  case "$1" in
    sqlite) src="type = \"sqlite\"
path = \"$2\"" ;;
    postgres) src="type = \"postgres\"
url = \"$2\"
slot = \"bench_$4\"
publication = \"bench\"" ;;
  esac
  cat <<TOML
[server]
listen = "127.0.0.1:0"
[source]
$src
[auth]
jwt_secret = "$SECRET"
user = { claim = "sub" }
[history]
path = "$3/history.db"
[[route]]
name = "orders"
collection = "orders"
on = ["insert"]
to = "\$creator_id"
TOML
}
# start DIR: changecast on core 0; sets SERVER_PID and ADDR.
start() {
  taskset -c "$SERVER_CPU" "$CHANGECAST" serve --config "$1/changecast.toml" > "$1/server.log" 2>&1 &
  SERVER_PID=$!
  ADDR=""
  for _ in $(seq 1 200); do
    ADDR=$(grep -o 'addr=127\.0\.0\.1:[0-9]*' "$1/server.log" | head -1 | cut -d= -f2)
    [ -n "$ADDR" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.05
  done
  log "changecast did not start"; cat "$1/server.log" >&2; return 1
}
stop() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
}
drop_slot() { [ "$1" = postgres ] && psql_ -d postgres -c "SELECT pg_drop_replication_slot('bench_$2')" > /dev/null; return 0; }
inserts() { curl -sf "http://$ADDR/metrics" | awk '/^changecast_changes_total\{/ && /collection="orders"/ && /op="insert"/ {print $2}' | head -1; }
emit() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(json.loads(sys.argv[2])); print(json.dumps(d))' "$1" "$2" >> "$RESULTS"; }

n=0
for run in $(seq 1 "$RUNS"); do
  order=$SOURCES; [ $((run % 2)) -eq 0 ] && order=$(echo $SOURCES | tr ' ' '\n' | tac | tr '\n' ' ')
  for src in $order; do
    # catch-up: the source's read rate on a backlog.
    n=$((n + 1)); dir="$OUT/catchup-$src-$run"; mkdir -p "$dir"
    db=$(db_for "$src" "$dir" "$n")
    "$LOADGEN" init --db "$db" --users 100 > /dev/null || { log "init failed"; exit 1; }
    config "$src" "$db" "$dir" "$n" > "$dir/changecast.toml"
    # The source's setup (triggers, or the publication and slot) exists before the backlog.
    start "$dir" || exit 1
    for _ in $(seq 1 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$ADDR/readyz")" = 200 ] && break; sleep 0.1; done
    stop
    timeout 120 "$LOADGEN" write --db "$db" --keys 100 --rate "$CATCHUP_ROWS" --duration 1 > "$dir/write.json" || { log "write failed"; exit 1; }
    t0=$(date +%s.%N); start "$dir" || exit 1
    got=0
    for _ in $(seq 1 1200); do
      got=$(inserts); got=${got:-0}
      python3 -c "import sys; sys.exit(0 if float('$got') >= $CATCHUP_ROWS else 1)" && break
      sleep 0.05
    done
    t1=$(date +%s.%N); stop; drop_slot "$src" "$n"
    j=$(python3 -c "import json; s=$t1-$t0; print(json.dumps({'workload':'catchup','source':'$src','run':$run,'rows':$CATCHUP_ROWS,'read':float('$got'),'seconds':round(s,3),'changes_per_s':round(float('$got')/s)}))")
    emit "$j" '{}'; log "catch-up/$src run $run: $j"

    for rate in $RATES; do
      n=$((n + 1)); dir="$OUT/rate$rate-$src-$run"; mkdir -p "$dir"
      db=$(db_for "$src" "$dir" "$n")
      "$LOADGEN" init --db "$db" --users "$CONNS" > /dev/null || { log "init failed"; exit 1; }
      config "$src" "$db" "$dir" "$n" > "$dir/changecast.toml"
      start "$dir" || exit 1
      timeout 60 taskset -c "$CLIENT_CPU" "$LOADGEN" run --url "ws://$ADDR/v1/ws" --secret "$SECRET" \
        --conns "$CONNS" --db "$db" --rate "$rate" --duration "$DURATION" --connect-timeout 15 \
        --label "rate$rate/$src" > "$dir/loadgen.json" 2> "$dir/loadgen.err"
      rc=$?; stop; drop_slot "$src" "$n"
      if [ $rc -ne 0 ] || [ ! -s "$dir/loadgen.json" ]; then
        log "rate$rate/$src run $run: loadgen failed (rc=$rc)"; tail -3 "$dir/loadgen.err" >&2
        emit "{\"failed\": true}" "{\"workload\":\"rate$rate\",\"source\":\"$src\",\"run\":$run}"; continue
      fi
      emit "$(tail -1 "$dir/loadgen.json")" "{\"workload\":\"rate$rate\",\"source\":\"$src\",\"run\":$run}"
      log "rate$rate/$src run $run: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print({k: d.get(k) for k in ("events_per_s","p50_ms","p99_ms","max_ms","lost","errors")})' "$(tail -1 "$dir/loadgen.json")")"
    done
  done
done

python3 - "$RESULTS" <<'PY' | tee "$OUT/table.md"
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda xs: statistics.median(xs) if xs else float("nan")
print("| workload | source | runs | changes/s | p50 ms | p99 ms | lost | errors |")
print("|---|---|---|---|---|---|---|---|")
for wl in sorted({r["workload"] for r in rows}, key=lambda w: (w != "catchup", len(w), w)):
    for src in ("sqlite", "postgres"):
        rs = [r for r in rows if r["workload"] == wl and r["source"] == src and not r.get("failed")]
        failed = sum(1 for r in rows if r["workload"] == wl and r["source"] == src and r.get("failed"))
        if not rs and not failed:
            continue
        if wl == "catchup":
            print(f"| catch-up ({rs[0]['rows'] if rs else '?'} rows) | {src} | {len(rs)} | {med([r['changes_per_s'] for r in rs]):,.0f} | | | {sum(r['rows'] - r['read'] for r in rs):.0f} | {failed} |")
        else:
            print(f"| {wl[4:]} changes/s offered | {src} | {len(rs)} | {med([r['events_per_s'] for r in rs]):,.0f} | {med([r['p50_ms'] for r in rs]):.2f} | {med([r['p99_ms'] for r in rs]):.2f} | {sum(r['lost'] for r in rs)} | {sum(r['errors'] for r in rs) + failed} |")
PY
log "raw results: $RESULTS"
