"""CSRMaxPerSecond and CSRMaxConcurrent hold for the whole cluster, not per server process.

The split itself is pure (``trellis.api.ca.limits``), table-tested here. Which processes share
the store comes from ``trellis.api.members``, tested on real SQLite and PostgreSQL. Then two
``CAManager`` s on one store, each with its own store connection and membership as two server
processes have, sign no more together than the configured figure. (The same with a real
two-worker ``trellis server`` is ``tests/test_integration_limits.py``.)
"""

from __future__ import annotations

import os
import threading

import pytest

from tests.api_fixtures import InThread
from tests.ca_support import GatedProvider, service_csr
from trellis.api.ca.limits import Share, process_share
from trellis.api.ca.manager import CAManager
from trellis.api.ca.secrets import Sealer
from trellis.api.errors import TooManyRequests
from trellis.api.members import Membership
from trellis.api.store import open_store

DC = "dc1"

# -- the split (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "concurrent", "rank", "count", "share"),
    [
        # One process: the whole figure, as before.
        (50, 0, 0, 1, Share(50.0, 50.0, 0)),
        # Two processes: half the rate each; the bucket holds half the burst.
        (50, 0, 0, 2, Share(25.0, 25.0, 0)),
        (50, 0, 1, 2, Share(25.0, 25.0, 0)),
        # A rate below one per process still signs: the bucket holds one token.
        (1, 0, 0, 2, Share(0.5, 1.0, 0)),
        (0.5, 0, 1, 1, Share(0.5, 1.0, 0)),
        # A rate so small that its share underflows stays a limit, not "no limit".
        (5e-324, 0, 0, 2, Share(5e-324, 1.0, 0)),
        # 0: no rate limit at all.
        (0, 0, 0, 3, Share(0.0, 1.0, 0)),
        # Concurrency: shares add up to exactly the figure, the first ranks take the remainder.
        (50, 5, 0, 2, Share(25.0, 25.0, 3)),
        (50, 5, 1, 2, Share(25.0, 25.0, 2)),
        (50, 4, 0, 4, Share(12.5, 12.5, 1)),
        (50, 4, 3, 4, Share(12.5, 12.5, 1)),
        # Fewer slots than processes: each still signs one at a time (else it never could).
        (50, 1, 0, 2, Share(25.0, 25.0, 1)),
        (50, 1, 1, 2, Share(25.0, 25.0, 1)),
        # A count of 0 (cannot happen: a process counts itself) or a rank out of range is
        # read as the nearest sane value, not a ZeroDivisionError.
        (10, 3, 0, 0, Share(10.0, 10.0, 3)),
        (10, 3, 7, 2, Share(5.0, 5.0, 1)),
    ],
)
def test_process_share(rate, concurrent, rank, count, share):
    assert process_share(rate, concurrent, rank, count) == share


def test_concurrency_shares_add_up_to_the_figure():
    for count in range(1, 9):
        for concurrent in range(count, 40):
            shares = [process_share(0, concurrent, r, count).concurrent for r in range(count)]
            assert sum(shares) == concurrent, (count, concurrent, shares)
            assert max(shares) - min(shares) <= 1


# -- membership, on both stores -----------------------------------------------------------------


class Clock:
    """A wall clock the test moves (injected, as Membership takes one)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_members_see_each_other_leave_and_expire(store_url):
    stores = [open_store(store_url) for _ in range(3)]
    clock = Clock()
    try:
        a, b, c = (
            Membership(s, member_id=m, clock=clock) for s, m in zip(stores, "abc", strict=True)
        )
        a.beat(force=True)
        assert a.share() == (0, 1)
        b.beat(force=True)
        c.beat(force=True)
        assert (b.share(), c.share()) == ((1, 2), (2, 3))  # b beat before c came
        a.beat()  # not due yet (BEAT seconds): no write, the old view
        assert a.share() == (0, 1)
        clock.now += 2.0
        a.beat()
        assert a.share() == (0, 3)
        # b stops gracefully: the others see it at their next beat.
        b.leave()
        clock.now += 2.0
        a.beat()
        c.beat()
        assert (a.share(), c.share()) == ((0, 2), (1, 2))
        # c dies without leaving: after TTL without a beat it no longer counts.
        clock.now += 9.0
        a.beat()
        assert a.share() == (0, 2)
        clock.now += 2.0
        a.beat()
        assert a.share() == (0, 1)
    finally:
        for s in stores:
            s.close()


def test_beats_move_no_index_and_wake_nobody(store_url):
    store = open_store(store_url)
    try:
        store.kv_put("k", b"v")
        index, pos = store.current_index(), store.feed.position()
        clock = Clock()
        m = Membership(store, clock=clock)
        for _ in range(5):
            m.beat(force=True)
            clock.now += 3
        m.leave()
        assert store.current_index() == index
        assert store.feed.position() == pos
    finally:
        store.close()


# -- two server processes' CA managers on one store --------------------------------------------


@pytest.fixture
def two_processes(store_url):
    """Two CA managers on one store, each with its own store object and membership, as two
    server processes have; ``gate`` holds every signing until set."""
    sealer = Sealer(os.urandom(32))
    entered, gate = threading.Semaphore(0), threading.Event()
    opened, managers = [], []
    try:
        for name in ("p1", "p2"):
            store = open_store(store_url)
            opened.append(store)
            members = Membership(store, member_id=name)
            holder: list[CAManager] = []
            manager = CAManager(
                store,
                datacenter=DC,
                sealer=sealer,
                members=members.share,
                provider_factory=lambda n, h=holder: GatedProvider(
                    h[0]._default_factory(n), entered.release, gate
                ),
            )
            holder.append(manager)
            manager.ensure_initialized()
            members.beat(force=True)
            managers.append((manager, members))
        for _, members in managers:
            members.beat(force=True)  # the first learns of the second
            assert members.share()[1] == 2
        yield [m for m, _ in managers], entered, gate
    finally:
        gate.set()
        for s in opened:
            s.close()


def _sign(manager: CAManager, service: str):
    return manager.sign_csr(service_csr(manager.trust_domain, service), lambda s: True)


def test_two_processes_sign_no_faster_than_the_cluster_rate(two_processes):
    (p1, p2), _, gate = two_processes
    gate.set()
    p1.set_config({"Provider": "consul", "Config": {"CSRMaxPerSecond": 2}})
    # Two per second for the cluster: one per second for each process, a bucket of one.
    # (Each process used to take the whole rate: two at once, four for the cluster.)
    for p in (p1, p2):
        assert _sign(p, "web").identity.service == "web"
        with pytest.raises(TooManyRequests) as e:
            _sign(p, "web")
        assert e.value.headers["Retry-After"] == "1"


def test_two_processes_sign_no_more_at_once_than_the_cluster_allows(two_processes):
    (p1, p2), entered, gate = two_processes
    p1.set_config({"Provider": "consul", "Config": {"CSRMaxConcurrent": 2}})
    # Two at once for the cluster: one for each process.
    slow = [InThread(lambda p=p: _sign(p, "web")).start() for p in (p1, p2)]
    for _ in slow:
        assert entered.acquire(timeout=10)
    for p in (p1, p2):
        with pytest.raises(TooManyRequests):
            _sign(p, "db")
    gate.set()
    assert [q.result().identity.service for q in slow] == ["web", "web"]
    # The slots are free again.
    for p in (p1, p2):
        assert _sign(p, "db").identity.service == "db"
