"""Backfill and upserter sharing one budget over simulated hours, scheduled as the sensors do.

Plain Python on a ManualClock (simulated time costs no wall time): every ``upsert_interval_min``
an upsert run (UPSERT priority, deadline = the next tick); in between, backfill chunks whose
deadline is the next upsert tick, so the backfill never holds up the upserter. Used by the
upsert freshness test and by benchmarks/.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from deals_pipeline.budget import BudgetDeadline
from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute


@dataclass
class SimulationReport:
    hours: float
    upsert_runs: list = field(default_factory=list)       # UpsertReport
    upsert_started_ms: list = field(default_factory=list)  # when each upsert run started (timeline)
    ages_min: list = field(default_factory=list)          # newest-deal age samples (minutes)
    backfill_pages_complete: int = 0
    backfill_chunks_done: int = 0
    backfill_done: bool = False

    @property
    def max_age_min(self) -> float:
        return max(self.ages_min) if self.ages_min else float("nan")

    @property
    def p95_age_min(self) -> float:
        if len(self.ages_min) < 2:
            return self.max_age_min
        return statistics.quantiles(self.ages_min, n=20)[-1]


def newest_age_min(stack) -> float | None:
    with stack.db.connect() as con:
        newest = con.execute("SELECT max(last_update_minute) FROM deals").fetchone()[0]
    return None if newest is None else unix_ms_to_keepa_minute(stack.clock.now_ms()) - int(newest)


def simulate(stack, *, hours: float, upsert_interval_min: float = 5.0, backfill=None, updater=None,
             backfill_selection: dict | None = None) -> SimulationReport:
    clock = stack.clock
    backfill = backfill or stack.backfill(selection=backfill_selection)
    updater = updater or stack.updater()
    interval = int(upsert_interval_min * 60_000)
    end = clock.now_ms() + int(hours * 3_600_000)
    report = SimulationReport(hours=hours)
    next_upsert = clock.now_ms()
    page = 0
    while clock.now_ms() < end:
        now = clock.now_ms()
        if now >= next_upsert:
            next_upsert = now + interval
            report.upsert_started_ms.append(now)
            report.upsert_runs.append(updater.run(deadline_ms=next_upsert))
            age = newest_age_min(stack)
            if age is not None:
                report.ages_min.append(age)
            continue
        progressed = False
        if not report.backfill_done:
            try:
                snapshot = backfill.snapshot(page, deadline_ms=next_upsert)
            except BudgetDeadline:
                snapshot = None
            if snapshot is not None:
                for chunk in backfill.unfinished_chunks(page):
                    outcome = backfill.run_chunk(snapshot, chunk, deadline_ms=next_upsert)
                    if outcome.status == "deferred":
                        break
                    progressed = True
                    if outcome.status == "done":
                        report.backfill_chunks_done += 1
                    if clock.now_ms() >= next_upsert:
                        break
                summary = backfill.summarize(snapshot)
                if summary.complete:
                    report.backfill_pages_complete += 1
                    if summary.is_last or page >= 66:
                        report.backfill_done = True
                    else:
                        page += 1
                    progressed = True
        if not progressed:
            clock.sleep_ms(max(1, min(next_upsert, end) - clock.now_ms()))
    return report
