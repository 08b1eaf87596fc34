"""The token bucket (KEEPA_API.md §3), directly and through HTTP on a ManualClock."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deals_pipeline.clock import ScaledClock
from deals_pipeline.keepa.models import TokenStatus, refill_wait_ms
from deals_pipeline.simulator import KeepaSimulator, SimulatorConfig, TokenBucket
from deals_pipeline_tests.simulator.helpers import Api, assert_envelope


def test_refill_once_per_minute_by_rate_at_a_fixed_phase():
    b = TokenBucket(5, initial_tokens=100, start_ms=0)
    assert b.balance(0) == 100 and b.refill_in(0) == 60_000
    assert b.balance(59_999) == 100 and b.refill_in(59_999) == 1
    assert b.balance(60_000) == 105 and b.refill_in(60_000) == 60_000
    assert b.balance(119_999) == 105
    assert b.balance(180_000) == 115  # two more refills at 120 s and 180 s
    b.charge(10, 185_000)  # a charge does not move the phase
    assert b.refill_in(185_000) == 55_000
    assert b.balance(240_000) == 110


def test_cap_is_60_times_rate_and_overflow_is_lost():
    b = TokenBucket(5, start_ms=0)
    assert b.cap == 300 and b.balance(0) == 300  # None = full
    assert b.balance(10 * 60_000) == 300
    b.charge(5, 10 * 60_000)
    assert b.balance(10 * 60_000 + 60_000) == 300
    assert b.balance(10 * 60_000 + 120_000) == 300
    assert TokenBucket(25, start_ms=0).cap == 1_500
    assert TokenBucket(5, initial_tokens=1_000, start_ms=0).balance(0) == 300


def test_admission_serves_while_positive_and_may_go_negative():
    b = TokenBucket(5, initial_tokens=11, start_ms=0)
    assert b.try_charge(30, 0) is True
    assert b.balance(0) == -19
    assert b.try_charge(1, 0) is False  # rejected: nothing charged
    assert b.balance(0) == -19
    b.set_balance(0, 0)
    assert b.try_charge(1, 0) is False


@settings(max_examples=150, deadline=None)
@given(
    rate=st.integers(min_value=1, max_value=30),
    initial=st.one_of(st.none(), st.integers(min_value=-400, max_value=2_000)),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("advance"), st.integers(min_value=0, max_value=200_000)),
            st.tuples(st.just("charge"), st.integers(min_value=0, max_value=400)),
        ),
        max_size=60,
    ),
)
def test_bucket_property_cap_and_minute_boundaries(rate, initial, ops):
    b = TokenBucket(rate, initial_tokens=initial, start_ms=0)
    cap = 60 * rate
    now = 0
    bal = b.balance(now)
    assert bal <= cap
    for op, arg in ops:
        if op == "advance":
            new_now = now + arg
            new_bal = b.balance(new_now)
            refills = new_now // 60_000 - now // 60_000  # refill boundaries crossed in (now, new_now]
            assert new_bal == min(cap, bal + refills * rate)
            if refills == 0:
                assert new_bal == bal  # nothing changes between minute boundaries
            now, bal = new_now, new_bal
        else:
            accepted = b.try_charge(arg, now)
            assert accepted == (bal > 0)
            new_bal = b.balance(now)
            assert new_bal == (bal - arg if accepted else bal)
            bal = new_bal
        assert bal <= cap
        refill_in = b.refill_in(now)
        assert 0 < refill_in <= 60_000
        assert (now + refill_in) % 60_000 == 0  # the phase never drifts
        status = b.status(now)
        assert status.tokens_left == bal and status.refill_in_ms == refill_in and status.timestamp_ms == now


def test_expensive_product_goes_negative_then_429_then_wait_then_success(make_sim, api_for, clock):
    sim = make_sim(catalog_size=50)
    api = api_for(sim)
    sim.bucket.set_balance(11)
    asins = sim.catalog.asins()[:5]
    r = api.product(asins, offers=20, rating=1)
    assert r.status_code == 200
    consumed = r.json()["tokensConsumed"]
    assert consumed >= 5 * 6  # >= one offer page (6) per ASIN; rating adds up to 1
    assert r.json()["tokensLeft"] == 11 - consumed < 0
    assert sim.bucket.balance() == 11 - consumed

    r = api.deal(0)
    assert r.status_code == 429
    body = r.json()
    assert_envelope(body, now_ms=clock.now_ms(), consumed=0)
    assert body["tokensLeft"] == 11 - consumed
    status = TokenStatus.from_envelope(body)
    wait = refill_wait_ms(status, need=1, now_ms=clock.now_ms())
    assert wait > 0
    # One millisecond before the last needed refill (wait includes a 1,000 ms margin) it is still a 429 ...
    clock.sleep_ms(wait - 1_001)
    r = api.deal(0)
    assert r.status_code == 429 and r.json()["tokensConsumed"] == 0
    # ... and after sleeping the rest of the computed wait the same request succeeds.
    clock.sleep_ms(1_001)
    r = api.deal(0)
    assert r.status_code == 200
    assert r.json()["tokensConsumed"] == 5
    assert 1 <= r.json()["tokensLeft"] + 5 <= 5  # the refill brought it just above 0
    st_ = sim.stats()
    assert st_.rejected_429 == 2 and st_.responses[429] == 2


def test_429_at_exactly_zero_and_token_endpoint_still_answers(make_sim, api_for):
    sim = make_sim(catalog_size=10, initial_tokens=0)
    api = api_for(sim)
    r = api.product("0000000000")
    assert r.status_code == 429 and r.json()["tokensLeft"] == 0 and r.json()["tokensConsumed"] == 0
    r = api.token()  # free, always answered
    assert r.status_code == 200 and r.json()["tokensLeft"] == 0


def test_refill_in_stays_in_range_over_time(make_sim, api_for, clock):
    sim = make_sim(catalog_size=10, refill_rate=25)
    api = api_for(sim)
    for step in (0, 1, 59_998, 1, 1, 30_000, 90_000, 600_000):
        clock.advance(step)
        body = api.token().json()
        assert_envelope(body, now_ms=clock.now_ms(), consumed=0)
        assert body["refillRate"] == 25 and body["tokensLeft"] <= 1_500


def test_scaled_clock_plays_refills_faster(sentinel_key):
    # 600x: one simulated minute per 0.1 wall seconds.
    clock = ScaledClock(scale=600)
    with KeepaSimulator(SimulatorConfig(catalog_size=10, initial_tokens=0), clock=clock) as sim:
        api = Api(sim, sentinel_key)
        try:
            assert api.token().json()["tokensLeft"] == 0
            time.sleep(0.35)
            left = api.token().json()["tokensLeft"]
            assert 15 <= left <= 60 and left % 5 == 0  # >= 3 refills in >= 210 simulated s
        finally:
            api.close()


@pytest.mark.parametrize("rate", [0, -1])
def test_zero_or_negative_rate(rate):
    if rate < 0:
        with pytest.raises(ValueError):
            TokenBucket(rate, start_ms=0)
        return
    b = TokenBucket(rate, start_ms=0)
    assert b.cap == 0 and b.balance(10**9) == 0 and not b.can_serve(10**9)
    assert math.isfinite(b.refill_in(10**9))
