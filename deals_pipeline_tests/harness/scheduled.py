"""The production schedule in plain Python: two sensors, ONE `keepa_api` pool slot, ops bounded in the slot.

On a ManualClock (simulated time costs no wall time). It models what `dagster-daemon` does with the
queued run coordinator and a pool limit of 1, at op granularity (a chunk op frees the slot when it ends):

* the upsert sensor launches a run when the adaptive poll interval (``scheduling.poll_interval``) has
  passed since its last launch; the run takes the slot at the next op boundary;
* otherwise the backfill runs its next unfinished chunk; a chunk that cannot be afforded within
  ``max_wait_in_slot_s`` is deferred (nothing paid) and the sensor relaunches it at its next tick.

Used by the scheduling tests and by benchmarks/scheduling.py.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from deals_pipeline.budget import BudgetDeadline
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.scheduling import observed_arrivals_per_hour, poll_interval

TICK_MS = 60_000
#: The relaunched op may itself wait up to its slot bound: wake that much before the tokens are there.
BOUND_SLACK_MS = 60_000


@dataclass
class ScheduledReport:
    hours: float
    upsert_runs: list = field(default_factory=list)  # UpsertReport
    poll_intervals_s: list = field(default_factory=list)
    backfill_chunks_done: int = 0
    backfill_chunks_deferred: int = 0
    backfill_pages_complete: int = 0
    backfill_done: bool = False
    #: asin -> timeline ms when the pipeline first held it in `deals` (discovered or enriched)
    discovered_ms: dict = field(default_factory=dict)
    ages_min: list = field(default_factory=list)
    longest_slot_wait_ms: int = 0

    @property
    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.upsert_runs:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def _record_discoveries(stack, report: ScheduledReport) -> None:
    now = stack.clock.now_ms()
    with stack.db.connect() as con:
        held = {r[0] for r in con.execute("SELECT asin FROM deals").fetchall()}
    for asin in held - report.discovered_ms.keys():
        report.discovered_ms[asin] = now


def simulate_scheduled(stack, *, hours: float, backfill, updater, max_poll_share: float = 0.10,
                       lag_target_min: float = 30, run_budget_min: float = 480) -> ScheduledReport:
    clock = stack.clock
    end = clock.now_ms() + int(hours * 3_600_000)
    report = ScheduledReport(hours=hours)
    next_poll = clock.now_ms()
    page = 0
    with stack.db.connect() as con:
        report.discovered_ms.update({r[0]: -1 for r in con.execute("SELECT asin FROM deals").fetchall()})
    while clock.now_ms() < end:
        now = clock.now_ms()
        if now >= next_poll:
            started = now
            run = updater.run(deadline_ms=now + int(run_budget_min * 60_000))
            report.upsert_runs.append(run)
            report.longest_slot_wait_ms = max(report.longest_slot_wait_ms, clock.now_ms() - started
                                              if run.status == "deferred" else 0)
            _record_discoveries(stack, report)
            with stack.db.connect() as con:
                newest = con.execute("SELECT max(last_update_minute) FROM deals").fetchone()[0]
                arrivals = observed_arrivals_per_hour(con, now_minute=unix_ms_to_keepa_minute(clock.now_ms()))
            if newest is not None:
                report.ages_min.append(unix_ms_to_keepa_minute(clock.now_ms()) - int(newest))
            plan = poll_interval(refill_rate=stack.budget.projection().refill_rate, arrivals_per_hour=arrivals,
                                 max_poll_share=max_poll_share, lag_target_min=lag_target_min)
            report.poll_intervals_s.append(plan.interval_s)
            next_poll = started + plan.interval_s * 1000
            continue
        progressed = False
        wake_ms = clock.now_ms() + TICK_MS
        if not report.backfill_done:
            try:
                snapshot = backfill.snapshot(page, deadline_ms=end)
            except BudgetDeadline:
                snapshot = None
            if snapshot is not None:
                pending = backfill.unfinished_chunks(page)
                outcome = backfill.run_chunk(snapshot, pending[0]) if pending else None
                if outcome is not None and outcome.status == "done":
                    report.backfill_chunks_done += 1
                    progressed = True
                elif outcome is not None and outcome.status == "deferred":
                    report.backfill_chunks_deferred += 1
                    # deal_pages_sensor relaunches once a chunk is affordable (its budget gate says when).
                    if outcome.wait_ms:
                        wake_ms = max(wake_ms, clock.now_ms() + outcome.wait_ms - BOUND_SLACK_MS)
                elif outcome is not None and outcome.status in ("failed", "quarantined", "already_done"):
                    progressed = True
                if not backfill.unfinished_chunks(page):
                    summary = backfill.summarize(snapshot)
                    if summary.complete:
                        report.backfill_pages_complete += 1
                        if summary.is_last or page >= 66:
                            report.backfill_done = True
                        else:
                            page += 1
                        progressed = True
        if not progressed:
            # The sensors tick once a minute: the deferred chunk is relaunched at the next tick.
            clock.sleep_ms(max(1, min(next_poll, end, wake_ms) - clock.now_ms()))
    _record_discoveries(stack, report)
    return report


def discovery_lags_min(stack, report: ScheduledReport, start_ms: int, end_ms: int) -> list[float]:
    """Minutes from a NEW deal becoming visible to the pipeline holding it (undiscovered: until the end)."""
    first_visible: dict[str, int] = {}
    for v in stack.sim.catalog.versions(end_ms):
        first_visible.setdefault(v.asin, v.visible_from_ms)
    lags = []
    for asin, visible in first_visible.items():
        if visible <= start_ms or report.discovered_ms.get(asin) == -1:
            continue  # in the catalog before the window: not a new deal
        found = report.discovered_ms.get(asin, end_ms)
        lags.append(max(0, found - visible) / 60_000)
    return lags


def p95(values: list[float]) -> float:
    if not values:
        return float("nan")
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20)[-1]
