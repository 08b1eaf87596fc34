"""Fault injection (scripted and seeded-random), stats counters, and key hygiene."""

from __future__ import annotations

import http.client
import json
import logging
import time
from urllib.parse import urlencode

import pytest
import requests

from deals_pipeline.simulator import FaultConfig, KeepaSimulator, SimulatorConfig
from deals_pipeline_tests.simulator.helpers import Api, assert_envelope, selection


@pytest.fixture
def sim(make_sim):
    return make_sim(catalog_size=300)


def _raw_get(sim, path_and_query: str):
    """GET with http.client so a truncated body can be inspected byte for byte."""
    host, port = sim.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", path_and_query)
    return conn, conn.getresponse()


def test_scripted_server_errors_500_then_503_cost_nothing(api, sim):
    sim.inject("server_error", count=2)
    r1, r2 = api.deal(0), api.deal(0)
    assert (r1.status_code, r2.status_code) == (500, 503)
    for r in (r1, r2):
        assert "error" in r.json()
        assert_envelope(r.json(), consumed=0)
        assert r.json()["tokensLeft"] == 300
    r3 = api.deal(0)
    assert r3.status_code == 200 and r3.json()["tokensLeft"] == 295
    s = sim.stats()
    assert s.faults_injected == {"server_error": 2}
    assert s.responses == {500: 1, 503: 1, 200: 1}
    assert s.tokens_consumed == 5 and s.deal_page_fetches == {0: 1}


def test_scripted_fault_matches_its_endpoint_only(api, sim):
    sim.inject("http_402", endpoint="product")
    assert api.token().status_code == 200
    assert api.deal(0).status_code == 200
    r = api.product(sim.catalog.asins()[0])
    assert r.status_code == 402
    assert_envelope(r.json(), consumed=0)
    assert api.product(sim.catalog.asins()[0]).status_code == 200
    with pytest.raises(ValueError):
        sim.inject("explode")
    with pytest.raises(ValueError):
        sim.inject("timeout", endpoint="seller")


def test_scripted_http_400_and_not_enough_tokens(api, sim):
    envelope_keys = set(api.token().json())
    sim.inject("http_400")
    sim.inject("not_enough_tokens", count=2)
    r = api.deal(0)
    assert r.status_code == 400
    assert_envelope(r.json(), consumed=0)
    for _ in range(2):
        r = api.deal(0)
        assert r.status_code == 429
        assert_envelope(r.json(), consumed=0)
        assert set(r.json()) == envelope_keys  # just the envelope
    assert api.deal(0).status_code == 200
    s = sim.stats()
    assert s.rejected_429 == 2 and s.faults_injected == {"http_400": 1, "not_enough_tokens": 2}
    assert sim.bucket.balance() == 295


def test_truncated_response_is_charged_and_cut_in_half(api, sim):
    sim.inject("truncated", endpoint="deal")
    # A request that would fail (400) does not consume the scripted truncation.
    assert api.deal(0, page="0").status_code == 400
    conn, resp = _raw_get(sim, "/deal?" + urlencode({"key": api.key, "selection": json.dumps(selection(0))}))
    try:
        assert resp.status == 200
        declared = int(resp.getheader("Content-Length"))
        with pytest.raises(http.client.IncompleteRead) as exc:
            resp.read()
        assert len(exc.value.partial) == declared // 2
    finally:
        conn.close()
    assert sim.bucket.balance() == 295  # the server spent the tokens
    assert sim.stats().faults_injected == {"truncated": 1}
    assert sim.stats().deal_page_fetches == {0: 1}
    # requests surfaces it as an error, never as a short page.
    sim.inject("truncated")
    with pytest.raises(requests.exceptions.RequestException):
        api.deal(1).json()
    assert api.deal(1).status_code == 200


def test_timeout_holds_the_response_and_the_client_times_out(make_sim, api_for):
    sim = make_sim(catalog_size=50, faults=FaultConfig(timeout_hold_s=0.6))
    api = api_for(sim)
    sim.inject("timeout", endpoint="token")
    t0 = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        api.session.get(f"{sim.base_url}/token", params={"key": api.key}, timeout=0.2)
    assert time.monotonic() - t0 < 0.5
    assert api.token().status_code == 200  # next request is normal
    sim.inject("timeout", endpoint="deal")
    t0 = time.monotonic()
    r = api.deal(0, timeout=5)  # a patient client gets the (charged) answer late
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.55
    assert r.json()["tokensConsumed"] == 5
    assert sim.stats().faults_injected == {"timeout": 2}


def test_malformed_payloads_are_valid_json_that_break_the_schema(api, sim):
    sim.inject("malformed", count=3)
    d = api.deal(0)
    assert d.status_code == 200 and isinstance(d.json()["deals"]["dr"], str)
    assert_envelope(d.json(), consumed=5)
    p = api.product(sim.catalog.asins()[0])
    assert p.status_code == 200 and isinstance(p.json()["products"], str)
    t = api.token()
    assert t.status_code == 200 and isinstance(t.json()["tokensLeft"], str)
    assert sim.stats().faults_injected == {"malformed": 3}
    assert isinstance(api.deal(0).json()["deals"]["dr"], list)


def _fault_trace(sim: KeepaSimulator, api: Api, n: int) -> list[str]:
    out = []
    for _ in range(n):
        try:
            r = api.get("token", timeout=2)
            body = r.json()
            out.append("malformed" if isinstance(body["tokensLeft"], str) else str(r.status_code))
        except requests.exceptions.RequestException:
            out.append("broken")
    return out


def test_random_faults_are_seeded_and_reproducible(make_sim, api_for):
    faults = FaultConfig(p_server_error=0.25, p_malformed=0.2, p_truncated=0.15, p_timeout=0.05, timeout_hold_s=0.0, seed=3)
    traces = []
    for _ in range(2):
        sim = make_sim(catalog_size=10, faults=faults)
        traces.append((_fault_trace(sim, api_for(sim), 60), sim.stats().faults_injected))
    (t1, f1), (t2, f2) = traces
    assert t1 == t2 and f1 == f2
    assert {"200", "500", "503", "malformed", "broken"} <= set(t1)
    assert f1["server_error"] > 5 and f1["malformed"] > 3 and f1["truncated"] > 2 and f1["timeout"] >= 1
    sim = make_sim(catalog_size=10, faults=FaultConfig(p_server_error=0.25, p_malformed=0.2, seed=4))
    assert _fault_trace(sim, api_for(sim), 60) != t1


def test_latency_is_real_wall_delay(make_sim, api_for):
    sim = make_sim(catalog_size=10, faults=FaultConfig(latency_ms=150))
    api = api_for(sim)
    t0 = time.monotonic()
    assert api.token().status_code == 200
    assert time.monotonic() - t0 >= 0.14


def test_stats_count_everything_and_reset(api, sim, clock):
    asins = sim.catalog.asins()[:3]
    envelopes = [api.deal(0).json(), api.deal(1).json(), api.deal(1).json()]
    envelopes.append(api.product(asins, rating=1).json())
    envelopes.append(api.product(asins[:1]).json())
    api.token()
    api.get("nowhere")
    api.deal(0, page="x")
    sim.bucket.set_balance(0)
    api.deal(0)
    s = sim.stats()
    assert s.requests == {"deal": 5, "product": 2, "token": 1, "other": 1}
    assert s.responses == {200: 6, 404: 1, 400: 1, 429: 1}
    rating = sum(sim.catalog.traits(a, clock.now_ms()).rating_fresh for a in asins)  # rating costs up to 1
    assert s.tokens_consumed == sum(e["tokensConsumed"] for e in envelopes) == 15 + 3 + rating + 1
    assert s.product_fetches == {asins[0]: 2, asins[1]: 1, asins[2]: 1}
    assert s.deal_page_fetches == {0: 1, 1: 2}
    assert s.rejected_429 == 1 and s["rejected_429"] == 1
    js = requests.get(f"{sim.base_url}/_sim/stats", timeout=5).json()
    assert {k: v for k, v in js.items() if k not in ("bucket", "catalog")} == json.loads(json.dumps(s.to_dict()))
    assert js["bucket"]["tokens_left"] == 0 and js["bucket"]["now_ms"] == clock.now_ms()
    snapshot = sim.stats()
    sim.reset_stats()
    assert sim.stats().to_dict() == {
        "requests": {}, "responses": {}, "tokens_consumed": 0, "product_fetches": {}, "deal_page_fetches": {},
        "faults_injected": {}, "rejected_429": 0,
    }  # fmt: skip
    assert snapshot.tokens_consumed == 15 + 3 + rating + 1  # snapshots are copies


def test_key_never_logged_nor_exposed(make_sim, api_for, sentinel_key, caplog):
    caplog.set_level(logging.DEBUG, logger="deals_pipeline.simulator")
    sim = make_sim(catalog_size=20, expected_key=sentinel_key, faults=FaultConfig(timeout_hold_s=0.3))
    api = api_for(sim)
    api.token()
    api.deal(0)
    api.deal(0, page="bad")
    api.product(sim.catalog.asins()[:2], offers=20)
    api.get("unknown/path")
    api.session.post(f"{sim.base_url}/deal", params={"key": sentinel_key}, data=json.dumps(selection(0)), timeout=5)
    api.session.post(f"{sim.base_url}/token", params={"key": sentinel_key}, timeout=5)
    for kind in ("server_error", "truncated", "malformed", "http_400", "http_402", "not_enough_tokens"):
        sim.inject(kind)
        try:
            api.deal(0)
        except requests.exceptions.RequestException:
            pass
    sim.inject("timeout")
    with pytest.raises(requests.exceptions.ReadTimeout):
        api.get("token", timeout=0.1)
    wrong = Api(sim, sentinel_key[::-1])
    assert wrong.token().status_code == 400
    wrong.close()
    sim.bucket.set_balance(0)
    body = api.deal(0).text
    time.sleep(0.35)  # let the held (timeout) response finish and log
    assert caplog.records, "the simulator should log (redacted) request lines at DEBUG"
    assert "key=***" in caplog.text
    assert sentinel_key not in caplog.text
    assert sentinel_key[::-1] not in caplog.text
    assert sentinel_key not in body
    assert sentinel_key not in requests.get(f"{sim.base_url}/_sim/stats", timeout=5).text
    assert sentinel_key not in repr(sim) + repr(sim.config) + repr(sim.stats()) + repr(sim.bucket)


def test_stop_closes_keepalive_connections_and_port(sentinel_key):
    sim = KeepaSimulator(SimulatorConfig(catalog_size=5))
    sim.start()
    api = Api(sim, sentinel_key)
    assert api.token().status_code == 200
    url = sim.base_url
    sim.stop()
    sim.stop()  # idempotent
    with pytest.raises(requests.exceptions.ConnectionError):
        api.session.get(f"{url}/token", params={"key": sentinel_key}, timeout=2)
    api.close()


def test_concurrent_clients_are_accounted_exactly(make_sim, sentinel_key):
    from concurrent.futures import ThreadPoolExecutor

    sim = make_sim(catalog_size=300, initial_tokens=200)
    asins = sim.catalog.asins()

    def worker(i: int) -> list[tuple[int, int]]:
        api = Api(sim, sentinel_key)
        out = []
        try:
            for j in range(12):
                r = api.deal(j % 3) if (i + j) % 2 else api.product(asins[(i * 7 + j) % 300], offers=20)
                out.append((r.status_code, r.json()["tokensConsumed"]))
        finally:
            api.close()
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [x for chunk in pool.map(worker, range(8)) for x in chunk]
    assert {code for code, _ in results} <= {200, 429}
    assert any(code == 429 for code, _ in results)  # 200 tokens run out
    spent = sum(c for _, c in results)
    s = sim.stats()
    assert s.tokens_consumed == spent == 200 - sim.bucket.balance()
    assert s.responses[429] == s.rejected_429 == sum(1 for code, _ in results if code == 429)
    assert sim.bucket.balance() > -6 * 2 * 8  # served only while positive: bounded overshoot
