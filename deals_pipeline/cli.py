"""`deals-pipeline`: simulator, status (System Health), backfill a page range, demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from deals_pipeline.config import ENV_DB_PATH, ENV_MODE, ENV_SIMULATOR_URL

#: The demo hands the simulator its strict key through this variable (never on a command line).
SIMULATOR_KEY_ENV = "DEALS_SIMULATOR_EXPECTED_KEY"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = Path("data/demo")


def _parse_pages(text: str) -> list[int]:
    pages: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            pages.extend(range(int(lo), int(hi) + 1))
        elif part:
            pages.append(int(part))
    bad = [p for p in pages if not 0 <= p <= 66]
    if bad:
        raise SystemExit(f"pages must be within 0-66 (Keepa's deal page range), got {bad}")
    return pages


def cmd_simulator(args: argparse.Namespace, rest: list[str]) -> int:
    from deals_pipeline.simulator.cli import main as simulator_main

    return simulator_main(rest)


def cmd_status(args: argparse.Namespace) -> int:
    from deals_pipeline.defs.resources import default_resources
    from deals_pipeline.clock import clock_from_env
    from deals_pipeline.status import collect_health
    from deals_pipeline.storage import DatabaseBusy
    from deals_pipeline.storage.db import Database

    resources = default_resources()
    path = args.db or resources["database"].path
    if not Path(path).exists():
        print(f"no database at {path} yet (run `make demo`, or set {ENV_DB_PATH})", file=sys.stderr)
        return 1
    db = Database(path, busy_timeout_s=args.busy_timeout)
    clock = clock_from_env()
    budget = resources["token_budget"].budget(db, clock, owner="status")
    try:
        health = collect_health(db, budget, clock)
    except DatabaseBusy as busy:
        print(f"the database is busy (a run is writing); tried for {args.busy_timeout:.0f}s: {busy}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(health, indent=2, default=str))
    else:
        from deals_pipeline.status_view import render

        render(health, path)
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from deals_pipeline.definitions import defs

    job = defs.resolve_job_def("deal_pages_job")
    instance = DagsterInstance.get()
    for page in _parse_pages(args.pages):
        result = job.execute_in_process(partition_key=str(page), instance=instance, raise_on_error=False)
        materializations = result.asset_materializations_for_node("deal_pages") if result.success else []
        metadata = {k: v.value for k, v in materializations[-1].metadata.items()} if materializations else {}
        print(f"page {page}: {'ok' if result.success else 'FAILED'} "
              f"complete={metadata.get('complete')} chunks={metadata.get('chunks_done')}/{metadata.get('chunks_total')} "
              f"tokens={metadata.get('tokens_spent_this_run')}")
        if not result.success or not metadata.get("complete"):
            print(f"stopping at page {page}: it is not complete (the next run resumes at its next unfinished chunk)")
            return 0 if result.success else 1
        if metadata.get("is_last_page"):
            print(f"page {page} is the query's last page: backfill complete")
            return 0
    return 0


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise SystemExit(f"the simulator exited early with code {proc.returncode}")
        time.sleep(0.1)
    raise SystemExit(f"the simulator did not start within {timeout_s:.0f}s")


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulator at 5 tokens/min, time-scaled; backfill the first pages and one upsert; System Health."""
    demo_dir = Path(args.dir)
    if demo_dir.exists():
        shutil.rmtree(demo_dir)
    dagster_home = demo_dir / "dagster_home"
    dagster_home.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", dagster_home / "dagster.yaml")
    ready = demo_dir / "simulator.json"
    from deals_pipeline.defs.resources import SIMULATOR_KEY  # the key the pipeline sends in simulator mode

    bin_dir = Path(sys.executable).parent
    sim = subprocess.Popen(
        [sys.executable, "-m", "deals_pipeline.simulator.cli", "--port", "0", "--refill-rate", str(args.refill_rate),
         "--time-scale", str(args.time_scale), "--catalog-size", str(args.catalog_size),
         "--expected-key-env", SIMULATOR_KEY_ENV, "--ready-file", str(ready)],
        # Calibrated churn (the simulator CLI's default) and a strict key: any key but the demo's gets HTTP 400.
        env={**os.environ, SIMULATOR_KEY_ENV: SIMULATOR_KEY},
    )
    started = time.monotonic()
    try:
        info = _wait_for_file(ready, sim)
        env = {
            **os.environ,
            **info["env"],
            ENV_MODE: "simulator",
            ENV_SIMULATOR_URL: info["base_url"],
            ENV_DB_PATH: str(demo_dir / "deals_demo.duckdb"),
            "DAGSTER_HOME": str(dagster_home.resolve()),
        }
        env.pop("KEEPA_API_KEY", None)
        print(f"simulator: {info['base_url']} at {args.refill_rate} tokens/min, time x{args.time_scale}")
        steps = [[str(bin_dir / "dagster"), "asset", "materialize", "-m", "deals_pipeline.definitions",
                  "--select", "deal_pages", "--partition", str(p)] for p in range(args.pages)]
        steps.append([str(bin_dir / "dagster"), "asset", "materialize", "-m", "deals_pipeline.definitions",
                      "--select", "recent_deals"])
        for step in steps:
            print("$ " + " ".join(step[1:]), flush=True)
            t0 = time.monotonic()
            done = subprocess.run(step, env=env, capture_output=True, text=True)
            print(f"  -> {'ok' if done.returncode == 0 else 'FAILED'} in {time.monotonic() - t0:.1f}s", flush=True)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return done.returncode
        status = subprocess.run([str(bin_dir / "deals-pipeline"), "status"], env=env)
        print(f"demo finished in {time.monotonic() - started:.1f}s; database: {env[ENV_DB_PATH]} (simulator data)")
        return status.returncode
    finally:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sim.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deals-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("simulator", help="run the Keepa simulator (options: deals-pipeline simulator --help)",
                   add_help=False)
    status = sub.add_parser("status", help="System Health report")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--db", help=f"database path (default: ${ENV_DB_PATH} or data/deals.duckdb)")
    status.add_argument("--busy-timeout", type=float, default=10.0, help="seconds to retry a busy database")
    backfill = sub.add_parser("backfill", help="backfill a page range in order through Dagster")
    backfill.add_argument("--pages", required=True, help="e.g. 0-9 or 0,1,5")
    demo = sub.add_parser("demo", help="the whole pipeline on the simulator, time-scaled")
    demo.add_argument("--dir", default=str(DEMO_DIR))
    demo.add_argument("--pages", type=int, default=2)
    demo.add_argument("--refill-rate", type=int, default=5)
    demo.add_argument("--time-scale", type=float, default=600.0)
    demo.add_argument("--catalog-size", type=int, default=800)
    args, rest = parser.parse_known_args(argv)
    if args.command == "simulator":
        return cmd_simulator(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"status": cmd_status, "backfill": cmd_backfill, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
