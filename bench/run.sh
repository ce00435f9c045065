#!/usr/bin/env bash
# One command: builds changecast and the load generator, installs the peers, runs every
# workload against changecast and the peers on loopback, and prints the results table
# (also written to bench/out/<time>/table.md; results.jsonl has every raw run).
#
#   bench/run.sh                      # everything, 3 runs per figure (about 15 minutes)
#   RUNS=1 SERVERS="changecast" bench/run.sh
#   WORKLOADS="a b" bench/run.sh      # a b bmax c d e, see below
#
# Server pinned to core 0 (SERVER_CPU), load generator and writer to core 1 (CLIENT_CPU).
# Every run is bounded (timeout) and every server is stopped by its pid (and the pids of its
# process tree); its CPU time and memory are summed over that tree.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
RUNS="${RUNS:-3}"
# changecast runs as configured by default (durable history in SQLite) and, as
# changecast-memory, with `[history] store = "memory"` (the peers keep no durable history).
SERVERS="${SERVERS:-changecast changecast-memory node-ws bun nchan fastapi}"
WORKLOADS="${WORKLOADS:-a b bmax c d e}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
SECRET="bench-secret-$$"
PORT="${PORT:-18200}"
OUT="$ROOT/bench/out/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOADGEN="$ROOT/target/release/examples/loadgen"
CHANGECAST="$ROOT/target/release/changecast"
PEERS="$ROOT/bench/peers"

# Workload parameters (each run <= 15 s).
A_CONNS="${A_CONNS:-10000}"; A_RATE="${A_RATE:-1000}"          # (a) per-user, 1-3 conns/user
B_CONNS="${B_CONNS:-2000}"; B_BUSINESSES="${B_BUSINESSES:-4}"; B_RATE="${B_RATE:-200}"  # (b) 500 conns/business: 100k deliveries/s offered
BMAX_RATE="${BMAX_RATE:-2000}"                                  # (b) at 1M deliveries/s offered: capacity
C_CONNS="${C_CONNS:-10000}"                                    # (c) idle
D_STEPS="${D_STEPS:-5000 10000 19500}"   # the hard open-files limit here is 20000                   # (d) ramp
E_CONNS="${E_CONNS:-2000}"; E_RATE="${E_RATE:-200}"; E_DURATION="${E_DURATION:-20}"  # (e) as (b), 20 s, 1% stalled
DURATION="${DURATION:-5}"

log() { echo "[bench] $*" >&2; }

# --- build and install -------------------------------------------------------------------
log "building release binaries"
cargo build --release --bin changecast --example loadgen >&2 || exit 1
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "open files limit: $(ulimit -n)"
if [[ " $SERVERS " == *" node-ws "* || " $SERVERS " == *" bun "* || " $SERVERS " == *" nchan "* ]]; then
  if [ ! -f "$PEERS/node_modules/better-sqlite3/build/Release/better_sqlite3.node" ] || [ ! -x "$PEERS/node_modules/.bin/bun" ]; then
    log "installing node peers"
    (cd "$PEERS" && npm install --no-audit --no-fund >&2 \
      && (npm install-scripts approve better-sqlite3 bun >&2 2>&1 || true) \
      && npm_config_nodedir=/usr npm rebuild better-sqlite3 bun >&2)
  fi
fi
if [[ " $SERVERS " == *" nchan "* ]] && { ! command -v nginx > /dev/null || [ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; }; then
  log "installing nginx + nchan"
  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx libnginx-mod-nchan) >&2 || exit 1
  # The package may start the distro's nginx on :80; the peer runs its own instance instead.
  if command -v systemctl > /dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx >&2
  elif [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
    kill -QUIT "$(cat /run/nginx.pid)"
  fi
fi
if [[ " $SERVERS " == *" fastapi "* ]]; then
  python3 -c "import fastapi, uvicorn, websockets, jwt" 2>/dev/null || pip install -q -r "$PEERS/requirements.txt" >&2
fi

# --- servers -------------------------------------------------------------------------------
SERVER_PID=""
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# start_server NAME MODE(user|business) DB
start_server() {
  local name="$1" mode="$2" db="$3" dir; dir="$(dirname "$db")"
  PORT=$((PORT + 1))
  # Skip ports something else listens on (nchan also uses PORT+5000 and PORT+6000).
  while port_busy "$PORT" || { [ "$name" = nchan ] && { port_busy $((PORT + 5000)) || port_busy $((PORT + 6000)); }; }; do
    PORT=$((PORT + 1))
  done
  case "$name" in
    changecast|changecast-memory)
      local to='"$creator_id"'
      local store=sqlite; [ "$name" = changecast-memory ] && store=memory
      [ "$mode" = business ] && to='{ lookup = "users", where = { business_id = "$creator_id" }, pick = "_id", many = true }'
      cat > "$dir/changecast.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
[source]
type = "sqlite"
path = "$db"
[auth]
jwt_secret = "$SECRET"
user = { claim = "sub" }
[history]
store = "$store"
path = "$dir/history.db"
[[route]]
name = "orders"
collection = "orders"
on = ["insert"]
to = $to
TOML
      taskset -c "$SERVER_CPU" "$CHANGECAST" serve --config "$dir/changecast.toml" > "$dir/server.log" 2>&1 &
      ;;
    node-ws)
      PORT=$PORT DB="$db" SECRET="$SECRET" MODE="$mode" taskset -c "$SERVER_CPU" node "$PEERS/node-ws.js" > "$dir/server.log" 2>&1 &
      ;;
    bun)
      PORT=$PORT DB="$db" SECRET="$SECRET" MODE="$mode" taskset -c "$SERVER_CPU" "$PEERS/node_modules/.bin/bun" "$PEERS/bun.js" > "$dir/server.log" 2>&1 &
      ;;
    nchan)
      # A wrapper whose children are the companion (auth + feeder) and nginx (master + worker).
      PORT=$PORT DB="$db" SECRET="$SECRET" MODE="$mode" DIR="$dir" taskset -c "$SERVER_CPU" "$PEERS/nchan/run.sh" > "$dir/server.log" 2>&1 &
      ;;
    fastapi)
      (cd "$PEERS" && PORT=$PORT DB="$db" SECRET="$SECRET" MODE="$mode" exec taskset -c "$SERVER_CPU" python3 -m uvicorn fastapi_peer:app --host 127.0.0.1 --port "$PORT" --log-level warning) > "$dir/server.log" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    if port_busy "$PORT"; then return 0; fi
    sleep 0.1
  done
  log "$name did not start"; cat "$dir/server.log" >&2; return 1
}
# tree_pids PID: PID and all its descendants (a server may be several processes: nchan).
tree_pids() {
  kill -0 "$1" 2>/dev/null || return 0
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { kids[$2] = kids[$2] " " $1 }
    END { n = 1; q[1] = root
          while (n > 0) { p = q[n]; n--; printf "%s ", p; m = split(kids[p], c, " "); for (i = 1; i <= m; i++) q[++n] = c[i] } }'
}
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  local alive p; alive=$(tree_pids "$SERVER_PID")
  kill -TERM "$SERVER_PID" 2>/dev/null
  # Up to 5 s for the whole tree to exit, then KILL what is left of it.
  for _ in $(seq 1 50); do
    # shellcheck disable=SC2086
    alive=$(for p in $alive; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
    [ -n "$alive" ] || break; sleep 0.1
  done
  for p in $alive; do kill -KILL "$p" 2>/dev/null; done
  wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
}
trap 'stop_server' EXIT
# The server's resident memory (KiB) and CPU time (clock ticks), summed over its process tree.
rss_kb() { local p t=0 v; for p in $(tree_pids "$1"); do v=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null); t=$((t + ${v:-0})); done; echo "$t"; }
cpu_ticks() { local p t=0 v; for p in $(tree_pids "$1"); do v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}'); t=$((t + ${v:-0})); done; echo "$t"; }
# Samples the server's RSS every 0.25 s into a file while a command runs; prints max.
sample_rss() { local pid="$1" file="$2"; : > "$file"; while kill -0 "$pid" 2>/dev/null; do rss_kb "$SERVER_PID" >> "$file"; sleep 0.25; done; }
# Extra load generator flags per server: nchan sends no `ready` frame, so its connections
# count as ready at the 101 (it has subscribed them by then: checked, see BENCHMARKS.md).
loadgen_flags() { [ "$1" = nchan ] && echo --ready-on-open; return 0; }

# emit WORKLOAD SERVER RUN JSON -> one line in results.jsonl
emit() { python3 -c 'import json,sys; d=json.loads(sys.argv[4]); d.update(workload=sys.argv[1], server=sys.argv[2], run=int(sys.argv[3])); print(json.dumps(d))' "$1" "$2" "$3" "$4" >> "$RESULTS"; }

# measure WORKLOAD SERVER RUN MODE INIT_ARGS -- LOADGEN_ARGS
measure() {
  local wl="$1" name="$2" run="$3" mode="$4" users="$5" biz="$6"; shift 6
  local dir="$OUT/$wl-$name-$run"; mkdir -p "$dir"
  "$LOADGEN" init --db "$dir/app.db" --users "$users" --businesses "$biz" > /dev/null || return 1
  start_server "$name" "$mode" "$dir/app.db" || { stop_server; return 1; }
  sleep 0.5
  local rss0; rss0=$(rss_kb "$SERVER_PID")
  # shellcheck disable=SC2046
  timeout 45 taskset -c "$CLIENT_CPU" "$LOADGEN" run --url "ws://127.0.0.1:$PORT/v1/ws" --secret "$SECRET" \
    --db "$dir/app.db" --label "$wl/$name" --connect-timeout 15 $(loadgen_flags "$name") "$@" > "$dir/loadgen.json" 2> "$dir/loadgen.err" &
  local lg=$!
  sample_rss "$lg" "$dir/rss.txt" &
  local sampler=$!
  wait "$lg"; local rc=$?
  wait "$sampler" 2>/dev/null
  local rss_max; rss_max=$(sort -n "$dir/rss.txt" | tail -1); rss_max=${rss_max:-0}
  local rss_end; rss_end=$(tail -1 "$dir/rss.txt"); rss_end=${rss_end:-0}
  # server CPU time (utime+stime, clock ticks, whole process tree)
  local cpu; cpu=$(cpu_ticks "$SERVER_PID")
  stop_server
  if [ $rc -ne 0 ] || [ ! -s "$dir/loadgen.json" ]; then
    log "$wl/$name run $run: loadgen failed (rc=$rc)"; tail -3 "$dir/loadgen.err" >&2
    emit "$wl" "$name" "$run" '{"failed": true}'; return 0
  fi
  local j; j=$(python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().splitlines()[-1]); d.update(rss0_kb=int(sys.argv[2]), rss_max_kb=int(sys.argv[3]), rss_end_kb=int(sys.argv[4]), server_cpu_s=int(sys.argv[5])/100); print(json.dumps(d))' "$dir/loadgen.json" "$rss0" "$rss_max" "$rss_end" "$cpu")
  emit "$wl" "$name" "$run" "$j"
  log "$wl/$name run $run: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print({k: d.get(k) for k in ("connections","events_per_s","p50_ms","p99_ms","p999_ms","max_ms","lost","errors","rss_max_kb")})' "$j")"
}

for run in $(seq 1 "$RUNS"); do
  # Alternate the order of the servers from run to run.
  order=$SERVERS; [ $((run % 2)) -eq 0 ] && order=$(echo $SERVERS | tr ' ' '\n' | tac | tr '\n' ' ')
  for wl in $WORKLOADS; do
    for name in $order; do
      case "$wl" in
        a) measure a "$name" "$run" user "$A_CONNS" 1 --conns "$A_CONNS" --per-user 1-3 --rate "$A_RATE" --duration "$DURATION" ;;
        b) measure b "$name" "$run" business "$B_CONNS" "$B_BUSINESSES" --conns "$B_CONNS" --businesses "$B_BUSINESSES" --rate "$B_RATE" --duration "$DURATION" ;;
        bmax) [ "$name" = fastapi ] && continue  # it cannot hold the connections (see a, b)
           measure bmax "$name" "$run" business "$B_CONNS" "$B_BUSINESSES" --conns "$B_CONNS" --businesses "$B_BUSINESSES" --rate "$BMAX_RATE" --duration "$DURATION" ;;
        c) [ "$name" = changecast-memory ] && continue  # the history store does not change idle memory
           measure c "$name" "$run" user "$C_CONNS" 1 --conns "$C_CONNS" --idle --hold 3 ;;
        d) [ "$name" = changecast ] || continue
           for n in $D_STEPS; do
             measure "d$n" "$name" "$run" user "$n" 1 --conns "$n" --idle --hold 2 \
               --bind 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4
           done ;;
        e) [ "$name" = fastapi ] && continue
           # The same load without (e0) and with 1% of the connections never reading (e).
           for stall in 0 0.01; do
             measure "e$( [ "$stall" = 0 ] && echo 0 )" "$name" "$run" business "$E_CONNS" "$B_BUSINESSES" --conns "$E_CONNS" \
               --businesses "$B_BUSINESSES" --rate "$E_RATE" --duration "$E_DURATION" --stall-fraction "$stall"
           done ;;
      esac
    done
  done
done

python3 "$ROOT/bench/report.py" "$RESULTS" | tee "$OUT/table.md"
# Put the table into BENCHMARKS.md between its markers (with the run's date and settings).
python3 - "$ROOT/BENCHMARKS.md" "$OUT/table.md" "RUNS=$RUNS SERVERS=\"$SERVERS\" WORKLOADS=\"$WORKLOADS\"" <<'PY'
import sys, datetime
path, table, settings = sys.argv[1], open(sys.argv[2]).read(), sys.argv[3]
start, end = "<!-- bench:table -->", "<!-- /bench:table -->"
try:
    doc = open(path).read()
except FileNotFoundError:
    doc = f"# Benchmarks\n\n{start}\n{end}\n"
if start in doc and end in doc:
    head, rest = doc.split(start, 1)
    tail = rest.split(end, 1)[1]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    doc = f"{head}{start}\nMeasured {stamp} by `bench/run.sh` ({settings}).\n{table}\n{end}{tail}"
    open(path, "w").write(doc)
PY
log "raw results: $RESULTS"
