"""Point the public ``keepa`` client (PyPI ``keepa``, akaszynski/keepa) at a simulator on 127.0.0.1.

keepa 1.6 hard-codes ``https://api.keepa.com/{endpoint}/?`` in ``keepa.keepa_sync.Keepa._request`` and calls the
module-level ``requests.get`` (a fresh connection per call, so no session or transport adapter can be mounted).
The least invasive redirect is to give that one module a ``requests`` stand-in whose ``get`` swaps the URL prefix
and forwards everything else to the real ``requests.get``: keepa's own code, parameters, parsing, error mapping and
waits stay untouched, and nothing else in the process is affected. With pytest::

    monkeypatch.setattr(keepa.keepa_sync, "requests", KeepaRedirect(sim.base_url))

Outside tests, ``with redirected(base_url): keepa.Keepa(key).deals(...)``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import requests

KEEPA_BASE_URL = "https://api.keepa.com"


class KeepaRedirect:
    """A ``requests`` stand-in for ``keepa.keepa_sync``: ``get`` goes to ``base_url`` instead of api.keepa.com."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.calls: list[str] = []  # endpoints requested, for tests (never the key)

    def get(self, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        if not url.startswith(KEEPA_BASE_URL + "/"):
            raise ValueError(f"unexpected keepa URL {url!r}")
        path = url[len(KEEPA_BASE_URL):]
        self.calls.append(path.strip("/?"))
        return requests.get(self.base_url + path, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # exceptions and anything else keepa may use
        return getattr(requests, name)


@contextlib.contextmanager
def redirected(base_url: str) -> Iterator[KeepaRedirect]:
    """Redirect ``keepa.Keepa`` to ``base_url`` for the duration of the block."""
    import keepa.keepa_sync as keepa_sync

    shim = KeepaRedirect(base_url)
    original = keepa_sync.requests
    keepa_sync.requests = shim
    try:
        yield shim
    finally:
        keepa_sync.requests = original
