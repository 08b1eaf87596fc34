"""The /deal selection filters, applied as KEEPA_API.md §4.1 documents them.

* ``priceTypes[0]`` and ``dateRange`` pick the cell every filter and sort reads: ``current[pt]``,
  ``delta[dateRange][pt]`` (average - current: positive is a drop), ``deltaPercent[dateRange][pt]``. A deal
  without a value of that price type (``current[pt] < 0``) never matches.
* ``includeCategories`` / ``excludeCategories``: a deal matches an id through its ``rootCat`` or its
  ``categories`` (the sub-categories it is listed in directly). ``categoryCount`` ignores these two only.
* With ``isRangeEnabled``: ``currentRange``, ``deltaRange``, ``deltaPercentRange`` (minimum 10 %, as
  documented), ``deltaLastRange`` and ``salesRankRange`` (max -1 = no max; a range excludes unranked deals),
  each ``[min, max]`` inclusive, ``null`` = unused.
* With ``isFilterEnabled``: ``minRating`` (``current[16]`` >= it; -1 = inactive), ``hasReviews``
  (``current[17]`` > 0), ``isLowest`` (:func:`is_lowest`: the deal object has no all-time minimum),
  ``isLowest90`` (at or below the 90-day average), ``mustHaveAmazonOffer`` /
  ``mustNotHaveAmazonOffer`` (``current[0]``).
* ``titleSearch``: case-insensitive, every keyword must appear in the title.

UNCERTAIN (KEEPA_API.md gives the switches but not their scope): which fields ``isFilterEnabled`` gates. The
samples always send both switches true, so the reference query is unaffected either way.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any, Mapping

_RANGE_FIELDS = ("currentRange", "deltaRange", "deltaPercentRange", "deltaLastRange", "salesRankRange")
_FILTER_BOOLS = ("hasReviews", "isLowest", "isLowest90", "mustHaveAmazonOffer", "mustNotHaveAmazonOffer")
#: Documented server-side minimum of ``deltaPercentRange`` (80 for the sales rank type).
_MIN_DELTA_PERCENT = 10
_MIN_DELTA_PERCENT_RANK = 80
_MAX_CATEGORY_IDS = 500
_MAX_TITLE_KEYWORDS = 50
RATING, COUNT_REVIEWS, SALES, AMAZON = 16, 17, 3, 0


class SelectionError(ValueError):
    """A selection field of the wrong type or shape (the server answers HTTP 400)."""


def _flag(sel: Mapping[str, Any], name: str) -> bool:
    value = sel.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SelectionError(f"selection field {name!r} must be a JSON boolean")
    return value


def _ids(sel: Mapping[str, Any], name: str) -> frozenset[int] | None:
    value = sel.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or any(type(v) is not int for v in value):
        raise SelectionError(f"selection field {name!r} must be a list of integer category ids")
    if len(value) > _MAX_CATEGORY_IDS:
        raise SelectionError(f"selection field {name!r} holds more than {_MAX_CATEGORY_IDS} ids")
    return frozenset(value) if value else None


def _range(sel: Mapping[str, Any], name: str) -> tuple[int, int] | None:
    value = sel.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or any(type(v) is not int for v in value):
        raise SelectionError(f"selection field {name!r} must be [min, max] of integers or null")
    return value[0], value[1]


@dataclass(frozen=True)
class DealFilter:
    """A parsed selection's filters; hashable, so filtered orderings can be cached per filter."""

    price_type: int
    date_range: int
    include_categories: frozenset[int] | None = None
    exclude_categories: frozenset[int] | None = None
    current_range: tuple[int, int] | None = None
    delta_range: tuple[int, int] | None = None
    delta_percent_range: tuple[int, int] | None = None
    delta_last_range: tuple[int, int] | None = None
    sales_rank_range: tuple[int, int] | None = None
    min_rating: int | None = None
    has_reviews: bool = False
    is_lowest: bool = False
    is_lowest90: bool = False
    must_have_amazon_offer: bool = False
    must_not_have_amazon_offer: bool = False
    title_words: tuple[str, ...] = ()

    @classmethod
    def from_selection(cls, sel: Mapping[str, Any], price_type: int, date_range: int) -> "DealFilter":
        """Parse the filter fields of a queryJSON (``priceTypes``/``dateRange`` already validated)."""
        kw: dict[str, Any] = {
            "include_categories": _ids(sel, "includeCategories"),
            "exclude_categories": _ids(sel, "excludeCategories"),
        }
        ranges = {name: _range(sel, name) for name in _RANGE_FIELDS}  # validated even when switched off
        if _flag(sel, "isRangeEnabled"):
            kw.update(
                current_range=ranges["currentRange"],
                delta_range=ranges["deltaRange"],
                delta_last_range=ranges["deltaLastRange"],
                sales_rank_range=ranges["salesRankRange"],
            )
            dpr = ranges["deltaPercentRange"]
            if dpr is not None:
                floor = _MIN_DELTA_PERCENT_RANK if price_type == SALES else _MIN_DELTA_PERCENT
                kw["delta_percent_range"] = (max(dpr[0], floor), dpr[1])
        rating = sel.get("minRating")
        if rating is not None and (type(rating) is not int or not -1 <= rating <= 50):
            raise SelectionError("selection field 'minRating' must be an integer in -1..50")
        flags = {name: _flag(sel, name) for name in _FILTER_BOOLS}
        if _flag(sel, "isFilterEnabled"):
            kw.update(
                min_rating=rating if rating is not None and rating >= 0 else None,
                has_reviews=flags["hasReviews"],
                is_lowest=flags["isLowest"],
                is_lowest90=flags["isLowest90"],
                must_have_amazon_offer=flags["mustHaveAmazonOffer"],
                must_not_have_amazon_offer=flags["mustNotHaveAmazonOffer"],
            )
        title = sel.get("titleSearch")
        if title is not None and not isinstance(title, str):
            raise SelectionError("selection field 'titleSearch' must be a string")
        words = tuple(w.lower() for w in (title or "").split())
        if len(words) > _MAX_TITLE_KEYWORDS:
            raise SelectionError(f"titleSearch holds more than {_MAX_TITLE_KEYWORDS} keywords")
        return cls(price_type=price_type, date_range=date_range, title_words=words, **kw)

    def without_categories(self) -> "DealFilter":
        """The same filter with the category filters off: what ``categoryCount`` counts."""
        return replace(self, include_categories=None, exclude_categories=None)

    def matches(self, deal: Mapping[str, Any]) -> bool:
        cur = deal["current"]
        pt, dr = self.price_type, self.date_range
        value = cur[pt]
        if value < 0:
            return False
        if self.include_categories is not None or self.exclude_categories is not None:
            cats = {deal["rootCat"], *deal["categories"]}
            if self.include_categories is not None and not cats & self.include_categories:
                return False
            if self.exclude_categories is not None and cats & self.exclude_categories:
                return False
        if not _inside(self.current_range, value):
            return False
        if not _inside(self.delta_range, deal["delta"][dr][pt]):
            return False
        if not _inside(self.delta_percent_range, deal["deltaPercent"][dr][pt]):
            return False
        if not _inside(self.delta_last_range, deal["deltaLast"][pt]):
            return False
        if self.sales_rank_range is not None:
            rank = cur[SALES]
            lo, hi = self.sales_rank_range
            if rank < 0 or rank < lo or (hi != -1 and rank > hi):
                return False
        if self.min_rating is not None and cur[RATING] < self.min_rating:
            return False
        if self.has_reviews and cur[COUNT_REVIEWS] <= 0:
            return False
        if self.is_lowest and not is_lowest(deal, pt):
            return False
        if self.is_lowest90:
            avg90 = deal["avg"][3][pt]
            if self.is_lowest90 and (avg90 <= 0 or value > avg90):
                return False
        if self.must_have_amazon_offer and cur[AMAZON] < 0:
            return False
        if self.must_not_have_amazon_offer and cur[AMAZON] >= 0:
            return False
        if self.title_words:
            title = (deal.get("title") or "").lower()
            if not all(w in title for w in self.title_words):
                return False
        return True


#: Share of the deals at or below all their averages that are also at their all-time low.
LOWEST_SHARE = 0.3


def is_lowest(deal: Mapping[str, Any], price_type: int) -> bool:
    """Whether ``current[price_type]`` is the all-time lowest. A deal object has no all-time minimum, so this is
    a stable draw (per ASIN, ``lastUpdate`` and type) among the deals at or below every interval's average."""
    value = deal["current"][price_type]
    avgs = [row[price_type] for row in deal["avg"] if row[price_type] > 0]
    if value <= 0 or not avgs or value > min(avgs):
        return False
    draw = zlib.crc32(f"{deal['asin']}:{deal['lastUpdate']}:{price_type}".encode()) / 0xFFFFFFFF
    return draw < LOWEST_SHARE


def _inside(bounds: tuple[int, int] | None, value: int) -> bool:
    return bounds is None or bounds[0] <= value <= bounds[1]
