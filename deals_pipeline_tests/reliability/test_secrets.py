"""Secrets: the API key never leaves the request URL.

A sentinel key (fixture ``sentinel_key``), which the simulator requires (``expected_key``), drives real
Dagster runs in process on a temporary instance with on-disk storage: a backfill page and an upsert
that succeed, then failures: HTTP 402 on the page fetch, HTTP 402 on a chunk's /product call, and a
connection refused (requests puts the full URL, key included, in its messages). The sentinel must
not appear in:

* log records at DEBUG, urllib3 included (caplog), nor in anything written to stdout/stderr (capfd);
* exception texts: every run's failure events (message and stack), chunk errors;
* the DuckDB file: its bytes (and WAL), and every VARCHAR/JSON column of every table;
* run metadata, run config, tags, stored event logs, and every file under the instance's folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from deals_pipeline.clock import SystemClock
from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline.storage import Database
from deals_pipeline_tests.keepa.http_fixture import refused_url
from deals_pipeline_tests.reliability._support import RecordingSimulator, backfill_job, query

pytestmark = pytest.mark.slow  # Dagster runs and the whole stack

SELECTION = {"domainId": 1, "priceTypes": [2], "dateRange": 3, "sortType": 4}


def _upsert_job(resources: dict):
    import dagster as dg

    from deals_pipeline.defs.recent_deals import recent_deals, recent_deals_job

    defs = dg.Definitions(assets=[recent_deals], jobs=[recent_deals_job], resources=resources,
                          executor=dg.in_process_executor)
    return defs.resolve_job_def(recent_deals_job.name)


def _texts_of_run(result, instance) -> list[str]:
    texts = []
    for event in result.all_events:
        texts += [str(event), repr(event), str(event.message or "")]
        data = event.event_specific_data
        error = getattr(data, "error", None)
        if error is not None:
            texts.append(error.to_string())
        for holder in ("materialization", "asset_observation_data", "step_output_data"):
            inner = getattr(data, holder, None)
            inner = getattr(inner, "asset_observation", inner)
            for md in (getattr(inner, "metadata", None) or {}).values():
                texts.append(str(getattr(md, "value", md)))
    run = instance.get_run_by_id(result.run_id)
    texts += [json.dumps(run.run_config, default=str), json.dumps(dict(run.tags)), repr(run)]
    for entry in instance.all_logs(result.run_id):
        texts += [entry.user_message or "", repr(entry)]
    return texts


@pytest.mark.timeout(180)
def test_the_sentinel_key_never_leaks(tmp_path: Path, sentinel_key: str, caplog: pytest.LogCaptureFixture,
                                      capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster import DagsterInstance, EnvVar

    from deals_pipeline.defs.resources import DealQueryResource, DealsDatabaseResource, KeepaResource, TokenBudgetResource

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    for name in ("DEALS_PIPELINE_TIME_SCALE", "DEALS_PIPELINE_TIME_ANCHOR", "DEALS_PIPELINE_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEEPA_API_KEY", sentinel_key)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    db_path = tmp_path / "secrets.duckdb"
    with Database(db_path, data_mode="keepa").connect():  # what `deals-pipeline init` does: keepa mode never creates it
        pass
    config = SimulatorConfig(refill_rate=2000, catalog_size=200, seed=3, expected_key=sentinel_key)
    texts: list[str] = []
    outcomes = {}
    with RecordingSimulator(config, clock=SystemClock()) as sim:
        def resources(*, api_key, base_url=sim.base_url, max_attempts=4) -> dict:
            return {
                "keepa": KeepaResource(mode="keepa", api_key=api_key, base_url=base_url, max_attempts=max_attempts),
                "database": DealsDatabaseResource(path=str(db_path)),
                "token_budget": TokenBudgetResource(),
                "query": DealQueryResource(selection_json=json.dumps(SELECTION), chunk_size=50),
            }

        raw = resources(api_key=sentinel_key)  # as the brief asks: the key passed as a plain value
        from_env = resources(api_key=EnvVar("KEEPA_API_KEY"))  # as definitions.py does it
        runs = [
            ("page 0", backfill_job(raw), "0", None, True),
            ("402 on the page fetch", backfill_job(from_env), "1", ("http_402", "deal"), False),
            ("402 on a chunk", backfill_job(raw), "1", ("http_402", "product"), False),
            ("connection refused", backfill_job(resources(api_key=sentinel_key, base_url=refused_url(),
                                                          max_attempts=2)), "2", None, False),
            ("upsert", _upsert_job(from_env), None, None, True),
        ]
        with DagsterInstance.local_temp(str(home)) as instance:
            for name, job, partition, fault, should_succeed in runs:
                if fault is not None:
                    sim.inject(fault[0], endpoint=fault[1])
                result = job.execute_in_process(partition_key=partition, instance=instance, raise_on_error=False)
                sim.clear_injections()
                outcomes[name] = result.success
                assert result.success == should_succeed, name
                texts += _texts_of_run(result, instance)
        accepted = sim.stats().responses[200]
    assert accepted > 0, "the runs must have authenticated with the sentinel key"
    assert outcomes == {name: ok for name, _, _, _, ok in runs}

    # The failures are visible (typed, redacted), not swallowed.
    joined = "\n".join(texts)
    assert "PaymentRequired" in joined and "RetriesExhausted" in joined and "key=***" in joined
    errors = query(db_path, "SELECT error FROM page_chunks WHERE status = 'failed'")
    assert errors and "PaymentRequired" in errors[0][0]

    # -- logs and console ------------------------------------------------------------------------------
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    urllib3_lines = [r for r in caplog.records if r.name.startswith("urllib3")]
    assert urllib3_lines, "urllib3 DEBUG lines (request URLs) must have been captured"
    for record in caplog.records:
        assert sentinel_key not in formatter.format(record), record.name
    out, err = capfd.readouterr()
    assert sentinel_key not in out and sentinel_key not in err

    # -- exception texts, run metadata, config, tags, event logs ------------------------------------------
    leaks = [t[:200] for t in texts if sentinel_key in t]
    assert not leaks, leaks[:3]

    # -- every file of the instance ------------------------------------------------------------------------
    files = [p for p in home.rglob("*") if p.is_file()]
    assert files
    assert [str(p) for p in files if sentinel_key.encode() in p.read_bytes()] == []

    # -- the DuckDB file: bytes, then every text column ------------------------------------------------------
    for path in (db_path, db_path.with_name(db_path.name + ".wal")):
        if path.exists():
            assert sentinel_key.encode() not in path.read_bytes(), path
    columns = query(db_path, "SELECT table_name, column_name, data_type FROM information_schema.columns "
                             "WHERE data_type LIKE 'VARCHAR%' OR data_type = 'JSON'")
    assert len(columns) > 20
    for table, column, _ in columns:
        hits = query(db_path, f'SELECT count(*) FROM "{table}" WHERE CAST("{column}" AS VARCHAR) LIKE ?',
                     [f"%{sentinel_key}%"])[0][0]
        assert hits == 0, f"{table}.{column}"
    print("SECRETS", {"runs": outcomes, "log_records": len(caplog.records), "urllib3_records": len(urllib3_lines),
                      "texts_checked": len(texts), "instance_files": len(files), "text_columns": len(columns)})
