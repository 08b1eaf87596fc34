"""Smoke test: dagster-webserver on 127.0.0.1 with a temporary instance, checked through GraphQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import requests

from dagster._core.instance.ref import InstanceRef

from deals_pipeline.defs.deal_pages import deal_pages
from deals_pipeline.clock import SystemClock
from deals_pipeline.defs.resources import DealQueryResource, DealsDatabaseResource, KeepaResource, TokenBudgetResource
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig
from deals_pipeline_tests.harness.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
#: A hang guard: the webserver and its code location load in ~10 s idle, a few times that under load.
STARTUP_TIMEOUT_S = 240.0

LOCATION_QUERY = """
{
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes {
        name
        location { name }
        sensors { name }
        assetNodes { assetKey { path } }
      }
    }
  }
}
"""

CHECKS_QUERY = """
{
  assetNodes(assetKeys: [{path: ["deal_pages"]}, {path: ["recent_deals"]}]) {
    assetKey { path }
    assetChecksOrError { ... on AssetChecks { checks { name } } }
    partitionStats { numMaterialized numPartitions }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_webserver_serves_the_code_location_and_a_materialized_partition(tmp_path, sentinel_key):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster_home" / "dagster.yaml").read_text())
    db_path = tmp_path / "web.duckdb"
    with KeepaSimulator(SimulatorConfig(refill_rate=3000, catalog_size=320), clock=SystemClock()) as sim:
        resources = {
            "keepa": KeepaResource(mode="simulator", simulator_url=sim.base_url),
            "database": DealsDatabaseResource(path=str(db_path)),
            "token_budget": TokenBudgetResource(refill_rate_guess=3000),
            "query": DealQueryResource(chunk_size=20),
        }
        instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
        assert dg.materialize([deal_pages], partition_key="2", instance=instance, resources=resources).success
        instance.dispose()

    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "DEALS_DB_PATH": str(db_path),
           "DEALS_PIPELINE_MODE": "simulator", "KEEPA_API_KEY": sentinel_key}
    web = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
         "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def server_up() -> bool:
            try:
                return requests.get(f"{base}/server_info", timeout=5).ok
            except requests.RequestException:  # not listening yet, or too busy to answer within 5 s
                return False

        def web_exited() -> str | None:
            return None if web.poll() is None else f"dagster-webserver exited: {web.stdout.read()[-3000:]}"

        wait_for(server_up, STARTUP_TIMEOUT_S, "dagster-webserver answering /server_info", poll_s=0.5, abort=web_exited)

        def gql(query: str) -> dict:
            # The code location loads in the background after startup: wait until the query answers fully.
            def answered() -> dict | None:
                body = requests.post(f"{base}/graphql", json={"query": query}, timeout=60).json()
                if "errors" not in body and body["data"] and all(v is not None for v in body["data"].values()):
                    if body["data"].get("repositoriesOrError", {}).get("nodes", [1]):
                        return body["data"]
                return None

            return wait_for(answered, STARTUP_TIMEOUT_S, f"a full GraphQL answer to {query.split()[1]}", poll_s=1.0,
                            abort=web_exited)

        location = gql(LOCATION_QUERY)["repositoriesOrError"]["nodes"][0]
        assert location["location"]["name"] == "deals_pipeline"
        assets = {"/".join(a["assetKey"]["path"]) for a in location["assetNodes"]}
        assert {"deal_pages", "recent_deals"} <= assets
        assert {s["name"] for s in location["sensors"]} == {"deal_pages_sensor", "recent_deals_sensor", "maintenance_sensor"}

        nodes = {"/".join(n["assetKey"]["path"]): n for n in gql(CHECKS_QUERY)["assetNodes"]}
        checks = {c["name"] for n in nodes.values() for c in n["assetChecksOrError"]["checks"]}
        assert {"rows_hold_their_own_asin", "chunk_progress_matches_deals", "token_deficit_within_bounds",
                "discovery_lag_and_backlog", "watermark_not_ahead"} <= checks
        stats = nodes["deal_pages"]["partitionStats"]
        assert stats["numPartitions"] == 67 and stats["numMaterialized"] == 1
        # The UI shows the key's env var name, never its value.
        page = requests.post(f"{base}/graphql", json={"query": "{ workspaceOrError { __typename } }"}, timeout=30)
        assert sentinel_key not in page.text
    finally:
        web.terminate()
        try:
            output = web.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            web.kill()
            output = web.communicate()[0]
    assert sentinel_key not in output
