"""Tests of proxy/renewal.py: renew at 60-90 % of a leaf's life, now past 90 %, and within 30 s
of a root change."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trellis.proxy import renewal

NB = 1_700_000_000.0
LIFE = 72 * 3600.0
NA = NB + LIFE
AT_60 = NB + 0.6 * LIFE
AT_90 = NB + 0.9 * LIFE


def test_constants() -> None:
    assert (renewal.PLAN_FROM, renewal.PLAN_TO, renewal.URGENT) == (0.60, 0.90, 0.90)
    assert renewal.ROOT_CHANGE_WINDOW == 30.0


@pytest.mark.parametrize(
    ("not_before", "life"),
    [(NB, LIFE), (0.0, 1.0), (NB, 3600.0), (NB, 365 * 86400.0), (NB, 60.0)],
    ids=["72h", "one-second", "1h", "one-year", "one-minute"],
)
def test_plan_lies_in_60_to_90_percent_for_many_seeds(not_before: float, life: float) -> None:
    not_after = not_before + life
    plans = [renewal.plan(not_before, not_after, random.Random(seed)) for seed in range(500)]
    lo, hi = not_before + 0.6 * life, not_before + 0.9 * life
    for p in plans:
        assert lo <= p <= hi
    fractions = [(p - not_before) / life for p in plans]
    # Spread, not constant: the fleet's renewals cover the window.
    assert len(set(plans)) > 450
    assert min(fractions) < 0.62 and max(fractions) > 0.88
    assert 0.72 < statistics.mean(fractions) < 0.78
    assert statistics.pstdev(fractions) > 0.07
    # Deciles of the window are all used.
    assert {int((f - 0.6) / 0.03) for f in fractions} >= set(range(10))


def test_plan_is_reproducible_per_seed_and_differs_between_seeds() -> None:
    a = renewal.plan(NB, NA, random.Random(7))
    assert a == renewal.plan(NB, NA, random.Random(7))
    assert a != renewal.plan(NB, NA, random.Random(8))


def test_plan_without_rng_uses_system_randomness() -> None:
    plans = {renewal.plan(NB, NA) for _ in range(50)}
    assert len(plans) > 40
    assert all(AT_60 <= p <= AT_90 for p in plans)


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [(NB, NB), (NB, NB - 10.0)],
    ids=["zero-life", "negative-life"],
)
def test_plan_of_a_degenerate_leaf_is_its_start(not_before: float, not_after: float) -> None:
    assert renewal.plan(not_before, not_after, random.Random(1)) == not_before


PLANNED = NB + 0.7 * LIFE


@pytest.mark.parametrize(
    ("now", "planned", "want"),
    [
        (NB, PLANNED, False),
        (AT_60, PLANNED, False),
        (PLANNED - 1.0, PLANNED, False),
        (PLANNED, PLANNED, True),
        (PLANNED + 1.0, PLANNED, True),
        (AT_90 - 1.0, AT_90 + 100.0, False),
        (AT_90, AT_90 + 100.0, True),
        (AT_90 + 1.0, NA + 1e9, True),
        (NA, NA + 1e9, True),
        (NA + 3600.0, NA + 1e9, True),
        (NB - 10.0, PLANNED, False),
    ],
    ids=[
        "at-issue",
        "at-60pct",
        "just-before-plan",
        "at-plan",
        "after-plan",
        "late-plan-before-90pct",
        "late-plan-at-90pct",
        "late-plan-past-90pct",
        "expired",
        "long-expired",
        "before-issue",
    ],
)
def test_due(now: float, planned: float, want: bool) -> None:
    assert renewal.due(now, NB, NA, planned) is want


@pytest.mark.parametrize("seed", range(20))
def test_due_agrees_with_plan(seed: int) -> None:
    planned = renewal.plan(NB, NA, random.Random(seed))
    assert not renewal.due(planned - 0.001, NB, NA, planned)
    assert renewal.due(planned, NB, NA, planned)
    assert renewal.next_renewal(planned - 10.0, NB, NA, planned) == pytest.approx(10.0)
    assert renewal.next_renewal(planned, NB, NA, planned) == 0.0


def test_after_root_change_lies_within_30_seconds() -> None:
    now = NB + 1234.5
    delays = [renewal.after_root_change(now, random.Random(seed)) - now for seed in range(500)]
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert len(set(delays)) > 450
    assert min(delays) < 2.0 and max(delays) > 28.0
    assert 12.0 < statistics.mean(delays) < 18.0
    unseeded = [renewal.after_root_change(now) - now for _ in range(50)]
    assert all(0.0 <= d <= 30.0 for d in unseeded) and len(set(unseeded)) > 40


ROOT_AT = NB + 0.3 * LIFE


@pytest.mark.parametrize(
    ("now", "planned", "root_changed_at", "delay", "want"),
    [
        # only the plan
        (NB, PLANNED, None, 0.0, PLANNED - NB),
        (PLANNED - 5.0, PLANNED, None, 0.0, 5.0),
        (PLANNED + 5.0, PLANNED, None, 0.0, 0.0),
        # the plan lies past 90 %: 90 % wins
        (NB, AT_90 + 500.0, None, 0.0, AT_90 - NB),
        (NB, NA + 10.0, None, 0.0, AT_90 - NB),
        (AT_90 + 1.0, NA + 10.0, None, 0.0, 0.0),
        # a root change before the plan wins, with its delay
        (ROOT_AT, PLANNED, ROOT_AT, 12.5, 12.5),
        (ROOT_AT + 20.0, PLANNED, ROOT_AT, 12.5, 0.0),
        (ROOT_AT, PLANNED, ROOT_AT, 0.0, 0.0),
        # a root change whose renewal would fall after the plan: the plan wins
        (PLANNED - 10.0, PLANNED, PLANNED - 10.0, 25.0, 10.0),
        # a root change that would fall after 90 %: 90 % wins
        (AT_90 - 5.0, NA + 10.0, AT_90 - 5.0, 30.0, 5.0),
        # degenerate leaf: due at once
        (NB, NB, None, 0.0, 0.0),
    ],
    ids=[
        "plan-from-issue",
        "plan-soon",
        "plan-passed",
        "plan-late-90pct-wins",
        "plan-after-expiry-90pct-wins",
        "past-90pct",
        "root-change-delay",
        "root-change-passed",
        "root-change-no-delay",
        "plan-before-root-renewal",
        "90pct-before-root-renewal",
        "zero-life",
    ],
)
def test_next_renewal_takes_the_earliest(
    now: float, planned: float, root_changed_at: float | None, delay: float, want: float
) -> None:
    got = renewal.next_renewal(
        now, NB, NA, planned, root_changed_at=root_changed_at, root_change_delay=delay
    )
    assert got == pytest.approx(want)
    assert got >= 0.0


@settings(max_examples=300, deadline=None)
@given(
    life=st.floats(1.0, 10 * 365 * 86400.0),
    seed=st.integers(0, 2**32),
    now_frac=st.floats(-0.5, 1.5),
    root_frac=st.none() | st.floats(0.0, 1.0),
    delay=st.floats(0.0, 30.0),
)
def test_property_renewal_is_never_later_than_any_trigger(
    life: float, seed: int, now_frac: float, root_frac: float | None, delay: float
) -> None:
    na = NB + life
    planned = renewal.plan(NB, na, random.Random(seed))
    assert NB + 0.6 * life - 1e-3 <= planned <= NB + 0.9 * life + 1e-3
    now = NB + now_frac * life
    root_at = None if root_frac is None else NB + root_frac * life
    wait = renewal.next_renewal(
        now, NB, na, planned, root_changed_at=root_at, root_change_delay=delay
    )
    assert wait >= 0.0
    triggers = [planned, NB + 0.9 * life] + ([] if root_at is None else [root_at + delay])
    earliest = min(triggers)
    assert wait == pytest.approx(max(0.0, earliest - now), abs=1e-3)
    # Waiting that long makes the leaf due, unless only a root change is what triggers it.
    if root_at is None or root_at + delay >= min(planned, NB + 0.9 * life):
        assert renewal.due(now + wait + 1e-3, NB, na, planned)
    # Never past the 90 % mark, so a renewal always precedes expiry.
    assert now + wait <= max(now, NB + 0.9 * life) + 1e-3


def test_a_short_leafs_root_change_window_is_a_tenth_of_its_life() -> None:
    now = NB + 10.0
    for lifetime, window in ((30.0, 3.0), (120.0, 12.0), (300.0, 30.0), (72 * 3600.0, 30.0)):
        delays = [
            renewal.after_root_change(now, random.Random(seed), lifetime) - now
            for seed in range(200)
        ]
        assert all(0.0 <= d <= window for d in delays), lifetime
        assert max(delays) > 0.9 * window, lifetime


def test_the_lifetime_starts_when_the_leaf_arrived_not_at_its_backdated_not_before() -> None:
    # A 30 s leaf backdated by a minute, received at its issue time: 60% of "90 s" from
    # notBefore lies 6 s in the past; from arrival, the plan is 18-27 s ahead.
    nb, issued, na = 1000.0, 1060.0, 1090.0
    start = renewal.lifetime_start(nb, na, issued)
    assert start == issued
    plans = [renewal.plan(start, na, random.Random(seed)) - issued for seed in range(200)]
    assert all(18.0 <= p <= 27.0 for p in plans)
    # A clock that is off cannot move the start out of the validity window.
    assert renewal.lifetime_start(nb, na, 0.0) == nb
    assert renewal.lifetime_start(nb, na, 5000.0) == na
