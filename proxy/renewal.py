"""When to renew a leaf certificate. Pure: times in, times out.

* Plan the renewal at a random point between 60% and 90% of the leaf's lifetime, so that a
  fleet whose leaves were issued together does not renew together.
* Past 90% of the lifetime, renew now (the plan was missed: the process slept, the CA was down).
* After a root change, renew within a random 30 s window: soon, but not every sidecar at once.
  A leaf that lives less than 300 s (a short LeafCertTTL, which a server allows only when told
  to: tests, demos) gets a tenth of its lifetime instead, so that the move to the new root is
  not slower than the plan would renew it anyway.
* The lifetime runs from when the leaf was received, not from its ``notBefore``: CAs backdate
  leaves (one minute for the built-in CA, 30 s for Vault) to absorb clock skew, and for a leaf
  of a few minutes that backdating would put 60% of the lifetime in the past, and the follower
  would re-sign at once, again and again (``lifetime_start``).
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


def lifetime_start(not_before: float, not_after: float, received: float) -> float:
    """Where a leaf's lifetime starts for ``plan``: when it was ``received``, within its
    validity (so a backdated ``notBefore`` does not count, and a skewed clock cannot move the
    start out of the validity window)."""
    return max(not_before, min(received, not_after))


def after_root_change(
    now: float, rng: random.Random | None = None, lifetime: float | None = None
) -> float:
    """When to renew after the trusted roots changed: within the next 30 s, or within a tenth
    of the leaf's ``lifetime`` if that is shorter."""
    window = ROOT_CHANGE_WINDOW if lifetime is None else min(ROOT_CHANGE_WINDOW, lifetime / 10)
    return now + (rng or random.SystemRandom()).uniform(0.0, max(0.0, window))


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
