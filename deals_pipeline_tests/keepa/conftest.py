from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from deals_pipeline_tests.keepa.http_fixture import ScriptedServer

FIRST_RUN = "run_2025-09-14T18-12Z_commit_b3f7397"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def deal_index(samples_dir: Path) -> list[dict]:
    return load_json(samples_dir / "deal_responses" / "index.json")


@pytest.fixture(scope="session")
def first_page_bytes(samples_dir: Path) -> bytes:
    return (samples_dir / "deal_responses" / FIRST_RUN / "page_0.json").read_bytes()


@pytest.fixture(scope="session")
def last_page_bytes(samples_dir: Path) -> bytes:
    return (samples_dir / "deal_responses" / FIRST_RUN / "page_6.json").read_bytes()


@pytest.fixture(scope="session")
def body_429(samples_dir: Path) -> bytes:
    return (samples_dir / "deal_429_not_enough_token.json").read_bytes()


@pytest.fixture(scope="session")
def token_samples(samples_dir: Path) -> list[dict]:
    return load_json(samples_dir / "token_status_samples.json")


@pytest.fixture(scope="session")
def product_objects(samples_dir: Path) -> dict[str, dict]:
    return {
        asin: load_json(samples_dir / f"product_object_{asin}.json") for asin in ("1886940606", "055299068X")
    }
