"""VerifyTimeEstimator: the online fit of verify time against (sessions, rows), and the row cost
the broker stamps on every verdict."""

import random

import pytest

from brokers.estimator import VerifyTimeEstimator


def _feed(est, cost, batches, start=0.0, gap=0.0, seed=0):
    """``batches`` timed batches of random shapes costing ``cost(s, r)`` ± 3 %, each dispatched
    ``gap`` seconds after the previous one finished; returns the clock."""
    rng = random.Random(seed)
    now = start
    for _ in range(batches):
        s = rng.randint(1, 16)
        r = s + rng.randint(0, 4 * s)
        seconds = cost(s, r) * (1 + rng.uniform(-0.03, 0.03))
        est.observe(s, r, seconds, sent=now)
        now += seconds + gap
    return now


def test_learns_fixed_per_session_and_per_row_costs():
    est = VerifyTimeEstimator()
    assert est.row_cost_ms() == 0.0 and not est.ready  # unknown until the warm-up is done
    _feed(est, lambda s, r: 0.020 + 0.002 * s + 0.0015 * r, 200)
    a, b, c = est.coefficients()
    assert a == pytest.approx(0.020, rel=0.15)
    assert b == pytest.approx(0.002, rel=0.3)
    assert c == pytest.approx(0.0015, rel=0.1)
    assert est.seconds(16, 64) == pytest.approx(0.020 + 0.032 + 0.096, rel=0.05)


def test_follows_a_verifier_that_slows_down():
    est = VerifyTimeEstimator()
    now = _feed(est, lambda s, r: 0.010 + 0.001 * r, 200)
    assert est.seconds(8, 32) == pytest.approx(0.042, rel=0.05)
    _feed(est, lambda s, r: 2 * (0.010 + 0.001 * r), 300, start=now, seed=1)  # the machine got busy
    assert est.seconds(8, 32) == pytest.approx(0.084, rel=0.05)


def test_row_cost_is_the_slope_under_full_load_and_small_when_idle():
    busy = VerifyTimeEstimator()
    _feed(busy, lambda s, r: 0.020 + 0.001 * r, 200)  # back to back: the verifier never waits
    assert busy.utilisation > 0.95
    assert busy.row_cost_ms() == pytest.approx(1.0, rel=0.1)
    idle = VerifyTimeEstimator()
    _feed(idle, lambda s, r: 0.020 + 0.001 * r, 200, gap=0.2)  # ~10 % busy
    assert 0.05 < idle.utilisation < 0.25
    assert idle.row_cost_ms() < 0.3 * busy.row_cost_ms()
    # under light load a row costs far less than a forward's fixed part
    assert idle.row_cost_ms() < 0.1 * 1000 * idle.coefficients()[0]


def test_a_steady_shape_does_not_wind_the_fit_up():
    est = VerifyTimeEstimator()
    now = _feed(est, lambda s, r: 0.010 + 0.002 * s + 0.001 * r, 100)
    for _ in range(5000):  # one shape for a long time: no information on the other directions
        est.observe(4, 12, 0.010 + 0.008 + 0.012, sent=now)
        now += 0.03
    assert est.seconds(16, 64) == pytest.approx(0.010 + 0.032 + 0.064, rel=0.2)


def test_prefill_batches_count_as_busy_but_stay_out_of_the_fit():
    est = VerifyTimeEstimator()
    now = _feed(est, lambda s, r: 0.010 + 0.001 * r, 50)
    before = est.coefficients()
    for _ in range(20):
        est.observe(1, 1, 5.0, sent=now, fit=False)  # a long prefill
        now += 5.0
    assert est.coefficients() == before and est.utilisation > 0.95
    with pytest.raises(ValueError):
        est.observe(2, 1, 0.01)  # fewer rows than sessions


def test_round_cost_is_a_sessions_share_of_the_fixed_part():
    """a / sessions per batch + b, scaled like the row cost: so its ratio to the row cost is the
    fit's own, and shrinks as batches grow."""
    est = VerifyTimeEstimator()
    assert est.round_cost_ms() == 0.0  # unknown until the warm-up is done
    rng = random.Random(4)
    now = 0.0
    for size in (2, 16):
        for _ in range(300):  # back to back, batches of about ``size`` sessions
            s = max(1, size + rng.randint(-1, 1))
            r = s + rng.randint(0, 3 * s)
            seconds = 0.060 + 0.008 * s + 0.004 * r
            est.observe(s, r, seconds, sent=now)
            now += seconds
        rows_worth = est.round_cost_ms() / est.row_cost_ms()
        assert rows_worth == pytest.approx((60 / est.batch_sessions + 8) / 4, rel=0.1)
        assert est.batch_sessions == pytest.approx(size, abs=1.0)
        if size == 2:
            small = rows_worth
    assert rows_worth < 0.5 * small  # sixteen sessions share the forward's fixed cost


def test_round_cost_over_the_served_sessions_does_not_follow_the_batches():
    """The broker divides the fixed part among the sessions the verifier serves, not among those
    recent batches happened to hold: when drafting sessions miss batches, the batches shrink, and a
    share over them would grow and make drafting look cheaper still (estimator.py)."""
    est = VerifyTimeEstimator()
    rng = random.Random(7)
    now = 0.0
    for _ in range(300):  # batches of about 4 though 16 sessions are served (the others out drafting)
        s = 4 + rng.randint(-1, 1)
        r = s + rng.randint(0, 3 * s)
        seconds = 0.048 + 0.001 * s + 0.0026 * r
        est.observe(s, r, seconds, sent=now)
        now += seconds
    assert est.round_cost_ms() == pytest.approx(1000 * (0.048 / est.batch_sessions + 0.001) * est.utilisation, rel=0.05)
    served = est.round_cost_ms(16)
    assert served == pytest.approx(1000 * (0.048 / 16 + 0.001) * est.utilisation, rel=0.05)
    assert served < 0.5 * est.round_cost_ms()
    assert est.round_cost_ms(0) == est.round_cost_ms(1)  # never divided by nothing


def test_prices_come_from_the_reported_compute_and_timing_from_the_round_trip():
    """On a machine the verifier shares, a round trip carries waits for a core, the event loop and
    the messages on top of the forward's compute: a fixed part that is time, not cost. The verdicts'
    prices follow the compute the verifier reports (BatchVerdicts.cost_ms); the predicted time
    (the SLO hold's) keeps the round trip. Without reports, both come from the round trip."""
    def compute(s, r):
        return 0.036 + 0.0027 * r

    def round_trip(s, r):
        return 0.070 + 0.0023 * r  # a larger fixed part: waits for a core, the event loop, the messages

    reported, silent = VerifyTimeEstimator(), VerifyTimeEstimator()
    rng = random.Random(3)
    now = 0.0
    for _ in range(200):
        s = rng.randint(1, 8)
        r = s + rng.randint(0, 4 * s)
        reported.observe(s, r, round_trip(s, r), sent=now, cost=compute(s, r))
        silent.observe(s, r, round_trip(s, r), sent=now)
        now += round_trip(s, r)
    assert reported.seconds(4, 8) == pytest.approx(round_trip(4, 8), rel=0.02)
    assert reported.cost_coefficients() == pytest.approx((0.036, 0.0, 0.0027), abs=2e-4)
    assert silent.cost_coefficients() == silent.coefficients()
    rows_worth = {name: est.round_cost_ms(4) / est.row_cost_ms() for name, est in (("reported", reported), ("silent", silent))}
    assert rows_worth["reported"] == pytest.approx(36 / 4 / 2.7, rel=0.05)  # a session's share: ~3.3 rows
    assert rows_worth["silent"] == pytest.approx(70 / 4 / 2.3, rel=0.05)  # ~7.6 rows
    # prefill batches stay out of both fits
    before = reported.cost_coefficients()
    reported.observe(1, 1, 5.0, sent=now, fit=False, cost=4.0)
    assert reported.cost_coefficients() == before
