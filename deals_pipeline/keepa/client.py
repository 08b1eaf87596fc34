"""Plain-Python Keepa HTTP client (``requests`` + ``tenacity``). No Dagster, no token waiting.

Outcomes are typed (HAZARDS #16/H8: a 429 is never "no more deals"):

=====================================  ==============================================================
HTTP 200 + valid payload               a parsed model (:class:`DealPage`, :class:`ProductPage`, ...)
HTTP 429                               :class:`NotEnoughTokens` at once (the token budget owns waits)
HTTP 400/404/405 (other 4xx)           :class:`RequestRejected` (not retried)
HTTP 402                               :class:`PaymentRequired` (not retried)
5xx/408, timeout, connection error,    :class:`TransientKeepaError`, retried with bounded exponential
truncated or non-JSON 200 body         backoff + jitter; :class:`RetriesExhausted` after ``max_attempts``
... on a paid endpoint (/deal,         :class:`ResponseLost` at once when the server may have charged
/product) once the request was sent    (read timeout, damaged 200 body, dropped connection): never
                                       retried blindly, the caller keeps what arrived (partial products)
200 with well-formed but wrong JSON    :class:`MalformedPayload` (not retried)
=====================================  ==============================================================

Exact accounting: a paid call's result (or error) carries ONE status whose ``tokens_consumed`` is
the sum over every attempt of that call (a 5xx answered with an envelope and then retried costs what
both envelopes say), so one reservation settles everything the server charged for it.

Every response carrying a JSON envelope yields a :class:`TokenStatus`, passed to ``on_status`` and
attached to raised errors as ``err.status``.

The API key never appears in log lines, exception messages, exception chains or ``repr(client)``:
errors are built from redacted text and raised outside ``except`` blocks (no ``__context__``), and a
:class:`~deals_pipeline.keepa.redact.RedactingFilter` is attached to urllib3's loggers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NoReturn, Sequence, TypeVar

import requests
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from deals_pipeline.clock import Clock, SystemClock
from deals_pipeline.keepa.errors import (
    ConfigError,
    InvalidRequest,
    KeepaError,
    MalformedPayload,
    NotEnoughTokens,
    PaymentRequired,
    RequestRejected,
    ResponseLost,
    RetriesExhausted,
    TransientKeepaError,
)
from deals_pipeline.keepa.models import DealPage, ProductPage, TokenStatus, is_valid_asin
from deals_pipeline.keepa.query import (
    MAX_ASINS_PER_PRODUCT_REQUEST,
    PRODUCT_DOMAINS,
    DealSelection,
    ProductOptions,
)
from deals_pipeline.keepa.redact import Secret, install_urllib3_redaction, redact

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.keepa.com"
ENV_API_KEY = "KEEPA_API_KEY"
ENV_BASE_URL = "KEEPA_API_BASE_URL"
ENV_DOMAIN = "KEEPA_DOMAIN"

T = TypeVar("T")

_SNIPPET = 200

#: Endpoints the server charges for: a request that may have been served is never retried blindly.
PAID_ENDPOINTS = frozenset({"deal", "product"})
#: Body read size: urllib3 drops a short final read when the connection is cut, so small reads keep
#: all but the last KiB of a truncated body (what the product salvage needs).
_READ_CHUNK = 1024
#: Transport failures where the request never reached the server (safe to retry, nothing charged).
_NOT_SENT = frozenset({"connect_timeout", "connection_refused"})


@dataclass
class ClientStats:
    """Counters of one client (thread-safe updates; read them directly or via :meth:`snapshot`).

    ``attempts``/``retries``/``successes`` are keyed by endpoint (``deal``, ``product``, ``token``);
    ``transient`` by failure kind (``http_500``, ``timeout``, ``connection``, ``incomplete_body``,
    ``truncated_json``, ``non_json``); ``errors`` by raised error class name; ``tokens_consumed``
    by endpoint (from the envelopes).
    """

    attempts: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    successes: Counter = field(default_factory=Counter)
    transient: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    tokens_consumed: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _inc(self, counter: str, key: str, n: int = 1) -> None:
        with self._lock:
            getattr(self, counter)[key] += n

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A plain-dict copy, e.g. for run metadata."""
        with self._lock:
            return {
                name: dict(getattr(self, name))
                for name in ("attempts", "retries", "successes", "transient", "errors", "tokens_consumed")
            }


class _Exhausted:
    """Marker returned by tenacity's ``retry_error_callback`` when attempts run out."""

    def __init__(self, last: TransientKeepaError, attempts: int) -> None:
        self.last = last
        self.attempts = attempts


def _parse_domain(value: Any, source: str) -> int:
    try:
        domain = int(str(value).strip())
    except (TypeError, ValueError):
        domain = None
    if domain is None or domain not in PRODUCT_DOMAINS:
        raise ConfigError(f"{source} must be a Keepa domain id 1..12 (1 = amazon.com), got {value!r:.40}")
    return domain


class KeepaClient:
    """Typed access to Keepa's ``/deal``, ``/product`` and ``/token`` endpoints.

    :param api_key: the Keepa access key (kept in a :class:`Secret`, only ever put in request URLs).
    :param base_url: ``https://api.keepa.com`` or a simulator's URL.
    :param domain: Keepa domain id used for ``/product`` (1 = amazon.com); ``/deal`` selections must match.
    :param timeout_s: ``(connect, read)`` timeouts in seconds.
    :param session: a ``requests.Session`` to use (closed by :meth:`close` only if the client made it).
    :param clock: where retry backoff sleeps (a ``ManualClock`` in tests); defaults to real time.
    :param max_attempts: total attempts for transient failures (>= 1).
    :param backoff_base_ms: first backoff; doubles per retry, plus up to ``backoff_base_ms`` of jitter.
    :param backoff_cap_ms: upper bound of one backoff.
    :param on_status: called with the :class:`TokenStatus` of every response that carries an envelope.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        domain: int = 1,
        timeout_s: tuple[float, float] | float = (5.0, 60.0),
        session: requests.Session | None = None,
        clock: Clock | None = None,
        max_attempts: int = 4,
        backoff_base_ms: float = 500,
        backoff_cap_ms: float = 30_000,
        on_status: Callable[[TokenStatus], None] | None = None,
    ) -> None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise ConfigError("Keepa API key is missing or blank")
        if any(c.isspace() for c in api_key) or "&" in api_key:
            raise ConfigError("Keepa API key contains whitespace or '&'; check how it was loaded")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {redact(str(base_url))!r:.80}")
        if isinstance(timeout_s, (int, float)):
            timeout_s = (float(timeout_s), float(timeout_s))
        if len(timeout_s) != 2 or any(not isinstance(t, (int, float)) or t <= 0 for t in timeout_s):
            raise ConfigError(f"timeout_s must be (connect, read) seconds > 0, got {timeout_s!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        if backoff_base_ms < 0 or backoff_cap_ms < backoff_base_ms:
            raise ConfigError("need 0 <= backoff_base_ms <= backoff_cap_ms")
        self._key = Secret(api_key)
        self.base_url = base_url.rstrip("/")
        self.domain = _parse_domain(domain, "domain")
        self.timeout_s = (float(timeout_s[0]), float(timeout_s[1]))
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.max_attempts = max_attempts
        self.backoff_base_ms = float(backoff_base_ms)
        self.backoff_cap_ms = float(backoff_cap_ms)
        self.on_status = on_status
        self.stats = ClientStats()
        #: The last envelope seen by this client (None before the first response).
        self.last_status: TokenStatus | None = None
        install_urllib3_redaction(api_key, extra_loggers=(__name__,))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "KeepaClient":
        """Build from ``KEEPA_API_KEY`` (required), ``KEEPA_API_BASE_URL`` and ``KEEPA_DOMAIN``.

        Keyword ``overrides`` (any constructor argument, ``api_key`` included) win over the environment.
        Raises :class:`ConfigError` naming the variable when the key is missing or blank.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        if "api_key" not in overrides:
            key = (env.get(ENV_API_KEY) or "").strip()
            if not key:
                raise ConfigError(f"{ENV_API_KEY} is not set or blank: export your Keepa access key")
            kwargs["api_key"] = key
        base = (env.get(ENV_BASE_URL) or "").strip()
        kwargs["base_url"] = base or DEFAULT_BASE_URL
        raw_domain = (env.get(ENV_DOMAIN) or "").strip()
        kwargs["domain"] = _parse_domain(raw_domain, ENV_DOMAIN) if raw_domain else 1
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> "KeepaClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeepaClient(base_url={self.base_url!r}, domain={self.domain}, key={self._key!r})"

    # -- endpoints -------------------------------------------------------------------------

    def deals(self, selection: DealSelection) -> DealPage:
        """Fetch one /deal page: ``GET /deal?key=…&selection=<json>``. Costs 5 tokens, empty or not.

        The domain comes from the selection and must equal the client's ``domain``.
        """
        if not isinstance(selection, DealSelection):
            raise InvalidRequest(f"deals() needs a DealSelection, got {type(selection).__name__}")
        if selection.domain_id != self.domain:
            raise InvalidRequest(
                f"selection.domain_id {selection.domain_id} differs from the client domain {self.domain}"
            )
        page = selection.page
        return self._call(
            "deal",
            {"selection": selection.to_query_param()},
            lambda body: DealPage.from_response(body, page=page),
            detail=f"page={page}",
        )

    def products(self, asins: Sequence[str], options: ProductOptions | None = None) -> ProductPage:
        """Fetch up to 100 products: ``GET /product?key=…&domain=…&asin=a,b,c`` plus ``options``.

        ASINs are validated (10 chars of ``[0-9A-Z]``) and de-duplicated, order kept, before sending.
        """
        if options is None:
            options = ProductOptions()
        if not isinstance(options, ProductOptions):
            raise InvalidRequest(f"products() needs ProductOptions, got {type(options).__name__}")
        if isinstance(asins, (str, bytes)):
            raise InvalidRequest("products() needs a sequence of ASINs, not a single string")
        unique = list(dict.fromkeys(asins))
        if not unique:
            raise InvalidRequest("products() needs at least one ASIN")
        if len(unique) > MAX_ASINS_PER_PRODUCT_REQUEST:
            raise InvalidRequest(
                f"{len(unique)} ASINs in one /product request (max {MAX_ASINS_PER_PRODUCT_REQUEST})"
            )
        bad = [a for a in unique if not is_valid_asin(a)]
        if bad:
            shown = ", ".join(repr(a)[:20] for a in bad[:5])
            raise InvalidRequest(f"{len(bad)} invalid ASIN(s): {shown}{' …' if len(bad) > 5 else ''}")
        params = {"domain": str(self.domain), "asin": ",".join(unique), **options.to_params()}
        return self._call("product", params, ProductPage.from_response, detail=f"asins={len(unique)}")

    def token_status(self) -> TokenStatus:
        """``GET /token``: the free token-status call. Use sparingly (startup, after long idles)."""
        return self._call("token", {}, TokenStatus.from_envelope)

    # -- transport -------------------------------------------------------------------------

    def _sleep_s(self, seconds: float) -> None:
        self.clock.sleep_ms(seconds * 1000.0)

    def _call(self, endpoint: str, params: dict[str, str], parse: Callable[[dict], T], detail: str = "") -> T:
        attempt_no = 0
        charged_before = 0  # tokensConsumed of earlier attempts of this call (5xx answered with an envelope)
        paid = endpoint in PAID_ENDPOINTS

        def attempt() -> T:
            nonlocal attempt_no, charged_before
            attempt_no += 1
            self.stats._inc("attempts", endpoint)
            if attempt_no > 1:
                self.stats._inc("retries", endpoint)
            try:
                result = self._attempt(endpoint, params, parse, detail, attempt_no)
            except KeepaError as err:
                if err.status is not None:
                    consumed = err.status.tokens_consumed
                    err.status = _with_consumed(err.status, charged_before + consumed)
                    charged_before += consumed
                raise
            if charged_before and getattr(result, "status", None) is not None:
                status = result.status  # type: ignore[attr-defined]
                result = dataclasses.replace(result, status=_with_consumed(status, charged_before + status.tokens_consumed))  # type: ignore[type-var]
            return result

        def should_retry(exc: BaseException) -> bool:
            if not isinstance(exc, TransientKeepaError):
                return False
            # A paid request the server may have served is not repeated inside one reservation.
            return not (paid and exc.maybe_charged)

        def before_sleep(state: Any) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            wait_ms = (state.next_action.sleep if state.next_action is not None else 0) * 1000
            logger.warning("%s; retry %d/%d in %.0f ms", exc, state.attempt_number, self.max_attempts - 1, wait_ms)

        base_s = self.backoff_base_ms / 1000.0
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential_jitter(initial=base_s, max=self.backoff_cap_ms / 1000.0, exp_base=2, jitter=base_s),
            retry=retry_if_exception(should_retry),
            sleep=self._sleep_s,
            before_sleep=before_sleep,
            retry_error_callback=lambda state: _Exhausted(state.outcome.exception(), state.attempt_number),
            reraise=False,
        )
        result = retrying(attempt)
        if isinstance(result, _Exhausted):
            last = result.last
            err = RetriesExhausted(
                f"Keepa {endpoint} failed after {result.attempts} attempts; last: {last}",
                attempts=result.attempts,
                last=last,
            )
            self.stats._inc("errors", type(err).__name__)
            logger.error("Keepa %s: giving up after %d attempts: %s", endpoint, result.attempts, last)
            raise err from last  # `last` holds only redacted text; raised outside any except block
        return result

    def _publish(self, endpoint: str, status: TokenStatus) -> None:
        self.last_status = status
        if status.tokens_consumed:
            self.stats._inc("tokens_consumed", endpoint, status.tokens_consumed)
        if self.on_status is not None:
            self.on_status(status)

    def _attempt(self, endpoint: str, params: dict[str, str], parse: Callable[[dict], T], detail: str,
                 attempt_no: int) -> T:
        key = self._key.reveal()
        url = f"{self.base_url}/{endpoint}"
        where = f"Keepa {endpoint} {detail}".rstrip()
        started = time.monotonic()
        paid = endpoint in PAID_ENDPOINTS
        response, body_bytes, failure = self._send(url, {"key": key, **params})
        if failure is not None:
            kind, text = failure
            self.stats._inc("transient", kind)
            if paid and kind not in _NOT_SENT:
                self._lost(endpoint, body_bytes, f"{where}: {kind} after the request was sent", text, None)
            raise TransientKeepaError(f"{where}: {kind}: {text}", maybe_charged=kind not in _NOT_SENT)
        if response is None:  # pragma: no cover - _send returns exactly one of the two
            raise TransientKeepaError(f"{where}: no response")
        elapsed_ms = (time.monotonic() - started) * 1000
        code = response.status_code
        body, json_problem = _parse_json(body_bytes)
        status = _envelope_or_none(body)
        logger.debug(
            "%s attempt %d: HTTP %d, %d bytes in %.0f ms, tokensLeft=%s consumed=%s",
            where, attempt_no, code, len(body_bytes), elapsed_ms,
            status.tokens_left if status is not None else "?", status.tokens_consumed if status is not None else "?",
        )
        if status is not None:
            self._publish(endpoint, status)

        if code == 200:
            if json_problem is not None:
                self.stats._inc("transient", json_problem)
                if paid:
                    self._lost(endpoint, body_bytes, f"{where}: HTTP 200 with {json_problem.replace('_', ' ')} body "
                               f"({len(body_bytes)} bytes)", "", 200)
                raise TransientKeepaError(
                    f"{where}: HTTP 200 with {json_problem.replace('_', ' ')} body "
                    f"({len(body_bytes)} bytes): {self._snippet(body_bytes)}",
                    http_status=200,
                )
            if status is None:
                err: KeepaError = MalformedPayload(f"{where}: HTTP 200 body has no token envelope", field="envelope")
                self._fail(err, None)
            try:
                result = parse(body)
            except MalformedPayload as exc:
                exc.status = status
                exc.http_status = 200
                self.stats._inc("errors", type(exc).__name__)
                raise
            self.stats._inc("successes", endpoint)
            return result

        reason = f"{where}: HTTP {code} {response.reason or ''}".rstrip()
        if code == 429:
            tokens = f"tokensLeft={status.tokens_left}, refillIn={status.refill_in_ms} ms" if status else "no envelope"
            self._fail(NotEnoughTokens(f"{reason} (not enough tokens; {tokens})", status), status)
        if code == 402:
            self._fail(PaymentRequired(f"{reason}: {self._snippet(body_bytes)}", status=status), status)
        if code == 408 or code >= 500:
            self.stats._inc("transient", f"http_{code}")
            if paid and status is None:
                # Without an envelope a paid 5xx may have been charged (a proxy in front of a served request).
                self.stats._inc("errors", ResponseLost.__name__)
                raise ResponseLost(f"{reason} without a token envelope (may be charged): {self._snippet(body_bytes)}",
                                   http_status=code)
            raise TransientKeepaError(f"{reason}: {self._snippet(body_bytes)}", http_status=code, status=status)
        # 400 (bad parameters or key), 404, 405 and anything else unexpected: not retried.
        self._fail(RequestRejected(f"{reason}: {self._snippet(body_bytes)}", http_status=code, status=status), status)

    def _lost(self, endpoint: str, body: bytes, what: str, text: str, http_status: int | None) -> NoReturn:
        """Raise :class:`ResponseLost` for a paid answer damaged in transit, keeping what it still holds
        (the envelope when complete, whole products at the head of a /product body)."""
        status, partial = _salvage(body) if body else (None, [])
        if status is not None:
            self._publish(endpoint, status)
        self.stats._inc("errors", ResponseLost.__name__)
        suffix = f": {text}" if text else ""
        raise ResponseLost(f"{what}, {len(partial)} complete product(s) kept; may be charged{suffix}",
                           http_status=http_status, status=status, partial_products=partial)

    def _fail(self, err: KeepaError, status: TokenStatus | None) -> NoReturn:
        if status is not None and err.status is None:
            err.status = status
        self.stats._inc("errors", type(err).__name__)
        raise err

    def _send(self, url: str, params: dict[str, str]) -> tuple[requests.Response | None, bytes, tuple[str, str] | None]:
        """One HTTP GET: ``(response, body, None)`` or ``(None, bytes that did arrive, (kind, redacted text))``.

        Transport failures are returned, never raised here, so that typed errors are raised outside
        this ``except`` (no ``__context__`` holding the URL). The body is streamed so that what arrived
        before a cut survives it (a truncated paid /product body still holds complete products).
        """
        chunks: list[bytes] = []
        try:
            response = self._session.get(url, params=params, timeout=self.timeout_s, stream=True)
            try:
                for chunk in response.iter_content(chunk_size=_READ_CHUNK):
                    chunks.append(chunk)
            finally:
                response.close()
            return response, b"".join(chunks), None
        except requests.exceptions.ConnectTimeout as exc:
            return None, b"", ("connect_timeout", self._describe(exc))
        except requests.exceptions.Timeout as exc:
            return None, b"".join(chunks), ("timeout", self._describe(exc))
        except requests.exceptions.ChunkedEncodingError as exc:
            return None, b"".join(chunks), ("incomplete_body", self._describe(exc))
        except requests.exceptions.ConnectionError as exc:
            if "Read timed out" in str(exc):  # a read timeout while streaming the body
                return None, b"".join(chunks), ("timeout", self._describe(exc))
            refused = _is_refused(exc)
            return None, b"".join(chunks), ("connection_refused" if refused else "connection", self._describe(exc))
        except requests.exceptions.RequestException as exc:
            return None, b"".join(chunks), ("request_error", self._describe(exc))

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return redact(text, self._key.reveal())[:400]

    def _snippet(self, body: bytes) -> str:
        text = body[:_SNIPPET].decode("utf-8", errors="replace")
        return redact(text, self._key.reveal()) + ("…" if len(body) > _SNIPPET else "")


def _parse_json(body: bytes) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(None, "truncated_json" | "non_json")``."""
    try:
        return json.loads(body), None
    except (ValueError, UnicodeDecodeError):
        pass
    head = body.lstrip()[:1]
    return None, ("truncated_json" if head in (b"{", b"[") else "non_json")


def _is_refused(exc: BaseException) -> bool:
    """True when the connection was never established (nothing reached the server)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, (ConnectionRefusedError,)) or type(cur).__name__ in ("NewConnectionError", "NameResolutionError"):
            return True
        stack.extend([getattr(cur, "reason", None), cur.__cause__, cur.__context__, *[a for a in getattr(cur, "args", ()) if isinstance(a, BaseException)]])
    return False


def _with_consumed(status: TokenStatus, consumed: int) -> TokenStatus:
    return status if status.tokens_consumed == consumed else dataclasses.replace(status, tokens_consumed=consumed)


_ENVELOPE_FIELDS = {"timestamp": "timestamp", "tokensLeft": "tokensLeft", "refillIn": "refillIn",
                    "refillRate": "refillRate", "tokensConsumed": "tokensConsumed"}


def _salvage(body: bytes) -> tuple[TokenStatus | None, list[dict]]:
    """What a truncated paid body still holds: its envelope (when every field arrived, e.g. Keepa puts
    it first) and the complete objects at the head of its ``products`` list (in full, parsed one by one)."""
    text = body.decode("utf-8", errors="ignore")
    status: TokenStatus | None = None
    found: dict[str, int] = {}
    for name in _ENVELOPE_FIELDS:
        m = re.search(r'"%s"\s*:\s*(-?\d+)' % name, text)
        if m is not None:
            found[name] = int(m.group(1))
    if len(found) == len(_ENVELOPE_FIELDS):
        try:
            status = TokenStatus.from_envelope(found)
        except MalformedPayload:
            status = None
    products: list[dict] = []
    start = re.search(r'"products"\s*:\s*\[', text)
    if start is not None:
        decoder = json.JSONDecoder()
        pos = start.end()
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                break  # the cut went through this object: it and the rest are missing
            if isinstance(obj, dict):
                products.append(obj)
    return status, products


def _envelope_or_none(body: Any) -> TokenStatus | None:
    if not isinstance(body, dict):
        return None
    try:
        return TokenStatus.from_envelope(body)
    except MalformedPayload:
        return None


__all__ = ["ClientStats", "KeepaClient", "PAID_ENDPOINTS", "DEFAULT_BASE_URL", "ENV_API_KEY", "ENV_BASE_URL", "ENV_DOMAIN"]
