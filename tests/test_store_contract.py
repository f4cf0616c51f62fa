"""The store contract: every test runs against a real SQLite file and a real PostgreSQL database.

What a store promises (DESIGN.md, "Storage and change index"): one global index that every
write that changes something bumps by exactly one; CreateIndex/ModifyIndex on every object;
per-topic indexes for watched reads; Consul's K/V and catalog semantics; durability across a
reopen; and a follower that lets several processes on one database see each other's writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trellis.api.errors import ConfigError, StoreUnavailable
from trellis.api.feed import Watch
from trellis.api.store import open_store
from trellis.api.store.base import (
    CRITICAL,
    PASSING,
    WARNING,
    Check,
    KVEntry,
    Node,
    Registration,
    Service,
    Store,
)
from trellis.api.store.errors import UnstorableValue
from trellis.api.store.sql import migrations

U64_MAX = 2**64 - 1
DEADLINE = 15.0


# -- helpers -------------------------------------------------------------------------------


def node(name: str = "n1", address: str = "10.0.0.1", **kw) -> Node:
    return Node(name=name, id=kw.pop("id", ""), address=address, datacenter="dc1", **kw)


def svc(sid: str, name: str, node_name: str = "n1", **kw) -> Service:
    return Service(node=node_name, id=sid, name=name, **kw)


def chk(cid: str, node_name: str = "n1", service: Service | None = None, **kw) -> Check:
    if service is not None:
        kw.setdefault("service_id", service.id)
        kw.setdefault("service_name", service.name)
    kw.setdefault("status", PASSING)
    return Check(node=node_name, check_id=cid, name=kw.pop("name", cid), **kw)


def proxy_for(dest: str, sid: str | None = None, node_name: str = "n1") -> Service:
    return Service(
        node=node_name,
        id=sid or f"{dest}-sidecar-proxy",
        name=f"{dest}-sidecar-proxy",
        port=21000,
        kind="connect-proxy",
        proxy={"DestinationServiceName": dest, "LocalServicePort": 8080},
    )


def bumps(store: Store, by: int = 1):
    """Context manager: the block must move the global index by exactly ``by``."""

    @contextlib.contextmanager
    def cm() -> Iterator[None]:
        before = store.current_index()
        yield
        assert store.current_index() == before + by

    return cm()


@contextlib.contextmanager
def opened(url: str, **kw) -> Iterator[Store]:
    s = open_store(url, **kw)
    try:
        yield s
    finally:
        s.close()


def wait_published(store: Store, watch: Watch, pos: int, index: int) -> None:
    """Wait (with a deadline) until ``store``'s feed has published a matching change >= index."""
    deadline = time.monotonic() + DEADLINE
    while store.feed.published_index < index:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"feed never published index {index} (got {store.feed.published_index})"
            )
        if store.feed.wait(watch, pos, left):
            pos = store.feed.position()
    assert store.feed.published_index >= index


def sql_rows(store: Store, sql: str, params: tuple = ()) -> list[tuple]:
    with store.read() as q:  # type: ignore[attr-defined]
        return [tuple(r) for r in q(sql, params)]


# -- the global index ----------------------------------------------------------------------


def test_new_store_is_empty_at_index_zero(store: Store) -> None:
    assert store.current_index() == 0
    assert store.topic_index("catalog") == 0
    assert store.topic_index("kv") == 0
    assert store.topic_index() == 0
    assert store.kv_list("") == []
    assert store.kv_get("a") is None
    assert store.nodes() == []
    assert store.services() == []
    assert store.checks() == []
    # Consul clients treat an index below 1 as broken: K/V never reports 0.
    assert store.kv_index("", exact=False) == 1
    assert store.kv_index("missing", exact=True) == 1
    assert uuid.UUID(store.cluster_id()).version == 4
    store.ping()


def test_every_changing_write_bumps_the_index_by_one(store: Store) -> None:
    web = svc("web1", "web", port=80)
    seen = [store.current_index()]

    def step() -> None:
        now = store.current_index()
        assert now == seen[-1] + 1
        seen.append(now)

    assert store.kv_put("a", b"1") is True
    step()
    assert store.kv_put("a", b"2") is True
    step()
    assert store.kv_put("b/1", b"x") is True
    step()
    assert store.kv_put("b/2", b"x") is True
    step()
    assert store.kv_delete("b/", recurse=True) is True  # two keys, one write
    step()
    assert store.kv_delete("a") is True
    step()
    assert store.register(Registration(node(), services=(web,), checks=(chk("c1", service=web),)))
    step()
    assert store.update_check("n1", "c1", CRITICAL, "down", now=1.0) is not None
    step()
    assert store.deregister_check("n1", "c1") is True
    step()
    assert store.deregister_service("n1", "web1") is True
    step()
    assert store.deregister_node("n1") is True
    step()
    assert seen == list(range(0, 12))


def test_writes_that_change_nothing_do_not_bump_the_index(store: Store) -> None:
    web = svc("web1", "web")
    store.kv_put("k", b"v")
    store.register(Registration(node(), services=(web,), checks=(chk("c1", service=web),)))
    entry = store.kv_get("k")
    assert entry is not None
    before = store.current_index()
    assert before == 2

    assert store.kv_put("k", b"new", cas=0) is False  # exists: create-only fails
    assert store.kv_put("k", b"new", cas=entry.modify_index + 1) is False
    assert store.kv_put("fresh", b"new", cas=5) is False  # absent key, cas != 0
    assert store.kv_delete("missing") is True  # Consul: deleting nothing is not an error
    assert store.kv_delete("missing/", recurse=True) is True
    assert store.kv_delete("k", cas=entry.modify_index + 1) is False
    assert store.kv_delete("k", cas=0) is False  # cas=0 deletes nothing
    assert store.kv_delete("missing", cas=1) is False
    assert store.update_check("n1", "c1", PASSING, "", now=5.0) is not None  # same status+output
    assert store.update_check("n1", "c1", PASSING, None, now=6.0) is not None
    assert store.update_check("n1", "nope", CRITICAL, "x", now=6.0) is None
    assert store.deregister_check("n1", "nope") is False
    assert store.deregister_service("n1", "nope") is False
    assert store.deregister_node("nope") is False
    assert store.expire_ttl_checks(1e12) == 0  # no TTL checks at all

    assert store.current_index() == before
    assert store.kv_get("k") == entry
    assert store.topic_index("catalog") == 2
    assert store.topic_index("kv") == 1


def test_reregistering_an_unchanged_existing_node_does_not_bump(store: Store) -> None:
    """An agent re-sync that adds nothing must not move the index (or leave a gap in it)."""
    store.register(Registration(node()))
    assert store.current_index() == 1
    store.register(Registration(node(address="10.9.9.9"), keep_existing_node=True))
    store.register(Registration(node(id=store.nodes()[0].id)))
    assert store.current_index() == 1
    assert store.nodes()[0].address == "10.0.0.1"
    assert store.nodes()[0].modify_index == 1


def test_indexes_are_monotonic_and_unique_across_interleaved_writes(store: Store) -> None:
    indexes = []
    for i in range(10):
        store.kv_put(f"k{i}", b"v")
        indexes.append(store.kv_get(f"k{i}").modify_index)  # type: ignore[union-attr]
        indexes.append(store.register(Registration(node(f"n{i}"))))
    assert indexes == list(range(1, 21))
    assert store.current_index() == 20


def test_kv_create_and_modify_index(store: Store) -> None:
    store.kv_put("a", b"1")
    store.kv_put("other", b"x")
    store.kv_put("a", b"2", flags=7)
    e = store.kv_get("a")
    assert e == KVEntry(key="a", value=b"2", flags=7, create_index=1, modify_index=3)
    assert e.lock_index == 0 and e.session is None
    store.kv_delete("a")
    store.kv_put("a", b"3")
    # a re-created key is a new key
    assert store.kv_get("a") == KVEntry("a", b"3", 0, 5, 5)


def test_catalog_create_and_modify_index(store: Store) -> None:
    web = svc("web1", "web", port=80)
    store.register(Registration(node(), services=(web,), checks=(chk("c1", service=web),)))
    n1 = store.node("n1")
    assert n1 is not None and (n1.create_index, n1.modify_index) == (1, 1)

    store.kv_put("x", b"")  # index 2, unrelated
    # update the service and the check, node unchanged
    web2 = svc("web1", "web", port=81)
    store.register(
        Registration(
            node(id=n1.id), services=(web2,), checks=(chk("c1", service=web2, output="hi"),)
        )
    )
    assert store.current_index() == 3
    [s] = store.services()
    assert (s.port, s.create_index, s.modify_index) == (81, 1, 3)
    [c] = store.checks()
    assert (c.output, c.create_index, c.modify_index) == ("hi", 1, 3)
    assert store.node("n1") == n1  # unchanged node keeps its indexes

    # the node's address changes: its modify index moves, create stays
    store.register(Registration(node(address="10.0.0.2", id=n1.id)))
    n1b = store.node("n1")
    assert n1b is not None
    assert (n1b.address, n1b.create_index, n1b.modify_index) == ("10.0.0.2", 1, 4)

    assert store.update_check("n1", "c1", WARNING, "meh", now=1.0) is not None
    [c] = store.checks()
    assert (c.status, c.output, c.create_index, c.modify_index) == (WARNING, "meh", 1, 5)


# -- K/V -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "flags"),
    [
        (b"hello", 0),
        (b"", 0),
        (b"\x00", 1),
        (b"a\x00b\x00\xff\xfe" * 100, 42),
        (bytes(range(256)), U64_MAX),
        (b"x" * 512 * 1024, 2**63),
        (b"y", 2**63 - 1),
    ],
)
def test_kv_value_and_flags_round_trip(store: Store, value: bytes, flags: int) -> None:
    assert store.kv_put("k", value, flags=flags) is True
    e = store.kv_get("k")
    assert e is not None
    assert e.value == value
    assert type(e.value) is bytes
    assert e.flags == flags
    [listed] = store.kv_list("k")
    assert listed == e


def test_kv_get_is_exact(store: Store) -> None:
    store.kv_put("a/b", b"1")
    assert store.kv_get("a") is None
    assert store.kv_get("a/") is None
    assert store.kv_get("a/b/") is None
    assert store.kv_get("A/b") is None
    assert store.kv_get("a/b").value == b"1"  # type: ignore[union-attr]


SPECIAL_KEYS = [
    "",
    "a",
    "a/",
    "a/b",
    "a/b/c",
    "ab",
    "a%",
    "a%b",
    "a_",
    "a_b",
    "aXb",
    "a\\b",
    "a'b",
    "a b",
    "café",
    "café/menu",
    "cafe",
    "日本/東京",
    "日本語",
    "z\x7f",
    "z\x7f\x7f",
    "z\u00ff",
    "z\ud7ff",
    "z\ud7ffx",
    "z\ue000",
    "z\uffff",
    "z\uffff/x",
    "z\U0001f600",
    "z\U0010ffff",
    "z\U0010ffff\U0010ffff",
    "z\U0010ffffa",
]


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "a",
        "a/",
        "a%",
        "a_",
        "%",
        "_",
        "caf",
        "café",
        "日本",
        "z",
        "z\x7f",
        "z\ud7ff",
        "z\uffff",
        "z\U0010ffff",
        "\U0010ffff",
        "nothing",
    ],
)
def test_kv_list_prefix_matches_startswith(store: Store, prefix: str) -> None:
    """Prefixes are ranges, not LIKE patterns: '%' and '_' are plain characters, and a prefix
    ending in a high code point neither misses nor over-reaches."""
    for i, k in enumerate(SPECIAL_KEYS):
        store.kv_put(k, k.encode(), flags=i)
    expected = sorted(k for k in SPECIAL_KEYS if k.startswith(prefix))
    got = store.kv_list(prefix)
    assert [e.key for e in got] == expected
    assert all(e.value == e.key.encode() for e in got)
    # the prefix index is the newest write under the prefix
    if expected:
        newest = max(SPECIAL_KEYS.index(k) for k in expected) + 1
        assert store.kv_index(prefix, exact=False) == newest
    # a recursive delete removes exactly the listed keys
    assert store.kv_delete(prefix, recurse=True) is True
    assert sorted(e.key for e in store.kv_list("")) == sorted(
        k for k in SPECIAL_KEYS if not k.startswith(prefix)
    )


#: '%' and '_' (LIKE wildcards), control and high code points, and U+D7FF/U+E000 around the
#: surrogate gap, where the prefix range's upper bound must jump.
KEY_CHARS = st.sampled_from("ab/%_\\\x01\x7fé\ud7ff\ue000\uffff😀\U0010ffff")
KEYS = st.text(alphabet=KEY_CHARS, max_size=5)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(keys=st.lists(KEYS, max_size=12, unique=True), prefixes=st.lists(KEYS, max_size=4))
def test_kv_prefix_listing_equals_reference(store: Store, keys: list[str], prefixes: list[str]):
    store.kv_delete("", recurse=True)
    ref: dict[str, int] = {}
    for k in keys:
        store.kv_put(k, k.encode())
        ref[k] = store.current_index()
    for p in [*prefixes, *(k[:-1] for k in keys if k)]:
        want = sorted(k for k in ref if k.startswith(p))
        assert [e.key for e in store.kv_list(p)] == want, p
        got_index = store.kv_index(p, exact=False)
        if want:
            assert got_index == max(ref[k] for k in want)
        else:
            assert got_index >= 1


def test_kv_cas(store: Store) -> None:
    # cas=0: create only if absent
    assert store.kv_put("k", b"1", cas=0) is True
    assert store.kv_put("k", b"2", cas=0) is False
    assert store.kv_get("k").value == b"1"  # type: ignore[union-attr]
    m = store.kv_get("k").modify_index  # type: ignore[union-attr]
    # cas=N: only if ModifyIndex == N
    assert store.kv_put("k", b"3", cas=m - 1) is False
    assert store.kv_put("k", b"3", cas=m + 1) is False
    assert store.kv_put("k", b"3", flags=9, cas=m) is True
    e = store.kv_get("k")
    assert e == KVEntry("k", b"3", 9, 1, 2)
    # the old index is stale now
    assert store.kv_put("k", b"4", cas=m) is False
    # a key that does not exist has ModifyIndex 0 for cas purposes
    assert store.kv_put("new", b"x", cas=1) is False
    assert store.kv_get("new") is None
    # after a delete, cas=0 creates again
    assert store.kv_delete("k") is True
    assert store.kv_put("k", b"5", cas=0) is True
    assert store.kv_get("k").create_index == 4  # type: ignore[union-attr]


def test_kv_delete(store: Store) -> None:
    for k in ["app", "app/a", "app/b/c", "apple", "b"]:
        store.kv_put(k, b"")
    assert store.kv_delete("app/a") is True
    assert [e.key for e in store.kv_list("")] == ["app", "app/b/c", "apple", "b"]
    # non-recursive delete is exact
    assert store.kv_delete("app/b") is True
    assert [e.key for e in store.kv_list("")] == ["app", "app/b/c", "apple", "b"]
    # recursive delete is a plain prefix (Consul): "app/" keeps "app" and "apple"
    assert store.kv_delete("app/", recurse=True) is True
    assert [e.key for e in store.kv_list("")] == ["app", "apple", "b"]
    assert store.kv_delete("app", recurse=True) is True
    assert [e.key for e in store.kv_list("")] == ["b"]
    assert store.kv_delete("", recurse=True) is True
    assert store.kv_list("") == []
    assert store.current_index() == 5 + 4


def test_kv_delete_with_cas(store: Store) -> None:
    store.kv_put("k", b"v")
    store.kv_put("k", b"w")
    assert store.kv_delete("k", cas=1) is False
    assert store.kv_delete("k", cas=0) is False
    assert store.kv_get("k") is not None
    assert store.kv_delete("k", cas=2) is True
    assert store.kv_get("k") is None
    assert store.current_index() == 3
    assert store.kv_delete("k", cas=2) is False


def test_kv_index(store: Store) -> None:
    store.register(Registration(node()))  # 1: not K/V
    assert store.kv_index("", exact=False) >= 1
    assert store.kv_index("a", exact=True) >= 1
    store.kv_put("a/1", b"")  # 2
    store.kv_put("a/2", b"")  # 3
    store.kv_put("b", b"")  # 4
    assert store.kv_index("a/1", exact=True) == 2
    assert store.kv_index("a/2", exact=True) == 3
    assert store.kv_index("a/", exact=False) == 3
    assert store.kv_index("", exact=False) == 4
    assert store.kv_index("b", exact=True) == 4
    # a prefix read of an existing key is not an exact read of a missing one
    assert store.kv_index("a/1", exact=False) == 2

    store.kv_put("a/1", b"x")  # 5
    assert store.kv_index("a/1", exact=True) == 5
    assert store.kv_index("a/", exact=False) == 5
    assert store.kv_index("a/2", exact=True) == 3

    # Deleting the newest key under a prefix must not move the prefix index backwards.
    store.kv_delete("a/1")  # 6
    assert store.kv_index("a/", exact=False) == 6
    assert store.kv_index("a/1", exact=True) == 6
    assert store.kv_index("", exact=False) == 6
    store.kv_delete("a/", recurse=True)  # 7
    assert store.kv_list("a/") == []
    assert store.kv_index("a/", exact=False) == 7
    assert store.kv_index("a/2", exact=True) == 7
    assert store.kv_index("b", exact=True) == 4
    # re-creating the key: its index is the new write
    store.kv_put("a/1", b"again")  # 8
    assert store.kv_index("a/1", exact=True) == 8
    assert store.kv_index("a/", exact=False) == 8
    # a key that never existed still reports a usable index
    assert store.kv_index("never/existed", exact=True) >= 1
    assert store.kv_index("never/", exact=False) >= 1


# -- topic indexes -------------------------------------------------------------------------


def test_topic_indexes_move_on_the_right_writes(store: Store) -> None:
    def idx(*topics: str) -> int:
        return store.topic_index(*topics)

    web = svc("web1", "web", port=80)
    db = svc("db1", "db", port=5432)
    i1 = store.register(Registration(node(), services=(web,)))
    assert i1 == 1
    assert idx("catalog") == idx("catalog/svc/web") == idx("catalog/node/n1") == 1
    assert idx("catalog/svc/db") == 0
    assert idx("kv") == 0

    store.register(Registration(node(), services=(db,), keep_existing_node=True))  # 2
    assert idx("catalog/svc/db") == 2
    assert idx("catalog/svc/web") == 1  # a write to db does not move web
    assert idx("catalog") == 2
    assert idx("catalog/node/n1") == 2  # the node's service list changed

    store.kv_put("web", b"")  # 3: K/V only
    assert idx("kv") == 3
    assert idx("catalog") == 2
    assert idx("catalog/svc/web") == 1

    # a second node with a web instance
    store.register(Registration(node("n2", "10.0.0.9"), services=(svc("web2", "web", "n2"),)))
    assert idx("catalog/svc/web") == 4
    assert idx("catalog/node/n2") == 4
    assert idx("catalog/node/n1") == 2
    assert idx("catalog/svc/db") == 2

    # a node's address change moves every service on that node (their address changed)
    n1 = store.node("n1")
    store.register(Registration(node(address="10.1.1.1", id=n1.id)))  # type: ignore[union-attr] # 5
    assert idx("catalog/node/n1") == idx("catalog/svc/web") == idx("catalog/svc/db") == 5
    assert idx("catalog/node/n2") == 4

    # a sidecar registration also moves the service it proxies for
    store.register(
        Registration(node("n3", "10.0.0.3"), services=(proxy_for("web", node_name="n3"),))
    )
    assert idx("catalog/svc/web-sidecar-proxy") == 6
    assert idx("catalog/svc/web") == 6
    assert idx("catalog/svc/db") == 5
    assert idx("catalog/node/n3") == 6

    # a service check moves only its service; a node check moves every service on the node
    store.register(Registration(node(), checks=(chk("dbc", service=db),), keep_existing_node=True))
    assert idx("catalog/svc/db") == 7
    assert idx("catalog/svc/web") == 6
    store.register(Registration(node(), checks=(chk("serf"),), keep_existing_node=True))  # 8
    assert idx("catalog/svc/db") == idx("catalog/svc/web") == idx("catalog/node/n1") == 8
    assert idx("catalog/node/n2") == 4
    assert store.update_check("n1", "dbc", CRITICAL, "down", now=0.0) is not None  # 9
    assert idx("catalog/svc/db") == 9
    assert idx("catalog/svc/web") == 8
    assert store.update_check("n1", "serf", CRITICAL, "down", now=0.0) is not None  # 10
    assert idx("catalog/svc/db") == idx("catalog/svc/web") == 10
    assert idx("catalog/svc/web-sidecar-proxy") == 6  # on another node

    # deregistrations
    store.deregister_service("n1", "db1")  # 11
    assert idx("catalog/svc/db") == 11
    assert idx("catalog/svc/web") == 10
    store.deregister_service("n3", "web-sidecar-proxy")  # 12
    assert idx("catalog/svc/web") == 12
    assert idx("catalog/svc/web-sidecar-proxy") == 12
    assert idx("catalog/node/n1") == 11  # the node's service list changed
    store.deregister_node("n2")  # 13
    assert idx("catalog/svc/web") == idx("catalog/node/n2") == 13
    assert idx("catalog/node/n1") == 11
    # several topics: the newest of them
    assert idx("catalog/svc/db", "catalog/node/n1", "nope") == 11
    assert idx("catalog") == 13
    assert idx("kv") == 3


def test_moving_a_service_id_to_another_name_moves_both_names(store: Store) -> None:
    store.register(Registration(node(), services=(svc("s1", "old"),)))
    store.register(Registration(node(), services=(svc("s1", "new"),), keep_existing_node=True))
    assert store.topic_index("catalog/svc/old") == 2
    assert store.topic_index("catalog/svc/new") == 2
    assert [s.name for s in store.services()] == ["new"]


def test_changes_are_published_to_the_own_feed(store: Store) -> None:
    pos = store.feed.position()
    store.kv_put("app/x", b"")
    store.register(Registration(node(), services=(proxy_for("web"),)))
    assert store.feed.wait(Watch("kv", exact=("app/x",)), pos, 0) is True
    assert store.feed.wait(Watch("catalog", exact=("svc/web",)), pos, 0) is True
    assert store.feed.wait(Watch("catalog", exact=("node/n1",)), pos, 0) is True
    assert store.feed.wait(Watch("catalog", exact=("svc/db",)), pos, 0) is False
    assert store.feed.published_index == 2
    # writes that change nothing publish nothing
    pos = store.feed.position()
    store.kv_put("app/x", b"", cas=0)
    store.kv_delete("nope")
    assert store.feed.position() == pos


# -- catalog -------------------------------------------------------------------------------


def test_register_and_read_back(store: Store) -> None:
    nid = str(uuid.uuid4())
    web = svc(
        "web1",
        "web",
        tags=("v1", "primary"),
        address="10.0.0.5",
        port=8080,
        meta={"version": "1"},
        tagged_addresses={"lan": {"address": "10.0.0.5", "port": 8080}},
        weights={"Passing": 3, "Warning": 1},
        connect={"Native": False},
        enable_tag_override=True,
    )
    sidecar = proxy_for("web", sid="web1-sidecar-proxy")
    checks = (
        chk("serfHealth", name="Serf Health Status"),
        chk("web-http", service=web, status=CRITICAL, type="http", notes="n", output="o",
            definition={"HTTP": "http://127.0.0.1:8080/health", "Interval": "10s"}),
        chk("web-ttl", service=web, status=WARNING, type="ttl", ttl=30.0, expires_at=100.0,
            definition={"TTL": "30s"}),
    )  # fmt: skip
    n = node(id=nid, tagged_addresses={"lan": "10.0.0.1"}, meta={"rack": "r1"})
    idx = store.register(Registration(n, services=(web, sidecar), checks=checks))
    assert idx == 1 == store.current_index()

    assert store.nodes() == [
        Node(
            name="n1",
            id=nid,
            address="10.0.0.1",
            datacenter="dc1",
            tagged_addresses={"lan": "10.0.0.1"},
            meta={"rack": "r1"},
            create_index=1,
            modify_index=1,
        )
    ]
    assert store.node("n1") == store.nodes()[0]
    assert store.node("n2") is None

    got = {s.id: s for s in store.services()}
    assert got["web1"] == Service(**{**web.__dict__, "create_index": 1, "modify_index": 1})
    assert got["web1"].tags == ("v1", "primary")
    assert got["web1-sidecar-proxy"].destination == "web"
    assert got["web1-sidecar-proxy"].proxy == {
        "DestinationServiceName": "web",
        "LocalServicePort": 8080,
    }
    assert got["web1"].destination is None

    assert [(c.check_id, c.status, c.service_id, c.service_name) for c in store.checks()] == [
        ("serfHealth", PASSING, "", ""),
        ("web-http", CRITICAL, "web1", "web"),
        ("web-ttl", WARNING, "web1", "web"),
    ]
    http = store.checks(check_id="web-http")[0]
    assert http == Check(**{**checks[1].__dict__, "create_index": 1, "modify_index": 1})
    ttl = store.checks(check_id="web-ttl")[0]
    assert (ttl.ttl, ttl.expires_at, ttl.definition) == (30.0, 100.0, {"TTL": "30s"})


def test_node_id_is_generated_when_missing_and_kept(store: Store) -> None:
    store.register(Registration(node()))
    nid = store.node("n1").id  # type: ignore[union-attr]
    assert uuid.UUID(nid)
    # re-registering without an ID keeps the one we have
    store.register(Registration(node(address="10.0.0.2")))
    assert store.node("n1").id == nid  # type: ignore[union-attr]
    assert store.node("n1").address == "10.0.0.2"  # type: ignore[union-attr]


def test_reregister_updates_in_place(store: Store) -> None:
    web = svc("web1", "web", port=80, tags=("a",))
    store.register(Registration(node(), services=(web,), checks=(chk("c1", service=web),)))
    web_b = svc("web1", "web", port=81, tags=("b",), meta={"m": "1"})
    store.register(
        Registration(node(), services=(web_b,), checks=(chk("c1", service=web_b, status=WARNING),))
    )
    [s] = store.services()
    assert (s.port, s.tags, s.meta, s.create_index, s.modify_index) == (
        81,
        ("b",),
        {"m": "1"},
        1,
        2,
    )
    [c] = store.checks()
    assert (c.status, c.create_index, c.modify_index) == (WARNING, 1, 2)
    assert len(store.nodes()) == 1


def test_reregistering_the_same_service_and_checks_changes_nothing(store: Store) -> None:
    """Consul skips identical catalog updates: an agent re-syncing its services, or a client
    retrying a registration, must not move ModifyIndex or wake the service's watchers."""
    web = svc(
        "web1",
        "web",
        port=80,
        tags=("a", "b"),
        meta={"m": "1"},
        proxy=None,
        connect={"Native": False},
        weights={"Passing": 3, "Warning": 1},
    )
    checks = (
        chk("c1", service=web, type="http", definition={"HTTP": "http://x/health"}),
        chk("c2", type="tcp", definition={"TCP": "x:1"}),
    )
    store.register(Registration(node(), services=(web,), checks=checks))
    before = store.current_index()
    pos = store.feed.position()
    again = store.register(Registration(node(), services=(web,), checks=checks))
    assert again == before == store.current_index()
    assert store.feed.position() == pos  # nothing published: no watcher wakes
    [s] = store.services()
    assert (s.create_index, s.modify_index) == (before, before)
    assert {(c.check_id, c.modify_index) for c in store.checks()} == {
        ("c1", before),
        ("c2", before),
    }
    # Any difference is a change.
    with bumps(store):
        store.register(Registration(node(), services=(svc("web1", "web", port=80),)))
    with bumps(store):
        store.register(Registration(node(), checks=(chk("c2", type="tcp", status=WARNING),)))


def test_keep_existing_node(store: Store) -> None:
    store.register(Registration(node(meta={"a": "1"})))
    store.register(
        Registration(
            node(address="9.9.9.9", meta={"b": "2"}),
            services=(svc("web1", "web"),),
            keep_existing_node=True,
        )
    )
    n = store.node("n1")
    assert n is not None
    assert (n.address, n.meta, n.modify_index) == ("10.0.0.1", {"a": "1"}, 1)
    assert [s.id for s in store.services(node="n1")] == ["web1"]
    # a node that does not exist yet is created even with keep_existing_node
    store.register(Registration(node("n2", "10.0.0.2"), keep_existing_node=True))
    assert store.node("n2").address == "10.0.0.2"  # type: ignore[union-attr]


def test_replace_checks_for(store: Store) -> None:
    web = svc("web1", "web")
    db = svc("db1", "db")
    store.register(
        Registration(
            node(),
            services=(web, db),
            checks=(
                chk("c1", service=web),
                chk("c2", service=web),
                chk("c3", service=db),
                chk("nodec"),
            ),
        )
    )
    # without replace_checks_for, a registration that omits a check keeps it
    store.register(Registration(node(), services=(web,), checks=(chk("c1", service=web),)))
    assert [c.check_id for c in store.checks()] == ["c1", "c2", "c3", "nodec"]
    # with it, the omitted checks of the named service go; other services' and node checks stay
    before = store.topic_index("catalog/svc/db")
    store.register(
        Registration(
            node(),
            services=(web,),
            checks=(chk("c1", service=web),),
            replace_checks_for=("web1",),
        )
    )
    assert [c.check_id for c in store.checks()] == ["c1", "c3", "nodec"]
    assert store.topic_index("catalog/svc/web") == store.current_index()
    assert store.topic_index("catalog/svc/db") == before
    # replacing with no checks drops them all
    store.register(Registration(node(), services=(web,), replace_checks_for=("web1",)))
    assert [c.check_id for c in store.checks()] == ["c3", "nodec"]


def test_deregister_service_drops_its_checks(store: Store) -> None:
    web = svc("web1", "web")
    web2 = svc("web2", "web")
    store.register(
        Registration(
            node(),
            services=(web, web2),
            checks=(chk("c1", service=web), chk("c2", service=web2), chk("nodec")),
        )
    )
    assert store.deregister_service("n1", "web1") is True
    assert [s.id for s in store.services()] == ["web2"]
    assert [c.check_id for c in store.checks()] == ["c2", "nodec"]
    assert store.deregister_service("n1", "web1") is False
    assert store.deregister_service("n2", "web2") is False  # wrong node
    assert [s.id for s in store.services()] == ["web2"]


def test_deregister_check(store: Store) -> None:
    web = svc("web1", "web")
    store.register(
        Registration(node(), services=(web,), checks=(chk("c1", service=web), chk("nodec")))
    )
    assert store.deregister_check("n1", "c1") is True
    assert store.topic_index("catalog/svc/web") == 2
    assert store.deregister_check("n1", "c1") is False
    assert store.deregister_check("n1", "nodec") is True
    # a node check's removal changes the health of every service on the node
    assert store.topic_index("catalog/svc/web") == 3
    assert store.topic_index("catalog/node/n1") == 3
    assert store.checks() == []
    assert [s.id for s in store.services()] == ["web1"]


def test_deregister_node_cascades(store: Store) -> None:
    web = svc("web1", "web")
    store.register(
        Registration(node(), services=(web, proxy_for("web")), checks=(chk("c", service=web),))
    )
    other = svc("web9", "web", "n2")
    store.register(Registration(node("n2"), services=(other,), checks=(chk("c", "n2", other),)))
    assert store.deregister_node("n1") is True
    assert [n.name for n in store.nodes()] == ["n2"]
    assert [(s.node, s.id) for s in store.services()] == [("n2", "web9")]
    assert [(c.node, c.check_id) for c in store.checks()] == [("n2", "c")]
    assert store.services(node="n1") == []
    assert store.checks(node="n1") == []
    assert store.deregister_node("n1") is False
    # the node's name is free again, and a fresh registration starts fresh
    store.register(Registration(node()))
    assert store.services(node="n1") == []


def test_service_queries(store: Store) -> None:
    store.register(
        Registration(
            node(), services=(svc("web1", "web"), svc("db1", "db"), proxy_for("web", "p1"))
        )
    )
    store.register(
        Registration(
            node("n2"),
            services=(svc("web2", "web", "n2"), proxy_for("web", "p2", "n2"), proxy_for("db", "q")),
        )
    )

    def ids(**kw) -> list[tuple[str, str]]:
        return [(s.node, s.id) for s in store.services(**kw)]

    every = [("n1", "db1"), ("n1", "p1"), ("n1", "web1"), ("n2", "p2"), ("n2", "q"), ("n2", "web2")]
    assert ids() == every
    assert ids(name="web") == [("n1", "web1"), ("n2", "web2")]
    assert ids(name="nope") == []
    assert ids(node="n2") == [("n2", "p2"), ("n2", "q"), ("n2", "web2")]
    assert ids(node="n1", name="web") == [("n1", "web1")]
    assert ids(destination="web") == [("n1", "p1"), ("n2", "p2")]
    assert ids(destination="db") == [("n2", "q")]
    assert ids(destination="web", node="n2") == [("n2", "p2")]
    assert ids(destination="nope") == []
    # a service that is not a proxy has no destination even if it carries Proxy config
    store.register(
        Registration(
            node("n3"),
            services=(svc("x", "x", "n3", proxy={"DestinationServiceName": "web"}),),
        )
    )
    assert ids(destination="web") == [("n1", "p1"), ("n2", "p2")]


def test_check_queries(store: Store) -> None:
    web1 = svc("web1", "web")
    web2 = svc("web2", "web", "n2")
    db = svc("db1", "db")
    store.register(
        Registration(
            node(),
            services=(web1, db),
            checks=(
                chk("a", service=web1, status=PASSING),
                chk("b", service=db, status=CRITICAL),
                chk("serf", status=PASSING),
            ),
        )
    )
    store.register(
        Registration(
            node("n2"),
            services=(web2,),
            checks=(chk("a", "n2", web2, status=WARNING), chk("serf", "n2", status=CRITICAL)),
        )
    )

    def ids(**kw) -> list[tuple[str, str]]:
        return [(c.node, c.check_id) for c in store.checks(**kw)]

    assert ids() == [("n1", "a"), ("n1", "b"), ("n1", "serf"), ("n2", "a"), ("n2", "serf")]
    assert ids(node="n2") == [("n2", "a"), ("n2", "serf")]
    assert ids(service_name="web") == [("n1", "a"), ("n2", "a")]
    assert ids(service_id="web2") == [("n2", "a")]
    assert ids(service_name="") == [("n1", "serf"), ("n2", "serf")]
    assert ids(state=CRITICAL) == [("n1", "b"), ("n2", "serf")]
    assert ids(state=PASSING) == [("n1", "a"), ("n1", "serf")]
    assert ids(state=WARNING) == [("n2", "a")]
    assert ids(check_id="serf") == [("n1", "serf"), ("n2", "serf")]
    assert ids(check_id="serf", node="n1") == [("n1", "serf")]
    assert ids(node="n1", state=CRITICAL, service_name="db") == [("n1", "b")]
    assert ids(node="n3") == []


def test_update_check(store: Store) -> None:
    web = svc("web1", "web")
    store.register(
        Registration(node(), services=(web,), checks=(chk("c", service=web, output="ok"),))
    )
    c = store.update_check("n1", "c", WARNING, "slow", now=10.0)
    assert c is not None
    assert (c.status, c.output, c.create_index, c.modify_index) == (WARNING, "slow", 1, 2)
    assert store.checks()[0] == c
    # output None keeps the old output
    c = store.update_check("n1", "c", CRITICAL, None, now=11.0)
    assert (c.status, c.output, c.modify_index) == (CRITICAL, "slow", 3)  # type: ignore[union-attr]
    # same output, same status: nothing changes
    c = store.update_check("n1", "c", CRITICAL, "slow", now=12.0)
    assert (c.status, c.output, c.modify_index) == (CRITICAL, "slow", 3)  # type: ignore[union-attr]
    # same status, new output: a change
    c = store.update_check("n1", "c", CRITICAL, "slower", now=13.0)
    assert (c.status, c.output, c.modify_index) == (CRITICAL, "slower", 4)  # type: ignore[union-attr]
    assert store.current_index() == 4
    assert c.expires_at is None  # type: ignore[union-attr] # not a TTL check


def test_ttl_checks_expire(store: Store) -> None:
    web = svc("web1", "web")
    ttl = chk("t", service=web, type="ttl", ttl=30.0, expires_at=1030.0, output="fine")
    plain = chk("p", service=web)  # no TTL: never expires
    store.register(Registration(node(), services=(web,), checks=(ttl, plain)))
    assert store.current_index() == 1

    assert store.expire_ttl_checks(1000.0) == 0
    assert store.expire_ttl_checks(1029.9) == 0
    assert store.current_index() == 1
    assert store.expire_ttl_checks(1031.0) == 1
    assert store.current_index() == 2
    [t] = store.checks(check_id="t")
    assert (t.status, t.output, t.modify_index) == (CRITICAL, "TTL expired", 2)
    assert store.checks(check_id="p")[0].status == PASSING
    # an expired check does not expire again
    assert store.expire_ttl_checks(5000.0) == 0
    assert store.current_index() == 2

    # a refresh moves the deadline to now + ttl
    t = store.update_check("n1", "t", PASSING, "back", now=2000.0)
    assert (t.status, t.expires_at, t.modify_index) == (PASSING, 2030.0, 3)  # type: ignore[union-attr]
    # a refresh that changes nothing visible does not bump, but still moves the deadline
    t = store.update_check("n1", "t", PASSING, "back", now=2020.0)
    assert store.current_index() == 3
    assert (t.status, t.expires_at, t.modify_index) == (PASSING, 2050.0, 3)  # type: ignore[union-attr]
    assert store.checks(check_id="t")[0].expires_at == 2050.0
    assert store.expire_ttl_checks(2040.0) == 0  # the old deadline no longer applies
    assert store.expire_ttl_checks(2051.0) == 1
    assert store.current_index() == 4
    assert store.topic_index("catalog/svc/web") == 4


def test_registering_a_ttl_check_again_moves_only_its_deadline(store: Store) -> None:
    """A node agent refreshes its serfHealth TTL check by registering it again, every few
    seconds: that must move the deadline without taking an index, or every heartbeat of every
    node would wake the blocking queries on the catalog."""
    serf = chk("serfHealth", type="ttl", ttl=30.0, expires_at=1030.0, output="alive")
    store.register(Registration(node(), checks=(serf,)))
    assert store.current_index() == 1
    again = dataclasses.replace(serf, expires_at=1040.0)
    assert store.register(Registration(node(), checks=(again,), keep_existing_node=True)) == 1
    assert store.current_index() == 1
    [c] = store.checks(check_id="serfHealth")
    assert (c.expires_at, c.modify_index) == (1040.0, 1)
    assert store.expire_ttl_checks(1035.0) == 0  # the old deadline no longer applies
    assert store.expire_ttl_checks(1041.0) == 1
    assert store.current_index() == 2
    # A registration that changes what is visible still takes an index.
    back = dataclasses.replace(serf, expires_at=1100.0, output="back")
    assert store.register(Registration(node(), checks=(back,), keep_existing_node=True)) == 3


# -- durability and reopen -----------------------------------------------------------------


def test_reopen_keeps_data_index_cluster_id_and_schema(store_url: str) -> None:
    with opened(store_url) as s:
        cid = s.cluster_id()
        s.kv_put("k", b"\x00v", flags=U64_MAX)
        web = svc("web1", "web")
        s.register(Registration(node(), services=(web,), checks=(chk("c", service=web),)))
        versions = sql_rows(s, "SELECT version, applied_at FROM schema_migrations ORDER BY 1")
        before = (s.kv_list(""), s.nodes(), s.services(), s.checks())
        assert s.current_index() == 2
    with opened(store_url) as s:
        assert s.cluster_id() == cid
        assert s.current_index() == 2
        assert s.topic_index("catalog/svc/web") == 2
        assert s.kv_index("k", exact=True) == 1
        assert (s.kv_list(""), s.nodes(), s.services(), s.checks()) == before
        s.kv_put("k2", b"")
        assert s.current_index() == 3
        s.kv_delete("k2")
        assert s.current_index() == 4
    with opened(store_url) as s:
        assert s.cluster_id() == cid
        assert s.current_index() == 4
        # the tombstone survived too: the deleted key's index did not go back
        assert s.kv_index("k2", exact=True) == 4
        assert (s.kv_list(""), s.nodes(), s.services(), s.checks()) == before
        # migrations ran once: same rows, same applied_at
        assert sql_rows(s, "SELECT version, applied_at FROM schema_migrations ORDER BY 1") == (
            versions
        )
    # exactly one row per migration version
    assert [v for v, _ in versions] == [v for v, _ in migrations("BLOB")]


def test_two_stores_on_one_database_share_everything(store_url: str) -> None:
    with opened(store_url) as a, opened(store_url) as b:
        assert a.cluster_id() == b.cluster_id()
        a.kv_put("k", b"1")
        assert b.kv_get("k").value == b"1"  # type: ignore[union-attr]
        assert b.kv_put("k", b"2", cas=1) is True
        assert a.kv_put("k", b"3", cas=1) is False
        assert a.current_index() == b.current_index() == 2
        assert sql_rows(a, "SELECT count(*) FROM schema_migrations") == [(len(migrations("")),)]


# -- followers -----------------------------------------------------------------------------


def test_follower_publishes_other_stores_writes(store_url: str) -> None:
    with opened(store_url) as a, opened(store_url) as b:
        a.kv_put("before", b"")  # committed before the follower starts: not a change to wake on
        b.start_follower()
        b.start_follower()  # idempotent
        pos = b.feed.position()
        kv = Watch("kv", exact=("app/x",))
        web = Watch("catalog", exact=("svc/web",))
        a.kv_put("app/x", b"1")
        wait_published(b, kv, pos, a.current_index())
        assert b.feed.wait(kv, pos, 0) is True
        assert b.kv_get("app/x").value == b"1"  # type: ignore[union-attr]
        assert b.feed.wait(web, pos, 0) is False

        pos = b.feed.position()
        idx = a.register(Registration(node(), services=(proxy_for("web"),)))
        wait_published(b, web, pos, idx)
        assert b.feed.wait(web, pos, 0) is True
        assert b.feed.wait(Watch("catalog", exact=("node/n1",)), pos, 0) is True
        assert b.feed.wait(kv, pos, 0) is False
        assert b.topic_index("catalog/svc/web") == idx
        # a's own feed got it directly, at once
        assert a.feed.published_index == idx


def test_follower_wakes_a_parked_waiter(store_url: str) -> None:
    """The path a blocking query takes: parked on the feed of one process, woken by a write in
    another."""
    with opened(store_url, poll_interval=0.01) as a, opened(store_url) as b:
        b.start_follower()
        pos = b.feed.position()
        result: list[bool] = []
        t = threading.Thread(
            target=lambda: result.append(b.feed.wait(Watch("kv", prefixes=("cfg/",)), pos, 30))
        )
        t.start()
        deadline = time.monotonic() + DEADLINE
        while b.feed.waiting() != 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        a.kv_put("cfg/x", b"")
        t.join(DEADLINE)
        assert result == [True]


def test_follower_dedupes_own_writes(store_url: str) -> None:
    with opened(store_url) as s:
        s.start_follower()
        pos = s.feed.position()
        s.kv_put("k", b"")
        assert s.feed.position() == pos + 1
        # give the follower every chance to read the write back: a second write from another
        # store must arrive, and by then the first has been read back and dropped
        with opened(store_url) as other:
            other.kv_put("other", b"")
            wait_published(s, Watch("kv", exact=("other",)), pos, 2)
        assert s.feed.position() == pos + 2


def _listener_pids(admin: psycopg.Connection, dbname: str) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%'",
        (dbname,),
    ).fetchall()
    return [r[0] for r in rows]


def test_pg_follower_survives_a_killed_listener(pg_url: str, pg_server) -> None:
    """A NOTIFY sent while the listener is down is lost; the follower must catch up anyway.

    The follower's slow poll is set to a minute, so delivery within the deadline can only come
    from NOTIFY or from the catch-up after a reconnect.
    """
    dbname = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
    with (
        psycopg.connect(pg_server.get_uri(), autocommit=True) as admin,
        opened(pg_url) as a,
        opened(pg_url, poll_interval=60.0) as b,
    ):
        b.start_follower()
        deadline = time.monotonic() + DEADLINE
        while len(_listener_pids(admin, dbname)) != 1:
            assert time.monotonic() < deadline, "the follower never listened"
            time.sleep(0.01)
        [old_pid] = _listener_pids(admin, dbname)

        # NOTIFY works: delivered long before the 60 s poll
        pos = b.feed.position()
        a.kv_put("live", b"")
        wait_published(b, Watch("kv", exact=("live",)), pos, a.current_index())

        # Keep the follower from reconnecting while we write (a's pool connection stays open).
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            pos = b.feed.position()
            [(ok,)] = admin.execute("SELECT pg_terminate_backend(%s)", (old_pid,)).fetchall()
            assert ok is True
            while _listener_pids(admin, dbname):
                assert time.monotonic() < deadline + DEADLINE
                time.sleep(0.01)
            a.kv_put("missed", b"1")
            idx = a.register(Registration(node(), services=(svc("web1", "web"),)))
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')

        wait_published(b, Watch("catalog", exact=("svc/web",)), pos, idx)
        assert b.feed.wait(Watch("kv", exact=("missed",)), pos, 0) is True
        [new_pid] = _listener_pids(admin, dbname)
        assert new_pid != old_pid
        # and it keeps following after the reconnect
        pos = b.feed.position()
        a.kv_put("after", b"")
        wait_published(b, Watch("kv", exact=("after",)), pos, a.current_index())


# -- errors --------------------------------------------------------------------------------


def test_unreachable_postgres_is_store_unavailable_quickly() -> None:
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        open_store("postgresql://postgres@/postgres?host=/nonexistent-trellis-dir")
    assert time.monotonic() - t0 < 5


def test_postgres_database_that_does_not_exist_is_store_unavailable(pg_url: str) -> None:
    url = pg_url.replace("/t_", "/missing_", 1)
    assert url != pg_url
    with pytest.raises(StoreUnavailable):
        open_store(url)


def test_sqlite_in_missing_directory_is_store_unavailable(tmp_path) -> None:
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:///{tmp_path}/no/such/dir/trellis.db")


def test_sqlite_file_that_is_not_a_database_is_store_unavailable(tmp_path) -> None:
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not a database file, not at all" * 100)
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:///{bad}")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "trellis.db",
        "/var/lib/trellis.db",
        "mysql://root@localhost/trellis",
        "redis://localhost",
        "sqlite://",
        "sqlite:///",
        "sqlite:relative.db",
        "postgresql://postgres@localhost:notaport/db",
        "postgresql://postgres@/db?nosuchoption=1",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_store(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://trellis:s3cr3tpw@[::1/db",
        "postgresql://trellis:s3cr3tpw@h/db?nosuchoption=1",
        "postgresql://trellis:s3cr3tpw@h:port/db",
        "postgress://trellis:s3cr3tpw@h/db",
    ],
)
def test_config_error_does_not_echo_a_password(url: str) -> None:
    with pytest.raises(ConfigError) as e:
        open_store(url)
    assert "s3cr3tpw" not in str(e.value)


def test_a_closed_store_refuses_and_opens_no_connection(store_url: str) -> None:
    s = open_store(store_url)
    s.kv_put("k", b"")
    s.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        s.kv_get("k")
    with pytest.raises(StoreUnavailable, match="closed"):
        s.kv_put("k", b"again")
    s.close()  # idempotent


def test_follower_stops_when_the_store_closes(store_url: str) -> None:
    before = set(threading.enumerate())
    s = open_store(store_url, poll_interval=0.05)
    s.start_follower()
    [follower] = [t for t in threading.enumerate() if t not in before and "follower" in t.name]
    assert follower.daemon
    s.close()
    follower.join(DEADLINE)
    assert not follower.is_alive()


def test_nul_in_names_is_the_clients_fault_on_both(store: Store) -> None:
    """PostgreSQL text cannot hold NUL, SQLite can; both stores refuse it the same way
    (UnstorableValue, a 400 at the HTTP boundary), instead of one storing it and the other
    leaking a driver error (500)."""
    store.kv_put("a", b"\x00 in a value is fine")
    for op in [
        lambda: store.kv_put("a\x00b", b""),
        lambda: store.kv_get("a\x00b"),
        lambda: store.kv_list("a\x00"),
        lambda: store.kv_delete("a\x00", recurse=True),
        lambda: store.register(Registration(node("n\x00"))),
        lambda: store.register(Registration(node(), services=(svc("w", "we\x00b"),))),
    ]:
        with pytest.raises(UnstorableValue, match="NUL"):
            op()
    assert store.current_index() == 1
    assert store.nodes() == []
    assert store.kv_get("a").value == b"\x00 in a value is fine"  # type: ignore[union-attr]
    # the store is still usable: the failed writes were rolled back, connections returned
    for i in range(20):
        store.kv_put(f"k{i}", b"")
    assert store.current_index() == 21


# -- concurrency ---------------------------------------------------------------------------


def _run_threads(n: int, target) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_concurrent_writers_each_get_their_own_index(store: Store) -> None:
    store.kv_put("setup", b"")
    start = store.current_index()

    def writer(i: int) -> None:
        for j in range(50):
            assert store.kv_put(f"t{i}/k{j}", f"{i}-{j}".encode()) is True

    assert _run_threads(8, writer) == []
    entries = [e for e in store.kv_list("t")]
    assert len(entries) == 400
    assert all(e.value == e.key[1:].replace("/k", "-").encode() for e in entries)
    assert store.current_index() == start + 400
    mods = sorted(e.modify_index for e in entries)
    assert mods == list(range(start + 1, start + 401))  # unique, no gaps
    assert all(e.create_index == e.modify_index for e in entries)


def test_concurrent_cas_has_exactly_one_winner(store: Store) -> None:
    """cas=0 on one new key from many threads: exactly one create; the rest see it exists.
    Then cas=N on that key: exactly one update wins."""
    results: list[bool] = []

    def create(i: int) -> None:
        results.append(store.kv_put("lock", str(i).encode(), cas=0))

    assert _run_threads(8, create) == []
    assert sorted(results) == [False] * 7 + [True]
    assert store.current_index() == 1
    results.clear()

    def update(i: int) -> None:
        results.append(store.kv_put("lock", str(i).encode(), cas=1))

    assert _run_threads(8, update) == []
    assert sorted(results) == [False] * 7 + [True]
    assert store.current_index() == 2


def test_concurrent_registrations_of_one_node(store: Store) -> None:
    def reg(i: int) -> None:
        s = svc(f"s{i}", "web")
        store.register(Registration(node(), services=(s,), checks=(chk(f"c{i}", service=s),)))

    assert _run_threads(8, reg) == []
    assert len(store.nodes()) == 1
    assert len(store.services()) == 8
    assert len(store.checks()) == 8
    assert store.current_index() == 8
