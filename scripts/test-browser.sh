#!/usr/bin/env bash
# Installs what the browser tests need on a fresh Debian machine (Debian's Chromium, npm
# packages; never a downloaded browser), builds and unit-tests the JS client, builds
# changecast, and runs the activity page's browser tests against the real binary.
# Ends with `browser: N passed, M failed`; exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
LOG=$(mktemp -t changecast-browser-XXXXXX.log)
trap 'rm -f "$LOG"' EXIT

step() { echo "==> $*"; }
fail() {
  echo "error: $*" >&2
  echo "browser: 0 passed, 1 failed"
  exit 1
}

if [ ! -x /usr/bin/chromium ]; then
  step "installing chromium (apt)"
  [ "$(id -u)" = 0 ] || fail "/usr/bin/chromium is missing; run as root to install it with apt-get"
  timeout 600 apt-get update -qq || fail "apt-get update"
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null || fail "apt-get install chromium"
fi
command -v node >/dev/null && command -v npm >/dev/null || fail "node (>= 20) and npm are needed"
command -v sqlite3 >/dev/null || command -v python3 >/dev/null || fail "sqlite3 or python3 is needed"
if ! command -v sqlite3 >/dev/null; then
  [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq sqlite3 >/dev/null
  command -v sqlite3 >/dev/null || fail "sqlite3 is needed (apt-get install sqlite3)"
fi

step "npm ci (clients/js, tests/browser)"
(cd clients/js && timeout 300 npm ci --no-audit --no-fund) || fail "npm ci in clients/js"
(cd tests/browser && timeout 300 npm ci --no-audit --no-fund) || fail "npm ci in tests/browser"

step "client: build and unit tests"
(cd clients/js && timeout 300 npm test) || fail "client unit tests"

step "cargo build"
timeout 1200 cargo build --locked || fail "cargo build"

step "browser tests"
(cd tests/browser && CHANGECAST_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/changecast" timeout 900 node --test --test-concurrency=1 --test-reporter=spec *.test.mjs) 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
passed=$(sed -n 's/^[^0-9a-z]*pass \([0-9][0-9]*\).*/\1/p' "$LOG" | tail -1)
failed=$(sed -n 's/^[^0-9a-z]*fail \([0-9][0-9]*\).*/\1/p' "$LOG" | tail -1)
passed=${passed:-0}
failed=${failed:-0}
if [ "$rc" -ne 0 ] && [ "$failed" = 0 ]; then failed=1; fi
echo "browser: $passed passed, $failed failed"
[ "$rc" -eq 0 ] && [ "$failed" = 0 ] && [ "$passed" -gt 0 ]
