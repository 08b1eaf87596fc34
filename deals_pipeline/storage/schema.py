"""The one schema definition (HAZARDS #53). Migrations are append-only; each runs once, in order.

Times are stored as TIMESTAMPTZ (UTC) for people and as raw integers (Keepa minutes, server ms)
where the pipeline computes with them.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE IF NOT EXISTS meta (
        key VARCHAR PRIMARY KEY,
        value VARCHAR NOT NULL
    );

    -- One row per ASIN: what Keepa's deal list said, plus /product enrichment.
    CREATE TABLE IF NOT EXISTS deals (
        asin VARCHAR PRIMARY KEY,
        domain_id INTEGER NOT NULL,
        title VARCHAR,
        price_type INTEGER,                 -- the priceTypes entry of the query the deal came from
        current_price INTEGER,              -- current[price_type], cents; NULL for -1/-2 sentinels
        avg90_price INTEGER,                -- avg[3][price_type]
        delta90 INTEGER,                    -- delta[3][price_type]
        delta_percent90 INTEGER,            -- deltaPercent[3][price_type]
        current_amazon INTEGER,
        current_new INTEGER,
        current_used INTEGER,
        sales_rank INTEGER,                 -- current[3]
        categories BIGINT[],
        root_cat BIGINT,
        image_url VARCHAR,
        warehouse_condition INTEGER,
        sales_rank_drops30 INTEGER,
        sales_rank_drops90 INTEGER,
        creation_date TIMESTAMPTZ,
        last_update TIMESTAMPTZ,
        last_update_minute BIGINT NOT NULL, -- Keepa minute; the upsert watermark compares these
        viability VARCHAR NOT NULL,         -- 'viable' or 'filtered' (free pre-filter on deal fields)
        filter_reason VARCHAR,
        product_title VARCHAR,
        product_sales_rank INTEGER,
        product_used_price INTEGER,
        product_total_offers INTEGER,
        product_live_offers INTEGER,
        product_last_update TIMESTAMPTZ,
        enriched_at TIMESTAMPTZ,
        enriched_minute BIGINT,             -- deal lastUpdate the enrichment belongs to
        raw_deal JSON,
        raw_product JSON,
        first_seen TIMESTAMPTZ NOT NULL,
        last_seen TIMESTAMPTZ NOT NULL,
        source VARCHAR NOT NULL,            -- 'keepa' or 'simulator'
        origin VARCHAR NOT NULL             -- 'backfill' or 'upsert' (last writer)
    );

    -- The deal list of one page, as fetched once (HAZARDS H1): reruns reuse it.
    CREATE TABLE IF NOT EXISTS page_snapshots (
        page INTEGER NOT NULL,
        selection_fingerprint VARCHAR NOT NULL,
        fetched_at TIMESTAMPTZ NOT NULL,
        server_timestamp_ms BIGINT NOT NULL,
        raw_count INTEGER NOT NULL,
        deal_count INTEGER NOT NULL,
        skipped_count INTEGER NOT NULL,
        is_last BOOLEAN NOT NULL,
        asins VARCHAR[] NOT NULL,
        tokens_consumed INTEGER NOT NULL,
        raw_response JSON NOT NULL,
        PRIMARY KEY (page, selection_fingerprint)
    );

    -- Progress per chunk; the cursor is the set of done chunks (HAZARDS H2).
    CREATE TABLE IF NOT EXISTS page_chunks (
        page INTEGER NOT NULL,
        selection_fingerprint VARCHAR NOT NULL,
        chunk_index INTEGER NOT NULL,
        asins VARCHAR[] NOT NULL,
        status VARCHAR NOT NULL,            -- 'pending', 'done', 'failed'
        attempts INTEGER NOT NULL DEFAULT 0,
        tokens_spent INTEGER NOT NULL DEFAULT 0,
        deals_stored INTEGER NOT NULL DEFAULT 0,
        fresh_skipped INTEGER NOT NULL DEFAULT 0,
        filtered INTEGER NOT NULL DEFAULT 0,
        error VARCHAR,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (page, selection_fingerprint, chunk_index)
    );

    -- A paid /product response whose rows could not be written (HAZARDS #40): the rerun
    -- transforms it again instead of paying for it again.
    CREATE TABLE IF NOT EXISTS chunk_staging (
        page INTEGER NOT NULL,
        selection_fingerprint VARCHAR NOT NULL,
        chunk_index INTEGER NOT NULL,
        raw_response JSON NOT NULL,
        tokens_consumed INTEGER NOT NULL,
        fetched_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (page, selection_fingerprint, chunk_index)
    );

    CREATE TABLE IF NOT EXISTS page_summaries (
        page INTEGER NOT NULL,
        selection_fingerprint VARCHAR NOT NULL,
        status VARCHAR NOT NULL,            -- 'complete' or 'partial'
        chunks_total INTEGER NOT NULL,
        chunks_done INTEGER NOT NULL,
        deals_on_page INTEGER NOT NULL,
        is_last BOOLEAN NOT NULL,
        tokens_spent INTEGER NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (page, selection_fingerprint)
    );

    -- The last token status the server reported (one row). Re-based by every response.
    CREATE TABLE IF NOT EXISTS token_server_status (
        id INTEGER PRIMARY KEY,
        tokens_left INTEGER NOT NULL,
        refill_in_ms BIGINT NOT NULL,
        refill_rate INTEGER NOT NULL,
        timestamp_ms BIGINT NOT NULL,
        recorded_at_ms BIGINT NOT NULL
    );

    -- Every spend: reserved before the call, settled with the server's tokensConsumed after it.
    CREATE TABLE IF NOT EXISTS token_ledger (
        reservation_id VARCHAR PRIMARY KEY,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        settled_ms BIGINT,
        owner VARCHAR NOT NULL,             -- who spent: 'backfill', 'upsert', ... plus run id
        purpose VARCHAR NOT NULL,           -- 'deal_page', 'product', ...
        priority INTEGER NOT NULL,
        detail VARCHAR,
        predicted INTEGER NOT NULL,
        actual INTEGER,                     -- tokensConsumed of the response (written when it arrives)
        state VARCHAR NOT NULL,             -- 'reserved', 'settled', 'released', 'failed' (no envelope)
        server_ts_ms BIGINT,                -- envelope timestamp that charged it; set => in the server status
        units INTEGER,                      -- ASINs (or pages) the request covered; cost calibration
        cost_key VARCHAR                    -- cost-model key (e.g. 'product|offers=20|rating'); calibration
    );

    -- Shared budget flags (one row), e.g. the low-rate recharge mode.
    CREATE TABLE IF NOT EXISTS budget_state (
        id INTEGER PRIMARY KEY,
        recharging BOOLEAN NOT NULL,
        since_ms BIGINT NOT NULL,
        sync_requested_ms BIGINT            -- a response came without envelope: state unknown until a newer one
    );

    -- Upsert watermark: (last_update_minute, asin) of the newest deal committed in order.
    CREATE TABLE IF NOT EXISTS watermarks (
        name VARCHAR PRIMARY KEY,
        last_update_minute BIGINT NOT NULL,
        asin VARCHAR NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL
    );

    CREATE TABLE IF NOT EXISTS upsert_runs (
        run_id VARCHAR PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ,
        status VARCHAR NOT NULL,
        batch_size INTEGER NOT NULL,
        batch_reason VARCHAR NOT NULL,
        deals_new INTEGER NOT NULL DEFAULT 0,
        deals_updated INTEGER NOT NULL DEFAULT 0,
        tokens_spent INTEGER NOT NULL DEFAULT 0,
        watermark_before BIGINT,
        watermark_after BIGINT
    );
    """,
    # v2: the query's match count, estimated once per snapshot (see backfill.service.estimate_total_matches)
    """
    ALTER TABLE page_snapshots ADD COLUMN total_matches INTEGER;
    """,
    # v3: lossless discovery, free refresh, re-enrichment policy and two-stage enrichment (issue 10)
    None,  # built below from DEAL_PAGE_PRICE_TYPES
    # v4: scheduling (deals_pipeline/scheduling.py): chunk retry backoff + quarantine, resumable upsert scans
    """
    ALTER TABLE page_chunks ADD COLUMN next_attempt_ms BIGINT;  -- a failed chunk is not retried before this

    -- A newest-first scan deeper than one run's page cap: where the next run resumes (one row per name).
    -- The pages it paid for are in `deals` already (lossless discovery); only the position is kept here.
    CREATE TABLE IF NOT EXISTS upsert_scans (
        name VARCHAR PRIMARY KEY,
        next_page INTEGER NOT NULL,          -- the first page not read yet
        started_minute BIGINT NOT NULL,      -- server minute when the scan started at page 0
        seen_asins VARCHAR[] NOT NULL,       -- ASINs of the last page read: the resume checks it overlaps
        updated_at TIMESTAMPTZ NOT NULL
    );
    """,
    # v5: deal lifecycle (issue 13, deals_pipeline/lifecycle.py): a deal a full discovery pass no longer
    # lists is inactive from then on; the janitor archives (or deletes) it after the retention period.
    """
    ALTER TABLE deals ADD COLUMN inactive_since TIMESTAMPTZ;
    CREATE TABLE IF NOT EXISTS deals_archive (
        asin VARCHAR NOT NULL,
        archived_at TIMESTAMPTZ NOT NULL,
        inactive_since TIMESTAMPTZ,
        last_seen TIMESTAMPTZ,
        row_json JSON NOT NULL              -- the whole deals row, whatever columns it had then
    );
    CREATE TABLE IF NOT EXISTS discovery_passes (
        pass_id VARCHAR PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ,
        complete BOOLEAN NOT NULL,
        pages INTEGER NOT NULL,
        deals_listed INTEGER NOT NULL,
        marked_inactive INTEGER NOT NULL,
        reactivated INTEGER NOT NULL
    );
    """,
]

#: The deal-page price types a reseller uses: (column prefix, index into current/avg/delta/deltaPercent).
#: Each gets ``<prefix>_current``, ``<prefix>_avg90``, ``<prefix>_delta90`` and ``<prefix>_delta_pct90``.
DEAL_PAGE_PRICE_TYPES: tuple[tuple[str, int], ...] = (
    ("amazon", 0), ("new", 1), ("used", 2), ("rank", 3), ("new_offers", 11), ("used_offers", 12),
    ("rating", 16), ("reviews", 17), ("used_like_new", 19), ("used_very_good", 20), ("used_good", 21),
    ("used_acceptable", 22),
)
DEAL_PAGE_SUFFIXES = ("current", "avg90", "delta90", "delta_pct90")


def _v3() -> str:
    columns = [f"{prefix}_{suffix} INTEGER" for prefix, _ in DEAL_PAGE_PRICE_TYPES for suffix in DEAL_PAGE_SUFFIXES]
    columns += [
        # 'discovered' (deal-page fields only), 'enriched' (/product bought), 'filtered' (a rule said no)
        "state VARCHAR",
        "filter_stage VARCHAR",             # 'deal_page' (free rules) or 'stats' (stage 1)
        "first_seen_ms BIGINT",             # timeline ms (the injected clock), for the policy and coverage
        "last_seen_ms BIGINT",
        "enriched_at_ms BIGINT",
        "enriched_price INTEGER",           # the watched price (current[price_type]) the enrichment saw
        "stage1_at_ms BIGINT",              # stage 1: /product without offers (stats)
        "stage1_minute BIGINT",             # version stage 1 covers: newer of deal and product lastUpdate
        "stage1_passed BOOLEAN",
        "stage1_price INTEGER",
        "stats_sales_rank INTEGER",
        "stats_sales_rank_drops90 INTEGER",
        "stats_used_offer_count INTEGER",
        "stats_out_of_stock_pct90 INTEGER",
        "raw_stage1 JSON",
    ]
    statements = [f"ALTER TABLE deals ADD COLUMN {c};" for c in columns]
    # Existing rows: enriched if they hold a product, filtered if a rule said so, else discovered.
    statements.append(
        "UPDATE deals SET state = CASE WHEN enriched_at IS NOT NULL THEN 'enriched' "
        "WHEN viability = 'filtered' THEN 'filtered' ELSE 'discovered' END, "
        "filter_stage = CASE WHEN viability = 'filtered' THEN 'deal_page' END, "
        "first_seen_ms = epoch_ms(first_seen), last_seen_ms = epoch_ms(last_seen), "
        "enriched_at_ms = epoch_ms(enriched_at), "
        "enriched_price = CASE WHEN enriched_at IS NOT NULL THEN current_price END;"
    )
    # Their deal-page fields from the stored raw deal (current: -1/-2 sentinels are NULL).
    fills = []
    for prefix, index in DEAL_PAGE_PRICE_TYPES:
        current = f"TRY_CAST(json_extract(raw_deal, '$.current[{index}]') AS INTEGER)"
        fills.append(f"{prefix}_current = CASE WHEN {current} >= 0 THEN {current} END")
        for suffix, key in (("avg90", "avg"), ("delta90", "delta"), ("delta_pct90", "deltaPercent")):
            fills.append(f"{prefix}_{suffix} = TRY_CAST(json_extract(raw_deal, '$.{key}[3][{index}]') AS INTEGER)")
    statements.append(f"UPDATE deals SET {', '.join(fills)} WHERE raw_deal IS NOT NULL;")
    return "\n".join(statements)


MIGRATIONS[2] = _v3()

SCHEMA_VERSION = len(MIGRATIONS)
