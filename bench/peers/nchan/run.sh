#!/usr/bin/env bash
# Starts the nginx + nchan peer: the companion (auth_request endpoint + orders feeder, Node)
# and nginx (master + one worker) with the config from nginx.conf.in, then waits. TERM/INT
# stop both; if either exits, the other is stopped too. The driver (bench/run.sh) starts
# this script pinned to the server core, so both processes inherit the pinning, and counts
# the CPU time and memory of this script's whole process tree.
#
# Env: PORT (subscribers), DB, SECRET, MODE (user|business), DIR (run directory: config, pid,
# logs, temp files; default: DB's directory). The companion's auth port is PORT+6000, the
# publisher's PORT+5000 (127.0.0.1 only, below the ephemeral port range).
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
: "${PORT:?}" "${DB:?}" "${SECRET:?}"
MODE="${MODE:-user}"
DIR="${DIR:-$(dirname "$DB")}/nchan"
PUB_PORT=$((PORT + 5000))
AUTH_PORT=$((PORT + 6000))

# The subscriber's channel (see nginx.conf.in): the user's, or the user's business's.
channel='user.$cc_user'
[ "$MODE" = business ] && channel='business.$cc_business'
mkdir -p "$DIR/tmp"
sed -e "s|@DIR@|$DIR|g" -e "s|@PORT@|$PORT|g" -e "s|@PUB_PORT@|$PUB_PORT|g" -e "s|@AUTH_PORT@|$AUTH_PORT|g" \
    -e "s|@CHANNEL@|$channel|g" "$HERE/nginx.conf.in" > "$DIR/nginx.conf"

AUTH_PORT=$AUTH_PORT PUB_PORT=$PUB_PORT DB="$DB" SECRET="$SECRET" MODE="$MODE" \
  node "$HERE/companion.js" &
comp=$!
ngx=""
stopping=0
stop() { stopping=1; kill -TERM $ngx $comp 2>/dev/null; }
trap stop TERM INT
# nginx only once the companion answers (auth_request needs it).
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$AUTH_PORT") 2>/dev/null && break
  kill -0 "$comp" 2>/dev/null || exit 1
  sleep 0.05
done
[ "$stopping" = 0 ] || { wait "$comp"; exit 0; }
nginx -p "$DIR" -c "$DIR/nginx.conf" -e "$DIR/error.log" &
ngx=$!

wait -n "$ngx" "$comp"
stop
while kill -0 "$ngx" 2>/dev/null || kill -0 "$comp" 2>/dev/null; do wait "$ngx" "$comp" 2>/dev/null; done
