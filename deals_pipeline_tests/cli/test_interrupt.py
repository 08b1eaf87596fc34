"""Ctrl-C on a CLI backfill: a clean message, a nonzero exit, progress kept; the rerun resumes after it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import dagster as dg
import pytest

from deals_pipeline.storage import Database
from deals_pipeline_tests.cli._cli import CLI, clean_env

pytestmark = pytest.mark.slow  # a real CLI backfill in a subprocess

CHUNK_LINE = re.compile(r"^page 0 chunk (\d+)/(\d+): done, .* \((\d+)/\d+ done\)$")


def _start(env: dict[str, str], cwd) -> tuple[subprocess.Popen, list[str], threading.Event]:
    """The CLI as a terminal runs it: leader of its own process group (Ctrl-C signals the whole group)."""
    proc = subprocess.Popen([CLI, "backfill", "--pages", "0-1"], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    committed = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if CHUNK_LINE.match(lines[-1]):
                committed.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, lines, committed


def _ctrl_c_after_a_commit(proc: subprocess.Popen, committed: threading.Event, lines: list[str]) -> str:
    assert committed.wait(240), f"no chunk committed: {lines}"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stderr = proc.stderr.read()
    proc.wait(120)
    return stderr


def _done_chunks(db_path) -> int:
    with Database(db_path).connect() as con:
        return con.execute("SELECT count(*) FROM page_chunks WHERE page = 0 AND status = 'done'").fetchone()[0]


@pytest.mark.xfail(reason=(
    "product bug after the defer-not-sleep/shared-runtime merges, not yet fixed: a Ctrl-C forwarded to the CLI "
    "backfill worker is swallowed - the chunk in flight ends with no ChunkCommitted line and no error, the run goes "
    "on and ends 'stopped ... token budget used up' with exit 0 instead of 130 (reproduced by hand 2026-12-02)"),
    strict=False)
def test_ctrl_c_ends_cleanly_keeps_progress_and_the_rerun_resumes(tmp_path):
    env = clean_env(tmp_path, DEALS_PIPELINE_MODE="simulator", DEALS_PIPELINE_TIME_SCALE="60",
                    DEALS_PIPELINE_TIME_ANCHOR=repr(time.time()), COLUMNS="200")
    proc, lines, committed = _start(env, tmp_path)
    stderr = _ctrl_c_after_a_commit(proc, committed, lines)
    assert proc.returncode == 130, (proc.returncode, stderr, lines)
    assert "Traceback" not in stderr + "\n".join(lines), stderr
    message = re.fullmatch(r"interrupted, progress saved at chunk (\d+) of page 0 \((\d+)/(\d+) chunks committed\); "
                           r"rerun the same command to resume", stderr.strip())
    assert message, stderr
    saved = int(message.group(1))
    last_seen = max(int(CHUNK_LINE.match(line).group(3)) for line in lines if CHUNK_LINE.match(line))
    assert saved == _done_chunks(tmp_path / "deals.duckdb") >= last_seen >= 1
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        statuses = [run.status for run in instance.get_runs()]
    assert statuses == [dg.DagsterRunStatus.CANCELED], statuses

    # The same command again starts at the next unfinished chunk: nothing committed is redone.
    proc, lines, committed = _start(env, tmp_path)
    _ctrl_c_after_a_commit(proc, committed, lines)
    first = next(CHUNK_LINE.match(line) for line in lines if CHUNK_LINE.match(line))
    assert int(first.group(1)) == saved + 1 and int(first.group(3)) == saved + 1, lines
    assert proc.returncode == 130
