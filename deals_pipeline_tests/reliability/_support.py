"""Shared parts of the reliability suite: a simulator that records who was served what, worker
processes, and read-only views of the DuckDB file.

Everything here is real: the simulator is the product's HTTP server (subclassed only to record and,
when asked, to damage responses), workers are separate OS processes, the database is a DuckDB file.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import duckdb

from deals_pipeline.simulator import KeepaSimulator
from deals_pipeline.simulator.server import _Reply, _single
from deals_pipeline_tests.harness.processes import REPO, worker_env

SAMPLES = REPO.parent / "shared" / "keepa-samples"
FIRST_RUN = "run_2025-09-14T18-12Z_commit_b3f7397"

#: The backfill worker's default selection (harness/worker.py -> conftest.Stack.backfill).
BACKFILL_SORT = 4
#: The upserter's selection (conftest.Stack.updater).
UPSERT_SORT = 1


@dataclass(frozen=True)
class Served:
    """One request the simulator answered with HTTP 200 and charged."""

    seq: int
    who: str  # the key the request carried (workers get one key each)
    endpoint: str  # "deal" | "product"
    page: int | None
    sort_type: int | None
    asins: tuple[str, ...]
    tokens: int
    tokens_left: int  # the bucket right after this charge
    t: float


class RecordingSimulator(KeepaSimulator):
    """The product's simulator plus a log of every served (charged) /deal and /product request.

    Hooks (all optional, all under the simulator lock):

    * ``deal_429[page] = n``: answer the next ``n`` /deal requests for ``page`` with HTTP 429 (no charge),
      with the real envelope, exactly as the bucket would;
    * ``mutate_deal(body) -> body`` / ``mutate_product(body) -> body``: damage a served 200 body
      (a deep copy; the catalog's own dicts are never touched).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served: list[Served] = []
        self.deal_429: dict[int, int] = {}
        self.mutate_deal: Callable[[dict], Any] | None = None
        self.mutate_product: Callable[[dict], Any] | None = None
        self.hook_hits: dict[str, int] = {"deal_429": 0, "mutate_deal": 0, "mutate_product": 0}
        #: key -> time.monotonic() of the first request that carried it (any endpoint)
        self.first_contact: dict[str, float] = {}

    def _process(self, method: str, endpoint: str, params: dict, body: bytes) -> _Reply:
        key = _single(params, "key") or ""
        self.first_contact.setdefault(key, time.monotonic())
        return super()._process(method, endpoint, params, body)

    def _deal(self, method: str, params: dict, body: bytes, now: int) -> _Reply:
        try:
            sel = json.loads(_single(params, "selection") or "{}")
        except ValueError:
            sel = {}
        page = sel.get("page", 0) if isinstance(sel, dict) else None
        if isinstance(page, int) and self.deal_429.get(page, 0) > 0:
            self.deal_429[page] -= 1
            self.hook_hits["deal_429"] += 1
            return _Reply(429, self._envelope(now))
        reply = super()._deal(method, params, body, now)
        if reply.status == 200:
            self.served.append(Served(
                seq=len(self.served), who=_single(params, "key") or "", endpoint="deal", page=page,
                sort_type=sel.get("sortType"), asins=tuple(d["asin"] for d in reply.body["deals"]["dr"]),
                tokens=int(reply.body.get("tokensConsumed", 0)), tokens_left=int(reply.body.get("tokensLeft", 0)),
                t=time.monotonic(),
            ))
            if self.mutate_deal is not None:
                self.hook_hits["mutate_deal"] += 1
                _damage(reply, self.mutate_deal(copy.deepcopy(reply.body)))
        return reply

    def _product(self, params: dict, now: int) -> _Reply:
        reply = super()._product(params, now)
        if reply.status == 200:
            self.served.append(Served(
                seq=len(self.served), who=_single(params, "key") or "", endpoint="product", page=None,
                sort_type=None, asins=tuple(p["asin"] for p in reply.body["products"]),
                tokens=int(reply.body.get("tokensConsumed", 0)), tokens_left=int(reply.body.get("tokensLeft", 0)),
                t=time.monotonic(),
            ))
            if self.mutate_product is not None:
                self.hook_hits["mutate_product"] += 1
                _damage(reply, self.mutate_product(copy.deepcopy(reply.body)))
        return reply

    def served_log(self) -> list[Served]:
        with self._lock:
            return list(self.served)


def _damage(reply: _Reply, new_body: Any) -> None:
    """A mutator returns a new JSON value, or ``bytes`` for a body that is not JSON at all."""
    if isinstance(new_body, bytes):
        reply.raw = new_body
    else:
        reply.body = new_body


# -- worker processes ----------------------------------------------------------------------------


@dataclass
class WorkerRun:
    key: str
    args: list[str]
    proc: subprocess.Popen
    started: float
    log_path: Path
    kill_at: float | None = None
    killed: bool = False
    returncode: int | None = None
    ended: float | None = None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_worker(args: list[str], *, key: str, sim_url: str, db_path: Path, log_dir: Path,
                 extra_env: dict[str, str] | None = None) -> WorkerRun:
    """Start ``python -m deals_pipeline_tests.harness.worker <args>`` with its own key; output to a file."""
    log_path = log_dir / f"{key}.log"
    out = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deals_pipeline_tests.harness.worker", *args],
            cwd=REPO, env=worker_env(sim_url, db_path, key=key, extra=extra_env),
            stdout=out, stderr=subprocess.STDOUT,
        )
    finally:
        out.close()
    return WorkerRun(key=key, args=args, proc=proc, started=time.monotonic(), log_path=log_path)


def sigkill(run: WorkerRun) -> None:
    """SIGKILL one worker we started (by its pid) and reap it."""
    if run.proc.poll() is None:
        run.proc.kill()
        run.killed = True
    run.returncode = run.proc.wait()
    run.ended = time.monotonic()
    # A worker that exited on its own in the same instant was not killed.
    if run.returncode != -9:
        run.killed = False


# -- the database ----------------------------------------------------------------------------------


def query(db_path: Path, sql: str, params: list | None = None) -> list[tuple]:
    """One read on the DuckDB file (only call it when no worker is running)."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def match_ledger(db_path: Path, runs: list["WorkerRun"], served: list[Served]) -> tuple[dict[int, bool], int]:
    """Pair every served request with its ledger row: ``({seq: committed}, tokens charged but never recorded)``.

    Each ``budget.call`` is one ledger row owned by ``worker:<pid>``, reserved before the request and in
    the same order as that process's served requests (a 429 is 'released': not served, not counted; these
    runs have no other faults). A killed process may own one more row (reserved,
    never sent). A row still 'reserved' was never committed: a chunk's rows, done mark and settle share
    one transaction. A row whose ``actual`` is NULL belongs to a response the process died before
    recording; any other row must hold exactly what the simulator charged.
    """
    rows: dict[str, list[tuple]] = {}
    for owner, state, actual in query(db_path, "SELECT owner, state, actual FROM token_ledger "
                                               "WHERE purpose IN ('deal_page', 'product') AND state <> 'released' "
                                               "ORDER BY created_ms, rowid"):
        rows.setdefault(owner, []).append((state, actual))
    committed: dict[int, bool] = {}
    unrecorded = 0
    for run in runs:
        mine = [s for s in served if s.who == run.key]
        states = rows.get(f"worker:{run.proc.pid}", [])
        assert len(states) - len(mine) in ((0, 1) if run.killed else (0,)), (run.key, len(states), len(mine))
        for s, (state, actual) in zip(mine, states):
            committed[s.seq] = state == "settled"
            assert run.killed or state == "settled", (run.key, s.seq, state)
            if actual is None:
                unrecorded += s.tokens
            else:
                assert actual == s.tokens, (run.key, s.seq, actual, s.tokens)
    return committed, unrecorded


def deals_snapshot(db_path: Path) -> dict[str, tuple]:
    """Every stored deal row (all columns, as text), by ASIN."""
    rows = query(db_path, "SELECT asin, * EXCLUDE (asin) FROM deals ORDER BY asin")
    return {r[0]: tuple("" if v is None else str(v) for v in r[1:]) for r in rows}


class Lane:
    """Consecutive workers of one kind, each SIGKILLed at a random moment (or left to finish).

    Kill moments: with probability ``p_startup`` uniformly in ``startup_window_s`` after the process
    started (imports, DuckDB open/WAL replay, migration check, /token sync); otherwise uniformly in
    ``work_window_s`` after the simulator first heard from the process (``first_contact``), i.e.
    while it works. Process startup here is 1.3-2.5 s (imports incl. pandas/duckdb, two cores shared),
    so anchoring on the first request is what "1-3 s after start with a ~1 s startup" intends.
    """

    def __init__(self, name: str, args: list[str], *, sim_url: str, db_path: Path, log_dir: Path,
                 rng: Any, first_contact: dict[str, float] | None = None,
                 work_window_s: tuple[float, float] = (0.0, 2.0), startup_window_s: tuple[float, float] = (0.3, 1.5),
                 p_startup: float = 0.1, give_up_s: float = 8.0, kill: bool = True,
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.sim_url = sim_url
        self.db_path = db_path
        self.log_dir = log_dir
        self.rng = rng
        self.first_contact = first_contact if first_contact is not None else {}
        self.work_window_s = work_window_s
        self.startup_window_s = startup_window_s
        self.p_startup = p_startup
        self.give_up_s = give_up_s
        self.kill = kill
        self.extra_env = extra_env
        self.runs: list[WorkerRun] = []
        self.current: WorkerRun | None = None
        self.startup_kills = 0

    def step(self, now: float, *, may_start: bool = True) -> None:
        run = self.current
        if run is None:
            if may_start:
                run = start_worker(self.args, key=f"{self.name}-{len(self.runs):03d}", sim_url=self.sim_url,
                                   db_path=self.db_path, log_dir=self.log_dir, extra_env=self.extra_env)
                if self.kill and self.rng.random() < self.p_startup:
                    run.kill_at = run.started + self.rng.uniform(*self.startup_window_s)
                    self.startup_kills += 1
                self.runs.append(run)
                self.current = run
            return
        if self.kill and run.kill_at is None:
            contact = self.first_contact.get(run.key)
            if contact is not None:
                run.kill_at = contact + self.rng.uniform(*self.work_window_s)
            elif now - run.started > self.give_up_s:
                run.kill_at = now
        if run.proc.poll() is not None:
            run.returncode = run.proc.returncode
            run.ended = now
            self.current = None
        elif run.kill_at is not None and now >= run.kill_at:
            sigkill(run)
            self.current = None

    def stop(self) -> None:
        if self.current is not None:
            sigkill(self.current)
            self.current = None

    @property
    def kills(self) -> int:
        return sum(1 for r in self.runs if r.killed)


def run_lanes(lanes: list[Lane], *, until: Callable[[], bool], max_wall_s: float, poll_s: float = 0.02) -> float:
    """Drive the lanes until ``until()`` or ``max_wall_s``; then SIGKILL whatever still runs."""
    t0 = time.monotonic()
    try:
        while not until() and time.monotonic() - t0 < max_wall_s:
            now = time.monotonic()
            for lane in lanes:
                lane.step(now)
            time.sleep(poll_s)
    finally:
        for lane in lanes:
            lane.stop()
    return time.monotonic() - t0


def backfill_job(resources: dict) -> Any:
    """``deal_pages_job`` resolved with the given resources (as ``definitions.py`` does with the defaults)."""
    import dagster as dg

    from deals_pipeline.defs.deal_pages import deal_pages, deal_pages_job

    defs = dg.Definitions(assets=[deal_pages], jobs=[deal_pages_job], resources=resources,
                          executor=dg.in_process_executor)
    return defs.resolve_job_def(deal_pages_job.name)


class Looper(threading.Thread):
    """Call ``fn`` in a loop until stopped; keeps every outcome (or exception) in order."""

    def __init__(self, fn: Callable[[], Any], *, pause_s: float = 0.0, name: str = "looper") -> None:
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.pause_s = pause_s
        self.outcomes: list[Any] = []
        self.errors: list[BaseException] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.outcomes.append(self.fn())
            except BaseException as exc:  # noqa: BLE001 - the test asserts on them
                self.errors.append(exc)
            self._halt.wait(self.pause_s)

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=60)
