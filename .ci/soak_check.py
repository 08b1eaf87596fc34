"""Watch the soak deployment (.ci/soak.sh), inject a SIGKILL, then assert and print the figures.

Everything is read from the Dagster instance (PostgreSQL) while the deployment runs, and from the
DuckDB file only after the daemon is stopped and the last runs ended (one process at a time).
Waits are for events (a run started, a chunk committed, a run marked failed), each with a generous
timeout; the soak's length is the only clock, and no figure is a timing assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import dagster as dg
import duckdb
from dagster._core.scheduler.instigation import InstigatorType, TickStatus

PID_TAG = "deals_pipeline/pid"
LIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
RUNNING = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
SENSORS = ("deal_pages_sensor", "recent_deals_sensor", "maintenance_sensor")


def log(message: str) -> None:
    print(f"soak [{time.strftime('%H:%M:%S')}]: {message}", flush=True)


def wait_for(predicate, *, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise SystemExit(f"soak FAILED: timed out after {timeout_s:.0f}s waiting for {what}")


def runs(instance: dg.DagsterInstance, **filters) -> list[dg.DagsterRun]:
    return [r.dagster_run for r in instance.get_run_records(dg.RunsFilter(**filters), limit=10_000)]


def is_page_run(run: dg.DagsterRun) -> bool:
    return run.job_name == "deal_pages_job" or (run.asset_selection is not None
                                                and dg.AssetKey("deal_pages") in run.asset_selection)


def committed_chunks(instance: dg.DagsterInstance, run_id: str) -> int:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION)
    return sum(1 for e in events
               if "chunk_status" in e.dagster_event.event_specific_data.asset_observation.metadata)


def kill_a_page_run_mid_way(instance: dg.DagsterInstance) -> tuple[str, float]:
    """SIGKILL the process of a backfill run once it has committed a chunk (an event, not a delay)."""
    def victim():
        for run in runs(instance, statuses=[dg.DagsterRunStatus.STARTED]):
            if is_page_run(run) and PID_TAG in run.tags and committed_chunks(instance, run.run_id) >= 1:
                return run
        return None

    run = wait_for(victim, timeout_s=300, what="a backfill run that committed a chunk")
    pid = int(run.tags[PID_TAG])
    os.kill(pid, signal.SIGKILL)
    log(f"SIGKILLed run {run.run_id[:8]} (page {run.tags.get('dagster/partition')}, pid {pid}) "
        f"after {committed_chunks(instance, run.run_id)} committed chunks")
    return run.run_id, time.time()


def sensor_ticks(instance: dg.DagsterInstance) -> dict[str, Counter]:
    ticks: dict[str, Counter] = {}
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        name = state.origin.instigator_name
        if name not in SENSORS:
            continue
        counter = ticks.setdefault(name, Counter())
        for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=100_000):
            counter[tick.status.value] += 1
            if tick.status == TickStatus.FAILURE:
                counter["errors:" + (tick.error.message.splitlines()[0][:160] if tick.error else "?")] += 1
            if tick.status == TickStatus.SKIPPED and tick.skip_reason and "locked" in tick.skip_reason:
                counter["skipped_db_busy"] += 1
    return ticks


def run_failure_text(instance: dg.DagsterInstance, run_id: str) -> str:
    texts = []
    for event in instance.all_logs(run_id, of_type={dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.STEP_FAILURE}):
        texts.append(event.message or "")
        data = event.dagster_event.event_specific_data
        error = getattr(data, "error", None)
        if error is not None:
            texts.append(error.to_string())
    return "\n".join(texts)


def duckdb_figures(path: str) -> dict[str, int]:
    con = duckdb.connect(path, read_only=True)
    try:
        return {
            "pages_complete": con.execute("SELECT count(*) FROM page_summaries WHERE status = 'complete'").fetchone()[0],
            "chunks_done": con.execute("SELECT count(*) FROM page_chunks WHERE status = 'done'").fetchone()[0],
            "deals_stored": con.execute("SELECT count(*) FROM deals").fetchone()[0],
            "upsert_runs_complete": con.execute(
                "SELECT count(*) FROM upsert_runs WHERE status IN ('complete', 'nothing_new')").fetchone()[0],
            "upsert_deals_new": con.execute("SELECT coalesce(sum(deals_new), 0) FROM upsert_runs").fetchone()[0],
            "upsert_deals_updated": con.execute("SELECT coalesce(sum(deals_updated), 0) FROM upsert_runs").fetchone()[0],
        }
    finally:
        con.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, required=True, help="soak length (real seconds)")
    parser.add_argument("--webserver", required=True)
    parser.add_argument("--daemon-pid", type=int, required=True)
    parser.add_argument("--logs", required=True, help="folder of the deployment's logs")
    args = parser.parse_args()
    started = time.time()
    end = started + args.seconds
    failures: list[str] = []

    with dg.DagsterInstance.get() as instance:
        log(f"instance storage: {type(instance.run_storage).__name__}; soaking for {args.seconds:.0f}s")
        killed_run_id, killed_at = kill_a_page_run_mid_way(instance)
        wait_for(lambda: instance.get_run_by_id(killed_run_id).status == dg.DagsterRunStatus.FAILURE,
                 timeout_s=300, what="the killed run to be marked failed (reaped)")
        log("the killed run was reaped (FAILURE, pool slot freed)")
        wait_for(lambda: any(is_page_run(r) and r.run_id != killed_run_id
                             and (instance.get_run_record_by_id(r.run_id).create_timestamp.timestamp() > killed_at)
                             for r in runs(instance)),
                 timeout_s=300, what="a backfill run launched after the kill (the sensors carry on)")
        log("a backfill run was launched after the kill: the sensors carried on")
        while time.time() < end:
            time.sleep(min(30.0, max(0.0, end - time.time())))
            done = runs(instance, statuses=[dg.DagsterRunStatus.SUCCESS])
            log(f"{time.time() - started:.0f}s: {len(done)} runs succeeded, "
                f"{len(runs(instance, statuses=[dg.DagsterRunStatus.FAILURE]))} failed")
        with urllib.request.urlopen(f"{args.webserver}/server_info", timeout=30) as response:
            webserver_ok = response.status == 200

        # Stop launching, then let the runs in flight end (each stops at its run budget).
        os.kill(args.daemon_pid, signal.SIGTERM)
        log("daemon stopped; waiting for the runs in flight to end")
        # Queued runs stay queued without the daemon: only launched ones are waited for.
        wait_for(lambda: not runs(instance, statuses=RUNNING), timeout_s=600, what="the last runs to end")

        all_runs = runs(instance)
        status_by_job = Counter((("deal_pages" if is_page_run(r) else "recent_deals"), r.status.value) for r in all_runs)
        failed = [r for r in all_runs if r.status == dg.DagsterRunStatus.FAILURE and r.run_id != killed_run_id]
        lock_failures = [r.run_id for r in all_runs if r.status == dg.DagsterRunStatus.FAILURE
                         and ("locked" in run_failure_text(instance, r.run_id)
                              or "DatabaseBusy" in run_failure_text(instance, r.run_id))]
        failed_texts = {r.run_id: run_failure_text(instance, r.run_id)[-1500:] for r in failed[:3]}
        ticks = sensor_ticks(instance)
        materialized_pages = instance.get_materialized_partitions(dg.AssetKey("deal_pages"))
        upsert_materializations = len(instance.fetch_materializations(dg.AssetKey("recent_deals"), limit=10_000).records)
        upsert_observations = len(instance.fetch_observations(dg.AssetKey("recent_deals"), limit=10_000).records)

    db = duckdb_figures(os.environ["DEALS_DB_PATH"])
    tick_errors = sum(c.get("FAILURE", 0) for c in ticks.values())
    figures = {
        "soak_seconds": round(time.time() - started),
        "ticks": {name: {k: v for k, v in c.items() if not k.startswith("errors:")} for name, c in ticks.items()},
        "tick_errors": tick_errors,
        "runs": {f"{job}:{status}": n for (job, status), n in sorted(status_by_job.items())},
        "failed_runs_besides_the_killed_one": len(failed),
        "duckdb_lock_failures": len(lock_failures),
        "pages_materialized": len(materialized_pages),
        "recent_deals_materializations": upsert_materializations,
        "recent_deals_observations_not_up_to_date": upsert_observations,
        **db,
        "webserver_ok": webserver_ok,
    }
    print("SOAK FIGURES " + json.dumps(figures, sort_keys=True), flush=True)

    if tick_errors:
        failures.append(f"{tick_errors} sensor tick errors: "
                        + "; ".join(k for c in ticks.values() for k in c if k.startswith("errors:")))
    if failed:
        for run_id, text in failed_texts.items():
            print(f"--- failed run {run_id}:\n{text}", file=sys.stderr)
        failures.append(f"{len(failed)} failed runs besides the killed one: {[r.run_id[:8] for r in failed[:5]]}")
    if lock_failures:
        failures.append(f"DuckDB lock failures in runs {lock_failures[:5]}")
    # The killed page is completed by a later run, and the backfill moves on: one page per 5 soak minutes.
    pages_expected = max(1, int(args.seconds // 300))
    if db["pages_complete"] < pages_expected or len(materialized_pages) < pages_expected:
        failures.append(f"the backfill advanced {db['pages_complete']} pages, expected >= {pages_expected}")
    if db["upsert_runs_complete"] < 2:
        failures.append("fewer than two upsert runs completed")
    if not all(name in ticks for name in SENSORS):
        failures.append(f"a sensor never ticked: {sorted(ticks)}")
    if not webserver_ok:
        failures.append("the webserver did not answer")
    if failures:
        print("soak FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        for name in ("daemon.log", "code_server.log"):
            path = Path(args.logs) / name
            if path.exists():
                print(f"--- tail of {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]),
                      file=sys.stderr)
        return 1
    log("soak passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
