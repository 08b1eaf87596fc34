"""Token waits shown on the executing step: a log line and an AssetObservation per visible wait.

The budget announces each wait through :mod:`deals_pipeline.progress`; while an op runs, this listener
turns the waits of that op's budget owner into a step log line ("waiting for 42 tokens until 14:05 UTC
(refill: ...)") and metadata on the asset, so the UI says why a step has been executing for minutes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import dagster as dg

from deals_pipeline.progress import WaitNotice, add_listener


@contextmanager
def waits_shown_on(context: dg.OpExecutionContext, owner: str, asset_key: str,
                   partition: str | None = None) -> Iterator[list[WaitNotice]]:
    """While inside, every visible wait of ``owner`` is logged and observed; yields the waits seen."""
    seen: list[WaitNotice] = []

    def on_event(event: object) -> None:
        if isinstance(event, WaitNotice) and event.owner == owner:
            seen.append(event)
            context.log.info(event.line())
            context.log_event(dg.AssetObservation(asset_key=asset_key, partition=partition,
                                                  metadata={**event.metadata(), "owner": owner}))

    remove = add_listener(on_event)
    try:
        yield seen
    finally:
        remove()
