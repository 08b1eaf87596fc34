"""Typed Keepa errors. Messages never contain the API key (URLs are redacted before use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deals_pipeline.keepa.models import TokenStatus


class KeepaError(Exception):
    """Base of every error raised by the Keepa layer."""

    #: Token status parsed from the response envelope, when the server sent one.
    status: "TokenStatus | None" = None
    http_status: int | None = None


class NotEnoughTokens(KeepaError):
    """HTTP 429: the balance was not positive. Costs 0 tokens. Never means "no more deals"."""

    def __init__(self, message: str, status: "TokenStatus | None") -> None:
        super().__init__(message)
        self.status = status
        self.http_status = 429


class RequestRejected(KeepaError):
    """HTTP 400 (bad parameters, missing or invalid key) and other non-retryable 4xx."""

    def __init__(self, message: str, http_status: int = 400, status: "TokenStatus | None" = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.status = status


class PaymentRequired(KeepaError):
    """HTTP 402: the subscription does not cover this request."""

    def __init__(self, message: str, status: "TokenStatus | None" = None) -> None:
        super().__init__(message)
        self.http_status = 402
        self.status = status


class TransientKeepaError(KeepaError):
    """Worth retrying: 5xx, timeouts, connection errors, truncated or non-JSON bodies.

    ``maybe_charged``: the request reached the server and its answer was lost or damaged (read
    timeout, truncated or non-JSON 200 body, a connection dropped mid-response), so the server may
    have charged it. Paid endpoints never retry those blindly (see :class:`ResponseLost`).
    """

    def __init__(self, message: str, http_status: int | None = None, status: "TokenStatus | None" = None,
                 *, maybe_charged: bool = False) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.status = status
        self.maybe_charged = maybe_charged


class ResponseLost(TransientKeepaError):
    """A paid request (``/deal``, ``/product``) whose answer did not arrive intact: not retried.

    The server probably charged it. ``status`` is the envelope when it could be read from the damaged
    body (else None: the charge is unknown until the next envelope re-bases the budget).
    ``partial_products`` holds the complete product objects read from a truncated ``/product`` body,
    so the caller keeps them and pays again only for the missing ASINs.
    """

    def __init__(self, message: str, *, http_status: int | None = None, status: "TokenStatus | None" = None,
                 partial_products: "list[dict] | None" = None) -> None:
        super().__init__(message, http_status=http_status, status=status, maybe_charged=True)
        self.partial_products: list[dict] = list(partial_products or [])


class RetriesExhausted(TransientKeepaError):
    """A transient failure persisted through every bounded retry."""

    def __init__(self, message: str, attempts: int, last: TransientKeepaError) -> None:
        super().__init__(message, http_status=last.http_status, status=last.status, maybe_charged=last.maybe_charged)
        self.attempts = attempts
        self.last = last


class MalformedPayload(KeepaError):
    """A well-formed JSON body whose content does not match the Keepa schema.

    Not retried: the same request would return the same payload. Carries which field failed.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRequest(KeepaError, ValueError):
    """Raised before sending: a selection or option outside the documented values."""


class ConfigError(ValueError):
    """Bad configuration (rate, domain, paths, mode). Raised at load time with a clear message."""
