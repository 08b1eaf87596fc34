"""A deterministic synthetic deal list and product database shaped like Keepa's (KEEPA_API.md §4, §5).

Everything derives from ``seed`` and the simulator start time:

* the initial catalog (``catalog_size`` deals, ``lastUpdate`` spread over the 22 h before the start);
* optional *drift*: per simulated minute slot ``i`` since the start, ``random.Random(f"{seed}:drift:{i}")``
  decides how many new deals arrive and how many existing deals are refreshed (new ``lastUpdate``, new
  prices), and at which instant inside the slot each event becomes visible. Events are applied lazily, in
  time order, when a request reads the catalog, so the state at time ``t`` does not depend on when, or how
  often, the catalog was read before ``t``;
* products for ``/product``, built from the ASIN (and the current deal, when the ASIN is in the catalog).

Deal dicts are never mutated after creation (an update replaces the dict), so callers may serialize them
outside the catalog lock.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute
from deals_pipeline.simulator.filters import DealFilter, is_lowest
from deals_pipeline.simulator.products import (
    PRODUCT_KEYS,
    RATING_FRESH_MIN,
    ProductTraits,
    build_offers,
    empty_product,
    seller_id,
)
from deals_pipeline.simulator.products import cost as product_cost

#: Deals per /deal page, and the most a query yields (pages 0..66).
PAGE_SIZE = 150
MAX_RESULTS = 10_000
MAX_PAGE = (MAX_RESULTS - 1) // PAGE_SIZE  # 66
#: Price types (and csv indices) in every deal array.
N_TYPES = 34
#: Date intervals of avg/delta/deltaPercent: day, week, month, 90 days.
N_INTERVALS = 4
#: priceTypes accepted by /deal (KEEPA_API.md §4.1).
DEAL_PRICE_TYPES = frozenset({0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 18, 19, 20, 21, 22, 32, 33})
UNKNOWN_ROOT = 9223372036854775807
#: What sortType 1 ("deal age") may order by; no real sample settles which (KEEPA_API.md §4.2).
SORT1_FIELDS = ("lastUpdate", "creationDate")
#: Observed: lastUpdate up to 1,340 min before the response timestamp.
INITIAL_SPREAD_MIN = 1_340

#: (id, name, weight): the categoryIds/categoryNames/categoryCount of the real sample b3f7397 (the deals of the
#: Books/used query's ranges, in every root category).
ROOT_CATEGORIES: tuple[tuple[int, str, float], ...] = (
    (283155, "Books", 779.0),
    (5174, "CDs & Vinyl", 974.0),
    (2625373011, "Movies & TV", 589.0),
    (1055398, "Home & Kitchen", 92.0),
    (172282, "Electronics", 41.0),
    (228013, "Tools & Home Improvement", 102.0),
    (7141123011, "Clothing, Shoes & Jewelry", 104.0),
    (1064954, "Office Products", 49.0),
    (15684181, "Automotive", 48.0),
    (3375251, "Sports & Outdoors", 35.0),
    (468642, "Video Games", 30.0),
    (2972638011, "Patio, Lawn & Garden", 25.0),
    (16310091, "Industrial & Scientific", 13.0),
    (2335752011, "Cell Phones & Accessories", 7.0),
    (3760901, "Health & Household", 6.0),
    (165793011, "Toys & Games", 5.0),
    (2617941011, "Arts, Crafts & Sewing", 4.0),
    (11091801, "Musical Instruments", 5.0),
    (3760911, "Beauty & Personal Care", 1.0),
    (2619533011, "Pet Supplies", 1.0),
    (2619525011, "Appliances", 4.0),
    (16310101, "Grocery & Gourmet Food", 2.0),
    (165796011, "Baby Products", 1.0),
    (UNKNOWN_ROOT, "?", 2.0),
)
_ROOT_NAMES = {cid: name for cid, name, _ in ROOT_CATEGORIES}
BOOKS = 283155
USED = 2
#: The production Books/used query (deals_pipeline.config.DEFAULT_SELECTION, KEEPA_API.md §4.1). The catalog
#: is drawn around it: REFERENCE_SHARE of the deals meet all its filters (800 deals -> ~770, as the samples'
#: 755-793), every other deal misses exactly one, so each filter visibly removes its own misses.
REFERENCE_SELECTION: dict[str, Any] = {
    "domainId": 1, "priceTypes": [2], "dateRange": 3, "isFilterEnabled": True, "isRangeEnabled": True,
    "deltaPercentRange": [50, 2147483647], "deltaRange": [1950, 9900], "currentRange": [2000, 30100],
    "salesRankRange": [50000, 1500000], "minRating": 10, "includeCategories": [BOOKS],
}
_REF = REFERENCE_SELECTION
REFERENCE = "reference"
REFERENCE_SHARE = 0.96
#: Which filter a non-reference deal misses, and how often ("category": a root other than Books).
_MISSES = ("category", "price", "delta", "percent", "rank", "rating")
_MISS_WEIGHTS = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)
_OTHER_ROOT_IDS = [cid for cid, _, _ in ROOT_CATEGORIES if cid != BOOKS]
_OTHER_ROOT_WEIGHTS = [w for cid, _, w in ROOT_CATEGORIES if cid != BOOKS]
_ROOT_IDS = [cid for cid, _, _ in ROOT_CATEGORIES]

_WORDS = (
    "history art garden river night city dream light shadow secret journey kitchen science music ocean "
    "mountain winter summer empire letters stone silver golden practical guide complete modern ancient "
    "hidden little great last first american english french world war peace love death life mind heart "
    "spirit field handbook manual collection stories poems essays volume edition studies theory method"
).split()
_SURNAMES = ("Peebles", "Hart", "Lindqvist", "Okafor", "Moreau", "Castillo", "Brennan", "Tanaka", "Novak", "Reyes")
_GIVEN = ("Karen", "James", "Amara", "Luis", "Ingrid", "Tom", "Mei", "Pavel", "Rosa", "Daniel")
#: (productGroup, type, itemTypeKeyword, salesRankDisplayGroup/websiteDisplayGroup, websiteDisplayGroupName).
_PRODUCT_GROUPS = {283155: ("Book", "ABIS_BOOK", "books", "book_display_on_website", "Book")}
_SUBTITLES = (
    "A Novel", "A Memoir", "Second Edition", "The Complete Guide", "Selected Essays", "A History",
    "Book 1", "Volume 2", "Revised and Updated", "Illustrated Edition",
)
_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_IMG_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_WAREHOUSE_COMMENTS = (
    "Item will come in original packaging. Packaging will be damaged.",
    "Minor cosmetic imperfection on top of item.",
    "Cover has light wear; pages clean.",
)
#: csv types whose entries are triples (minute, price, shipping).
SHIPPING_TYPES = frozenset({7, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 32})
#: Count/rating types (not prices): their averages barely move.
_COUNT_TYPES = frozenset({11, 12, 13, 14, 15, 16, 17})
#: Share of avg cells that are -2, per price type, in the 3,095 sample deals (28 of 34 types; 6, 27, 33 always).
_AVG_MINUS2_SHARE: dict[int, float] = {0: 0.287, 1: 0.007, 4: 0.023, 5: 0.354, 6: 1.0, 7: 0.017, 8: 0.984, 9: 0.66, 10: 0.252, 11: 0.005, 13: 0.938, 14: 0.33, 18: 0.032, 19: 0.034, 20: 0.02, 21: 0.008, 22: 0.07, 23: 0.761, 24: 0.696, 25: 0.51, 26: 0.889, 27: 1.0, 28: 0.693, 29: 0.669, 30: 0.592, 31: 0.814, 32: 0.023, 33: 0.999}


class DealVersion(NamedTuple):
    """One version of a deal ever generated: when it became visible and with which ``lastUpdate``."""

    asin: str
    last_update: int  # Keepa minute
    visible_from_ms: int


@dataclass(frozen=True)
class ProductRequest:
    """Validated /product options relevant to content and cost."""

    offers: int | None = None  # 20..100 or None
    only_live_offers: bool = False
    rating: bool = False
    buybox: bool = False
    stock: bool = False
    stats: str | None = None
    history: bool = True
    days: int | None = None


def _rng(*parts: Any) -> random.Random:
    """A stable RNG for a tuple of parts (str seeding is hashed with SHA-512, stable across runs)."""
    return random.Random(":".join(str(p) for p in parts))


def _isbn10(rng: random.Random) -> str:
    digits = [rng.randrange(10) for _ in range(9)]
    check = sum((10 - i) * d for i, d in enumerate(digits)) % 11
    check = (11 - check) % 11
    return "".join(map(str, digits)) + ("X" if check == 10 else str(check))


def _isbn13(isbn10: str) -> str:
    body = "978" + isbn10[:9]
    check = (10 - sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(body)) % 10) % 10
    return body + str(check)


def make_asin(rng: random.Random) -> str:
    """A plausible ASIN: an ISBN-10 (books) or ``B0`` + 8 alphanumerics."""
    if rng.random() < 0.6:
        return _isbn10(rng)
    return "B0" + "".join(rng.choice(_ALNUM) for _ in range(8))


def _title(rng: random.Random) -> str:
    n = rng.randint(2, 7)
    words = [rng.choice(_WORDS) for _ in range(n)]
    title = " ".join(w.capitalize() if i == 0 or rng.random() < 0.7 else w for i, w in enumerate(words))
    if rng.random() < 0.4:
        title += ": " + rng.choice(_SUBTITLES)
    r = rng.random()
    if r < 0.03:  # HTML markup "in rare cases"
        parts = title.split(" ", 1)
        title = f"<b>{parts[0]}</b>" + (" " + parts[1] if len(parts) > 1 else "")
    elif r < 0.05:
        title = title.replace(" ", " &amp; ", 1)
    elif r < 0.06:
        title = f"{title} <i>(Paperback)</i>"
    return title


def _image(rng: random.Random) -> list[int]:
    name = str(rng.randint(1, 9)) + "".join(rng.choice(_IMG_CHARS) for _ in range(10)) + ".jpg"
    return [ord(c) for c in name]


class _Static(NamedTuple):
    """The part of a deal that never changes across versions."""

    asin: str
    title: str
    categories: list[int]
    root_cat: int
    image: list[int]
    creation_date: int
    warehouse_condition: int
    warehouse_comment: str | None
    profile: str


def _make_static(asin: str, seed: int, creation_date: int) -> _Static:
    rng = _rng(seed, "static", asin)
    profile = REFERENCE if rng.random() < REFERENCE_SHARE else rng.choices(_MISSES, weights=_MISS_WEIGHTS)[0]
    root = BOOKS if profile != "category" else rng.choices(_OTHER_ROOT_IDS, weights=_OTHER_ROOT_WEIGHTS)[0]
    cats = sorted({rng.choice((rng.randint(1_000, 30_000), rng.randint(1_000_000_000, 20_000_000_000)))
                   for _ in range(rng.randint(1, 4))})
    wc = 0
    comment = None
    if rng.random() < 0.03:
        wc = rng.choice((2, 2, 3, 4, 5))
        if rng.random() < 0.8:
            comment = rng.choice(_WAREHOUSE_COMMENTS)
    return _Static(asin, _title(rng), cats, root, _image(rng), creation_date, wc, comment, profile)


class _UsedShape(NamedTuple):
    """The cells the reference query reads: USED price and its four averages, sales rank, rating."""

    used: int
    avg: tuple[int, int, int, int]
    rank: int
    rating: int


def _shape(profile: str, rng: random.Random) -> _UsedShape:
    """Draw the reference query's cells so the deal meets every filter of REFERENCE_SELECTION, or misses
    exactly the one its ``profile`` names (KEEPA_API.md §4.1; ``delta`` = average - current)."""
    (c_lo, c_hi), (d_lo, d_hi) = _REF["currentRange"], _REF["deltaRange"]
    p_lo, p_hi = _REF["deltaPercentRange"][0], 81  # the samples' highest 90-day USED drop is 81 %
    r_lo, r_hi = _REF["salesRankRange"]
    rank = round(math.exp(rng.uniform(math.log(r_lo), math.log(r_hi))))
    rating = rng.randint(_REF["minRating"], 50)
    if profile == "rank":
        rank = rng.randint(1_000, r_lo - 1) if rng.random() < 0.5 else rng.randint(r_hi + 1, 5_000_000)
    elif profile == "rating":
        rating = -1 if rng.random() < 0.3 else rng.randint(0, _REF["minRating"] - 1)
    used = avg3 = 0
    for _ in range(100):
        # Percentage drops crowd near the filter minimum, as in the samples (81 ... 50).
        pct = rng.randint(10, p_lo - 1) if profile == "percent" else p_lo + int((p_hi - p_lo + 1) * rng.random() ** 2)
        lo = max(c_lo, math.ceil(d_lo * (100 - pct) / pct))
        hi = min(c_hi, math.floor(d_hi * (100 - pct) / pct))
        if profile == "price":
            lo, hi = (199, c_lo - 1) if rng.random() < 0.5 else (c_hi + 1, 60_000)
        elif profile == "delta":
            lo, hi = max(c_lo, math.floor(d_hi * (100 - pct) / pct) + 1), c_hi
        if lo > hi:
            continue
        used = rng.randint(lo, hi)
        avg3 = round(used * 100 / (100 - pct))
        delta, p = avg3 - used, round((avg3 - used) * 100 / avg3)
        in_price, in_delta, in_pct = c_lo <= used <= c_hi, d_lo <= delta <= d_hi, p >= p_lo
        wanted = {
            "price": (not in_price, in_pct),
            "delta": (in_price, not in_delta, in_pct),
            "percent": (in_price, in_delta, not in_pct),
        }.get(profile, (in_price, in_delta, in_pct))
        if all(wanted):
            break
    delta3 = avg3 - used
    # Shorter intervals hold smaller drops: few deals pass the filters on intervals 0-2 (18-203 of ~770).
    avgs = tuple(used + round(delta3 * rng.uniform(lo_f, hi_f)) for lo_f, hi_f in ((0, 0.4), (0.05, 0.65), (0.15, 0.85)))
    return _UsedShape(used, (*avgs, avg3), rank, rating)


def _prices(rng: random.Random, wc: int, shape: _UsedShape | None = None) -> list[int]:
    """``current``: 34 ints, -1 where there is no offer, -2 sometimes at RENT (31) as in real data."""
    cur = [-1] * N_TYPES
    used = rng.randint(199, 30_000) if shape is None else shape.used
    new = used + rng.randint(0, 25_000) if rng.random() < 0.75 else -1
    cur[0] = new + rng.randint(-200, 500) if new > 0 and rng.random() < 0.3 else -1  # AMAZON
    cur[1] = new
    cur[2] = used
    cur[3] = rng.randint(5_000, 3_000_000)  # sales rank
    cur[4] = max(used, new) + rng.randint(0, 5_000) if rng.random() < 0.97 else -1  # LISTPRICE
    cur[5] = used + rng.randint(100, 9_000) if rng.random() < 0.25 else -1  # COLLECTIBLE
    cur[7] = new + 399 if new > 0 else -1  # NEW_FBM_SHIPPING
    cur[9] = int(used * 0.9) if wc else -1  # WAREHOUSE
    cur[10] = new + rng.randint(0, 900) if new > 0 and rng.random() < 0.25 else -1  # NEW_FBA
    cur[11] = rng.randint(1, 40) if new > 0 else -1  # COUNT_NEW
    cur[12] = rng.randint(1, 60)  # COUNT_USED
    cur[14] = rng.randint(1, 5) if cur[5] > 0 else -1  # COUNT_COLLECTIBLE
    cur[15] = rng.randint(0, 30) if rng.random() < 0.998 else -2  # EXTRA_INFO_UPDATES
    cur[16] = rng.randint(10, 50)  # RATING
    cur[17] = rng.randint(1, 20_000)  # COUNT_REVIEWS
    cur[18] = cur[7] if rng.random() < 0.5 else -1  # BUY_BOX_SHIPPING
    for i in (19, 20, 21, 22):  # USED_*_SHIPPING
        cur[i] = used + rng.randint(0, 3_000) if rng.random() < 0.6 else -1
    cur[21] = cur[21] if cur[21] > 0 else used + 399
    for i in (23, 24, 25, 26):  # COLLECTIBLE_*_SHIPPING
        cur[i] = cur[5] + 399 if cur[5] > 0 and rng.random() < 0.4 else -1
    cur[28] = used + rng.randint(0, 2_000) if rng.random() < 0.2 else -1  # EBAY_NEW_SHIPPING
    cur[29] = used + rng.randint(0, 2_000) if rng.random() < 0.3 else -1  # EBAY_USED_SHIPPING
    cur[31] = -2 if rng.random() < 0.18 else -1  # RENT
    cur[32] = used + 399 if rng.random() < 0.8 else -1  # BUY_BOX_USED_SHIPPING
    if shape is not None:
        cur[3], cur[16] = shape.rank, shape.rating
    return cur


def _make_deal(static: _Static, seed: int, version: int, last_update: int) -> dict[str, Any]:
    """A complete deal object (KEEPA_API.md §4.5) for one version of an ASIN."""
    rng = _rng(seed, "deal", static.asin, version)
    shape = _shape(static.profile, _rng(seed, "shape", static.asin, version))
    cur = _prices(rng, static.warehouse_condition, shape)
    # Fractional drop of the average versus current per interval, growing with the interval length.
    base_drop = rng.uniform(-0.3, 0.9)
    rnd = rng.random
    avg: list[list[int]] = []
    delta: list[list[int]] = []
    pct: list[list[int]] = []
    for r in range(N_INTERVALS):
        factor = 0.25 + 0.25 * r
        a_row, d_row, p_row = [], [], []
        for i in range(N_TYPES):
            c = cur[i]
            if c < 0 and rnd() < _AVG_MINUS2_SHARE.get(i, 0.0):
                a = -2  # "unable to determine": where the samples have it, as often as there
            elif c < 0:
                a = -1 if rnd() < 0.85 else 500 + int(rnd() * 19_500)
            elif i in _COUNT_TYPES:
                a = max(0, c + int(rnd() * 7) - 3)
            else:
                drop = base_drop * factor + (rnd() - 0.5) * 0.1
                drop = 0.95 if drop > 0.95 else (-1.5 if drop < -1.5 else drop)
                a = max(1, round(c / (1.0 - drop)))
            a_row.append(a)
            if c >= 0 and a > 0:
                d = a - c  # observed sign: avg - current (positive for a price drop)
                d_row.append(d)
                p_row.append(round(d * 100 / a))
            else:
                d_row.append(0)
                p_row.append(0)
        a_row[USED] = shape.avg[r]
        d_row[USED] = shape.avg[r] - cur[USED]
        p_row[USED] = round(d_row[USED] * 100 / shape.avg[r])
        avg.append(a_row)
        delta.append(d_row)
        pct.append(p_row)
    delta_last = [0] * N_TYPES
    for i in (1, 2, 3, 12):
        if cur[i] > 0 and rng.random() < 0.3:
            delta_last[i] = rng.randint(-cur[i] // 4, cur[i] // 4)
    current_since = [
        (last_update - int(rnd() * 300_000) if c >= 0 else (-1 if rnd() < 0.8 else 4_000_000 + int(rnd() * 3_000_000)))
        for c in cur
    ]
    back_in_stock = [False] * N_TYPES
    if rng.random() < 0.02:
        back_in_stock[rng.choice((1, 2))] = True
    d30 = rng.randint(0, 30)
    d90 = d30 + rng.randint(0, 40)
    d180 = d90 + rng.randint(0, 60)
    d365 = d180 + rng.randint(0, 100)
    deal: dict[str, Any] = {
        "asin": static.asin,
        "title": static.title,
        "current": cur,
        "avg": avg,
        "delta": delta,
        "deltaPercent": pct,
        "deltaLast": delta_last,
        "currentSince": current_since,
        "backInStock": back_in_stock,
        "categories": list(static.categories),
        "rootCat": static.root_cat,
        "creationDate": static.creation_date,
        "lastUpdate": last_update,
        "lightningStart": 0,
        "lightningEnd": 0,
        "image": list(static.image),
        "warehouseCondition": static.warehouse_condition,
        "salesRankDrops30": d30,
        "salesRankDrops90": d90,
        "salesRankDrops180": d180,
        "salesRankDrops365": d365,
        "dateIntervalIndex": 0,
    }
    if static.warehouse_comment is not None:
        deal["warehouseConditionComment"] = static.warehouse_comment
    return deal


#: A refresh changes a price type's current value with this probability (most refreshes only move
#: ``lastUpdate`` and the rank), by at most this fraction: so a refreshed deal moves a few places in the
#: delta orders, and the real samples' repeats sit only at page boundaries.
_REFRESH_PRICE_P = 0.1
_REFRESH_PRICE_MAX = 0.05


def _refresh_deal(prev: dict[str, Any], rng: random.Random, last_update: int) -> dict[str, Any]:
    """The next version of a listed deal: a Keepa refresh, i.e. a new ``lastUpdate``, a new rank most of the
    time, now and then a small price move (``delta`` = avg - current and ``deltaPercent`` recomputed)."""
    cur = list(prev["current"])
    delta_last = [0] * N_TYPES
    since = list(prev["currentSince"])
    for i, c in enumerate(cur):
        if c <= 0 or i in _COUNT_TYPES:
            continue
        p = 0.7 if i == 3 else _REFRESH_PRICE_P
        if rng.random() < p:
            span = 0.2 if i == 3 else _REFRESH_PRICE_MAX
            new = max(1, round(c * (1.0 + rng.uniform(-span, span))))
            delta_last[i] = new - c
            since[i] = last_update
            cur[i] = new
    delta, pct = [], []
    for a_row in prev["avg"]:
        d_row, p_row = [], []
        for c, a in zip(cur, a_row):
            if c >= 0 and a > 0:
                d_row.append(a - c)
                p_row.append(round((a - c) * 100 / a))
            else:
                d_row.append(0)
                p_row.append(0)
        delta.append(d_row)
        pct.append(p_row)
    deal = dict(prev)
    deal.update(current=cur, delta=delta, deltaPercent=pct, deltaLast=delta_last, currentSince=since,
                lastUpdate=last_update)
    return deal


#: Mean time between two refreshes of a listed deal under CALIBRATED_CHURN (800 deals / 250 per hour).
_MEAN_REFRESH_MIN = 192


def _initial_ages(rng: random.Random) -> tuple[int, int]:
    """(creationDate age, lastUpdate age) in minutes for the list as it stands when the simulator starts,
    drawn like the samples (KEEPA_API.md §4.6): 4-11 % created in the last hour, about half in the last
    24 h, the oldest ~60 days back; lastUpdate within 22.3 h, 20-47 % in the last hour (a deal is
    refreshed every ~3.2 h under calibrated churn)."""
    r = rng.random()
    if r < 0.08:
        creation_age = rng.randint(0, 59)
    elif r < 0.5:
        creation_age = rng.randint(60, 1_439)
    else:
        creation_age = round(math.exp(rng.uniform(math.log(1_440), math.log(60 * 1_440))))
    update_age = min(creation_age, INITIAL_SPREAD_MIN, int(rng.expovariate(1 / _MEAN_REFRESH_MIN)))
    return creation_age, update_age


#: Initial catalogs are pure functions of (seed, size, start_ms): memoize small ones (tests build many).
_INITIAL_CACHE: dict[tuple[int, int, int], tuple[Any, ...]] = {}
_INITIAL_LOCK = threading.Lock()
_INITIAL_CACHE_MAX_SIZE = 2_000


def _sort_key_fn(sort_type: int, date_range: int, price_type: int, sort1_orders_by: str = "lastUpdate"):
    """Key for the natural (non-inverted) order of ``abs(sort_type)``; ties break by ASIN."""
    st = abs(sort_type)
    if st == 1:  # deal age, newest first: by lastUpdate or creationDate (KEEPA_API.md §4.2 leaves it open)
        return lambda d: (-d[sort1_orders_by], d["asin"])
    if st == 2:  # absolute delta, highest first
        return lambda d: (-d["delta"][date_range][price_type], d["asin"])
    if st == 3:  # sales rank, lowest first; no rank (-1/-2) last
        return lambda d: (d["current"][3] if d["current"][3] >= 0 else math.inf, d["asin"])
    if st == 4:  # percentage delta, highest first
        return lambda d: (-d["deltaPercent"][date_range][price_type], d["asin"])
    raise ValueError(f"unsupported sortType {sort_type}")


class SyntheticCatalog:
    """Seeded deal list with optional drift; thread-safe."""

    def __init__(
        self,
        *,
        seed: int = 7,
        size: int = 800,
        start_ms: int,
        drift_new_per_hour: float = 0.0,
        drift_updates_per_hour: float = 0.0,
        drift_expired_per_hour: float = 0.0,
        sort1_orders_by: str = "lastUpdate",
        offers_pages_max: int = 2,
        future_minute_fraction: float = 0.005,
    ) -> None:
        if size < 0:
            raise ValueError("catalog size must be >= 0")
        if drift_new_per_hour < 0 or drift_updates_per_hour < 0 or drift_expired_per_hour < 0:
            raise ValueError("drift rates must be >= 0")
        if sort1_orders_by not in SORT1_FIELDS:
            raise ValueError(f"sort1_orders_by must be one of {SORT1_FIELDS}, got {sort1_orders_by!r}")
        if offers_pages_max < 1:
            raise ValueError("offers_pages_max must be >= 1")
        self.seed = int(seed)
        self.start_ms = int(start_ms)
        self.drift_new_per_hour = float(drift_new_per_hour)
        self.drift_updates_per_hour = float(drift_updates_per_hour)
        self.drift_expired_per_hour = float(drift_expired_per_hour)
        self.sort1_orders_by = sort1_orders_by
        self.offers_pages_max = int(offers_pages_max)
        self.future_minute_fraction = float(future_minute_fraction)
        self._lock = threading.RLock()
        self._statics: dict[str, _Static] = {}
        self._deals: dict[str, dict[str, Any]] = {}
        self._version_no: dict[str, int] = {}
        self._versions: list[DealVersion] = []
        self._asin_order: list[str] = []  # every ASIN ever listed, in first-listed order
        # Listed ASINs, for O(1) uniform picks and removals (swap-remove on expiry).
        self._live: list[str] = []
        self._live_idx: dict[str, int] = {}
        self._expired: list[tuple[str, int]] = []  # (asin, visible_from_ms) of every expiry
        self._generation = 0  # bumps on every change; keys the sort cache
        self._sort_cache: dict[tuple[Any, ...], tuple[int, list[dict[str, Any]]]] = {}
        self._cat_cache: dict[DealFilter | None, tuple[int, dict[str, list[Any]]]] = {}
        # Drift state: minute slots generated so far, and events not yet visible.
        self._slots_generated = 0
        self._pending: list[tuple[int, int, str, int]] = []  # (t_ms, seq, kind, event_seed)
        self._seq = 0
        self._now_applied = self.start_ms
        self._build_initial(size)

    # -- construction ------------------------------------------------------------------------
    def _new_asin(self, rng: random.Random) -> str:
        while True:
            asin = make_asin(rng)
            if asin not in self._statics:
                return asin

    def _add_version(self, asin: str, last_update: int, visible_from_ms: int, creation: int | None = None) -> None:
        static = self._statics.get(asin)
        if static is None:
            static = _make_static(asin, self.seed, creation if creation is not None else last_update)
            self._statics[asin] = static
            self._asin_order.append(asin)
        if asin not in self._live_idx:
            self._live_idx[asin] = len(self._live)
            self._live.append(asin)
        version = self._version_no.get(asin, -1) + 1
        self._version_no[asin] = version
        previous = self._deals.get(asin)
        if previous is None:
            self._deals[asin] = _make_deal(static, self.seed, version, last_update)
        else:
            self._deals[asin] = _refresh_deal(previous, _rng(self.seed, "refresh", asin, version), last_update)
        self._versions.append(DealVersion(asin, last_update, visible_from_ms))
        self._generation += 1

    def _build_initial(self, size: int) -> None:
        cache_key = (self.seed, size, self.start_ms)
        with _INITIAL_LOCK:
            cached = _INITIAL_CACHE.get(cache_key)
        if cached is not None:
            statics, deals, version_no, versions, order = cached
            self._statics, self._deals, self._version_no = dict(statics), dict(deals), dict(version_no)
            self._versions, self._asin_order = list(versions), list(order)
            self._live = list(order)
            self._live_idx = {a: i for i, a in enumerate(order)}
            self._generation += 1
            return
        rng = _rng(self.seed, "catalog")
        start_min = unix_ms_to_keepa_minute(self.start_ms)
        for _ in range(size):
            asin = self._new_asin(rng)
            creation_age, update_age = _initial_ages(rng)
            last_update = start_min - update_age
            if rng.random() < 0.007:  # observed: a few deals have lastUpdate < creationDate
                creation = last_update + rng.randint(1, 120)
            else:
                creation = start_min - creation_age
            self._add_version(asin, last_update, self.start_ms, creation=creation)
        if size <= _INITIAL_CACHE_MAX_SIZE:
            # Deal dicts and statics are immutable by convention, so instances can share them.
            snapshot = (
                dict(self._statics), dict(self._deals), dict(self._version_no), list(self._versions),
                list(self._asin_order),
            )
            with _INITIAL_LOCK:
                _INITIAL_CACHE[cache_key] = snapshot
                while len(_INITIAL_CACHE) > 8:
                    _INITIAL_CACHE.pop(next(iter(_INITIAL_CACHE)))

    # -- drift -------------------------------------------------------------------------------
    @property
    def drifting(self) -> bool:
        return self.drift_new_per_hour > 0 or self.drift_updates_per_hour > 0 or self.drift_expired_per_hour > 0

    @staticmethod
    def _count(rng: random.Random, per_minute: float) -> int:
        whole = int(per_minute)
        return whole + (1 if rng.random() < per_minute - whole else 0)

    def _generate_slot(self, i: int) -> None:
        rng = _rng(self.seed, "drift", i)
        slot_start = self.start_ms + i * 60_000
        events: list[tuple[int, str, int]] = []
        for _ in range(self._count(rng, self.drift_new_per_hour / 60.0)):
            events.append((slot_start + rng.randrange(60_000), "new", rng.getrandbits(64)))
        for _ in range(self._count(rng, self.drift_updates_per_hour / 60.0)):
            events.append((slot_start + rng.randrange(60_000), "update", rng.getrandbits(64)))
        if self.drift_expired_per_hour > 0:  # drawn last: catalogs without expiry keep their old streams
            for _ in range(self._count(rng, self.drift_expired_per_hour / 60.0)):
                events.append((slot_start + rng.randrange(60_000), "expire", rng.getrandbits(64)))
        events.sort()
        for t, kind, ev_seed in events:
            if t <= self.start_ms:  # slot 0 starts at the start instant: nothing is visible *at* it
                t = self.start_ms + 1
            heapq.heappush(self._pending, (t, self._seq, kind, ev_seed))
            self._seq += 1

    def _apply(self, t: int, kind: str, ev_seed: int) -> None:
        rng = random.Random(ev_seed)
        if kind == "expire":
            if self._live:
                self._expire(self._live[rng.randrange(len(self._live))], t)
            return
        minute = unix_ms_to_keepa_minute(t)
        if rng.random() < self.future_minute_fraction:
            minute += 1  # observed: lastUpdate up to 1 min ahead of the server timestamp
        if kind == "new" or not self._live:
            asin = self._new_asin(rng)
            self._add_version(asin, minute, t, creation=unix_ms_to_keepa_minute(t))
        else:
            asin = self._live[rng.randrange(len(self._live))]
            # lastUpdate never goes back in time for an ASIN.
            minute = max(minute, self._deals[asin]["lastUpdate"])
            self._add_version(asin, minute, t)

    def _expire(self, asin: str, t: int) -> None:
        """Take ``asin`` off the list (its statics stay, so a new deal never reuses the ASIN)."""
        i = self._live_idx.pop(asin)
        last = self._live.pop()
        if last != asin:
            self._live[i] = last
            self._live_idx[last] = i
        del self._deals[asin]
        self._expired.append((asin, t))
        self._generation += 1

    def advance_to(self, now_ms: int) -> None:
        """Make every drift event with a visible time <= ``now_ms`` visible."""
        with self._lock:
            if not self.drifting or now_ms <= self._now_applied:
                return
            last_slot = (now_ms - self.start_ms) // 60_000
            while self._slots_generated <= last_slot:
                self._generate_slot(self._slots_generated)
                self._slots_generated += 1
            while self._pending and self._pending[0][0] <= now_ms:
                t, _, kind, ev_seed = heapq.heappop(self._pending)
                self._apply(t, kind, ev_seed)
            self._now_applied = now_ms

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._deals)

    def ordered(
        self,
        sort_type: int,
        date_range: int,
        price_type: int,
        now_ms: int | None = None,
        deal_filter: DealFilter | None = None,
    ) -> list[dict[str, Any]]:
        """Current deals matching ``deal_filter`` (None = all) in ``sort_type`` order (negative inverts).
        Not capped at 10,000."""
        with self._lock:
            if now_ms is not None:
                self.advance_to(now_ms)
            key = (sort_type, date_range, price_type, deal_filter)
            cached = self._sort_cache.get(key)
            if cached is not None and cached[0] == self._generation:
                return cached[1]
            deals: Iterable[dict[str, Any]] = self._deals.values()
            if deal_filter is not None:
                deals = [d for d in deals if deal_filter.matches(d)]
            ordered = sorted(deals, key=_sort_key_fn(sort_type, date_range, price_type, self.sort1_orders_by))
            if sort_type < 0:
                ordered.reverse()
            if len(self._sort_cache) > 32:
                self._sort_cache.clear()
            self._sort_cache[key] = (self._generation, ordered)
            return ordered

    def page(
        self,
        page: int,
        *,
        sort_type: int = 1,
        date_range: int = 0,
        price_type: int = 0,
        now_ms: int | None = None,
        deal_filter: DealFilter | None = None,
    ) -> list[dict[str, Any]]:
        """The deals of one page: at most 150, only within the first 10,000 results."""
        if not 0 <= page <= MAX_PAGE:
            raise ValueError(f"page must be in 0..{MAX_PAGE}")
        ordered = self.ordered(sort_type, date_range, price_type, now_ms, deal_filter)
        visible = ordered[:MAX_RESULTS]
        return visible[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]

    def visible_count(self, now_ms: int | None = None) -> int:
        with self._lock:
            if now_ms is not None:
                self.advance_to(now_ms)
            return min(MAX_RESULTS, len(self._deals))

    def category_summary(
        self, now_ms: int | None = None, deal_filter: DealFilter | None = None
    ) -> dict[str, list[Any]]:
        """``categoryIds`` / ``categoryNames`` / ``categoryCount`` over the root categories of the deals that
        match every filter but the category filters (KEEPA_API.md §4.4)."""
        with self._lock:
            if now_ms is not None:
                self.advance_to(now_ms)
            uncategorized = deal_filter.without_categories() if deal_filter is not None else None
            cached = self._cat_cache.get(uncategorized)
            if cached is not None and cached[0] == self._generation:
                return cached[1]
            counts: dict[int, int] = {}
            for d in self._deals.values():
                if uncategorized is None or uncategorized.matches(d):
                    counts[d["rootCat"]] = counts.get(d["rootCat"], 0) + 1
            ids = [cid for cid in _ROOT_IDS if cid in counts]
            summary = {
                "categoryIds": ids,
                "categoryNames": [_ROOT_NAMES[c] for c in ids],
                "categoryCount": [counts[c] for c in ids],
            }
            if len(self._cat_cache) > 32:
                self._cat_cache.clear()
            self._cat_cache[uncategorized] = (self._generation, summary)
            return summary

    def deal(self, asin: str, now_ms: int | None = None) -> dict[str, Any] | None:
        """The current version of one deal, or None."""
        with self._lock:
            if now_ms is not None:
                self.advance_to(now_ms)
            return self._deals.get(asin)

    def asins(self, now_ms: int | None = None) -> list[str]:
        with self._lock:
            if now_ms is not None:
                self.advance_to(now_ms)
            return [a for a in self._asin_order if a in self._deals]

    def expired(self, now_ms: int | None = None) -> list[tuple[str, int]]:
        """Every (asin, visible_from_ms) taken off the list so far, in time order."""
        with self._lock:
            if now_ms is not None:
                self.advance_to(now_ms)
            return list(self._expired)

    def newest(self, n: int, now_ms: int) -> list[dict[str, Any]]:
        """The ``n`` first deals in sortType 1 order at ``now_ms``."""
        return self.ordered(1, 0, 0, now_ms)[: max(0, n)]

    def versions(self, now_ms: int | None = None) -> list[DealVersion]:
        """Every (asin, lastUpdate minute, visible_from_ms) generated so far, in visibility order."""
        with self._lock:
            if now_ms is not None:
                self.advance_to(now_ms)
            return list(self._versions)

    # -- products ----------------------------------------------------------------------------
    def traits(self, asin: str, now_ms: int | None = None) -> ProductTraits:
        """The cost-relevant facts about ``asin`` at ``now_ms`` (freshness changes by the day)."""
        day = 0 if now_ms is None else now_ms // 86_400_000
        with self._lock:
            listed = asin in self._statics
        return ProductTraits(self.seed, asin, self.offers_pages_max, listed, day)

    def offer_count(self, asin: str) -> int:
        """Offers Keepa knows for ``asin``, live and historical (what ``offers`` returns without
        only-live-offers, whatever the ``offers`` value)."""
        return self.traits(asin).total_offers

    def live_offer_count(self, asin: str) -> int:
        """Live offers: 1..10 for 90 % of products, up to ``offers_pages_max`` x 10 for the rest."""
        return self.traits(asin).live_offers

    def product_cost(self, asin: str, req: ProductRequest, now_ms: int | None = None) -> int:
        """Tokens one valid ASIN costs at ``now_ms`` (KEEPA_API.md §3.4, see products.py)."""
        return product_cost(self.traits(asin, now_ms), req)

    def product(self, asin: str, req: ProductRequest, now_ms: int, domain_id: int = 1) -> dict[str, Any]:
        """A product object with the real samples' key set, consistent with the deal list."""
        with self._lock:
            self.advance_to(now_ms)
            deal = self._deals.get(asin)
            static = self._statics.get(asin)
        traits = self.traits(asin, now_ms)
        if not traits.in_db:
            return empty_product(asin, domain_id)
        now_min = unix_ms_to_keepa_minute(now_ms)
        rng = _rng(self.seed, "product", asin)
        if static is None:
            static = _make_static(asin, self.seed, now_min - rng.randint(1_000, 500_000))
        if deal is None:
            deal = _make_deal(static, self.seed, 0, now_min - rng.randint(0, 1_000))
        cur = list(deal["current"])
        avg30, avg90 = deal["avg"][2], deal["avg"][3]
        drops = [deal[f"salesRankDrops{d}"] for d in (30, 90, 180, 365)]
        avg180 = [c if c < 0 else round(max(c, a) * rng.uniform(0.95, 1.2)) for c, a in zip(cur, avg90)]
        avg365 = [c if c < 0 else round(max(c, a) * rng.uniform(0.95, 1.3)) for c, a in zip(cur, avg180)]
        last_update = now_min
        root = static.root_cat
        name = _ROOT_NAMES.get(root, "?")
        group, item_type, keyword, display, display_name = _PRODUCT_GROUPS.get(
            root, (name, "ABIS_" + name.upper().replace(" ", "_")[:12], name.lower(), "gl_" + name.lower()[:8], name)
        )
        is_book = root == BOOKS
        author = f"{rng.choice(_SURNAMES)}, {rng.choice(_GIVEN)}" if is_book else None
        publisher = f"{rng.choice(_SURNAMES)} {rng.choice(('Press', 'Publishing', 'Books', 'House'))}"
        ean = _isbn13(asin) if asin[:9].isdigit() else None
        image = "".join(map(chr, static.image))
        product: dict[str, Any] = dict.fromkeys(PRODUCT_KEYS)
        product.update({
            "asin": asin,
            "author": author,
            "availabilityAmazon": -1 if cur[0] < 0 else 0,
            "binding": "Paperback" if is_book else None,
            "brand": publisher if is_book else None,
            "buyBoxEligibleOfferCounts": [0] * 8,
            "categories": list(static.categories),
            "categoryTree": [{"catId": root, "name": name}]
            + [{"catId": c, "name": f"Category {c}"} for c in static.categories],
            "contributors": [[author, "author"]] if author else None,
            "description": f"{static.title}. " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 40))),
            "domainId": domain_id,
            "eanList": [ean] if ean else None,
            "ebayListingIds": [0, rng.randint(10_000_000, 99_999_999)] if rng.random() < 0.3 else None,
            "fbaFees": {"lastUpdate": last_update - rng.randint(0, 5_000), "pickAndPackFee": rng.randint(300, 600)},
            "features": ["Used Book in Good Condition"] if is_book and rng.random() < 0.3 else None,
            "g": rng.randint(50, 2_000),
            "gtinList": ["0" + ean] if ean else None,
            "hasReviews": cur[17] > 0,
            "images": [{"l": image, "lH": 1_275, "lW": 825, "m": image, "mH": 500, "mW": 324}],
            "imagesCSV": image,
            "isAdultProduct": False,
            "isB2B": False,
            "isEligibleForSuperSaverShipping": False,
            "isEligibleForTradeIn": False,
            "isHeatSensitive": False,
            "isRedirectASIN": False,
            "isSNS": False,
            "itemHeight": rng.randint(150, 300), "itemLength": rng.randint(100, 250),
            "itemTypeKeyword": keyword,
            "itemWeight": rng.randint(50, 2_000), "itemWidth": rng.randint(5, 60),
            "languages": [["English", "Published"], ["English", "Original Language"], ["English"]] if is_book else None,
            "lastEbayUpdate": last_update - rng.randint(0, 60_000),
            "lastPriceChange": max(c for c in deal["currentSince"][:3]) if max(deal["currentSince"][:3]) > 0
            else last_update - rng.randint(0, 2_000),
            "lastRatingUpdate": last_update - (rng.randint(0, RATING_FRESH_MIN - 1) if traits.rating_fresh
                                               else rng.randint(RATING_FRESH_MIN, 400_000)),
            "lastUpdate": last_update,
            "launchpad": False,
            "listedSince": static.creation_date - rng.randint(0, 9_000_000),
            "manufacturer": publisher if is_book else None,
            "newPriceIsMAP": False,
            "numberOfItems": -1,
            "numberOfPages": rng.randint(48, 900) if is_book else -1,
            "offersSuccessful": False,
            "packageHeight": rng.randint(5, 80), "packageLength": rng.randint(150, 300),
            "packageQuantity": 1, "packageWeight": rng.randint(60, 2_200), "packageWidth": rng.randint(100, 250),
            "productGroup": group,
            "productType": 0,
            "publicationDate": rng.randint(1990, 2025) * 10_000 + rng.randint(1, 12) * 100 + rng.randint(1, 28),
            "referralFeePercent": 15,
            "referralFeePercentage": 15.0,
            "releaseDate": 0 if rng.random() < 0.8 else -1,
            "rootCategory": root,
            "salesRankDisplayGroup": display,
            "salesRankReference": root if root != UNKNOWN_ROOT else -1,
            "title": static.title,
            "trackingSince": static.creation_date - rng.randint(0, 1_000_000),
            "type": item_type,
            "urlSlug": "-".join(static.title.replace(":", "").split()[:5]),
            "variableClosingFee": 180 if is_book else 0,
            "websiteDisplayGroup": display,
            "websiteDisplayGroupName": display_name,
        })
        rank_cats = [root, *static.categories[:3]]
        if req.history:
            product["csv"] = self._csv(rng, cur, last_update, req.days)
            product["salesRanks"] = {
                str(c): self._series(rng, cur[3] if c == root else max(1, cur[3] // 50), last_update, req.days)
                for c in rank_cats if cur[3] > 0
            }
            product["salesRankReferenceHistory"] = [last_update - 500_000, root, last_update - 2_000, root]
            sellers = [seller_id(rng) for _ in range(3)]
            product["buyBoxSellerIdHistory"] = [
                str(v) for t in range(3) for v in (last_update - (3 - t) * 9_000, rng.choice([*sellers, "-1"]))
            ]
            product["buyBoxUsedHistory"] = [
                str(v) for t in range(3)
                for v in (last_update - (3 - t) * 9_000, rng.choice(sellers), rng.choice((2, 3, 4, 5)), 0)
            ]
        else:
            # history=0 drops the histories but, as the real sample shows, keeps [minute, rank] per category.
            product["salesRanks"] = {
                str(c): [last_update - rng.randint(0, 3_000), cur[3] if c == root else -1] for c in rank_cats
            } if cur[3] > 0 else None
        offers: list[dict[str, Any]] = []
        live_order: list[int] = []
        retrieved = 0
        if req.offers is not None:
            offers, live_order, retrieved = build_offers(self.seed, asin, traits, req, last_update)
            product["offers"] = offers
            product["liveOffersOrder"] = live_order
            product["offersSuccessful"] = True
        if req.stats is not None:
            product["stats"] = self._stats(
                rng, deal, cur, (avg30, avg90, avg180, avg365), drops, last_update, req, offers, live_order,
                traits.live_offers,
            )
        return product

    @staticmethod
    def _series(rng: random.Random, value: int, last_update: int, days: int | None) -> list[int]:
        start = last_update - (days * 1_440 if days else 365 * 1_440)
        n = rng.randint(2, 8)
        times = sorted(rng.randint(start, last_update - 1) for _ in range(n - 1)) + [last_update]
        out: list[int] = []
        for t in times:
            out += [t, value if t == last_update else max(1, round(value * rng.uniform(0.6, 1.8)))]
        return out

    @staticmethod
    def _csv(rng: random.Random, cur: list[int], last_update: int, days: int | None) -> list[list[int] | None]:
        start = last_update - (days * 1_440 if days else 365 * 1_440)
        out: list[list[int] | None] = []
        for i, c in enumerate(cur):
            if c < 0 and i != 3:
                out.append(None if rng.random() < 0.8 else [start + rng.randint(0, 1_000), -1]
                           if i not in SHIPPING_TYPES else None)
                continue
            points: list[int] = []
            n = rng.randint(2, 6)
            times = sorted(rng.randint(start, last_update - 1) for _ in range(n - 1)) + [last_update]
            for t in times:
                value = c if t == last_update else max(1, round(c * rng.uniform(0.8, 1.5)))
                if c >= 0 and i not in _COUNT_TYPES and i != 3 and t != last_update and rng.random() < 0.15:
                    value = -1  # out of stock for a while, as real histories show
                points += [t, value]
                if i in SHIPPING_TYPES:
                    points.append(-1 if value == -1 else rng.choice((0, 399, 399, 599)))
            out.append(points)
        return out

    @staticmethod
    def _stats(
        rng: random.Random,
        deal: dict[str, Any],
        cur: list[int],
        avgs: tuple[list[int], list[int], list[int], list[int]],
        drops: list[int],
        last_update: int,
        req: ProductRequest,
        offers: list[dict[str, Any]],
        live_order: list[int],
        live_total: int,
    ) -> dict[str, Any]:
        avg30, avg90, avg180, avg365 = avgs
        rnd = rng.random
        days = _stats_days(req.stats)
        avg = avg30 if days <= 30 else avg90 if days <= 90 else avg180 if days <= 180 else avg365

        def extreme(pick, in_interval: bool) -> list[list[int] | None]:
            out: list[list[int] | None] = []
            for i, (c, a) in enumerate(zip(cur, avg365)):
                if c < 0 and a < 0:
                    out.append([-1, -1] if in_interval and rng.random() < 0.3 else None)
                    continue
                v = pick([v for v in (c, a) if v >= 0])
                span = days * 1_440 if in_interval else 5_000_000
                out.append([last_update - int(rnd() * span), v])
            return out

        def out_of_stock() -> list[int]:
            return [-1 if i == 3 or i in _COUNT_TYPES or (c < 0 and rnd() < 0.4)
                    else (100 if c < 0 else int(rnd() * 100)) for i, c in enumerate(cur)]

        live = [offers[i] for i in live_order]
        fba = sum(1 for o in live if o["isFBA"])
        with_offers = req.offers is not None
        stats: dict[str, Any] = {
            "atIntervalStart": [c if c < 0 else round(c * rng.uniform(0.9, 1.4)) for c in cur],
            "avg": list(avg),
            "avg180": list(avg180),
            "avg30": list(avg30),
            "avg365": list(avg365),
            "avg90": list(avg90),
            "buyBoxAvailabilityMessage": None,
            "buyBoxCondition": None,
            "buyBoxIsAmazon": False,
            "buyBoxIsBackorder": None,
            "buyBoxIsFBA": False,
            "buyBoxIsFreeShippingEligible": None,
            "buyBoxIsMAP": False,
            "buyBoxIsPreorder": False,
            "buyBoxIsPrimeEligible": None,
            "buyBoxIsPrimeExclusive": None,
            "buyBoxIsPrimePantry": None,
            "buyBoxIsShippable": False,
            "buyBoxIsUnqualified": True,
            "buyBoxIsUsed": False,
            "buyBoxIsWarehouseDeal": None,
            "buyBoxMaxOrderQuantity": None,
            "buyBoxMinOrderQuantity": None,
            "buyBoxPrice": -1,
            "buyBoxSellerId": None,
            "buyBoxShipping": -1,
            "buyBoxShippingCountry": None,
            "buyBoxStats": {},
            "buyBoxUsedStats": {},
            "current": list(cur),
            "deltaPercent90_monthlySold": None,
            "isAddonItem": False,
            "isLowest": [is_lowest(deal, i) for i in range(N_TYPES)],
            "isLowest90": [c > 0 and 0 < a and c <= a for c, a in zip(cur, avg90)],
            "lastBuyBoxUpdate": last_update,
            "lastOffersUpdate": last_update if with_offers else -1,
            "lightningDealInfo": None,
            "max": extreme(max, False),
            "maxInInterval": extreme(max, True),
            "min": extreme(min, False),
            "minInInterval": extreme(min, True),
            "offerCountFBA": fba if with_offers else -2,
            "offerCountFBM": len(live) - fba if with_offers else -2,
            "outOfStockCountAmazon30": rng.randint(0, 3),
            "outOfStockCountAmazon90": rng.randint(0, 6),
            "outOfStockPercentage180": out_of_stock(),
            "outOfStockPercentage30": out_of_stock(),
            "outOfStockPercentage365": out_of_stock(),
            "outOfStockPercentage90": out_of_stock(),
            "outOfStockPercentageInInterval": out_of_stock(),
            "retrievedOfferCount": len(live) if with_offers else -2,
            "salesRankDrops180": drops[2],
            "salesRankDrops30": drops[0],
            "salesRankDrops365": drops[3],
            "salesRankDrops90": drops[1],
            "sellerIdsLowestFBA": None,
            "sellerIdsLowestFBM": None,
            "totalOfferCount": live_total if with_offers else -2,
            "tradeInPrice": -1,
        }
        seller = seller_id(rng)
        if cur[18] > 0:  # a new buy box
            stats.update(buyBoxPrice=max(1, cur[18] - 399), buyBoxShipping=399, buyBoxSellerId=seller,
                         buyBoxIsShippable=True, buyBoxIsUnqualified=False, buyBoxCondition=1)
            stats["buyBoxStats"][seller] = {
                "avgNewOfferCount": max(0, cur[11]), "avgPrice": cur[18], "avgUsedOfferCount": max(0, cur[12]),
                "isFBA": False, "lastSeen": last_update, "percentageWon": round(rng.uniform(10, 100), 4),
            }
        if cur[32] > 0:  # a used buy box: the buyBoxUsed* fields, as in the 055299068X sample
            used_seller = live[0]["sellerId"] if live else seller
            stats.update(
                buyBoxUsedCondition=rng.choice((2, 3, 4, 5)), buyBoxUsedIsFBA=False,
                buyBoxUsedPrice=max(1, cur[32] - 399), buyBoxUsedSellerId=used_seller, buyBoxUsedShipping=399,
            )
            stats["buyBoxUsedStats"][used_seller] = {
                "avgNewOfferCount": -1, "avgPrice": cur[32], "avgUsedOfferCount": max(0, cur[12]),
                "condition": stats["buyBoxUsedCondition"], "isFBA": False, "lastSeen": last_update,
                "percentageWon": round(rng.uniform(5, 60), 5),
            }
        return stats


def _stats_days(stats: str | None) -> int:
    """The interval of ``stats=`` in days: a day count, or a ``from,to`` range in ms or ISO dates."""
    if stats is None:
        return 90
    text = stats.strip()
    if text.isdigit():
        return max(1, int(text))
    return 365


def iter_pages(deals: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split an ordered deal list into 150-deal pages (helper for tests)."""
    lst = list(deals)
    return [lst[i : i + PAGE_SIZE] for i in range(0, len(lst), PAGE_SIZE)]
