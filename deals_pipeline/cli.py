"""`deals-pipeline`: init, status (System Health), backfill a page range, demo, simulator,
query the published copy.

Every command uses the same state as `make ui` and `dagster asset materialize`: the Dagster instance in
``DAGSTER_HOME`` (default ``./dagster_home``) and the DuckDB file in ``DEALS_DB_PATH`` (default
``data/deals.duckdb``); a value the user set wins. Usage and configuration errors end with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from deals_pipeline.config import ENV_DB_PATH, ENV_MODE, ENV_SIMULATOR_URL, MAX_PAGE
from deals_pipeline.keepa.errors import ConfigError

PROG = "deals-pipeline"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: The demo hands the simulator its strict key through this variable (never on a command line).
SIMULATOR_KEY_ENV = "DEALS_SIMULATOR_EXPECTED_KEY"


class UsageError(ConfigError):
    """A bad command-line value (one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``deals-pipeline backfill: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def parse_pages(text: str) -> list[int]:
    """``"0-9"``, ``"0,1,5"`` or ``"2-3,7"`` -> pages in order. Raises UsageError naming the bad part."""
    pages: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise UsageError(f"--pages {text!r}: {part!r} is not a page or a range like 2-3 "
                             f"(pages are 0-{MAX_PAGE})") from None
        if first > last:
            raise UsageError(f"--pages {text!r}: range {part!r} runs backwards")
        pages.extend(range(first, last + 1))
    if not pages:
        raise UsageError(f"--pages {text!r} names no page (pages are 0-{MAX_PAGE}, e.g. 0-9 or 0,1,5)")
    bad = sorted({p for p in pages if not 0 <= p <= MAX_PAGE})
    if bad:
        raise UsageError(f"--pages {text!r}: page {bad[0]} does not exist: Keepa serves deal pages 0-{MAX_PAGE} "
                         f"(one partition each)")
    return pages


# ---------------------------------------------------------------------------------------------
# init / status
# ---------------------------------------------------------------------------------------------


def _resources() -> dict[str, Any]:
    """The definitions' resources with their EnvVars resolved: outside a Dagster run nothing resolves them, so an
    unresolved field would hold the variable's NAME (e.g. mode 'DEALS_PIPELINE_MODE'). Rebuilt from the values,
    so each resource's own validation gives its typed error for a bad value."""
    from dagster._config.field_utils import EnvVar, IntEnvVar  # IntEnvVar is what dg.EnvVar.int returns

    from deals_pipeline.defs.resources import default_resources

    def value(field: object) -> object:
        if isinstance(field, EnvVar):
            return os.environ[field.env_var_name]
        if isinstance(field, IntEnvVar):
            raw = os.environ[field.env_var_name]
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"{field.env_var_name} must be an integer, got {raw!r}") from None
        return field

    resources = {name: type(resource)(**{key: value(getattr(resource, key)) for key in type(resource).model_fields})
                 for name, resource in default_resources().items()}
    resources["keepa"].check_domain()  # before any mode or database question, so even `status` refuses it
    return resources


def _mode(resources: dict[str, Any], *, required: bool) -> str | None:
    """'keepa' or 'simulator'; None when no mode can be resolved and none is ``required``."""
    try:
        return resources["keepa"].data_mode()
    except ConfigError:
        if required:
            raise
        return None


def create_database(path: Path, mode: str) -> bool:
    """Create (migrate) the database at ``path`` for ``mode`` and record its clock. False if it existed."""
    from deals_pipeline.clock import clock_for_database, clock_from_env
    from deals_pipeline.storage.db import Database

    existed = path.exists()
    db = Database(path, data_mode=mode)
    clock_for_database(db, clock_from_env())
    return not existed


def cmd_init(args: argparse.Namespace) -> int:
    """Create the database a real-API run may then use (it is never created implicitly in that mode)."""
    from deals_pipeline.clock import clock_for_database, clock_from_env, describe_clock
    from deals_pipeline.state_paths import database_path
    from deals_pipeline.storage.db import Database

    path = database_path(args.db)
    mode = args.mode or _mode(_resources(), required=False) or "keepa"
    created = create_database(path, mode)
    clock = clock_for_database(Database(path, data_mode=mode), clock_from_env())
    print(f"{'created' if created else 'already there, left as it is:'} {path} ({mode} data, {describe_clock(clock)})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deals_pipeline.clock import clock_for_database, clock_from_env
    from deals_pipeline.state_paths import database_path
    from deals_pipeline.status import collect_health
    from deals_pipeline.storage import DatabaseBusy
    from deals_pipeline.storage.db import Database

    resources = _resources()  # validates the environment (e.g. KEEPA_DOMAIN) like every run does
    path = database_path(args.db or resources["database"].path)
    if not path.exists():
        print(f"{PROG}: no database at {path} yet (run `make demo`, or `{PROG} init`, or set {ENV_DB_PATH})",
              file=sys.stderr)
        return 1
    db = Database(path, busy_timeout_s=args.busy_timeout)
    try:
        clock = clock_for_database(db, clock_from_env())
        budget = resources["token_budget"].budget(db, clock, owner="status")
        health = collect_health(db, budget, clock)
    except DatabaseBusy as busy:
        print(f"{PROG}: the database is busy (a run is writing); tried for {args.busy_timeout:.0f}s: {busy}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(health, indent=2, default=str))
    else:
        from deals_pipeline.status_view import render

        render(health, str(path))
    return 0


# ---------------------------------------------------------------------------------------------
# backfill
# ---------------------------------------------------------------------------------------------


def _quiet_run_config() -> dict[str, Any]:
    """Dagster's console logger silenced: the CLI prints one line per chunk, per wait and per failure itself
    (the full step logs are in the run's event log, shown by `make ui`)."""
    return {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def _failure(result: Any) -> tuple[bool, str]:
    """(interrupted by Ctrl-C?, first line of the first step error) of a failed in-process run."""
    for event in result.all_events:
        if event.is_step_failure:
            chain = [event.event_specific_data.error]
            while chain[-1].cause is not None:
                chain.append(chain[-1].cause)
            if {e.cls_name for e in chain} & {"DagsterExecutionInterruptedError", "KeyboardInterrupt"}:
                return True, "interrupted"
            root = chain[-1]  # the pipeline's own error, not Dagster's "error occurred while executing" wrapper
            text = root.message.strip().splitlines()[0] if root.message else root.cls_name
            return False, f"{event.step_key}: {text}"
    return False, "the run failed (see its event log in `make ui`)"


def _page_progress(db_path: Path, page: int) -> tuple[int, int]:
    """(chunks done, chunks total) of ``page`` as committed in the database."""
    from deals_pipeline.storage.db import Database

    with Database(db_path).connect() as con:
        done, total = con.execute(
            "SELECT count(*) FILTER (status = 'done'), count(*) FROM page_chunks WHERE page = ?", [page]
        ).fetchone()
    return int(done), int(total)


_BACKFILL_WORKER_ENV = "DEALS_PIPELINE_CLI_WORKER"


def _backfill_in_own_session(args: argparse.Namespace) -> int:
    """Run the backfill in a child process of its own session and hand it Ctrl-C as one SIGINT.

    A terminal's Ctrl-C signals the whole foreground process group, which includes the helper processes
    Dagster starts to mirror step output (each would print its own KeyboardInterrupt traceback). The child
    is out of that group; this process forwards the interrupt to it alone and returns its exit code.
    """
    argv = [sys.executable, "-m", "deals_pipeline.cli", "backfill", "--pages", args.pages]
    argv += ["--create"] if args.create else []
    child = subprocess.Popen(argv, env={**os.environ, _BACKFILL_WORKER_ENV: "1"}, start_new_session=True)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)


def cmd_backfill(args: argparse.Namespace) -> int:
    """Backfill pages in order through Dagster (runs show in the UI); one line per chunk and per wait."""
    from rich.console import Console

    from deals_pipeline.progress import ChunkCommitted, WaitNotice, add_listener
    from deals_pipeline.state_paths import dagster_home, database_path, require_database

    pages = parse_pages(args.pages)
    dagster_home()
    resources = _resources()
    mode = _mode(resources, required=True)
    db_path = database_path(resources["database"].path)
    if args.create:
        create_database(db_path, mode)
    else:
        require_database(db_path, mode)
    # The clock, data mode and database are checked here, as one line, not inside a failed run.
    from deals_pipeline.clock import clock_for_database, clock_from_env
    from deals_pipeline.storage.db import Database

    clock = clock_from_env()
    if db_path.exists():
        clock_for_database(Database(db_path, data_mode=mode), clock)

    if os.environ.get(_BACKFILL_WORKER_ENV) != "1":
        return _backfill_in_own_session(args)

    from dagster import DagsterInstance

    from deals_pipeline.defs.deal_pages import page_run_metadata
    from deals_pipeline.definitions import defs

    console = Console(highlight=False)
    last_chunk: dict[str, int] = {}

    def show(event: object) -> None:
        if isinstance(event, ChunkCommitted):
            last_chunk[str(event.page)] = event.chunks_done
            console.print(f"page {event.page} chunk {event.chunk_index + 1}/{event.chunk_count}: {event.status}, "
                          f"{event.tokens_spent} tokens, {event.deals_stored} stored "
                          f"({event.chunks_done}/{event.chunk_count} done)")
        elif isinstance(event, WaitNotice):
            console.print(f"[yellow]{event.line()}[/yellow]")

    remove = add_listener(show)
    job = defs.resolve_job_def("deal_pages_job")
    instance = DagsterInstance.get()
    page = pages[0]
    try:
        for page in pages:
            console.print(f"page {page}: starting (Dagster instance {os.environ['DAGSTER_HOME']})")
            result = job.execute_in_process(partition_key=str(page), instance=instance, raise_on_error=False,
                                            run_config=_quiet_run_config())
            metadata = page_run_metadata(result) if result.success else {}
            done, total = _page_progress(db_path, page)
            if not result.success:
                interrupted, reason = _failure(result)
                if interrupted:
                    # Shown as Canceled in the UI, not as a red failure: nothing went wrong, progress is kept.
                    instance.report_run_canceled(instance.get_run_by_id(result.run_id),
                                                 message=f"interrupted (Ctrl-C) with {done}/{total} chunks committed")
                    raise KeyboardInterrupt
                console.print(f"[red]page {page}: run {result.run_id[:8]} failed[/red] with {done}/{total} chunks "
                              f"committed ({reason}); the next run retries the unfinished chunks")
                return 1
            if not metadata.get("complete"):
                console.print(f"page {page}: stopped with {done}/{total} chunks committed (token budget for this "
                              f"run used up); the next run resumes at chunk {done + 1}")
                return 0
            console.print(f"page {page}: complete, {done}/{total} chunks, "
                          f"{metadata.get('tokens_spent_this_run')} tokens this run")
            if metadata.get("is_last_page"):
                console.print(f"page {page} is the query's last page: backfill complete")
                return 0
        return 0
    except KeyboardInterrupt:
        done, total = _page_progress(db_path, page)
        print(f"interrupted, progress saved at chunk {done} of page {page} ({done}/{total} chunks committed); "
              f"rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        remove()


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise ConfigError(f"the simulator exited early with code {proc.returncode}")
        time.sleep(0.1)
    raise ConfigError(f"the simulator did not start within {timeout_s:.0f}s")


def _clear_previous_demo(db_path: Path) -> bool:
    """Remove a previous demo's database (and its partitions in the instance). Refuses real data. True if removed."""
    from deals_pipeline.storage.db import Database

    if not db_path.exists():
        return False
    with Database(db_path).connect() as con:
        row = con.execute("SELECT value FROM meta WHERE key = 'data_mode'").fetchone()
    if row is None or row[0] != "simulator":
        raise ConfigError(f"{db_path} holds {'real Keepa' if row else 'unmarked'} data; the demo never replaces it. "
                          f"Run it elsewhere: {ENV_DB_PATH}=data/demo.duckdb make demo")
    from dagster import AssetKey, DagsterInstance

    for leftover in (db_path, db_path.with_name(db_path.name + ".wal")):
        leftover.unlink(missing_ok=True)
    DagsterInstance.get().wipe_assets([AssetKey("deal_pages"), AssetKey("recent_deals")])
    return True


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def cmd_retry_quarantined(args: argparse.Namespace) -> int:
    """Put every quarantined chunk back (attempts reset, its page partial again) and say which."""
    from deals_pipeline.backfill.service import retry_quarantined
    from deals_pipeline.state_paths import database_path
    from deals_pipeline.storage.db import Database

    path = database_path(args.db)
    if not path.exists():
        print(f"{PROG}: no database at {path}", file=sys.stderr)
        return 1
    chunks = retry_quarantined(Database(path))
    for chunk in chunks:
        print(f"page {chunk.page} chunk {chunk.chunk_index}: back in the queue (was quarantined after "
              f"{chunk.attempts} attempts: {chunk.error})")
    print(f"{len(chunks)} quarantined chunk(s) put back; deal_pages_sensor (or `deals-pipeline backfill`) retries them")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulator at 5 tokens/min, time-scaled; backfill the first pages and one upsert; System Health.

    Writes to the default state (``DAGSTER_HOME``, ``DEALS_DB_PATH``), the database marked as simulator
    data and as made on the demo's scaled clock, so `make ui` and `make status` show the demo afterwards.
    """
    from deals_pipeline.state_paths import dagster_home, database_path

    home = dagster_home()
    db_path = database_path()
    replaced = _clear_previous_demo(db_path)
    work_dir = db_path.parent
    work_dir.mkdir(parents=True, exist_ok=True)
    ready = work_dir / "demo-simulator.json"
    ready.unlink(missing_ok=True)
    from deals_pipeline.defs.resources import SIMULATOR_KEY  # the key the pipeline sends in simulator mode

    bin_dir = Path(sys.executable).parent
    sim = subprocess.Popen(
        [sys.executable, "-m", "deals_pipeline.simulator.cli", "--port", "0", "--refill-rate", str(args.refill_rate),
         "--time-scale", str(args.time_scale), "--catalog-size", str(args.catalog_size),
         "--expected-key-env", SIMULATOR_KEY_ENV, "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        # Calibrated churn (the simulator CLI's default) and a strict key: any key but the demo's gets HTTP 400.
        env={**os.environ, SIMULATOR_KEY_ENV: SIMULATOR_KEY},
    )
    started = time.monotonic()
    try:
        info = _wait_for_file(ready, sim)
        env = {**os.environ, **info["env"], ENV_MODE: "simulator", ENV_SIMULATOR_URL: info["base_url"],
               ENV_DB_PATH: str(db_path), "DAGSTER_HOME": str(home)}
        env.pop("KEEPA_API_KEY", None)
        # The demo runs each page once from the shell, with no sensor to relaunch deferred work: give a run
        # the whole page (the deadline and the in-slot wait bound are timeline times; one real minute of
        # waiting in the slot is plenty on this clock). A value the user set wins.
        env.setdefault("DEALS_RUN_BUDGET_MINUTES", "1440")
        env.setdefault("DEALS_MAX_WAIT_IN_SLOT_S", str(int(60 * args.time_scale)))
        print(f"simulator: {info['base_url']} at {args.refill_rate} tokens/min, time x{args.time_scale:g}")
        print(f"state: Dagster instance {_shown(home)}, database {_shown(db_path)} (simulator data"
              f"{', replacing the previous demo' if replaced else ''})")
        dagster = _shown(bin_dir / "dagster")
        steps = [[dagster, "asset", "materialize", "-m", "deals_pipeline.definitions", "--select", "deal_pages",
                  "--partition", str(p)] for p in range(args.pages)]
        steps.append([dagster, "asset", "materialize", "-m", "deals_pipeline.definitions", "--select", "recent_deals"])
        for step in steps:
            print(f"$ DAGSTER_HOME={shlex.quote(str(home))} {ENV_MODE}=simulator {shlex.join(step)}", flush=True)
            t0 = time.monotonic()
            done = subprocess.run(step, env=env, capture_output=True, text=True)
            print(f"  -> {'ok' if done.returncode == 0 else 'FAILED'} in {time.monotonic() - t0:.1f}s", flush=True)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return done.returncode
        status = subprocess.run([str(bin_dir / "deals-pipeline"), "status"], env=env)
        print(f"demo finished in {time.monotonic() - started:.1f}s. See it: `make ui` (runs, partitions, checks) "
              f"and `make status`.")
        return status.returncode
    finally:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sim.kill()


def add_query_command(sub: "argparse._SubParsersAction") -> None:
    """`deals-pipeline query "SQL"`: read the published copy (never the pipeline's own file)."""
    query = sub.add_parser("query", help="run SQL on the published read-only copy (table current_deals, deals)")
    query.add_argument("sql", help='e.g. "SELECT asin, title, price_now_usd, drop_pct_90d FROM current_deals LIMIT 20"')
    query.add_argument("--db", help=f"pipeline database path (default: ${ENV_DB_PATH} or data/deals.duckdb)")
    query.add_argument("--csv", action="store_true", help="CSV output instead of a table")


def cmd_query(args: argparse.Namespace) -> int:
    """Print the result of ``args.sql`` on ``<db>.published.duckdb``; exit 2 when nothing is published."""
    import duckdb

    from deals_pipeline.state_paths import database_path
    from deals_pipeline.storage.publish import published_path

    path = published_path(database_path(args.db))
    if not path.exists():
        print(f"deals-pipeline query: nothing published yet at {path} (it appears after the first committed chunk)",
              file=sys.stderr)
        return 2
    con = duckdb.connect(str(path), read_only=True)
    try:
        relation = con.sql(args.sql)
        if relation is None:
            return 0
        if args.csv:
            relation.df().to_csv(sys.stdout, index=False)
        else:
            print(relation.df().to_string(index=False, max_colwidth=60))
    except duckdb.Error as exc:
        print(f"deals-pipeline query: {exc}", file=sys.stderr)
        return 2
    finally:
        con.close()
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def cmd_simulator(args: argparse.Namespace, rest: list[str]) -> int:
    from deals_pipeline.simulator.cli import main as simulator_main

    return simulator_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("simulator", help="run the Keepa simulator (options: deals-pipeline simulator --help)",
                   add_help=False)
    init = sub.add_parser("init", help="create the database (real-API mode never creates one implicitly)")
    init.add_argument("--db", help=f"database path (default: ${ENV_DB_PATH} or data/deals.duckdb)")
    init.add_argument("--mode", choices=("keepa", "simulator"), help="data it will hold (default: from the env)")
    status = sub.add_parser("status", help="System Health report")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--db", help=f"database path (default: ${ENV_DB_PATH} or data/deals.duckdb)")
    status.add_argument("--busy-timeout", type=float, default=10.0, help="seconds to retry a busy database")
    backfill = sub.add_parser("backfill", help="backfill a page range in order through Dagster")
    backfill.add_argument("--pages", "--partition", dest="pages", required=True,
                          help=f"e.g. 0-9 or 0,1,5 (pages are 0-{MAX_PAGE}, one partition each)")
    backfill.add_argument("--create", action="store_true",
                          help="create the database if it does not exist (real-API mode refuses a missing one)")
    retry = sub.add_parser("retry-quarantined", help="put quarantined chunks back so the sensor retries them")
    retry.add_argument("--db", help=f"database path (default: ${ENV_DB_PATH} or data/deals.duckdb)")
    demo = sub.add_parser("demo", help="the whole pipeline on the simulator, time-scaled")
    demo.add_argument("--pages", type=int, default=2)
    demo.add_argument("--refill-rate", type=int, default=5)
    demo.add_argument("--time-scale", type=float, default=600.0)
    demo.add_argument("--catalog-size", type=int, default=800)
    add_query_command(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "simulator":
        return cmd_simulator(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    commands = {"init": cmd_init, "status": cmd_status, "backfill": cmd_backfill, "demo": cmd_demo,
                "retry-quarantined": cmd_retry_quarantined, "query": cmd_query}
    return commands[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """The console script: exit 2 with one line on usage/config errors, 130 on Ctrl-C, never a traceback."""
    try:
        return run(argv)
    except ConfigError as err:  # every usage and configuration error, including DataModeMismatch, ClockMismatch
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
