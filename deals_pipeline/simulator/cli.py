"""Run the Keepa simulator as a process: ``python -m deals_pipeline.simulator.cli --ready-file PATH``.

Writes a JSON ready-file ``{"base_url", "pid", "time_scale", "time_anchor", "env"}`` atomically once the
server listens, so other processes can find it and share its clock (``env`` holds the variables that make
:func:`deals_pipeline.clock.clock_from_env` rebuild the same scaled clock). Serves until SIGTERM/SIGINT,
then removes the ready-file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from deals_pipeline.clock import TIME_SCALE_ENV, Clock, ScaledClock, SystemClock
from deals_pipeline.simulator.catalog import SORT1_FIELDS
from deals_pipeline.simulator.server import CALIBRATED_CHURN, QUIET, FaultConfig, KeepaSimulator, SimulatorConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deals-pipeline simulator", description="Embedded Keepa API simulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--refill-rate", type=int, default=5, help="tokens per minute (cap = 60 x rate)")
    p.add_argument(
        "--time-scale", type=float, default=1.0,
        help="simulated seconds per wall second (default 1: real time, what wall-clock clients such as keepa expect)",
    )
    p.add_argument("--time-anchor", type=float, default=None, help="wall-clock anchor (s) of the scaled clock")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--catalog-size", type=int, default=800)
    p.add_argument("--drift-new-per-hour", type=float, default=CALIBRATED_CHURN["drift_new_per_hour"],
                   help="deals listed for the first time per simulated hour")
    p.add_argument("--drift-updates-per-hour", type=float, default=CALIBRATED_CHURN["drift_updates_per_hour"],
                   help="listed deals refreshed per simulated hour")
    p.add_argument("--drift-expired-per-hour", type=float, default=CALIBRATED_CHURN["drift_expired_per_hour"],
                   help="listed deals taken off the list per simulated hour")
    p.add_argument("--quiet", action="store_true", help="no churn: the deal list never moves (overrides --drift-*)")
    p.add_argument("--sort1-orders-by", choices=SORT1_FIELDS, default="lastUpdate",
                   help="what sortType 1 (deal age) orders by")
    p.add_argument("--initial-tokens", type=int, default=None, help="default: a full bucket")
    p.add_argument("--offers-pages-max", type=int, default=2)
    p.add_argument("--p-server-error", type=float, default=0.0)
    p.add_argument("--p-truncated", type=float, default=0.0)
    p.add_argument("--p-timeout", type=float, default=0.0)
    p.add_argument("--p-malformed", type=float, default=0.0)
    p.add_argument("--latency-ms", type=int, default=0)
    p.add_argument("--timeout-hold-s", type=float, default=2.0)
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument(
        "--expected-key-env",
        default=None,
        metavar="VAR",
        help="accept only the key held in this environment variable (never pass a key on the command line)",
    )
    p.add_argument("--ready-file", type=Path, default=None)
    return p


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _remove_if_ours(path: Path) -> None:
    """Remove the ready-file unless another simulator has since replaced it."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clock: Clock
    if args.time_scale == 1.0:
        clock = SystemClock()
        anchor = time.time() if args.time_anchor is None else args.time_anchor
        env = {TIME_SCALE_ENV: "1.0"}
    else:
        scaled = ScaledClock(args.time_scale, args.time_anchor)
        clock = scaled
        anchor = scaled.anchor_wall_s
        env = scaled.env()
    expected_key = None
    if args.expected_key_env:
        expected_key = os.environ.get(args.expected_key_env) or None
        if expected_key is None:
            print(f"error: environment variable {args.expected_key_env} is empty", file=sys.stderr)
            return 2
    try:
        faults = FaultConfig(
            p_server_error=args.p_server_error,
            p_truncated=args.p_truncated,
            p_timeout=args.p_timeout,
            p_malformed=args.p_malformed,
            latency_ms=args.latency_ms,
            timeout_hold_s=args.timeout_hold_s,
            seed=args.fault_seed,
        )
        cfg = SimulatorConfig(
            refill_rate=args.refill_rate,
            initial_tokens=args.initial_tokens,
            seed=args.seed,
            catalog_size=args.catalog_size,
            **(QUIET if args.quiet else {
                "drift_new_per_hour": args.drift_new_per_hour,
                "drift_updates_per_hour": args.drift_updates_per_hour,
                "drift_expired_per_hour": args.drift_expired_per_hour,
            }),
            sort1_orders_by=args.sort1_orders_by,
            offers_pages_max=args.offers_pages_max,
            expected_key=expected_key,
            faults=faults,
        )
        sim = KeepaSimulator(cfg, clock=clock, host=args.host, port=args.port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        sim.start()
        if args.ready_file is not None:
            _write_atomic(
                args.ready_file,
                {
                    "base_url": sim.base_url,
                    "pid": os.getpid(),
                    "time_scale": args.time_scale,
                    "time_anchor": anchor,
                    "env": env,
                },
            )
        print(
            f"Keepa simulator listening on {sim.base_url} (refill {args.refill_rate}/min, "
            f"time x{args.time_scale:g}, seed {args.seed}, churn {cfg.drift_new_per_hour:g} new / "
            f"{cfg.drift_updates_per_hour:g} updated / {cfg.drift_expired_per_hour:g} expired per hour)",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if args.ready_file is not None:
            _remove_if_ours(args.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
