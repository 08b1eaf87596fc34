"""Dagster resources: typed configuration that builds the plain-Python services.

The API key comes from ``EnvVar("KEEPA_API_KEY")``: the UI shows the variable's name, never its
value. Without a key the pipeline refuses to run unless simulator mode was chosen explicitly
(``DEALS_PIPELINE_MODE=simulator``, what ``make demo`` sets): it never silently uses the simulator.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Optional

import dagster as dg
from pydantic import Field

from deals_pipeline import scheduling as sched
from deals_pipeline.backfill.service import BackfillSettings
from deals_pipeline.budget import BudgetPolicy, TokenBudget
from deals_pipeline.clock import Clock, clock_for_database, clock_from_env
from deals_pipeline.state_paths import require_database
from deals_pipeline.config import (
    DEFAULT_DB_PATH,
    DEFAULT_SELECTION,
    DEFAULT_UPSERT_INTERVAL_S,
    ENV_API_BASE_URL,
    ENV_API_KEY,
    ENV_DB_PATH,
    ENV_DOMAIN,
    ENV_MODE,
    ENV_RUN_BUDGET_MINUTES,
    ENV_SIMULATOR_URL,
    ENV_UPSERT_INTERVAL_S,
)
from deals_pipeline.enrichment import (
    DEFAULT_REENRICH_AFTER_HOURS, DEFAULT_REENRICH_PRICE_CHANGE_PCT, DEFAULT_STATS_RULES, EnrichmentPolicy, StatsRules,
    ViabilityRules,
)
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import ConfigError
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.storage import Database
from deals_pipeline.runtime import Runtime
from deals_pipeline.upsert.service import UpsertSettings

SIMULATOR_KEY = "simulator-demo-key"
_embedded_lock = threading.Lock()
_embedded_simulator = None


def _embedded_simulator_url(clock: Clock, refill_rate: int) -> str:
    """One in-process simulator per process, for `dagster asset materialize` without a running one."""
    global _embedded_simulator
    with _embedded_lock:
        if _embedded_simulator is None:
            from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig

            _embedded_simulator = KeepaSimulator(SimulatorConfig(refill_rate=refill_rate), clock=clock)
            _embedded_simulator.start()
        return _embedded_simulator.base_url


class KeepaResource(dg.ConfigurableResource):
    """Where Keepa requests go: the real API (a key is set) or the simulator (explicit mode)."""

    api_key: Optional[str] = Field(default=None, description="Keepa access key; set through the KEEPA_API_KEY env var.")
    mode: str = Field(default="auto", description="'auto' (real API when a key is set), 'keepa' or 'simulator'.")
    base_url: str = Field(default="https://api.keepa.com", description="Real API base URL.")
    simulator_url: Optional[str] = Field(default=None, description="A running `deals-pipeline simulator`; unset: embedded.")
    simulator_refill_rate: int = Field(default=5, description="Refill rate of the embedded simulator (tokens/min).")
    domain: int = Field(default=1, description="Keepa domain id (1 = amazon.com).")
    read_timeout_s: float = Field(default=60.0, description="Per-request read timeout.")
    max_attempts: int = Field(default=4, description="Attempts per request on transient errors (bounded).")

    def check_domain(self) -> None:
        """A typed one-line error for a domain Keepa's /deal does not serve (every command checks it)."""
        if not 1 <= self.domain <= 11:
            raise ConfigError(f"{ENV_DOMAIN}={self.domain} is not a Keepa /deal domain (1..11, e.g. 1 = amazon.com)")

    def resolved_mode(self) -> str:
        self.check_domain()
        mode = (self.mode or "auto").strip().lower()
        if mode not in ("auto", "keepa", "simulator"):
            raise ConfigError(f"Keepa mode must be 'auto', 'keepa' or 'simulator', got {self.mode!r}")
        if mode == "auto":
            mode = "keepa" if self.api_key else "none"
        if mode in ("keepa", "none") and not self.api_key:
            raise ConfigError(
                f"No Keepa API key. Set {ENV_API_KEY} to use the real Keepa API, or set "
                f"{ENV_MODE}=simulator (what `make demo` does) to run against the embedded simulator."
            )
        return mode

    def build_client(self, clock: Clock) -> tuple[KeepaClient, str]:
        """(client, data source name). Raises ConfigError with both options when neither is set."""
        mode = self.resolved_mode()
        if mode == "simulator":
            url = self.simulator_url or _embedded_simulator_url(clock, self.simulator_refill_rate)
            client = KeepaClient(SIMULATOR_KEY, base_url=url, domain=self.domain, clock=clock,
                                 timeout_s=(5.0, self.read_timeout_s), max_attempts=self.max_attempts)
            return client, "simulator"
        client = KeepaClient(self.api_key or "", base_url=self.base_url, domain=self.domain, clock=clock,
                             timeout_s=(5.0, self.read_timeout_s), max_attempts=self.max_attempts)
        return client, "keepa"

    def data_mode(self) -> str:
        return "simulator" if self.resolved_mode() == "simulator" else "keepa"


class DealsDatabaseResource(dg.ConfigurableResource):
    """The DuckDB file holding deals, progress, watermark and the shared token state."""

    path: str = Field(default=DEFAULT_DB_PATH, description="DuckDB file (DEALS_DB_PATH).")
    busy_timeout_s: float = Field(default=60.0, description="How long to retry a file locked by another process.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """At each run start: record this run's process, and free slots held by killed runs."""
        if context.instance is not None and context.run is not None:
            from deals_pipeline.defs.run_reaper import reap_dead_runs, register_run_process

            register_run_process(context.instance, context.run.run_id)
            reap_dead_runs(context.instance, current_run_id=context.run.run_id)

    def database(self, data_mode: str | None = None, *, busy_timeout_s: float | None = None) -> Database:
        """The file, retried for ``busy_timeout_s`` (default: the configured one) while another process holds it."""
        timeout = self.busy_timeout_s if busy_timeout_s is None else busy_timeout_s
        return Database(self.path, busy_timeout_s=timeout, data_mode=data_mode)


class TokenBudgetResource(dg.ConfigurableResource):
    """The one token budget for the key, shared through the database by every process."""

    refill_rate_guess: int = Field(default=5, description="Starting guess; the rate is learned from every response.")
    threshold: int = Field(default=0, description="Spend while the projected balance is above this.")
    max_deficit: int = Field(default=60, description="Deepest planned negative balance.")
    burst_level: int = Field(default=80, description="Low-rate plans (<10/min) recharge to this before spending again.")
    upsert_reserve: int = Field(default=40, description="Tokens the backfill leaves for the upserter's next chunk.")
    run_budget_minutes: float = Field(
        default=480.0,
        description="A run stops cleanly (progress saved) when its next tokens would arrive later than this "
        "(timeline minutes). A 150-deal page at 5 tokens/min needs 3-6.5 h.",
    )

    def policy(self) -> BudgetPolicy:
        if self.refill_rate_guess <= 0:
            raise ConfigError(f"refill_rate_guess must be > 0 tokens/min, got {self.refill_rate_guess}")
        if self.run_budget_minutes <= 0:
            raise ConfigError(f"run_budget_minutes must be > 0, got {self.run_budget_minutes}")
        return BudgetPolicy(
            initial_refill_rate=self.refill_rate_guess,
            threshold=self.threshold,
            max_deficit=self.max_deficit,
            burst_level=self.burst_level,
            upsert_reserve=self.upsert_reserve,
        )

    def budget(self, db: Database, clock: Clock, owner: str, client: KeepaClient | None = None) -> TokenBudget:
        """The shared budget; with a client it can make the free /token sync when the state is unknown."""
        return TokenBudget(db, clock, self.policy(), owner=owner, sync=client.token_status if client else None)

    def deadline_ms(self, clock: Clock) -> int:
        return clock.now_ms() + int(self.run_budget_minutes * 60_000)


class DealQueryResource(dg.ConfigurableResource):
    """What to collect and how to enrich it."""

    selection_json: str = Field(default=json.dumps(DEFAULT_SELECTION), description="Keepa deal selection (queryJSON).")
    chunk_size: int = Field(default=4, description="Deals per chunk: one /product call and one commit.")
    offers: Optional[int] = Field(default=20, description="/product offers (20..100) or null for no offers.")
    stats_days: Optional[int] = Field(default=90, description="/product stats window in days.")
    rating: bool = Field(default=True, description="/product rating=1.")
    min_delta_percent: Optional[int] = Field(default=None, description="Viability: minimum 90-day % drop.")
    max_sales_rank: Optional[int] = Field(default=None, description="Viability: maximum sales rank.")
    min_price: Optional[int] = Field(default=None, description="Viability: minimum current price (cents).")
    reenrich_after_hours: float = Field(
        default=DEFAULT_REENRICH_AFTER_HOURS,
        description="Re-enrichment policy: an enriched deal gets /product again when its enrichment is this old.")
    reenrich_price_change_pct: float = Field(
        default=DEFAULT_REENRICH_PRICE_CHANGE_PCT,
        description="Re-enrichment policy: ... or when its watched price moved by at least this many percent.")
    stats_min_sales_rank_drops90: Optional[int] = Field(
        default=None, description="Stage-1 stats rule: minimum sales-rank drops in 90 days.")
    stats_max_sales_rank: Optional[int] = Field(default=None, description="Stage-1 stats rule: maximum sales rank.")
    stats_min_used_offers: Optional[int] = Field(
        default=None, description="Stage-1 stats rule: minimum used-offer count (stats.current[12]).")
    stats_max_out_of_stock_pct90: Optional[int] = Field(
        default=DEFAULT_STATS_RULES.max_out_of_stock_pct90,
        description="Stage-1 stats rule: maximum outOfStockPercentage90 at the query's price type. Any stats "
                    "rule turns on two-stage enrichment (/product without offers first, ~1 token/ASIN); "
                    "null every stats_* option for single-stage.")
    upsert_sizing_mode: str = Field(default="default", description="'default' (20 below 20/min, else 200) or 'derived'.")
    upsert_interval_s: int = Field(default=DEFAULT_UPSERT_INTERVAL_S, description="Seconds between upsert sensor ticks.")
    # -- when to spend (deals_pipeline/scheduling.py) --
    upsert_share: float = Field(default=sched.DEFAULT_UPSERT_SHARE, description=(
        "While the backfill has work, the upserter's share of the refill over `share_window_min`; "
        "with no backfill work it may use it all."))
    share_window_min: int = Field(default=sched.DEFAULT_SHARE_WINDOW_MIN, description="Sliding window of the share.")
    max_wait_in_slot_s: float = Field(default=sched.DEFAULT_MAX_WAIT_IN_SLOT_S, description=(
        "Longest wait for tokens while holding the keepa_api pool slot; past it the op ends (progress saved, "
        "slot released) and the sensors relaunch the work when it is affordable."))
    max_poll_share: float = Field(default=sched.DEFAULT_MAX_POLL_SHARE, description=(
        "Polls of the newest page cost at most this share of the refill (10% = one page per 10 min at 5/min)."))
    discovery_lag_target_min: float = Field(default=sched.DEFAULT_DISCOVERY_LAG_TARGET_MIN, description=(
        "The poll interval never exceeds this: a new deal is found at most this long after it appears."))
    max_pages_per_run: int = Field(default=sched.DEFAULT_MAX_PAGES_PER_RUN, description=(
        "Pages one upsert run may read; a deeper backlog resumes from the stored scan position."))
    max_chunk_attempts: int = Field(default=sched.DEFAULT_MAX_CHUNK_ATTEMPTS, description=(
        "A chunk failing this many times is quarantined (`deals-pipeline retry-quarantined` puts it back)."))
    chunk_backoff_s: float = Field(default=sched.DEFAULT_CHUNK_BACKOFF_S, description=(
        "Backoff before a failed chunk's next attempt; doubles per attempt (at most 8x)."))

    def selection(self) -> DealSelection:
        try:
            raw = json.loads(self.selection_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"selection_json is not valid JSON: {exc}") from None
        return DealSelection.from_mapping(raw)

    def product_options(self) -> ProductOptions:
        return ProductOptions(stats=self.stats_days, offers=self.offers, rating=self.rating)

    def rules(self) -> ViabilityRules:
        return ViabilityRules(min_delta_percent=self.min_delta_percent, max_sales_rank=self.max_sales_rank,
                              min_price=self.min_price)

    def policy(self) -> EnrichmentPolicy:
        return EnrichmentPolicy(
            reenrich_after_hours=self.reenrich_after_hours, reenrich_price_change_pct=self.reenrich_price_change_pct,
            stats_rules=StatsRules(
                min_sales_rank_drops90=self.stats_min_sales_rank_drops90, max_sales_rank=self.stats_max_sales_rank,
                min_used_offer_count=self.stats_min_used_offers,
                max_out_of_stock_pct90=self.stats_max_out_of_stock_pct90,
            ),
        )

    def backfill_settings(self) -> BackfillSettings:
        return BackfillSettings(selection=self.selection(), product_options=self.product_options(),
                                rules=self.rules(), chunk_size=self.chunk_size, policy=self.policy(),
                                max_chunk_attempts=self.max_chunk_attempts, chunk_backoff_s=self.chunk_backoff_s,
                                max_wait_in_slot_s=self.max_wait_in_slot_s)

    def upsert_settings(self) -> UpsertSettings:
        newest_first = DealSelection.from_mapping({**self.selection().to_json(), "sortType": 1})
        return UpsertSettings(selection=newest_first, product_options=self.product_options(), rules=self.rules(),
                              chunk_size=self.chunk_size, sizing_mode=self.upsert_sizing_mode, policy=self.policy(),
                              interval_s=self.upsert_interval_s, max_pages_per_run=self.max_pages_per_run,
                              backfill_fingerprint=self.selection().fingerprint(), upsert_share=self.upsert_share,
                              share_window_min=self.share_window_min, max_wait_in_slot_s=self.max_wait_in_slot_s)

    def poll_plan(self, db: Database, budget: TokenBudget, clock: Clock) -> sched.PollPlan:
        """The upserter's poll interval from the observed arrival rate and the learned refill rate."""
        from deals_pipeline.keepa.keepa_time import unix_ms_to_keepa_minute

        with db.connect() as con:
            arrivals = sched.observed_arrivals_per_hour(con, now_minute=unix_ms_to_keepa_minute(clock.now_ms()))
        return sched.poll_interval(refill_rate=budget.projection().refill_rate, arrivals_per_hour=arrivals,
                                   page_cost=int(budget.costs.deal_pages()), max_poll_share=self.max_poll_share,
                                   lag_target_min=self.discovery_lag_target_min)


def build_runtime(
    keepa: KeepaResource,
    database: DealsDatabaseResource,
    token_budget: TokenBudgetResource,
    *,
    owner: str,
    clock: Clock | None = None,
) -> Runtime:
    """The services of one run from the Dagster resources (a key-less run fails here, before any spend)."""
    mode = keepa.data_mode()
    require_database(database.path, mode)  # real-API mode never starts afresh on a mistyped path
    db = database.database(data_mode=mode)
    clock = clock_for_database(db, clock or clock_from_env())  # a scaled-clock DB is read on its own clock
    client, source = keepa.build_client(clock)
    budget = token_budget.budget(db, clock, owner, client)
    return Runtime(db=db, client=client, budget=budget, clock=clock, source=source,
                   deadline_ms=token_budget.deadline_ms(clock))


def _from_env(name: str, default, *, kind: str = "str"):
    """``EnvVar(name)`` when the variable is set (the UI shows its name; it is read at run start), else ``default``.

    Only whether the variable exists is looked at here: its value is resolved by Dagster for each run, so a
    changed value takes effect without reloading the code location, and secrets never enter the definitions.
    """
    if name not in os.environ:
        return default
    return dg.EnvVar.int(name) if kind == "int" else dg.EnvVar(name)


def _float_from_env(name: str, default: float) -> float:
    """Float settings are read at load: Dagster has no float EnvVar, and these may be fractional."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


ENV_MAX_WAIT_IN_SLOT_S = "DEALS_MAX_WAIT_IN_SLOT_S"  # timeline seconds; a scaled clock (the soak) needs more


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """Resources for `definitions.py`: secrets, paths and settings from the environment, as EnvVars."""
    return {
        "keepa": KeepaResource(
            api_key=_from_env(ENV_API_KEY, None),
            mode=_from_env(ENV_MODE, "auto"),
            simulator_url=_from_env(ENV_SIMULATOR_URL, None),
            base_url=_from_env(ENV_API_BASE_URL, "https://api.keepa.com"),
            domain=_from_env(ENV_DOMAIN, 1, kind="int"),
        ),
        "database": DealsDatabaseResource(path=_from_env(ENV_DB_PATH, DEFAULT_DB_PATH)),
        "token_budget": TokenBudgetResource(run_budget_minutes=_float_from_env(ENV_RUN_BUDGET_MINUTES, 480.0)),
        "query": DealQueryResource(max_wait_in_slot_s=_float_from_env(ENV_MAX_WAIT_IN_SLOT_S, sched.DEFAULT_MAX_WAIT_IN_SLOT_S),
                                   upsert_interval_s=_from_env(ENV_UPSERT_INTERVAL_S, DEFAULT_UPSERT_INTERVAL_S,
                                                               kind="int")),
    }
