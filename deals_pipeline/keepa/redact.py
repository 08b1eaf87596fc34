"""Keep the Keepa API key out of logs, exceptions and reprs.

The key travels in the query string of every request (``key=<key>``), so it leaks through urllib3's
debug log of the request line, ``requests`` exception messages ("... for url: <full URL>") and
tracebacks. :func:`redact` scrubs text; :class:`RedactingFilter` scrubs log records; :class:`Secret`
holds the key so that ``repr``/``vars`` of its owner never show it.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Iterable
from urllib.parse import quote, quote_plus

REDACTED = "***"

#: ``key=<value>``, value up to ``&``, whitespace or a quote; and the URL-encoded ``key%3D<value>``
#: (a URL nested in another URL), whose value also ends at ``%26``.
_KEY_PARAM_RE = re.compile(r"(key=)[^&\s'\"]*", re.IGNORECASE)
_ENCODED_KEY_PARAM_RE = re.compile(r"(key%3D)(?:(?!%26)[^&\s'\"])*", re.IGNORECASE)

#: Loggers that print request URLs: the request line, redirects and retry notices.
URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry")


def _variants(secret: str) -> set[str]:
    return {v for v in (secret, quote(secret, safe=""), quote_plus(secret)) if v}


def redact(text: str, secrets: Iterable[str] | str | None = None) -> str:
    """Replace ``key=<anything>`` with ``key=***`` and every literal occurrence of ``secrets``.

    ``secrets`` may be one key or several; their URL-encoded forms are scrubbed too.
    """
    if not isinstance(text, str):
        text = str(text)
    text = _KEY_PARAM_RE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _ENCODED_KEY_PARAM_RE.sub(lambda m: m.group(1) + REDACTED, text)
    if secrets:
        if isinstance(secrets, str):
            secrets = (secrets,)
        for secret in secrets:
            if secret and len(secret) >= 4:
                for v in sorted(_variants(secret), key=len, reverse=True):
                    text = text.replace(v, REDACTED)
    return text


class Secret:
    """A string that never shows itself: ``str``/``repr`` give ``***``; :meth:`reveal` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message (and exception text) of every record.

    It never drops a record and never changes levels. Attach it to a *logger* (filters on a logger
    run before the record propagates to any handler, including pytest's caplog and the root logger).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()
        for s in secrets:
            self.add_secret(s)

    def add_secret(self, secret: str) -> None:
        """Also scrub this literal value (e.g. the API key) wherever it appears."""
        if secret:
            with self._lock:
                self._secrets.add(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            secrets = tuple(self._secrets)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: scrub the raw parts instead
            message = f"{record.msg} {record.args}"
        clean = redact(message, secrets)
        if clean != message:
            record.msg = clean
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        return True


_SHARED_FILTER = RedactingFilter()
_INSTALL_LOCK = threading.Lock()


def install_urllib3_redaction(secret: str | None = None, extra_loggers: Iterable[str] = ()) -> RedactingFilter:
    """Attach one shared :class:`RedactingFilter` to urllib3's URL-printing loggers (idempotent).

    Only adds a filter: levels and handlers are left alone. ``secret`` is registered for literal
    scrubbing. Returns the shared filter.
    """
    if secret:
        _SHARED_FILTER.add_secret(secret)
    with _INSTALL_LOCK:
        for name in (*URLLIB3_LOGGERS, *extra_loggers):
            logger = logging.getLogger(name)
            if _SHARED_FILTER not in logger.filters:
                logger.addFilter(_SHARED_FILTER)
    return _SHARED_FILTER
