"""The CSR limits of one server process: its share of the cluster-wide figures. Pure.

``CSRMaxPerSecond`` and ``CSRMaxConcurrent`` are cluster-wide: P live server processes (every
worker of every replica, see ``trellis.api.members``) split them. The process of rank r
(0 <= r < P) takes:

* rate: ``CSRMaxPerSecond / P`` per second, in a token bucket that holds
  ``max(CSRMaxPerSecond / P, 1)`` tokens (so that a rate below one per process still signs). Over
  any interval T the cluster signs at most ``CSRMaxPerSecond * T`` plus a burst of
  ``max(CSRMaxPerSecond, P)``.
* concurrency: ``CSRMaxConcurrent // P``, one more for the first ``CSRMaxConcurrent % P``
  ranks, so the shares add up to exactly ``CSRMaxConcurrent``; but never less than 1, since a
  process with no share could never sign: with ``CSRMaxConcurrent < P`` the cluster signs up
  to P at once.

0 means no limit, as before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Share:
    rate: float  # signings per second for this process; 0: no rate limit
    burst: float  # the most tokens its bucket holds
    concurrent: int  # signings at once for this process; 0: no cap (then the rate applies)


def process_share(rate: float, concurrent: int, rank: int, count: int) -> Share:
    """This process's part of the cluster-wide ``rate`` and ``concurrent``, as the process of
    ``rank`` among ``count`` live processes."""
    count = max(1, count)
    rank = min(max(0, rank), count - 1)
    own_rate = rate / count if rate > 0 else 0.0
    if rate > 0 and own_rate == 0.0:
        own_rate = rate  # underflow (a rate near 5e-324): never turn a limit into none
    own_concurrent = 0
    if concurrent > 0:
        own_concurrent = max(1, concurrent // count + (1 if rank < concurrent % count else 0))
    return Share(rate=own_rate, burst=max(own_rate, 1.0), concurrent=own_concurrent)
