"""The store's sessions and locks, on a real SQLite file and a real PostgreSQL database.

Index accounting (a renew moves no index, a refused acquire writes nothing), the TTL sweep's
re-check, invalidation inside the catalog write that causes it, and the reaper role: exactly
one store of those sharing a database holds it, and it passes on when the holder closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.support import wait_until
from trellis.api.store import open_store
from trellis.api.store.base import CRITICAL, PASSING, Check, Node, Registration, Store
from trellis.api.store.errors import InvalidSession
from trellis.api.store.sessions import DELETE, Session


@contextlib.contextmanager
def opened(url: str) -> Iterator[Store]:
    s = open_store(url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def store(store_url) -> Iterator[Store]:
    with opened(store_url) as s:
        s.register(
            Registration(
                node=Node(name="n1", id="", address="10.0.0.1", datacenter="dc1"),
                checks=(Check(node="n1", check_id="serfHealth", name="serf", status=PASSING),),
            )
        )
        yield s


def session(sid: str, **kw) -> Session:
    kw.setdefault("node_checks", ("serfHealth",))
    return Session(id=sid, node="n1", **kw)


def test_index_accounting(store: Store) -> None:
    before = store.current_index()
    s = store.session_create(session("a", ttl="10s", ttl_seconds=10), now=100.0)
    assert store.current_index() == before + 1 == s.create_index == s.modify_index
    renewed = store.session_renew("a", now=200.0)
    assert renewed is not None and renewed.expires_at == 220.0
    assert store.current_index() == before + 1  # a renew is no change
    assert store.session_get("a").expires_at == 220.0  # type: ignore[union-attr]
    assert store.kv_acquire("k", b"v", session="a", now=200.0)
    assert store.current_index() == before + 2
    store.session_create(session("b"), now=200.0)
    idx = store.current_index()
    assert not store.kv_acquire("k", b"w", session="b", now=200.0)
    assert not store.kv_release("k", b"w", session="b")
    assert store.current_index() == idx  # refused: nothing written
    with pytest.raises(InvalidSession):
        store.kv_acquire("k", b"w", session="nobody", now=200.0)
    assert store.session_renew("nobody", now=200.0) is None


def test_ttl_sweep_rechecks_the_deadline(store: Store) -> None:
    store.session_create(session("a", ttl="10s", ttl_seconds=10, lock_delay=5), now=100.0)
    assert store.kv_acquire("k", b"v", session="a", now=100.0)
    assert store.expire_sessions(119.0) == 0  # alive until 100 + 2 x 10
    store.session_renew("a", now=115.0)
    assert store.expire_sessions(121.0) == 0  # the renew moved it to 135
    assert store.expire_sessions(136.0) == 1
    assert store.session_get("a") is None
    e = store.kv_get("k")
    assert e is not None and e.session is None and e.lock_index == 1
    # The lock delay runs from the invalidation (136) for 5 s.
    store.session_create(session("b"), now=137.0)
    assert not store.kv_acquire("k", b"w", session="b", now=140.0)
    assert store.kv_acquire("k", b"w", session="b", now=141.5)
    assert store.kv_get("k").lock_index == 2  # type: ignore[union-attr]


def test_a_critical_check_ends_its_sessions_in_the_same_write(store: Store) -> None:
    store.session_create(session("a", behavior=DELETE, lock_delay=0), now=100.0)
    assert store.kv_acquire("k", b"v", session="a", now=100.0)
    before = store.current_index()
    store.update_check("n1", "serfHealth", CRITICAL, "down", now=100.0)
    assert store.current_index() == before + 1
    assert store.session_get("a") is None
    assert store.kv_get("k") is None
    assert store.kv_index("k", exact=True) == before + 1  # the delete's tombstone


def test_session_create_refusals(store: Store) -> None:
    with pytest.raises(InvalidSession, match="Missing node"):
        store.session_create(Session(id="x", node="n9"), now=1.0)
    with pytest.raises(InvalidSession, match="Missing check"):
        store.session_create(session("x", node_checks=("nope",)), now=1.0)
    store.update_check("n1", "serfHealth", CRITICAL, "down", now=1.0)
    with pytest.raises(InvalidSession, match="critical"):
        store.session_create(session("x"), now=1.0)
    assert store.sessions() == []


def test_exactly_one_store_holds_the_reaper_role(store_url) -> None:
    with opened(store_url) as first, opened(store_url) as second:
        assert first.hold_reaper_role()
        assert not second.hold_reaper_role()
        assert first.hold_reaper_role()  # kept, round after round
        first.close()
        wait_until(second.hold_reaper_role, timeout=5)
        assert second.hold_reaper_role()
