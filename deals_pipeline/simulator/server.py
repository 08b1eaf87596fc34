"""The Keepa simulator: a real HTTP server on 127.0.0.1 speaking Keepa's wire format (KEEPA_API.md).

Endpoints: ``GET /deal?key=&selection=<JSON>`` (and ``POST /deal`` with the JSON body), ``GET /product``,
``GET /token``; ``GET /_sim/stats`` returns the simulator's own counters (never the key).

Time comes from an injectable :class:`~deals_pipeline.clock.Clock`: with ``ManualClock`` tests are instant,
with ``ScaledClock(60)`` a 5 tokens/min plan plays at 300 tokens per real minute. Fault injection uses wall
time (``latency_ms``, ``timeout_hold_s``) because it exercises the client's real socket timeouts.

The API key is never logged: request lines are redacted before they reach :mod:`logging`, and nothing
keyed by the key is stored. Library code never configures logging.
"""

from __future__ import annotations

import copy
import hmac
import json
import logging
import random

import socket
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from deals_pipeline.clock import Clock, SystemClock
from deals_pipeline.keepa.redact import redact
from deals_pipeline.simulator.bucket import TokenBucket
from deals_pipeline.simulator.catalog import (
    DEAL_PRICE_TYPES,
    MAX_PAGE,
    ProductRequest,
    SyntheticCatalog,
)
from deals_pipeline.simulator.filters import DealFilter, SelectionError

logger = logging.getLogger("deals_pipeline.simulator")

ENDPOINTS = ("deal", "product", "token")
#: Faults that replace the response (decided when the request arrives).
PRE_FAULTS = ("server_error", "http_400", "http_402", "not_enough_tokens", "timeout")
#: Faults that damage an otherwise successful (HTTP 200) response.
POST_FAULTS = ("truncated", "malformed")
FAULT_KINDS = PRE_FAULTS + POST_FAULTS
DEAL_PAGE_COST = 5
MAX_ASINS = 100

@dataclass(frozen=True)
class FaultConfig:
    """Random faults (seeded) and delays. Probabilities are per request to /deal, /product, /token."""

    p_server_error: float = 0.0
    p_truncated: float = 0.0
    p_timeout: float = 0.0
    p_malformed: float = 0.0
    latency_ms: int = 0
    timeout_hold_s: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        probs = (self.p_server_error, self.p_truncated, self.p_timeout, self.p_malformed)
        if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities must be in [0, 1] and sum to <= 1, got {probs}")
        if self.latency_ms < 0 or self.timeout_hold_s < 0:
            raise ValueError("latency_ms and timeout_hold_s must be >= 0")

    @property
    def any_random(self) -> bool:
        return (self.p_server_error + self.p_truncated + self.p_timeout + self.p_malformed) > 0


#: Churn calibrated on the real sample runs (KEEPA_API.md §4.6: ~770 deals per query, 20-47 % updated and
#: 4-11 % new per hour): 60 new (7.8 %), 250 updated (32 %) and 60 expired deals per hour keep an 800-deal
#: list at a steady size. ``SimulatorConfig(**CALIBRATED_CHURN)``; the CLI, demo and benchmarks use it.
CALIBRATED_CHURN: dict[str, float] = {
    "drift_new_per_hour": 60.0,
    "drift_updates_per_hour": 250.0,
    "drift_expired_per_hour": 60.0,
}
#: No churn: the list only changes when a test says so.
QUIET: dict[str, float] = {"drift_new_per_hour": 0.0, "drift_updates_per_hour": 0.0, "drift_expired_per_hour": 0.0}


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that decides what the simulator serves. Same config + same clock readings = same bytes.

    Churn ("drift"): per simulated hour, ``drift_new_per_hour`` deals are listed for the first time,
    ``drift_updates_per_hour`` listed deals are refreshed (new ``lastUpdate``, new prices, so they move in the
    sort order) and ``drift_expired_per_hour`` listed deals leave the list. Events land at seeded instants
    inside each simulated minute and become visible when the injected clock passes them. The Python default
    is quiet (all 0, what most unit tests want); :data:`CALIBRATED_CHURN` is the realistic setting.
    ``sort1_orders_by`` picks what sortType 1 ("deal age") orders by: ``"lastUpdate"`` or ``"creationDate"``.
    """

    refill_rate: int = 5
    #: None = a full bucket (60 x rate).
    initial_tokens: int | None = None
    seed: int = 7
    catalog_size: int = 800
    drift_new_per_hour: float = 0.0
    drift_updates_per_hour: float = 0.0
    drift_expired_per_hour: float = 0.0
    sort1_orders_by: str = "lastUpdate"
    #: Offers per ASIN are 1..offers_pages_max*10 (deterministic from seed and ASIN).
    offers_pages_max: int = 2
    #: When set, any other key gets HTTP 400. Never printed (repr=False).
    expected_key: str | None = field(default=None, repr=False)
    faults: FaultConfig = field(default_factory=FaultConfig)
    #: Share of drifted deals whose lastUpdate is 1 minute ahead of server time (observed in real data).
    future_minute_fraction: float = 0.005


@dataclass
class SimulatorStats:
    """A snapshot of the simulator's counters."""

    requests: Counter = field(default_factory=Counter)  # endpoint ("deal", "product", "token", "other") -> n
    responses: Counter = field(default_factory=Counter)  # HTTP status -> n
    tokens_consumed: int = 0
    product_fetches: Counter = field(default_factory=Counter)  # asin -> times delivered (and charged)
    deal_page_fetches: Counter = field(default_factory=Counter)  # page -> times delivered (and charged)
    faults_injected: Counter = field(default_factory=Counter)  # kind -> n
    rejected_429: int = 0

    def __getitem__(self, name: str) -> Any:  # dict-style access for convenience
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "responses": {str(k): v for k, v in self.responses.items()},
            "tokens_consumed": self.tokens_consumed,
            "product_fetches": dict(self.product_fetches),
            "deal_page_fetches": {str(k): v for k, v in self.deal_page_fetches.items()},
            "faults_injected": dict(self.faults_injected),
            "rejected_429": self.rejected_429,
        }


class _BadRequest(Exception):
    """Parameter validation failure -> HTTP 400 (message never contains the key)."""


@dataclass
class _Reply:
    status: int
    body: Any
    truncate: bool = False
    hold_s: float = 0.0
    raw: bytes | None = None


@dataclass
class _Script:
    kind: str
    remaining: int
    endpoint: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: "KeepaSimulator") -> None:
        self.sim = sim
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:  # never print tracebacks with URLs
        logger.debug("simulator connection error: %s", redact(traceback.format_exc(), self.sim._secret))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "KeepaSimulator/1.0"
    sys_version = ""
    timeout = 120  # idle keep-alive connections end eventually
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms delayed-ACK stalls
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.sim._register(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sim._unregister(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.address_string(), redact(format % args, self.server.sim._secret))

    def do_GET(self) -> None:  # noqa: N802
        self.server.sim._serve(self, "GET")

    def do_POST(self) -> None:  # noqa: N802
        self.server.sim._serve(self, "POST")


def _single(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    return values[-1]


def _int_param(params: dict[str, list[str]], name: str, default: int | None = None) -> int | None:
    raw = _single(params, name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise _BadRequest(f"parameter {name!r} must be an integer") from None


class KeepaSimulator:
    """An embedded Keepa API on 127.0.0.1. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        clock: Clock | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.config = config or SimulatorConfig()
        self.clock: Clock = clock or SystemClock()
        self.host = host
        self._requested_port = int(port)
        self._secret = self.config.expected_key
        start_ms = self.clock.now_ms()
        self.start_ms = start_ms
        self.bucket = TokenBucket(
            self.config.refill_rate, self.config.initial_tokens, start_ms=start_ms, clock=self.clock
        )
        self.catalog = SyntheticCatalog(
            seed=self.config.seed,
            size=self.config.catalog_size,
            start_ms=start_ms,
            drift_new_per_hour=self.config.drift_new_per_hour,
            drift_updates_per_hour=self.config.drift_updates_per_hour,
            drift_expired_per_hour=self.config.drift_expired_per_hour,
            sort1_orders_by=self.config.sort1_orders_by,
            offers_pages_max=self.config.offers_pages_max,
            future_minute_fraction=self.config.future_minute_fraction,
        )
        self._lock = threading.RLock()
        self._stats = SimulatorStats()
        self._faults = self.config.faults
        self._fault_rng = random.Random(self._faults.seed)
        self._scripts: list[_Script] = []
        self._server_errors = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "KeepaSimulator":
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="keepa-simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "KeepaSimulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = f"port={self._server.server_address[1]}" if self._server else "stopped"
        return f"KeepaSimulator({state}, rate={self.config.refill_rate}, seed={self.config.seed})"

    def _register(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def _unregister(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    # -- control -----------------------------------------------------------------------------
    def inject(self, kind: str, count: int = 1, endpoint: str | None = None) -> None:
        """Script ``kind`` for the next ``count`` matching requests (``endpoint`` None = any of
        deal/product/token). ``truncated``/``malformed`` wait for a request that would succeed (200)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if endpoint is not None:
            endpoint = endpoint.strip("/")
            if endpoint not in ENDPOINTS:
                raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._scripts.append(_Script(kind, int(count), endpoint))

    def clear_injections(self) -> None:
        with self._lock:
            self._scripts.clear()

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the random fault configuration (reseeds the fault RNG)."""
        with self._lock:
            self._faults = faults
            self._fault_rng = random.Random(faults.seed)

    def stats(self) -> SimulatorStats:
        with self._lock:
            return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = SimulatorStats()

    def stats_json(self) -> dict[str, Any]:
        """What ``GET /_sim/stats`` returns: the counters plus the bucket state."""
        with self._lock:
            now = self.clock.now_ms()
            out = self._stats.to_dict()
            out["bucket"] = {
                "tokens_left": self.bucket.balance(now),
                "refill_in": self.bucket.refill_in(now),
                "refill_rate": self.bucket.refill_rate,
                "cap": self.bucket.cap,
                "now_ms": now,
            }
            out["catalog"] = {
                "deals": len(self.catalog),
                "versions": len(self.catalog.versions()),
                "expired": len(self.catalog.expired()),
            }
            return out

    # -- request handling --------------------------------------------------------------------
    def _serve(self, h: _Handler, method: str) -> None:
        try:
            if self._stopping.is_set():
                h.close_connection = True
                return
            parsed = urlsplit(h.path)
            endpoint = parsed.path.strip("/")
            params = parse_qs(parsed.query, keep_blank_values=True)
            body = b""
            if method == "POST":
                try:
                    length = int(h.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0 or length > 1_000_000:
                    h.close_connection = True
                    with self._lock:
                        reply = self._error_reply(400, self.clock.now_ms(), "invalidRequest", "bad Content-Length")
                    self._write(h, reply)
                    return
                body = h.rfile.read(length) if length > 0 else b""
            if endpoint == "_sim/stats" and method == "GET":
                self._write(h, _Reply(200, self.stats_json()))
                return
            if self._faults.latency_ms > 0 and endpoint in ENDPOINTS:
                time.sleep(self._faults.latency_ms / 1000.0)
            reply = self._process(method, endpoint, params, body)
        except Exception:  # noqa: BLE001 - a simulator bug must not kill the connection silently
            logger.error("simulator failed on a request: %s", redact(traceback.format_exc(), self._secret))
            body: dict[str, Any] = {}
            try:
                body.update(self.bucket.status(self.clock.now_ms()).to_envelope())
            except Exception:  # noqa: BLE001
                pass
            body["error"] = {"type": "simulatorBug", "message": "internal simulator error"}
            reply = _Reply(500, body)
        self._write(h, reply)

    def _write(self, h: _Handler, reply: _Reply) -> None:
        data = reply.raw if reply.raw is not None else json.dumps(reply.body, separators=(",", ":")).encode()
        try:
            if reply.hold_s > 0:
                self._stopping.wait(reply.hold_s)
                h.close_connection = True
            h.send_response(reply.status)
            h.send_header("Content-Type", "application/json;charset=UTF-8")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if reply.truncate:
                h.wfile.write(data[: len(data) // 2])
                h.wfile.flush()
                h.close_connection = True
                try:
                    h.connection.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            else:
                h.wfile.write(data)
                h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
            h.close_connection = True

    # Everything below runs under self._lock.
    def _envelope(self, now: int, consumed: int = 0, processing_ms: int = 0) -> dict[str, Any]:
        return self.bucket.status(now, consumed=consumed, processing_ms=processing_ms).to_envelope()

    def _error_reply(self, status: int, now: int, err_type: str, message: str) -> _Reply:
        body = self._envelope(now)
        body["error"] = {"type": err_type, "message": message}
        return _Reply(status, body)

    def _pick_fault(self, endpoint: str) -> tuple[str | None, _Script | None]:
        """The fault for this request: a scripted one first, else a seeded random draw."""
        drawn: str | None = None
        f = self._faults
        if f.any_random:
            r = self._fault_rng.random()
            acc = 0.0
            for kind, p in (
                ("server_error", f.p_server_error),
                ("timeout", f.p_timeout),
                ("truncated", f.p_truncated),
                ("malformed", f.p_malformed),
            ):
                acc += p
                if r < acc:
                    drawn = kind
                    break
        for script in self._scripts:
            if script.endpoint is None or script.endpoint == endpoint:
                return script.kind, script
        return drawn, None

    def _consume_script(self, script: _Script | None) -> None:
        if script is None:
            return
        script.remaining -= 1
        if script.remaining <= 0:
            self._scripts.remove(script)

    def _process(self, method: str, endpoint: str, params: dict[str, list[str]], body: bytes) -> _Reply:
        with self._lock:
            now = self.clock.now_ms()
            st = self._stats
            ep = endpoint if endpoint in ENDPOINTS else "other"
            st.requests[ep] += 1
            reply = self._process_locked(method, ep, params, body, now)
            st.responses[reply.status] += 1
            if reply.status == 429:
                st.rejected_429 += 1
            return reply

    def _process_locked(
        self, method: str, ep: str, params: dict[str, list[str]], body: bytes, now: int
    ) -> _Reply:
        if ep == "other":
            return self._error_reply(404, now, "notFound", "unknown endpoint")
        if method == "POST" and ep != "deal":
            return self._error_reply(405, now, "methodNotAllowed", "POST is only supported on /deal")
        key = (_single(params, "key") or "").strip()
        expected = self.config.expected_key
        if not key or (expected is not None and not hmac.compare_digest(key.encode(), expected.encode())):
            return self._error_reply(400, now, "invalidKey", "missing or invalid API key")

        kind, script = self._pick_fault(ep)
        hold = 0.0
        if kind in PRE_FAULTS:
            self._consume_script(script)
            self._stats.faults_injected[kind] += 1
            if kind == "server_error":
                status = 500 if self._server_errors % 2 == 0 else 503
                self._server_errors += 1
                return self._error_reply(status, now, "internalError", "simulated server error")
            if kind == "http_400":
                return self._error_reply(400, now, "requestRejected", "simulated rejected request")
            if kind == "http_402":
                return self._error_reply(402, now, "paymentRequired", "simulated payment required")
            if kind == "not_enough_tokens":
                return _Reply(429, self._envelope(now))
            hold = self._faults.timeout_hold_s  # "timeout": served and charged, but answered late

        try:
            if ep == "token":
                reply = _Reply(200, self._envelope(now))
            elif ep == "deal":
                reply = self._deal(method, params, body, now)
            else:
                reply = self._product(params, now)
        except _BadRequest as exc:
            reply = self._error_reply(400, now, "invalidParameter", str(exc))
        reply.hold_s = hold

        if kind in POST_FAULTS and reply.status == 200:
            self._consume_script(script)
            self._stats.faults_injected[kind] += 1
            if kind == "truncated":
                reply.truncate = True
            else:
                reply.body = self._malform(ep, reply.body)
        return reply

    @staticmethod
    def _malform(ep: str, body: dict[str, Any]) -> dict[str, Any]:
        """Valid JSON that breaks the schema."""
        body = dict(body)
        if ep == "deal":
            deals = dict(body["deals"])
            deals["dr"] = "malformed: dr should be a list"
            body["deals"] = deals
        elif ep == "product":
            body["products"] = "malformed: products should be a list"
        else:
            body["tokensLeft"] = "malformed"
        return body

    # -- /deal -------------------------------------------------------------------------------
    @staticmethod
    def _selection(method: str, params: dict[str, list[str]], body: bytes) -> dict[str, Any]:
        raw = _single(params, "selection")
        if method == "POST" and body:
            text = body.decode("utf-8", errors="replace").strip()
            if text.startswith("{"):
                raw = text
            else:
                form = parse_qs(text, keep_blank_values=True)
                raw = _single(form, "selection") or raw
        if raw is None or not raw.strip():
            raise _BadRequest("missing selection")
        try:
            sel = json.loads(raw)
        except json.JSONDecodeError:
            raise _BadRequest("selection is not valid JSON") from None
        if not isinstance(sel, dict):
            raise _BadRequest("selection must be a JSON object")
        return sel

    @staticmethod
    def _sel_int(sel: dict[str, Any], name: str, default: int | None) -> int:
        if name not in sel:
            if default is None:
                raise _BadRequest(f"selection field {name!r} is required")
            return default
        value = sel[name]
        if type(value) is not int:  # bool, float and "4" are all rejected: the pipeline must send ints
            raise _BadRequest(f"selection field {name!r} must be a JSON integer, got {type(value).__name__}")
        return value

    def _deal(self, method: str, params: dict[str, list[str]], body: bytes, now: int) -> _Reply:
        sel = self._selection(method, params, body)
        page = self._sel_int(sel, "page", 0)
        domain = self._sel_int(sel, "domainId", None)
        sort_type = self._sel_int(sel, "sortType", 4)
        date_range = self._sel_int(sel, "dateRange", 0)
        if not 0 <= page <= MAX_PAGE:
            raise _BadRequest(f"page must be in 0..{MAX_PAGE} (at most 10,000 results)")
        if not 1 <= domain <= 11:
            raise _BadRequest("domainId must be in 1..11 for /deal")
        if sort_type == 0 or abs(sort_type) > 4:
            raise _BadRequest("sortType must be one of 1, 2, 3, 4 (negative inverts)")
        if not 0 <= date_range <= 3:
            raise _BadRequest("dateRange must be in 0..3")
        pts = sel.get("priceTypes")
        if not isinstance(pts, list) or len(pts) != 1:
            raise _BadRequest("priceTypes must be a list with exactly one entry")
        pt = pts[0]
        if type(pt) is not int or pt not in DEAL_PRICE_TYPES:
            raise _BadRequest("priceTypes[0] must be a supported integer price type")

        try:
            deal_filter = DealFilter.from_selection(sel, pt, date_range)
        except SelectionError as exc:
            raise _BadRequest(str(exc)) from None

        if not self.bucket.try_charge(DEAL_PAGE_COST, now):
            return _Reply(429, self._envelope(now))
        dr = self.catalog.page(
            page, sort_type=sort_type, date_range=date_range, price_type=pt, now_ms=now, deal_filter=deal_filter
        )
        self._stats.tokens_consumed += DEAL_PAGE_COST
        self._stats.deal_page_fetches[page] += 1
        payload = {"dr": dr, **self.catalog.category_summary(now, deal_filter), "drDateIndex": []}
        out: dict[str, Any] = {"deals": payload, "dealsCached": False}
        out.update(self._envelope(now, DEAL_PAGE_COST, processing_ms=20 + 3 * len(dr)))
        return _Reply(200, out)

    # -- /product ----------------------------------------------------------------------------
    def _product(self, params: dict[str, list[str]], now: int) -> _Reply:
        domain = _int_param(params, "domain")
        if domain is None or not 1 <= domain <= 12:
            raise _BadRequest("domain must be an integer in 1..12")
        if _single(params, "code") is not None:
            raise _BadRequest("the simulator supports asin=, not code=")
        raw = _single(params, "asin")
        if raw is None or not raw.strip():
            raise _BadRequest("missing asin")
        entries = [a.strip() for a in raw.split(",") if a.strip()]
        if not entries:
            raise _BadRequest("missing asin")
        if len(entries) > MAX_ASINS:
            raise _BadRequest(f"at most {MAX_ASINS} ASINs per request")
        offers = _int_param(params, "offers")
        if offers is not None and not 20 <= offers <= 100:
            raise _BadRequest("offers must be in 20..100")
        history = _int_param(params, "history", 1)
        days = _int_param(params, "days")
        if days is not None and days <= 0:
            raise _BadRequest("days must be positive")
        _int_param(params, "update")  # validated, otherwise ignored
        stats_raw = _single(params, "stats")
        stats = stats_raw.strip() if stats_raw and stats_raw.strip() not in ("", "0") else None
        req = ProductRequest(
            offers=offers,
            only_live_offers=bool(_int_param(params, "only-live-offers", 0)),
            rating=bool(_int_param(params, "rating", 0)),
            buybox=bool(_int_param(params, "buybox", 0)),
            stock=bool(_int_param(params, "stock", 0)) and offers is not None,
            stats=stats,
            history=bool(history),
            days=days,
        )
        # Malformed ASIN strings are dropped, cost 0 and return no product; duplicates are served once.
        asins: list[str] = []
        seen: set[str] = set()
        for entry in entries:
            candidate = entry.upper()
            if len(candidate) == 10 and candidate.isascii() and candidate.isalnum() and candidate not in seen:
                seen.add(candidate)
                asins.append(candidate)

        if not self.bucket.can_serve(now):
            return _Reply(429, self._envelope(now))
        products = [self.catalog.product(a, req, now, domain_id=domain) for a in asins]
        cost = sum(self.catalog.product_cost(a, req, now) for a in asins)
        self.bucket.charge(cost, now)
        self._stats.tokens_consumed += cost
        for a in asins:
            self._stats.product_fetches[a] += 1
        out: dict[str, Any] = {"products": products}
        out.update(self._envelope(now, cost, processing_ms=min(5_000, 30 + 40 * len(asins) * (2 if offers else 1))))
        return _Reply(200, out)


__all__ = [
    "CALIBRATED_CHURN",
    "QUIET",
    "FAULT_KINDS",
    "FaultConfig",
    "KeepaSimulator",
    "SimulatorConfig",
    "SimulatorStats",
    "redact",
]
