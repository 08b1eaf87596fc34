"""Typed Keepa wire models, parsed defensively from JSON.

Parsing failures raise :class:`~deals_pipeline.keepa.errors.MalformedPayload` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from deals_pipeline.keepa.errors import MalformedPayload

#: Keepa refills once per minute.
REFILL_PERIOD_MS = 60_000
#: The bucket holds one hour of refill (300 at 5/min, observed).
CAP_MINUTES = 60


def _int_field(obj: Mapping[str, Any], name: str, *, required: bool = True, default: int = 0) -> int:
    value = obj.get(name)
    if value is None:
        if required:
            raise MalformedPayload(f"envelope field {name!r} is missing", field=name)
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise MalformedPayload(f"envelope field {name!r} is not a number: {type(value).__name__}", field=name)
    return int(value)


@dataclass(frozen=True)
class TokenStatus:
    """The token part of every Keepa response envelope (200, 429 and error bodies alike)."""

    tokens_left: int
    refill_in_ms: int
    refill_rate: int
    timestamp_ms: int
    tokens_consumed: int = 0
    token_flow_reduction: float = 0.0
    processing_time_ms: int = 0

    @classmethod
    def from_envelope(cls, obj: Any) -> "TokenStatus":
        """Parse the envelope of a response body (a dict). Raises MalformedPayload when unusable."""
        if not isinstance(obj, Mapping):
            raise MalformedPayload(f"response body is {type(obj).__name__}, not a JSON object")
        refill_rate = _int_field(obj, "refillRate")
        refill_in = _int_field(obj, "refillIn")
        if refill_rate < 0:
            raise MalformedPayload(f"refillRate {refill_rate} is negative", field="refillRate")
        if not 0 <= refill_in <= 10 * REFILL_PERIOD_MS:
            raise MalformedPayload(f"refillIn {refill_in} ms is out of range", field="refillIn")
        flow = obj.get("tokenFlowReduction", 0.0)
        if isinstance(flow, bool) or not isinstance(flow, (int, float)):
            raise MalformedPayload("envelope field 'tokenFlowReduction' is not a number", field="tokenFlowReduction")
        return cls(
            tokens_left=_int_field(obj, "tokensLeft"),
            refill_in_ms=refill_in,
            refill_rate=refill_rate,
            timestamp_ms=_int_field(obj, "timestamp"),
            tokens_consumed=_int_field(obj, "tokensConsumed", required=False),
            token_flow_reduction=float(flow),
            processing_time_ms=_int_field(obj, "processingTimeInMs", required=False),
        )

    @property
    def cap(self) -> int:
        """Bucket capacity: one hour of refill (60 x rate)."""
        return CAP_MINUTES * self.refill_rate

    @property
    def next_refill_ms(self) -> int:
        """Server time (Unix ms) of the next refill."""
        return self.timestamp_ms + self.refill_in_ms

    def to_envelope(self) -> dict[str, Any]:
        """The wire form (used by the simulator and when storing raw responses)."""
        return {
            "timestamp": self.timestamp_ms,
            "tokensLeft": self.tokens_left,
            "refillIn": self.refill_in_ms,
            "refillRate": self.refill_rate,
            "tokenFlowReduction": self.token_flow_reduction,
            "tokensConsumed": self.tokens_consumed,
            "processingTimeInMs": self.processing_time_ms,
        }


def refill_wait_ms(status: TokenStatus, need: int, now_ms: int, margin_ms: int = 1_000) -> int:
    """Milliseconds until the balance reaches ``need``, from one envelope (KEEPA_API.md §3.3, discrete form).

    ``need`` is clamped to the bucket cap: a wait for more than the cap would never end (HAZARDS #31).
    A bucket with refill rate 0 never refills; the caller must treat ``math.inf``-like results as "never".
    """
    cap = max(status.cap, 1)
    need = min(int(need), cap)
    if status.tokens_left >= need:
        return 0
    if status.refill_rate <= 0:
        raise ValueError("refill rate is 0: the balance never recovers")
    refills = math.ceil((need - status.tokens_left) / status.refill_rate)
    # Roll the next-refill instant forward past `now` (the status may be older than one period).
    next_refill = status.next_refill_ms
    if next_refill < now_ms:
        missed = (now_ms - next_refill) // REFILL_PERIOD_MS + 1
        # Refills that already happened since the status count towards `need`.
        refills = max(0, refills - int(missed))
        next_refill += int(missed) * REFILL_PERIOD_MS
        if refills == 0:
            return 0
    return int(next_refill - now_ms + (refills - 1) * REFILL_PERIOD_MS + margin_ms)
