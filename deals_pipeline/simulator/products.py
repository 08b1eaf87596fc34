"""/product objects and their cost, modelled on the real samples (keepa-samples/product_object_*.json).

Shape: the 85 top-level keys of ``product_object_1886940606.json`` (``history=0``) in its order, plus
``buyBoxUsedHistory`` with ``history=1`` (as ``product_object_055299068X.json``). ``stats`` carries the real
fields, ``buyBoxUsed*`` included when a used buy box exists. Offers are returned as the real API returns them:
the live offers (up to ``offers``) *and* the historical offers Keepa keeps (the sample returned 121 for
``offers=20`` with one live), unless ``only-live-offers=1``.

Cost (KEEPA_API.md §3.4), calibrated on the observed batches (1 ASIN 6, 5 ASINs 30-38, 10 ASINs 68-74):

* ``offers``: 6 per page of up to 10 *live* offers retrieved (at least one page). 90 % of products have at
  most 10 live offers, the rest 11 .. ``offers_pages_max`` x 10. Historical offers are free.
* ``rating``: +1 only when Keepa's rating data is fresh (< 14 days; 25 % of products on a given day).
* ``stock`` (with ``offers``): +2 only when the offers' ``lastStockUpdate`` is newer than 7 days (60 %).
* no ``offers``: 1, + 2 for ``buybox``.
* a product not in Keepa's DB costs 0 and comes back as an empty shell (UNCERTAIN: no sample shows one).
"""

from __future__ import annotations

import math
import random
from typing import Any

#: Top-level keys of the real product object (history=0 sample), in its order.
PRODUCT_KEYS: tuple[str, ...] = (
    "asin", "author", "availabilityAmazon", "binding", "brand", "buyBoxEligibleOfferCounts",
    "buyBoxSellerIdHistory", "categories", "categoryTree", "color", "contributors", "coupon", "csv", "description",
    "domainId", "eanList", "ebayListingIds", "edition", "fbaFees", "features", "format", "frequentlyBoughtTogether",
    "g", "gtinList", "hasReviews", "images", "imagesCSV", "isAdultProduct", "isB2B",
    "isEligibleForSuperSaverShipping", "isEligibleForTradeIn", "isHeatSensitive", "isRedirectASIN", "isSNS",
    "itemHeight", "itemLength", "itemTypeKeyword", "itemWeight", "itemWidth", "languages", "lastEbayUpdate",
    "lastPriceChange", "lastRatingUpdate", "lastUpdate", "launchpad", "listedSince", "liveOffersOrder",
    "manufacturer", "model", "newPriceIsMAP", "numberOfItems", "numberOfPages", "offers", "offersSuccessful",
    "packageHeight", "packageLength", "packageQuantity", "packageWeight", "packageWidth", "parentAsin",
    "partNumber", "productGroup", "productType", "promotions", "publicationDate", "referralFeePercent",
    "referralFeePercentage", "releaseDate", "rootCategory", "salesRankDisplayGroup", "salesRankReference",
    "salesRankReferenceHistory", "salesRanks", "size", "stats", "title", "trackingSince", "type", "upcList",
    "urlSlug", "variableClosingFee", "variationCSV", "variations", "websiteDisplayGroup", "websiteDisplayGroupName",
)
OFFER_PAGE_COST = 6
#: Calibration (see the module docstring and deals_pipeline_tests/simulator/test_costs_and_objects.py).
P_MORE_THAN_ONE_OFFER_PAGE = 0.10
P_RATING_FRESH = 0.25
P_STOCK_FRESH = 0.6
P_NOT_IN_DB = 0.05  # among ASINs that are not listed deals
RATING_FRESH_MIN = 14 * 1_440
STOCK_FRESH_MIN = 7 * 1_440

_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CONDITION_COMMENTS = (
    "Book is in Used-Good condition. Pages and cover are clean and intact.",
    "Used - Very Good. Minimal wear.",
    "The book has been read, but is in excellent condition. Pages are intact and not marred by notes.",
    "Acceptable: heavy wear, all pages present.",
)


def _rng(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


class ProductTraits:
    """The stable, cost-relevant facts about one ASIN on one day (they decide content and cost alike)."""

    __slots__ = ("live_offers", "historical_offers", "rating_fresh", "stock_fresh", "in_db")

    def __init__(self, seed: int, asin: str, offers_pages_max: int, listed: bool, day: int) -> None:
        rng = _rng(seed, "traits", asin)
        more = offers_pages_max > 1 and rng.random() < P_MORE_THAN_ONE_OFFER_PAGE
        self.live_offers = rng.randint(11, offers_pages_max * 10) if more else rng.randint(1, 10)
        self.historical_offers = int(120 * rng.random() ** 3)
        self.in_db = listed or rng.random() >= P_NOT_IN_DB
        daily = _rng(seed, "traits-day", asin, day)  # freshness changes from day to day
        self.rating_fresh = daily.random() < P_RATING_FRESH
        self.stock_fresh = daily.random() < P_STOCK_FRESH

    @property
    def total_offers(self) -> int:
        return self.live_offers + self.historical_offers


def cost(traits: ProductTraits, req: Any) -> int:
    """Tokens one valid ASIN costs (KEEPA_API.md §3.4)."""
    if not traits.in_db:
        return 0
    if req.offers is not None:
        retrieved = min(traits.live_offers, req.offers)
        tokens = OFFER_PAGE_COST * max(1, math.ceil(retrieved / 10))
        if req.stock and traits.stock_fresh:
            tokens += 2
    else:
        tokens = 1 + (2 if req.buybox else 0)
    if req.rating and traits.rating_fresh:
        tokens += 1
    return tokens


def empty_product(asin: str, domain_id: int) -> dict[str, Any]:
    """What an ASIN unknown to Keepa returns: the key set with no data (UNCERTAIN, no sample)."""
    out: dict[str, Any] = {k: None for k in PRODUCT_KEYS}
    out.update(asin=asin, domainId=domain_id, productType=4, offersSuccessful=False, lastUpdate=0)
    return out


def seller_id(rng: random.Random) -> str:
    """An Amazon seller id: 'A' and 12-13 base-36 characters (cheap: one 64-bit draw)."""
    n, chars = rng.getrandbits(66), []
    for _ in range(12 + (n & 1)):
        n, r = divmod(n >> 1 if not chars else n, 36)
        chars.append(_ALNUM[r])
    return "A" + "".join(chars)


def build_offers(
    seed: int, asin: str, traits: ProductTraits, req: Any, now_min: int
) -> tuple[list[dict[str, Any]], list[int], int]:
    """(offers, liveOffersOrder, live offers retrieved). Live offers first drawn, then historical ones, shuffled
    into a stable order as in the samples (``liveOffersOrder`` points into the list)."""
    orng = _rng(seed, "offerlist", asin)
    live_n = min(traits.live_offers, req.offers or 0)
    hist_n = 0 if req.only_live_offers else traits.historical_offers
    drawn: list[tuple[bool, dict[str, Any]]] = []
    for k in range(traits.live_offers + hist_n):  # live offers are drawn first: the same whatever follows
        live = k < traits.live_offers
        condition = orng.choice((1, 2, 3, 4, 4, 4, 5))
        price = orng.randint(199, 40_000)
        shipping = orng.choice((399, 399, 399, 599, 0, -1))
        seen = now_min if live else now_min - orng.randint(2_000, 900_000)
        n_points = 1 + int(12 * orng.random() ** 3)
        t = seen - orng.randint(100, 80_000)
        csv: list[int] = []
        for _ in range(n_points):
            csv += [t, max(1, price + orng.randint(-1_500, 1_500)), shipping]
            t = min(seen, t + orng.randint(10, 20_000))
        csv[-2] = price
        is_fba = orng.random() < 0.2
        if live:
            stock_update = seen if traits.stock_fresh else now_min - orng.randint(STOCK_FRESH_MIN + 1, 200_000)
        else:
            stock_update = 0
        offer: dict[str, Any] = {
            "condition": condition,
            "isAddonItem": False,
            "isAmazon": False,
            "isFBA": is_fba,
            "isMAP": False,
            "isPreorder": False,
            "isPrime": is_fba,
            "isPrimeExcl": False,
            "isScam": False,
            "isShippable": shipping != -1,
            "isWarehouseDeal": False,
            "lastSeen": seen,
            "lastStockUpdate": stock_update,
            "minOrderQty": 1,
            "offerCSV": csv,
            "offerId": k,
            "sellerId": seller_id(orng),
            "shipsFromChina": False,
        }
        if condition > 1 and orng.random() < 0.7:
            offer["conditionComment"] = orng.choice(_CONDITION_COMMENTS)
        if orng.random() < 0.05:
            offer["couponHistory"] = [seen - orng.randint(0, 50_000), 0]
        if req.stock and live:
            offer["stockCSV"] = [stock_update, orng.randint(1, 30)]
        if live and k >= live_n:
            continue  # beyond the `offers` value: not retrieved
        drawn.append((live, offer))
    order = list(range(len(drawn)))
    _rng(seed, "offerorder", asin).shuffle(order)
    offers = [drawn[i][1] for i in order]
    live_idx = [pos for pos, i in enumerate(order) if drawn[i][0]]
    live_idx.sort(key=lambda i: (offers[i]["offerCSV"][-2] + max(0, offers[i]["offerCSV"][-1]), i))
    return offers, live_idx, live_n
