# Sourced by bench/run.sh, bench/profile.sh and bench/quick.sh: the changecast config of the
# benchmark workloads.
# changecast_toml MODE DB PORT STORE HISTORY_PATH: a changecast config on stdout, with
# $SECRET as the JWT secret and, when $WRITE_DELAY is set, that `server.write_delay`.
# MODE user: each order to its creator; business: to every user of the creator business.
changecast_toml() {
  local mode="$1" db="$2" port="$3" store="$4" history="$5" to='"$creator_id"'
  [ "$mode" = business ] && to='{ lookup = "users", where = { business_id = "$creator_id" }, pick = "_id", many = true }'
  cat <<TOML
[server]
listen = "127.0.0.1:$port"
${WRITE_DELAY:+write_delay = \"$WRITE_DELAY\"}
[source]
type = "sqlite"
path = "$db"
[auth]
jwt_secret = "$SECRET"
user = { claim = "sub" }
[history]
store = "$store"
path = "$history"
[[route]]
name = "orders"
collection = "orders"
on = ["insert"]
to = $to
TOML
}
