#!/usr/bin/env bash
# A newcomer on a fresh checkout, as the README's quick start says: `make demo`, then `make status` must report
# the demo's data and `make ui`'s webserver must list the demo's runs, materialized partitions and checks.
# Usage: .ci/newcomer.sh [REPO]   (default: this checkout; a fresh clone of its committed HEAD is used)
set -euo pipefail
repo="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
work="$(mktemp -d)"
ui_pid=""
cleanup() {
  # `make ui` leads its own process group (setsid): stop the whole group (dagster dev, webserver, daemon, code
  # servers), and kill what is still there after 30 s (dagster dev does not always exit on a signal).
  if [ -n "$ui_pid" ]; then
    kill -TERM -- "-$ui_pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 -- "-$ui_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$ui_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
# Nothing from the caller's setup: a newcomer has none of it.
unset DAGSTER_HOME DEALS_DB_PATH KEEPA_API_KEY DEALS_PIPELINE_MODE KEEPA_SIMULATOR_URL \
      DEALS_PIPELINE_TIME_SCALE DEALS_PIPELINE_TIME_ANCHOR DEALS_RUN_BUDGET_MINUTES DEALS_MAX_WAIT_IN_SLOT_S
git clone --quiet "$repo" "$work/checkout"
cd "$work/checkout"

echo "newcomer\$ make demo"
make demo

echo "newcomer\$ make status"
make status | tee "$work/status.txt"
if grep -q "no database" "$work/status.txt"; then echo "newcomer: make status did not find the demo" >&2; exit 1; fi
.venv/bin/deals-pipeline status --json > "$work/status.json"
.venv/bin/python - "$work/status.json" <<'PY'
import json, sys
health = json.load(open(sys.argv[1]))
assert health["deals"]["stored"] > 0 and health["backfill"]["chunks_done"] > 0, health
assert health["clock"]["description"].startswith("simulated x600"), health["clock"]
print(f"newcomer: make status reports the demo: {health['deals']['stored']} deals, "
      f"{health['backfill']['chunks_done']} chunks, clock {health['clock']['description']}")
PY

port="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
echo "newcomer\$ make ui UI_PORT=$port"
setsid make ui UI_PORT="$port" > "$work/ui.log" 2>&1 &
ui_pid=$!
.venv/bin/python .ci/newcomer_check.py "http://127.0.0.1:$port" || { tail -40 "$work/ui.log" >&2; exit 1; }
echo "newcomer: ok"
