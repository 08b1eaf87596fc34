"""Free the `keepa_api` pool slot of runs whose process was killed.

A SIGKILLed run never reports its end, so it keeps its pool slot and every later run waits
forever. The daemon's run monitoring (``free_slots_after_run_end_seconds`` in dagster.yaml) cures
that for runs it launched, but `dagster asset materialize` runs without a daemon. So each run
records its pid and host in its tags when its resources start, and every run start (and sensor
tick) marks runs whose recorded process is gone as failed and frees their slots.
"""

import logging
import os
import socket

import dagster as dg

log = logging.getLogger(__name__)

PID_TAG = "deals_pipeline/pid"
HOST_TAG = "deals_pipeline/host"
LIVE_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (a killed child not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def register_run_process(instance: dg.DagsterInstance, run_id: str) -> None:
    instance.add_run_tags(run_id, {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})


def reap_dead_runs(instance: dg.DagsterInstance, *, current_run_id: str | None = None) -> list[str]:
    """Fail runs of this host whose process is gone and free their pool slots. Returns their ids."""
    host = socket.gethostname()
    reaped = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=LIVE_STATUSES), limit=50):
        run = record.dagster_run
        pid = run.tags.get(PID_TAG)
        if run.run_id == current_run_id or pid is None or run.tags.get(HOST_TAG) != host:
            continue
        if process_alive(int(pid)):
            continue
        instance.report_run_failed(run, f"run process {pid} is gone (killed); its keepa_api pool slot is freed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log.warning("freed the pool slot of run %s: its process %s is gone", run.run_id, pid)
        reaped.append(run.run_id)
    return reaped
