#!/usr/bin/env bash
# Production soak: the deployment docs/DEPLOYMENT.md describes, run for DEALS_SOAK_SECONDS (CI: 600).
#   PostgreSQL (instance storage) + a gRPC code server + dagster-daemon + dagster-webserver,
#   both sensors turned on through the instance, against the simulator on a scaled clock.
# .ci/soak_check.py watches it, SIGKILLs one backfill run mid-page, and asserts and prints the figures.
# Usage: bash .ci/soak.sh            (from the repository root; needs `make install` and PostgreSQL installed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BIN="$ROOT/.venv/bin"
SOAK_SECONDS="${DEALS_SOAK_SECONDS:-600}"
TIME_SCALE="${DEALS_SOAK_TIME_SCALE:-600}"

PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
  echo "soak: PostgreSQL is not installed (.ci/run installs it: apt-get install -y postgresql)" >&2
  exit 2
fi

work="$(mktemp -d /tmp/deals-soak.XXXXXX)"
chmod 755 "$work"
pids=()
cleanup() {
  # End only what this script started: each service runs in its own process group (setsid), ended by id,
  # newest first; a group still alive after 15 s (a code server waiting on its gRPC child) is SIGKILLed.
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM -- "-${pids[i]}" 2>/dev/null || true; done
  for ((t=0; t<75; t++)); do
    alive=0; for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  if [ -f "$work/pg/postmaster.pid" ]; then runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/pg" -m fast stop >/dev/null || true; fi
  if [ "${DEALS_SOAK_KEEP:-0}" != 1 ]; then rm -rf "$work"; else echo "soak: kept $work"; fi
}
trap cleanup EXIT

free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what="$1" limit="$2"; shift 2
  for ((t=0; t<limit*5; t++)); do if "$@" >/dev/null 2>&1; then return 0; fi; sleep 0.2; done
  echo "soak: $what did not come up within ${limit}s" >&2; tail -n 50 "$work"/*.log >&2 || true; exit 1
}

# --- PostgreSQL: a throwaway cluster owned by the postgres user, trust auth on 127.0.0.1 only ---------
PG_PORT="$(free_port)"
mkdir -p "$work/pg" && chown postgres "$work/pg"
runuser -u postgres -- "$PG_BIN/initdb" -D "$work/pg" -U dagster --auth=trust >"$work/initdb.log"
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/pg" -l "$work/pg/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$work/pg" start >/dev/null
runuser -u postgres -- "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U dagster dagster
echo "soak: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT"

# --- Dagster instance: the project's dagster.yaml plus PostgreSQL storage -------------------------------
export DAGSTER_HOME="$work/dagster_home"
mkdir -p "$DAGSTER_HOME"
cp dagster_home/dagster.yaml "$DAGSTER_HOME/dagster.yaml"
cat >>"$DAGSTER_HOME/dagster.yaml" <<YAML

# Added by .ci/soak.sh: runs, event logs and schedules/sensors on PostgreSQL (docs/DEPLOYMENT.md).
storage:
  postgres:
    postgres_url: "postgresql+psycopg2://dagster@127.0.0.1:$PG_PORT/dagster"
YAML

# --- The simulator on a scaled clock, shared by every process through its env ---------------------------
setsid "$BIN/python" -m deals_pipeline.simulator.cli --port 0 --refill-rate 5 --time-scale "$TIME_SCALE" \
  --catalog-size "${DEALS_SOAK_CATALOG:-3000}" --drift-new-per-hour 30 --drift-updates-per-hour 60 \
  --ready-file "$work/simulator.json" >"$work/simulator.log" 2>&1 &
pids+=($!)
wait_for "the simulator" 60 test -s "$work/simulator.json"
eval "$("$BIN/python" -c '
import json, shlex, sys
info = json.load(open(sys.argv[1]))
for k, v in {**info["env"], "KEEPA_SIMULATOR_URL": info["base_url"]}.items():
    print(f"export {k}={shlex.quote(str(v))}")
' "$work/simulator.json")"
export DEALS_PIPELINE_MODE=simulator DEALS_DB_PATH="$work/soak.duckdb"
# 1440 timeline minutes = 144 real s at x600: a page run has time to finish its page on a busy CI box.
export DEALS_RUN_BUDGET_MINUTES="${DEALS_SOAK_RUN_BUDGET_MINUTES:-1440}"
# The longest wait in a pool slot is in timeline seconds: 120 s would be 0.2 real s at x600. Give 60 real s.
export DEALS_MAX_WAIT_IN_SLOT_S="${DEALS_SOAK_MAX_WAIT_IN_SLOT_S:-$((60 * TIME_SCALE))}"
export DEALS_BACKFILL_SENSOR_INTERVAL_S="${DEALS_SOAK_SENSOR_INTERVAL_S:-15}" DEALS_UPSERT_INTERVAL_S="${DEALS_SOAK_SENSOR_INTERVAL_S:-15}"
unset KEEPA_API_KEY
echo "soak: simulator $KEEPA_SIMULATOR_URL at 5 tokens/min, time x$TIME_SCALE"

# --- gRPC code server, daemon, webserver -----------------------------------------------------------------
GRPC_PORT="$(free_port)"
WEB_PORT="$(free_port)"
cat >"$work/workspace.yaml" <<YAML
load_from:
  - grpc_server:
      host: 127.0.0.1
      port: $GRPC_PORT
      location_name: deals_pipeline
YAML
setsid "$BIN/dagster" code-server start -h 127.0.0.1 -p "$GRPC_PORT" -m deals_pipeline.definitions \
  --location-name deals_pipeline >"$work/code_server.log" 2>&1 &
pids+=($!)
wait_for "the code server" 120 "$BIN/dagster" api grpc-health-check -h 127.0.0.1 -p "$GRPC_PORT"
setsid "$BIN/dagster-daemon" run -w "$work/workspace.yaml" >"$work/daemon.log" 2>&1 &
pids+=($!)
setsid "$BIN/dagster-webserver" -w "$work/workspace.yaml" -h 127.0.0.1 -p "$WEB_PORT" >"$work/webserver.log" 2>&1 &
pids+=($!)
wait_for "the webserver" 120 "$BIN/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$WEB_PORT/server_info', timeout=5)"
echo "soak: code server :$GRPC_PORT, daemon, webserver http://127.0.0.1:$WEB_PORT"

# --- Both sensors on, through the instance (what the UI's toggle does) -----------------------------------
"$BIN/dagster" sensor start -w "$work/workspace.yaml" deal_pages_sensor
"$BIN/dagster" sensor start -w "$work/workspace.yaml" recent_deals_sensor

"$BIN/python" .ci/soak_check.py --seconds "$SOAK_SECONDS" --webserver "http://127.0.0.1:$WEB_PORT" \
  --daemon-pid "${pids[2]}" --logs "$work"
