"""Keepa time: minutes since 2011-01-01 00:00 UTC (deal and product times); envelopes use Unix ms.

One conversion for the whole project (HAZARDS #14: a 2000 epoch once shifted all data by 11 years).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

KEEPA_EPOCH = datetime(2011, 1, 1, tzinfo=timezone.utc)
#: Minutes from 1970-01-01 to 2011-01-01 (14,975 days).
KEEPA_EPOCH_OFFSET_MINUTES = 21_564_000


def keepa_minute_to_datetime(minute: int) -> datetime:
    """Keepa minute -> aware UTC datetime."""
    return KEEPA_EPOCH + timedelta(minutes=int(minute))


def datetime_to_keepa_minute(dt: datetime) -> int:
    """Aware datetime -> Keepa minute (floored). Naive datetimes are rejected, not guessed."""
    if dt.tzinfo is None:
        raise ValueError("datetime_to_keepa_minute needs an aware datetime (UTC)")
    return int((dt - KEEPA_EPOCH).total_seconds() // 60)


def keepa_minute_to_unix_ms(minute: int) -> int:
    return (int(minute) + KEEPA_EPOCH_OFFSET_MINUTES) * 60_000


def unix_ms_to_keepa_minute(unix_ms: int) -> int:
    return int(unix_ms) // 60_000 - KEEPA_EPOCH_OFFSET_MINUTES


def unix_ms_to_datetime(unix_ms: int) -> datetime:
    return datetime.fromtimestamp(int(unix_ms) / 1000.0, tz=timezone.utc)
