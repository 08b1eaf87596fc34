"""The API key never shows up in logs (urllib3 DEBUG included), exceptions, their chains, or reprs."""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

import pytest

from deals_pipeline.clock import ManualClock
from deals_pipeline.keepa.client import KeepaClient
from deals_pipeline.keepa.errors import KeepaError, NotEnoughTokens, RequestRejected, ResponseLost, RetriesExhausted
from deals_pipeline.keepa.query import DealSelection, ProductOptions
from deals_pipeline.keepa.redact import RedactingFilter, Secret, install_urllib3_redaction, redact
from deals_pipeline_tests.keepa.http_fixture import Reply, ScriptedServer, refused_url


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "last", None)]
    return seen


def assert_clean(exc: BaseException, secret: str) -> None:
    for e in _chain(exc):
        assert secret not in str(e), type(e)
        assert secret not in repr(e), type(e)
        assert all(secret not in repr(a) for a in e.args)
        # A requests/urllib3 exception in the chain would carry the URL (it holds the key).
        assert type(e).__module__.startswith(("deals_pipeline", "builtins")), type(e)
    text = "".join(traceback.format_exception(exc))
    assert secret not in text
    assert "During handling of the above exception" not in text


def test_key_never_leaks(server: ScriptedServer, sentinel_key: str, caplog: pytest.LogCaptureFixture,
                         first_page_bytes: bytes, body_429: bytes) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    clock = ManualClock()
    client = KeepaClient(sentinel_key, base_url=server.url, clock=clock, max_attempts=2, timeout_s=(1.0, 0.2))
    assert sentinel_key not in repr(client) and sentinel_key not in str(client)
    assert sentinel_key not in repr(vars(client))

    page = html = b"<html>Bad key " + f"key={sentinel_key}".encode() + b" for " + sentinel_key.encode() + b"</html>"
    server.script(
        Reply(200, first_page_bytes),  # success
        Reply(429, body_429),  # 429
        Reply(400, html, content_type="text/html"),  # 400 echoing the key back
        Reply(500, html), Reply(500, html),  # 500 exhausted (2 attempts)
        Reply(200, first_page_bytes, delay_s=0.5), Reply(200, first_page_bytes, delay_s=0.5),  # timeouts
        Reply(200, first_page_bytes[:100]), Reply(200, page),  # truncated, then non-JSON
        Reply(200, first_page_bytes, delay_s=0.5),  # a paid read timeout: not retried
        Reply(200, first_page_bytes[:100]),  # a paid truncated body: not retried
    )
    errors: list[BaseException] = []

    def run(fn: Callable[[], Any], expected: type[BaseException] | None) -> None:
        try:
            fn()
        except KeepaError as exc:  # noqa: PERF203
            assert expected is not None and isinstance(exc, expected), exc
            errors.append(exc)
        else:
            assert expected is None

    run(lambda: client.deals(DealSelection()), None)
    run(lambda: client.deals(DealSelection()), NotEnoughTokens)
    run(lambda: client.products(["B0031S36JA"], ProductOptions()), RequestRejected)
    run(lambda: client.token_status(), RetriesExhausted)
    run(lambda: client.token_status(), RetriesExhausted)  # read timeouts (free endpoint: retried)
    run(lambda: client.token_status(), RetriesExhausted)  # truncated + non-JSON
    run(lambda: client.deals(DealSelection()), ResponseLost)  # paid: maybe charged, never retried blindly
    run(lambda: client.products(["B0031S36JA"], ProductOptions()), ResponseLost)
    refused = KeepaClient(sentinel_key, base_url=refused_url(), clock=clock, max_attempts=2)
    run(lambda: refused.token_status(), RetriesExhausted)  # connection refused

    assert len(errors) == 8
    for exc in errors:
        assert_clean(exc, sentinel_key)
    assert sentinel_key not in caplog.text
    # The urllib3 request lines were logged, and redacted rather than dropped.
    assert "urllib3.connectionpool" in {r.name for r in caplog.records}
    assert "/deal?key=***&selection=" in caplog.text
    assert "/token?key=*** " in caplog.text or "/token?key=***" in caplog.text
    assert sentinel_key not in repr(client.stats.snapshot())


def test_filter_installed_once() -> None:
    for _ in range(3):
        KeepaClient("k" * 20)
    for name in ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry"):
        flt = [f for f in logging.getLogger(name).filters if isinstance(f, RedactingFilter)]
        assert len(flt) == 1, name
    # Library code never changes levels or handlers.
    assert logging.getLogger("urllib3.connectionpool").handlers == []


def test_redact_text() -> None:
    assert redact("GET /deal?key=abc123&selection=%7B%7D HTTP/1.1") == "GET /deal?key=***&selection=%7B%7D HTTP/1.1"
    assert redact("url: https://x/token?key=abc") == "url: https://x/token?key=***"
    assert redact("'key=abc' \"key=def\"") == "'key=***' \"key=***\""
    assert redact("next=https%3A%2F%2Fx%3Fkey%3Dabc%26a%3D1") == "next=https%3A%2F%2Fx%3Fkey%3D***%26a%3D1"
    assert redact("the key is s3cr3t!/x", "s3cr3t!/x") == "the key is ***"
    assert redact("enc s3cr3t%21%2Fx", "s3cr3t!/x") == "enc ***"
    assert redact("key=***&a") == "key=***&a"  # idempotent


def test_redacting_filter_on_any_logger(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("deals_pipeline_tests.redaction_probe")
    flt = RedactingFilter(["topsecretvalue"])
    log.addFilter(flt)
    try:
        caplog.set_level(logging.DEBUG, logger=log.name)
        log.debug("GET %s -> %d", "/deal?key=topsecretvalue&x=1", 200)
        log.info("raw topsecretvalue in text")
        try:
            raise ValueError("boom key=topsecretvalue")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeFilter(flt)
    assert "topsecretvalue" not in caplog.text
    assert "/deal?key=***&x=1 -> 200" in caplog.text and "boom key=***" in caplog.text


def test_secret_holder() -> None:
    s = Secret("abcdef")
    assert "abcdef" not in repr(s) and "abcdef" not in str(s) and s.reveal() == "abcdef"
    assert s == Secret("abcdef") and install_urllib3_redaction() is install_urllib3_redaction()
