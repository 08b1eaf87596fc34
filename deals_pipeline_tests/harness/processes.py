"""Worker processes for kill and contention tests, and kills at EVENTS, never after a random sleep.

A kill test asks for ``n`` kills; each kill lands once the process reached a chosen point of its
work, observed from outside: the simulator's request counter (in this process) or a row in the
DuckDB file (read-only, retried while the worker holds the file). Each run's outcome is counted, so
a test compares the kills it actually made with the kills it asked for. On a busy machine the
process just takes longer to reach the event; the generous timeout only catches a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import duckdb

from deals_pipeline_tests.harness.waiting import GENEROUS_TIMEOUT_S, wait_for

REPO = Path(__file__).resolve().parents[2]


def worker_env(sim_url: str, db_path: Path, *, key: str = "worker-key", extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a pipeline process under test: this simulator and DB file, its own key, no real
    key, no scaled clock unless ``extra`` sets one, and this checkout importable (harness.worker)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KEEPA_API_KEY", "DEALS_PIPELINE_TIME_SCALE", "DEALS_PIPELINE_TIME_ANCHOR", "SELECTION")}
    env.update({
        "SIM_URL": sim_url,
        "DEALS_DB_PATH": str(db_path),
        "SIM_KEY": key,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    })
    env.update(extra or {})
    return env


@dataclass
class KillTally:
    """What a kill loop did: kills asked for and made, and runs that finished on their own."""

    asked: int = 0
    made: int = 0
    finished: int = 0
    events: list[str] = field(default_factory=list)  # the event each run was to be killed at, in order

    @property
    def runs(self) -> int:
        return self.made + self.finished


def peek(db_path: Path, sql: str, params: list | None = None) -> list[tuple] | None:
    """One read-only query on a DuckDB file another process may be writing; None while it is busy.

    While a process holds the file read-write every other open fails, so an observer just tries again
    at its next poll (a miss costs nothing; the worker's own opens retry for up to a minute).
    """
    if not Path(db_path).exists():
        return None
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error:  # locked by the writer (IOException), or caught mid-creation by a first process
        return None
    try:
        return con.execute(sql, params or []).fetchall()
    except duckdb.CatalogException:
        return None  # the schema is not there yet (the first process is still migrating)
    finally:
        con.close()


def done_chunks(db_path: Path) -> int | None:
    """How many backfill chunks are committed as done (None while the file is busy or not migrated)."""
    rows = peek(db_path, "SELECT count(*) FROM page_chunks WHERE status = 'done'")
    return None if rows is None else int(rows[0][0])


def product_requests(sim) -> int:
    """How many /product requests the in-process simulator has received (any outcome)."""
    return int(sim.stats().requests.get("product", 0))


def run_and_kill_at(cmd: Sequence[str], env: dict[str, str], *, event: Callable[[], bool], what: str,
                    timeout: float = GENEROUS_TIMEOUT_S, poll_s: float = 0.05) -> bool:
    """Start ``cmd`` and SIGKILL it as soon as ``event()`` holds; True if it was killed.

    ``poll_s``: pause between checks; an event read from the DuckDB file should poll slower (0.2 s)
    than the worker commits, or the observer's opens take the file lock from the worker.

    False when the process exited on its own first (it must then have succeeded, or the test fails
    with its stderr). A process that exits in the instant between the event and the signal counts
    as finished, not as a kill.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: proc.poll() is not None or event(), timeout, f"{what} (or the process exiting)",
                     poll_s=poll_s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            returncode = proc.wait()
        finally:
            if proc.poll() is None:  # the wait timed out: never leave the process running
                proc.kill()
                proc.wait()
        if returncode == -signal.SIGKILL:
            return True
        err.seek(0)
        assert returncode == 0, err.read().decode(errors="replace")[-3000:]
        return False


def run_to_completion(cmd: Sequence[str], env: dict[str, str], *, timeout: float = 900.0) -> None:
    """Run ``cmd`` until it exits; it must succeed. ``timeout`` is a hang guard only (a Dagster page run
    needed more than 300 s at a load average of ~30 on 2 cores)."""
    done = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
