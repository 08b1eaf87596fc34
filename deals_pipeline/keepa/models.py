"""Typed Keepa wire models, parsed defensively from JSON.

Parsing failures raise :class:`~deals_pipeline.keepa.errors.MalformedPayload` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from deals_pipeline.keepa.errors import MalformedPayload

#: Envelope timestamps are Unix ms between Keepa's epoch (2011) and 2100.
_EARLIEST_TIMESTAMP_MS = 1_293_840_000_000
_LATEST_TIMESTAMP_MS = 4_102_444_800_000
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
        if not 0 <= refill_rate <= 1_000_000:
            raise MalformedPayload(f"refillRate {refill_rate} is out of range", field="refillRate")
        if not 0 <= refill_in <= 10 * REFILL_PERIOD_MS:
            raise MalformedPayload(f"refillIn {refill_in} ms is out of range", field="refillIn")
        flow = obj.get("tokenFlowReduction", 0.0)
        if isinstance(flow, bool) or not isinstance(flow, (int, float)):
            raise MalformedPayload("envelope field 'tokenFlowReduction' is not a number", field="tokenFlowReduction")
        tokens_left = _int_field(obj, "tokensLeft")
        if not -(2**31) <= tokens_left <= 2**31 - 1:
            raise MalformedPayload(f"tokensLeft {tokens_left} is out of range", field="tokensLeft")
        timestamp = _int_field(obj, "timestamp")
        if not _EARLIEST_TIMESTAMP_MS <= timestamp <= _LATEST_TIMESTAMP_MS:
            raise MalformedPayload(f"timestamp {timestamp} is not a time between 2011 and 2100", field="timestamp")
        consumed = _int_field(obj, "tokensConsumed", required=False)
        if not 0 <= consumed <= 2**31 - 1:
            raise MalformedPayload(f"tokensConsumed {consumed} is out of range", field="tokensConsumed")
        return cls(
            tokens_left=tokens_left,
            refill_in_ms=refill_in,
            refill_rate=refill_rate,
            timestamp_ms=timestamp,
            tokens_consumed=consumed,
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


# ---------------------------------------------------------------------------------------------
# What we receive: deals, deal pages, products (KEEPA_API.md §4.4, §4.5, §5).
# ---------------------------------------------------------------------------------------------

import html as _html
import re as _re
from dataclasses import field as _field
from datetime import datetime as _datetime
from typing import Sequence as _Sequence

from deals_pipeline.keepa import keepa_time as _kt

#: Keepa's /deal page size: a page with fewer deals is the last one (KEEPA_API.md §4.3).
DEAL_PAGE_SIZE = 150
#: A query yields at most 10,000 deals, so page 66 is the last page that can hold results.
MAX_DEAL_PAGE = 66
#: Arrays longer than this are rejected (real deal arrays have 34 entries; 4 x 34 for avg/delta).
MAX_ARRAY_LEN = 1000
#: Number of date intervals (outer index of avg/delta/deltaPercent): 0 day, 1 week, 2 month, 3 90 days.
DATE_INTERVALS = 4
#: Sanity bound for Keepa-minute fields: 2100-01-01 00:00 UTC.
MAX_KEEPA_MINUTE = _kt.datetime_to_keepa_minute(_datetime(2100, 1, 1, tzinfo=_kt.KEEPA_EPOCH.tzinfo))
#: Sentinels in price arrays: -1 no offer / no data, -2 unknown ("unable to determine").
PRICE_SENTINELS = frozenset({-1, -2})
#: Base URL of Amazon product images; the deal `image` field decodes to a file name under it.
IMAGE_BASE_URL = "https://m.media-amazon.com/images/I/"

_ASIN_RE = _re.compile(r"[0-9A-Z]{10}")
_BLOCK_TAG_RE = _re.compile(r"<\s*/?\s*(?:br|p|div|li|ul|ol|tr|td|h[1-6])\b[^>]*>", _re.IGNORECASE)
_TAG_RE = _re.compile(r"<[^>]*>")
_WS_RE = _re.compile(r"\s+")


def is_valid_asin(s: object) -> bool:
    """True for a 10-character ASIN/ISBN-10 made of digits and upper-case letters."""
    return isinstance(s, str) and _ASIN_RE.fullmatch(s) is not None


def decode_image_name(codes: _Sequence[int] | str | None) -> str | None:
    """Decode a deal's ``image`` (ASCII codes) into a file name, e.g. ``51950K3CZ5L.jpg``.

    Returns None for a missing or empty image. A plain string (webhook style) is returned as is.
    Raises ValueError for codes that are not printable ASCII.
    """
    if codes is None:
        return None
    if isinstance(codes, str):
        return codes or None
    if not codes:
        return None
    for c in codes:
        if isinstance(c, bool) or not isinstance(c, int) or not 32 <= c < 127:
            raise ValueError(f"image code {c!r} is not a printable ASCII code")
    return "".join(map(chr, codes))


def image_url(name: str | None) -> str | None:
    """``https://m.media-amazon.com/images/I/<name>`` (None when there is no image)."""
    return f"{IMAGE_BASE_URL}{name}" if name else None


def strip_html(text: str) -> str:
    """Strip HTML tags and unescape entities; collapse whitespace (deal titles may hold markup)."""
    text = _BLOCK_TAG_RE.sub(" ", text)
    text = _TAG_RE.sub("", text)
    return _WS_RE.sub(" ", _html.unescape(text)).strip()


# -- defensive field readers (all raise MalformedPayload naming the field) ---------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _req(obj: Mapping[str, Any], name: str) -> Any:
    if name not in obj:
        raise MalformedPayload(f"field {name!r} is missing", field=name)
    return obj[name]


#: Prices, ranks, counts and percentages are stored as 32-bit INTEGER, category ids as 64-bit BIGINT:
#: a value outside them is malformed (it would otherwise parse, then fail every write of its chunk).
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MAX = 2**63 - 1


def _int(obj: Mapping[str, Any], name: str, *, minimum: int | None = None, maximum: int | None = INT32_MAX) -> int:
    v = _req(obj, name)
    if not _is_int(v):
        raise MalformedPayload(f"field {name!r} must be an int, got {type(v).__name__}", field=name)
    if minimum is not None and v < minimum:
        raise MalformedPayload(f"field {name!r} = {v} is below {minimum}", field=name)
    if maximum is not None and v > maximum:
        raise MalformedPayload(f"field {name!r} = {v} is above {maximum}", field=name)
    return v


def _minute(obj: Mapping[str, Any], name: str) -> int:
    """A Keepa-minute field: a non-negative int below :data:`MAX_KEEPA_MINUTE`."""
    return _int(obj, name, minimum=0, maximum=MAX_KEEPA_MINUTE)


def _int_list(value: Any, name: str, *, min_len: int = 1, lo: int = INT32_MIN, hi: int = INT32_MAX) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise MalformedPayload(f"field {name!r} must be a list, got {type(value).__name__}", field=name)
    if len(value) > MAX_ARRAY_LEN:
        raise MalformedPayload(f"field {name!r} has {len(value)} entries (max {MAX_ARRAY_LEN})", field=name)
    if len(value) < min_len:
        raise MalformedPayload(f"field {name!r} has {len(value)} entries (min {min_len})", field=name)
    for i, v in enumerate(value):
        if not _is_int(v):
            raise MalformedPayload(f"field {name!r}[{i}] must be an int, got {type(v).__name__}", field=name)
        if not lo <= v <= hi:
            raise MalformedPayload(f"field {name!r}[{i}] = {v} is out of range", field=name)
    return tuple(value)


def _bool_list(value: Any, name: str) -> tuple[bool, ...]:
    if not isinstance(value, list):
        raise MalformedPayload(f"field {name!r} must be a list, got {type(value).__name__}", field=name)
    if not 1 <= len(value) <= MAX_ARRAY_LEN:
        raise MalformedPayload(f"field {name!r} has {len(value)} entries (1..{MAX_ARRAY_LEN})", field=name)
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool):
            out.append(v)
        elif _is_int(v) and v in (0, 1):
            out.append(bool(v))
        else:
            raise MalformedPayload(f"field {name!r}[{i}] must be a bool, got {v!r:.40}", field=name)
    return tuple(out)


def _int_matrix(value: Any, name: str) -> tuple[tuple[int, ...], ...]:
    """avg/delta/deltaPercent: 4 date intervals (outer) x price types (inner)."""
    if not isinstance(value, list):
        raise MalformedPayload(f"field {name!r} must be a list, got {type(value).__name__}", field=name)
    if len(value) != DATE_INTERVALS:
        raise MalformedPayload(
            f"field {name!r} must have {DATE_INTERVALS} date intervals, got {len(value)}", field=name
        )
    return tuple(_int_list(row, f"{name}[{i}]") for i, row in enumerate(value))


def _opt_str(obj: Mapping[str, Any], name: str) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise MalformedPayload(f"field {name!r} must be a string, got {type(v).__name__}", field=name)
    return v


@dataclass(frozen=True)
class Deal:
    """One element of ``deals.dr`` in a /deal response (KEEPA_API.md §4.5).

    ``avg``/``delta``/``delta_percent`` are indexed ``[date_interval][price_type]`` with date interval
    0 day, 1 week, 2 month, 3 90 days. Times are Keepa minutes (see :mod:`keepa_time`).
    """

    asin: str
    title: str
    current: tuple[int, ...]
    avg: tuple[tuple[int, ...], ...]
    delta: tuple[tuple[int, ...], ...]
    delta_percent: tuple[tuple[int, ...], ...]
    delta_last: tuple[int, ...]
    current_since: tuple[int, ...]
    back_in_stock: tuple[bool, ...]
    categories: tuple[int, ...]
    root_cat: int
    creation_date: int
    last_update: int
    lightning_start: int
    lightning_end: int
    image_name: str | None
    warehouse_condition: int
    warehouse_condition_comment: str | None
    sales_rank_drops30: int
    sales_rank_drops90: int
    sales_rank_drops180: int
    sales_rank_drops365: int
    parent_asin: str | None
    raw: dict = _field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, obj: Any) -> "Deal":
        """Validate and parse one deal object. Raises :class:`MalformedPayload` naming the field."""
        if not isinstance(obj, Mapping):
            raise MalformedPayload(f"deal is {type(obj).__name__}, not an object", field="deal")
        asin = _req(obj, "asin")
        if not is_valid_asin(asin):
            raise MalformedPayload(f"asin {asin!r:.40} is not a valid ASIN", field="asin")
        title = _req(obj, "title")
        if not isinstance(title, str):
            raise MalformedPayload(f"field 'title' must be a string, got {type(title).__name__}", field="title")
        raw_image = obj.get("image")
        if raw_image is not None and not isinstance(raw_image, (list, str)):
            raise MalformedPayload(f"field 'image' must be a list of codes, got {type(raw_image).__name__}",
                                   field="image")
        if isinstance(raw_image, list) and len(raw_image) > MAX_ARRAY_LEN:
            raise MalformedPayload(f"field 'image' has {len(raw_image)} entries", field="image")
        try:
            image_name = decode_image_name(raw_image)
        except ValueError as exc:
            raise MalformedPayload(f"field 'image': {exc}", field="image") from None
        categories = _req(obj, "categories")
        return cls(
            asin=asin,
            title=title,
            current=_int_list(_req(obj, "current"), "current"),
            avg=_int_matrix(_req(obj, "avg"), "avg"),
            delta=_int_matrix(_req(obj, "delta"), "delta"),
            delta_percent=_int_matrix(_req(obj, "deltaPercent"), "deltaPercent"),
            delta_last=_int_list(_req(obj, "deltaLast"), "deltaLast"),
            current_since=_int_list(_req(obj, "currentSince"), "currentSince"),
            back_in_stock=_bool_list(_req(obj, "backInStock"), "backInStock"),
            categories=_int_list(categories, "categories", min_len=0, lo=0, hi=INT64_MAX),
            root_cat=_int(obj, "rootCat", minimum=0, maximum=INT64_MAX),
            creation_date=_minute(obj, "creationDate"),
            last_update=_minute(obj, "lastUpdate"),
            lightning_start=_minute(obj, "lightningStart"),
            lightning_end=_minute(obj, "lightningEnd"),
            image_name=image_name,
            warehouse_condition=_int(obj, "warehouseCondition", minimum=0),
            warehouse_condition_comment=_opt_str(obj, "warehouseConditionComment"),
            sales_rank_drops30=_int(obj, "salesRankDrops30", minimum=-1),
            sales_rank_drops90=_int(obj, "salesRankDrops90", minimum=-1),
            sales_rank_drops180=_int(obj, "salesRankDrops180", minimum=-1),
            sales_rank_drops365=_int(obj, "salesRankDrops365", minimum=-1),
            parent_asin=_opt_str(obj, "parentAsin") or None,
            raw=dict(obj),
        )

    def __repr__(self) -> str:  # the 34-wide arrays would drown a log line
        return (f"Deal(asin={self.asin!r}, title={self.title[:60]!r}, last_update={self.last_update}, "
                f"creation_date={self.creation_date}, root_cat={self.root_cat})")

    @property
    def title_text(self) -> str:
        """The title with HTML tags stripped and entities unescaped."""
        return strip_html(self.title)

    @property
    def image_url(self) -> str | None:
        return image_url(self.image_name)

    @property
    def last_update_utc(self) -> _datetime:
        return _kt.keepa_minute_to_datetime(self.last_update)

    @property
    def creation_date_utc(self) -> _datetime:
        return _kt.keepa_minute_to_datetime(self.creation_date)

    def price(self, price_type: int) -> int | None:
        """Current value for ``price_type`` (cents, rank or count); None for -1/-2 or out of range."""
        if not 0 <= price_type < len(self.current):
            return None
        value = self.current[price_type]
        return None if value in PRICE_SENTINELS else value

    def delta_percent_at(self, date_interval: int, price_type: int) -> int | None:
        """``deltaPercent[date_interval][price_type]`` (the field the sample filters hold at, [3][2])."""
        if not 0 <= date_interval < len(self.delta_percent):
            return None
        row = self.delta_percent[date_interval]
        return row[price_type] if 0 <= price_type < len(row) else None


@dataclass(frozen=True)
class SkippedDeal:
    """An element of a page that failed validation and was skipped (the rest of the page is kept)."""

    index: int
    asin: str | None
    reason: str


def _skip(index: int, obj: Any, exc: MalformedPayload) -> SkippedDeal:
    asin = obj.get("asin") if isinstance(obj, Mapping) else None
    return SkippedDeal(index=index, asin=asin if isinstance(asin, str) else None,
                       reason=f"{exc.field or 'deal'}: {exc}")


def _opt_list(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> tuple:
    v = obj.get(name)
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > 100_000:
        raise MalformedPayload(f"field {name!r} must be a list", field=name)
    for x in v:
        if not isinstance(x, kind) or isinstance(x, bool):
            raise MalformedPayload(f"field {name!r} holds a {type(x).__name__}", field=name)
    return tuple(v)


@dataclass(frozen=True)
class DealPage:
    """One parsed /deal response page: deals in server order, skipped entries, envelope."""

    page: int
    deals: tuple[Deal, ...]
    skipped: tuple[SkippedDeal, ...]
    raw_count: int
    status: TokenStatus
    category_ids: tuple[int, ...] = ()
    category_names: tuple[str, ...] = ()
    category_counts: tuple[int, ...] = ()
    raw: dict = _field(default_factory=dict, compare=False, repr=False)

    @property
    def is_last(self) -> bool:
        """True when the page is short (< 150 entries, skipped ones included): stop paging here."""
        return self.raw_count < DEAL_PAGE_SIZE

    @classmethod
    def from_response(cls, body: Any, page: int) -> "DealPage":
        """Parse a /deal response body. Malformed deals become :class:`SkippedDeal`; a body without a
        usable envelope or ``deals.dr`` list raises :class:`MalformedPayload`."""
        status = TokenStatus.from_envelope(body)
        deals_obj = body.get("deals")
        if not isinstance(deals_obj, Mapping):
            raise MalformedPayload(
                f"field 'deals' must be an object, got {type(deals_obj).__name__}", field="deals"
            )
        dr = deals_obj.get("dr")
        if not isinstance(dr, list):
            raise MalformedPayload(f"field 'deals.dr' must be a list, got {type(dr).__name__}", field="deals.dr")
        deals: list[Deal] = []
        skipped: list[SkippedDeal] = []
        for i, obj in enumerate(dr):
            try:
                deals.append(Deal.from_json(obj))
            except MalformedPayload as exc:
                skipped.append(_skip(i, obj, exc))
        return cls(
            page=int(page),
            deals=tuple(deals),
            skipped=tuple(skipped),
            raw_count=len(dr),
            status=status,
            category_ids=_opt_list(deals_obj, "categoryIds", int),
            category_names=_opt_list(deals_obj, "categoryNames", str),
            category_counts=_opt_list(deals_obj, "categoryCount", int),
            raw=body if isinstance(body, dict) else dict(body),
        )


def _opt_int(obj: Mapping[str, Any], name: str) -> int | None:
    v = obj.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise MalformedPayload(f"field {name!r} must be an int, got {type(v).__name__}", field=name)
    if not -(2**63) <= v <= 2**63 - 1:
        raise MalformedPayload(f"field {name!r} = {v} is out of range", field=name)
    return v


def _price_or_none(v: int | None) -> int | None:
    return None if v is None or v < 0 else v


@dataclass(frozen=True)
class Product:
    """The fields of a /product object the pipeline uses; everything else stays in ``raw``."""

    asin: str
    title: str | None
    last_update: int | None
    root_category: int
    categories: tuple[int, ...]
    stats_current: tuple[int, ...] | None
    sales_rank: int | None
    total_offer_count: int | None
    live_offer_count: int | None
    offers_successful: bool | None
    buy_box_used_price: int | None
    used_price: int | None
    #: stats fields stage 1 (/product without offers) judges: they are on no deal page.
    sales_rank_drops90: int | None = None
    out_of_stock_percentage90: tuple[int, ...] | None = None
    raw: dict = _field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, obj: Any) -> "Product":
        """Parse one element of ``products[]`` (the samples are such single objects)."""
        if not isinstance(obj, Mapping):
            raise MalformedPayload(f"product is {type(obj).__name__}, not an object", field="product")
        asin = _req(obj, "asin")
        if not is_valid_asin(asin):
            raise MalformedPayload(f"asin {asin!r:.40} is not a valid ASIN", field="asin")
        last_update = _opt_int(obj, "lastUpdate")
        if last_update is not None and not 0 <= last_update <= MAX_KEEPA_MINUTE:
            raise MalformedPayload(f"lastUpdate {last_update} is out of range", field="lastUpdate")
        stats = obj.get("stats")
        if stats is not None and not isinstance(stats, Mapping):
            raise MalformedPayload(f"field 'stats' must be an object, got {type(stats).__name__}", field="stats")
        stats = stats or {}
        current = stats.get("current")
        stats_current = _int_list(current, "stats.current") if current is not None else None
        live = obj.get("liveOffersOrder")
        if live is not None and not isinstance(live, list):
            raise MalformedPayload("field 'liveOffersOrder' must be a list", field="liveOffersOrder")
        ok = obj.get("offersSuccessful")
        if ok is not None and not isinstance(ok, bool):
            raise MalformedPayload("field 'offersSuccessful' must be a bool", field="offersSuccessful")
        cats = obj.get("categories")
        return cls(
            asin=asin,
            title=_opt_str(obj, "title"),
            last_update=last_update,
            root_category=_opt_int(obj, "rootCategory") or 0,
            categories=_int_list(cats, "categories", min_len=0, lo=0, hi=INT64_MAX) if cats is not None else (),
            stats_current=stats_current,
            sales_rank=_price_or_none(stats_current[3]) if stats_current and len(stats_current) > 3 else None,
            total_offer_count=_int(stats, "totalOfferCount", minimum=-2) if "totalOfferCount" in stats else None,
            live_offer_count=len(live) if live is not None else None,
            offers_successful=ok,
            buy_box_used_price=(
                _price_or_none(_int(stats, "buyBoxUsedPrice")) if stats.get("buyBoxUsedPrice") is not None else None
            ),
            used_price=_price_or_none(stats_current[2]) if stats_current and len(stats_current) > 2 else None,
            sales_rank_drops90=(
                _int(stats, "salesRankDrops90", minimum=-1) if stats.get("salesRankDrops90") is not None else None
            ),
            out_of_stock_percentage90=(
                _int_list(stats["outOfStockPercentage90"], "stats.outOfStockPercentage90", min_len=0)
                if stats.get("outOfStockPercentage90") is not None else None
            ),
            raw=dict(obj),
        )

    @property
    def last_update_utc(self) -> _datetime | None:
        return None if self.last_update is None else _kt.keepa_minute_to_datetime(self.last_update)

    def stat_current(self, index: int) -> int | None:
        """``stats.current[index]`` (price, rank or count); None for -1/-2 or without stats."""
        if self.stats_current is None or not 0 <= index < len(self.stats_current):
            return None
        return _price_or_none(self.stats_current[index])

    def out_of_stock_pct90(self, price_type: int) -> int | None:
        """``stats.outOfStockPercentage90[price_type]``; None when unknown (-1 or absent)."""
        values = self.out_of_stock_percentage90
        if values is None or not 0 <= price_type < len(values) or values[price_type] < 0:
            return None
        return values[price_type]


@dataclass(frozen=True)
class ProductPage:
    """A parsed /product response: products in server order, skipped entries, envelope."""

    products: tuple[Product, ...]
    skipped: tuple[SkippedDeal, ...]
    status: TokenStatus
    raw: dict = _field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_response(cls, body: Any) -> "ProductPage":
        """Parse a /product response. Malformed products become skipped entries."""
        status = TokenStatus.from_envelope(body)
        products = body.get("products")
        if not isinstance(products, list):
            raise MalformedPayload(
                f"field 'products' must be a list, got {type(products).__name__}", field="products"
            )
        parsed: list[Product] = []
        skipped: list[SkippedDeal] = []
        for i, obj in enumerate(products):
            try:
                parsed.append(Product.from_json(obj))
            except MalformedPayload as exc:
                skipped.append(_skip(i, obj, exc))
        return cls(products=tuple(parsed), skipped=tuple(skipped), status=status,
                   raw=body if isinstance(body, dict) else dict(body))

    def by_asin(self) -> dict[str, Product]:
        return {p.asin: p for p in self.products}


def retry_after_ms(source: "TokenStatus | Any", now_ms: int, need: int = 1, margin_ms: int = 1_000) -> int:
    """How long to wait before retrying after a 429 (or any envelope): :func:`refill_wait_ms`.

    ``source`` is a :class:`TokenStatus` or an error carrying ``.status`` (e.g. ``NotEnoughTokens``).
    Without a status (a 429 whose body was unreadable) the balance is unknown: wait one refill period
    and let the next envelope (or one ``/token`` call) tell the truth.
    """
    status = source if isinstance(source, TokenStatus) else getattr(source, "status", None)
    if status is None:
        return REFILL_PERIOD_MS + margin_ms
    return refill_wait_ms(status, need=need, now_ms=now_ms, margin_ms=margin_ms)
