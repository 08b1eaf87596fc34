"""Shared fixtures. Real parts only: the simulator over HTTP on 127.0.0.1, real DuckDB files."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "keepa-samples"

#: A sentinel key: tests assert it never shows up in logs, exceptions, the database or run metadata.
SENTINEL_KEY = "SENTINELKEY0123456789abcdefSENTINELKEY0123456789abcdefSENTINEL00"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.fail(f"Keepa samples not found at {SAMPLES} (expected ../shared/keepa-samples next to the checkout)")
    return SAMPLES


@pytest.fixture
def sentinel_key() -> str:
    return SENTINEL_KEY
