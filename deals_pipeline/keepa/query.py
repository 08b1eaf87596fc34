"""What we send to Keepa: the /deal ``selection`` (queryJSON) and /product options.

Both are frozen, validated dataclasses. Invalid values raise
:class:`~deals_pipeline.keepa.errors.InvalidRequest` *before* anything is sent (HAZARDS #2: an
out-of-range ``offers`` once cost ~95 tokens per book). Every number goes on the wire as a JSON
integer, never a string (KEEPA_API.md §1, HAZARDS #11).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from deals_pipeline.keepa.errors import InvalidRequest
from deals_pipeline.keepa.models import MAX_DEAL_PAGE

#: Keepa accepts up to 100 ASINs (or codes) per /product request.
MAX_ASINS_PER_PRODUCT_REQUEST = 100
#: Domains documented for /deal: 1 com … 11 com.mx. 0 is reserved, 12 (com.br) is not listed for /deal.
DEAL_DOMAINS = frozenset(range(1, 12))
#: Domains for /product (12 = com.br is valid there).
PRODUCT_DOMAINS = frozenset(range(1, 13))
#: The price types /deal accepts in ``priceTypes`` (KEEPA_API.md §4.1).
DEAL_PRICE_TYPES = frozenset({0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 18, 19, 20, 21, 22, 32, 33})
#: 0 day, 1 week, 2 month, 3 90 days. 4 ("all combined", website only) is undocumented: rejected.
DATE_RANGES = frozenset({0, 1, 2, 3})
#: 1 deal age (newest first, cannot be inverted), 2 absolute delta, 3 sales rank, 4 percentage delta.
#: Negative values invert 2..4. Note: 4 is NOT recency (KEEPA_API.md §4.2).
SORT_TYPES = frozenset({1, 2, 3, 4, -2, -3, -4})
#: Warehouse conditions: 1 New, 2 Like New, 3 Very Good, 4 Good, 5 Acceptable ("24" as documented).
WAREHOUSE_CONDITIONS = frozenset({1, 2, 3, 4, 5, 24})
MAX_CATEGORY_IDS = 500
MAX_TITLE_KEYWORDS = 50
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v: object, lo: int, hi: int) -> int:
    if not _is_int(v):
        raise InvalidRequest(f"{name} must be an int, got {type(v).__name__} {v!r:.40}")
    if not lo <= v <= hi:
        raise InvalidRequest(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def _check_int_tuple(name: str, v: object, lo: int, hi: int, max_len: int) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise InvalidRequest(f"{name} must be a list of ints, got {type(v).__name__}")
    t = tuple(v)  # type: ignore[arg-type]
    if len(t) > max_len:
        raise InvalidRequest(f"{name} holds {len(t)} entries (max {max_len})")
    for i, x in enumerate(t):
        _check_int(f"{name}[{i}]", x, lo, hi)
    return t


def _check_str_tuple(name: str, v: object) -> tuple[str, ...]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise InvalidRequest(f"{name} must be a list of strings, got {type(v).__name__}")
    t = tuple(v)  # type: ignore[arg-type]
    for i, x in enumerate(t):
        if not isinstance(x, str):
            raise InvalidRequest(f"{name}[{i}] must be a string, got {type(x).__name__}")
    return t


@dataclass(frozen=True)
class DealSelection:
    """The /deal queryJSON (``selection``), validated.

    Defaults: page 0, amazon.com, USED price (type 2), 90-day interval, newest first. Optional
    filters default to None and are then omitted from the JSON. Sequences are stored as tuples.

    Range fields are ``(min, max)`` in the smallest currency unit (cents) or rank; a ``sales_rank_range``
    max of -1 means "no max". ``delta_percent_range`` has a server-side minimum of 10 % (80 % for rank).
    """

    page: int = 0
    domain_id: int = 1
    price_types: tuple[int, ...] = (2,)
    date_range: int = 3
    sort_type: int = 1
    is_filter_enabled: bool | None = None
    is_range_enabled: bool | None = None
    include_categories: tuple[int, ...] | None = None
    exclude_categories: tuple[int, ...] | None = None
    min_rating: int | None = None
    current_range: tuple[int, int] | None = None
    delta_range: tuple[int, int] | None = None
    delta_percent_range: tuple[int, int] | None = None
    delta_last_range: tuple[int, int] | None = None
    sales_rank_range: tuple[int, int] | None = None
    is_lowest: bool | None = None
    is_lowest90: bool | None = None
    is_lowest_offer: bool | None = None
    is_highest: bool | None = None
    is_out_of_stock: bool | None = None
    is_back_in_stock: bool | None = None
    has_reviews: bool | None = None
    filter_erotic: bool | None = None
    single_variation: bool | None = None
    is_risers: bool | None = None
    is_prime_exclusive: bool | None = None
    must_have_amazon_offer: bool | None = None
    must_not_have_amazon_offer: bool | None = None
    warehouse_conditions: tuple[int, ...] | None = None
    title_search: str | None = None
    brand: tuple[str, ...] | None = None
    author: tuple[str, ...] | None = None
    binding: tuple[str, ...] | None = None
    manufacturer: tuple[str, ...] | None = None
    product_group: tuple[str, ...] | None = None
    languages: tuple[str, ...] | None = None

    _RANGES = ("current_range", "delta_range", "delta_percent_range", "delta_last_range", "sales_rank_range")
    _BOOLS = (
        "is_filter_enabled", "is_range_enabled", "is_lowest", "is_lowest90", "is_lowest_offer", "is_highest",
        "is_out_of_stock", "is_back_in_stock", "has_reviews", "filter_erotic", "single_variation", "is_risers",
        "is_prime_exclusive", "must_have_amazon_offer", "must_not_have_amazon_offer",
    )
    _STR_LISTS = ("brand", "author", "binding", "manufacturer", "product_group", "languages")

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        _check_int("page", self.page, 0, MAX_DEAL_PAGE)
        if not _is_int(self.domain_id) or self.domain_id not in DEAL_DOMAINS:
            raise InvalidRequest(
                f"domain_id must be one of the /deal domains 1..11 (12 com.br is not supported by /deal, "
                f"0 is reserved), got {self.domain_id!r}"
            )
        pts = _check_int_tuple("price_types", self.price_types, 0, 10_000, 10)
        if len(pts) != 1:
            raise InvalidRequest(f"price_types must hold exactly one entry (Keepa: 'Multiple types per query "
                                 f"are not supported'), got {list(pts)}")
        if pts[0] not in DEAL_PRICE_TYPES:
            raise InvalidRequest(f"price type {pts[0]} is not accepted by /deal; allowed: {sorted(DEAL_PRICE_TYPES)}")
        set_(self, "price_types", pts)
        if not _is_int(self.date_range) or self.date_range not in DATE_RANGES:
            raise InvalidRequest(
                f"date_range must be 0 (day), 1 (week), 2 (month) or 3 (90 days), got {self.date_range!r} "
                "(4 is undocumented for the API)"
            )
        if not _is_int(self.sort_type) or self.sort_type not in SORT_TYPES:
            raise InvalidRequest(
                f"sort_type must be 1 (deal age), ±2 (delta), ±3 (sales rank) or ±4 (percentage delta); "
                f"1 cannot be inverted. Got {self.sort_type!r}"
            )
        for name in self._BOOLS:
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise InvalidRequest(f"{name} must be a bool or None, got {type(v).__name__}")
        for name in ("include_categories", "exclude_categories"):
            v = getattr(self, name)
            if v is not None:
                set_(self, name, _check_int_tuple(name, v, 0, _INT64[1], MAX_CATEGORY_IDS))
        if self.min_rating is not None:
            _check_int("min_rating", self.min_rating, -1, 50)
        for name in self._RANGES:
            v = getattr(self, name)
            if v is None:
                continue
            r = _check_int_tuple(name, v, *_INT32, 2)
            if len(r) != 2:
                raise InvalidRequest(f"{name} must be [min, max], got {list(r)}")
            open_max = name == "sales_rank_range" and r[1] == -1
            if r[0] > r[1] and not open_max:
                raise InvalidRequest(f"{name} min {r[0]} is above max {r[1]}")
            set_(self, name, r)
        if self.warehouse_conditions is not None:
            wc = _check_int_tuple("warehouse_conditions", self.warehouse_conditions, 0, 100, 10)
            bad = [c for c in wc if c not in WAREHOUSE_CONDITIONS]
            if bad:
                raise InvalidRequest(f"warehouse_conditions {bad} not in {sorted(WAREHOUSE_CONDITIONS)}")
            set_(self, "warehouse_conditions", wc)
        if self.title_search is not None:
            if not isinstance(self.title_search, str):
                raise InvalidRequest(f"title_search must be a string, got {type(self.title_search).__name__}")
            if len(self.title_search.split()) > MAX_TITLE_KEYWORDS:
                raise InvalidRequest(f"title_search holds more than {MAX_TITLE_KEYWORDS} keywords")
        for name in self._STR_LISTS:
            v = getattr(self, name)
            if v is not None:
                set_(self, name, _check_str_tuple(name, v))

    # -- wire form -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The queryJSON: camelCase keys, JSON ints and bools, lists for sequences; None fields omitted."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[_camel(f.name)] = list(v) if isinstance(v, tuple) else v
        return out

    def to_query_param(self) -> str:
        """Compact JSON text for the ``selection`` query parameter."""
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    def with_page(self, page: int) -> "DealSelection":
        """The same selection for another page (validated)."""
        return dataclasses.replace(self, page=page)

    def fingerprint(self) -> str:
        """Stable sha256 (hex) of the selection without ``page``: identifies one query's page snapshots."""
        body = self.to_json()
        body.pop("page", None)
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "DealSelection":
        """Build from a config mapping with camelCase (Keepa) or snake_case keys.

        Integer fields also accept decimal strings (``"3"``, as in the production selection files);
        they are always sent as ints. Unknown keys raise :class:`InvalidRequest` (catches typos).
        """
        return cls(**_kwargs_from_mapping(cls, d))


_INT_FIELDS = {"page", "domain_id", "date_range", "sort_type", "min_rating"}


def _coerce_int(name: str, v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        raise InvalidRequest(f"{name} must be an int, got string {v!r:.40}")
    return v


def _kwargs_from_mapping(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise InvalidRequest(f"{cls.__name__}.from_mapping needs a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    lookup = {n: n for n in names}
    lookup.update({_camel(n): n for n in names})
    lookup.update({n.replace("_", "-"): n for n in names})
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        name = lookup.get(key)
        if name is None:
            raise InvalidRequest(f"unknown {cls.__name__} field {key!r}; known: {sorted(names)}")
        if name in kwargs:
            raise InvalidRequest(f"{cls.__name__} field {name!r} given twice ({key!r})")
        if name in _INT_FIELDS or (cls is ProductOptions and name in {"stats", "offers", "days", "update"}):
            value = _coerce_int(name, value)
        elif cls is DealSelection and isinstance(value, list):
            if name in DealSelection._STR_LISTS:
                value = tuple(value)
            else:
                value = tuple(_coerce_int(f"{name}[]", x) for x in value)
        kwargs[name] = value
    return kwargs


@dataclass(frozen=True)
class ProductOptions:
    """Options of a /product request (KEEPA_API.md §5). ``offers`` drives the cost (≈ 6–13 tokens per ASIN).

    ``stats``: days of statistics (None: no stats). ``offers``: 20..100 or None (no offers; then a
    product costs 1 token). ``history``: include csv histories. ``update``: max age in hours before a
    refresh (0 live, -1 never). ``stock`` needs ``offers``. ``buybox`` is ignored by Keepa with ``offers``.
    """

    stats: int | None = 90
    offers: int | None = 20
    history: bool = False
    days: int | None = None
    rating: bool = True
    buybox: bool = False
    update: int | None = None
    only_live_offers: bool = True
    stock: bool = False

    def __post_init__(self) -> None:
        if self.stats is not None:
            _check_int("stats", self.stats, 1, 100_000)
        if self.offers is not None:
            if not _is_int(self.offers) or not 20 <= self.offers <= 100:
                raise InvalidRequest(
                    f"offers must be 20..100 or None, got {self.offers!r} (offers=0 is rejected by Keepa and "
                    "values below 20 return incomplete data or cost far more)"
                )
        if self.days is not None:
            _check_int("days", self.days, 1, 100_000)
        if self.update is not None:
            _check_int("update", self.update, -1, 1_000_000)
        for name in ("history", "rating", "buybox", "only_live_offers", "stock"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.stock and self.offers is None:
            raise InvalidRequest("stock=True needs offers (20..100)")

    def to_params(self) -> dict[str, str]:
        """Query parameters. ``only-live-offers`` is hyphenated: the underscore form is ignored (HAZARDS H6)."""
        p: dict[str, str] = {}
        if self.stats is not None:
            p["stats"] = str(self.stats)
        if self.offers is not None:
            p["offers"] = str(self.offers)
            p["only-live-offers"] = "1" if self.only_live_offers else "0"
            if self.stock:
                p["stock"] = "1"
        p["history"] = "1" if self.history else "0"
        if self.days is not None:
            p["days"] = str(self.days)
        p["rating"] = "1" if self.rating else "0"
        if self.buybox:
            p["buybox"] = "1"
        if self.update is not None:
            p["update"] = str(self.update)
        return p

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "ProductOptions":
        """Build from a config mapping (snake_case, camelCase or hyphenated keys)."""
        return cls(**_kwargs_from_mapping(cls, d))
