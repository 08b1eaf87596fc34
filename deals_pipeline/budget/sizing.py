"""How many new deals one upserter run may take on, from the (learned) refill rate.

* ``mode="default"``: below 20 tokens/min -> 20, otherwise 200 (the rule that unblocked the
  production system: a 200-deal run is impossible at 5/min, HAZARDS #37).
* ``mode="derived"``: the largest batch whose cost the refill covers within the upsert interval,
  ``floor(rate * interval_min / tokens_per_deal)``, at least one chunk, never more than the bucket
  cap (60 x rate) worth.
"""

from __future__ import annotations

import math

from deals_pipeline.keepa.models import CAP_MINUTES

LOW_RATE_BELOW = 20
SMALL_RUN = 20
LARGE_RUN = 200
#: ≈ 6–7.7 tokens per ASIN observed with offers=20 and rating=1 (KEEPA_API.md §3.4), rounded up.
DEFAULT_TOKENS_PER_DEAL = 8.0
DEFAULT_INTERVAL_S = 900
DEFAULT_CHUNK_SIZE = 4

MODES = ("default", "derived")


def max_new_deals_per_run(
    refill_rate: int,
    mode: str = "default",
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    tokens_per_deal: float = DEFAULT_TOKENS_PER_DEAL,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Batch size for one upserter run at ``refill_rate`` tokens/min (see module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rate = max(int(refill_rate), 0)
    if mode == "default":
        return SMALL_RUN if rate < LOW_RATE_BELOW else LARGE_RUN
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
    if tokens_per_deal <= 0:
        raise ValueError(f"tokens_per_deal must be > 0, got {tokens_per_deal!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    derived = math.floor(rate * (interval_s / 60.0) / tokens_per_deal + 1e-9)
    cap_worth = math.floor(CAP_MINUTES * rate / tokens_per_deal + 1e-9)
    return max(1, min(max(derived, chunk_size), cap_worth))
