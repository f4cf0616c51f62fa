"""When to renew a leaf certificate. Pure: times in, times out.

* Plan the renewal at a random point between 60% and 90% of the leaf's lifetime, so that a
  fleet whose leaves were issued together does not renew together.
* Past 90% of the lifetime, renew now (the plan was missed: the process slept, the CA was down).
* After a root change, renew within a random 30 s window: soon, but not every sidecar at once.
"""

from __future__ import annotations

import random

PLAN_FROM, PLAN_TO, URGENT = 0.60, 0.90, 0.90
ROOT_CHANGE_WINDOW = 30.0


def plan(not_before: float, not_after: float, rng: random.Random | None = None) -> float:
    """The planned renewal time (epoch seconds) of a leaf valid from ``not_before`` to
    ``not_after``."""
    r = (rng or random.SystemRandom()).random()
    life = max(0.0, not_after - not_before)
    return not_before + life * (PLAN_FROM + (PLAN_TO - PLAN_FROM) * r)


def due(now: float, not_before: float, not_after: float, planned: float) -> bool:
    """Whether to renew at ``now``: the plan has come, or 90% of the lifetime has passed."""
    life = max(0.0, not_after - not_before)
    return now >= planned or now >= not_before + URGENT * life


def after_root_change(now: float, rng: random.Random | None = None) -> float:
    """When to renew after the trusted roots changed: within the next 30 s."""
    return now + (rng or random.SystemRandom()).uniform(0.0, ROOT_CHANGE_WINDOW)


def next_renewal(
    now: float,
    not_before: float,
    not_after: float,
    planned: float,
    root_changed_at: float | None = None,
    root_change_delay: float = 0.0,
) -> float:
    """Seconds from ``now`` until the leaf should be renewed (0 when it is due)."""
    at = min(planned, not_before + URGENT * max(0.0, not_after - not_before))
    if root_changed_at is not None:
        at = min(at, root_changed_at + root_change_delay)
    return max(0.0, at - now)
