"""Blocking queries (``?index=&wait=``) and agent hash blocking (``?hash=&wait=``), in-process,
on SQLite and on PostgreSQL.

Each blocking GET runs in a thread while the test thread writes. Before writing, a test waits
until the query is parked (``/v1/agent/self`` counts parked queries), so the wake-up measured is
the change feed's, not a lucky read. A write that concerns the query must answer it well
under a second; a write that does not must leave it parked until its ``wait`` runs out, with
the same index.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tests import api_fixtures
from tests.api_fixtures import (
    InThread,
    assert_error,
    current_index,
    index_of,
    parked,
    put_json,
    register,
    wait_until,
)

# Fixtures, bound here so that pytest finds them in this module.
client = api_fixtures.client
make_client = api_fixtures.make_client

#: A woken query must answer within this long of the write (the write itself included).
PROMPT = 0.5
#: The wait of a query that must not be woken: a wrong wake-up answers within milliseconds of
#: the write, so half a second tells the two apart.
IDLE_WAIT = 0.5


def block(client, url: str) -> InThread:
    """Start the blocking GET ``url`` and wait until it is parked on the change feed."""
    q = InThread(lambda: client.get(url)).start()
    wait_until(lambda: parked(client) >= 1 or q.done(), timeout=10)
    assert not q.done(), f"{url} answered at once: {q.result().status_code}"
    return q


def assert_woken(client, url: str, write: Callable[[], object]):
    """``url`` (a blocking GET at the current index) answers promptly after ``write``, with a
    higher index. Returns the response."""
    before = index_of(client.get(url.split("?")[0] + "?" + _strip_blocking(url)))
    q = block(client, f"{url}&index={before}&wait=5s")
    t0 = time.monotonic()
    write()
    r = q.result()
    took = time.monotonic() - t0
    assert took < PROMPT, f"answered {took:.3f}s after the write"
    assert index_of(r) > before
    return r


def assert_not_woken(client, url: str, write: Callable[[], object]):
    """``url`` stays parked through ``write`` and answers after its wait with the same index
    and body."""
    first = client.get(url.split("?")[0] + "?" + _strip_blocking(url))
    before = index_of(first)
    q = block(client, f"{url}&index={before}&wait={int(IDLE_WAIT * 1000)}ms")
    write()
    r = q.result()
    assert q.elapsed >= IDLE_WAIT * 0.95, f"answered after {q.elapsed:.3f}s, before its wait"
    assert q.elapsed < 3
    assert index_of(r) == before
    assert r.status_code == first.status_code
    assert r.get_data() == first.get_data()
    return r


def _strip_blocking(url: str) -> str:
    return url.split("?", 1)[1] if "?" in url else ""


def kv_put(client, key: str, value: bytes = b"v"):
    def write():
        r = client.put(f"/v1/kv/{key}", data=value)
        assert r.get_json() is True

    return write


# -- K/V ---------------------------------------------------------------------------------------


def test_kv_key_woken_by_its_write(client):
    kv_put(client, "app/config", b"v1")()
    r = assert_woken(client, "/v1/kv/app/config?", kv_put(client, "app/config", b"v2"))
    assert r.status_code == 200
    (e,) = r.get_json()
    assert (e["Value"], e["ModifyIndex"]) == ("djI=", index_of(r))


def test_kv_key_not_woken_by_another_key(client):
    kv_put(client, "app/config")()
    assert_not_woken(client, "/v1/kv/app/config?", kv_put(client, "app/config2"))
    # Nor by a key that has it as a prefix, nor by its parent.
    assert_not_woken(client, "/v1/kv/app/config?raw", kv_put(client, "app/config/sub"))


def test_kv_recurse_woken_by_a_write_under_the_prefix(client):
    kv_put(client, "app/a")()
    kv_put(client, "other")()
    r = assert_woken(client, "/v1/kv/app/?recurse", kv_put(client, "app/deep/b"))
    assert [e["Key"] for e in r.get_json()] == ["app/a", "app/deep/b"]
    r = assert_woken(client, "/v1/kv/app/?keys&separator=/", kv_put(client, "app/c"))
    assert r.get_json() == ["app/a", "app/c", "app/deep/"]


def test_kv_recurse_not_woken_outside_the_prefix(client):
    kv_put(client, "app/a")()
    assert_not_woken(client, "/v1/kv/app/?recurse", kv_put(client, "apps/x"))
    assert_not_woken(client, "/v1/kv/app/?keys", kv_put(client, "ap"))


def test_deleted_key_wakes_a_blocking_get_with_404(client):
    kv_put(client, "doomed")()
    before = current_index(client)

    def delete():
        assert client.delete("/v1/kv/doomed").get_json() is True

    r = assert_woken(client, "/v1/kv/doomed?", delete)
    assert_error(r, 404, "not_found")
    assert index_of(r) == before + 1
    # A recursive watch sees the delete too.
    kv_put(client, "dir/x")()

    def delete_dir():
        assert client.delete("/v1/kv/dir/?recurse").get_json() is True

    r = assert_woken(client, "/v1/kv/dir/?recurse", delete_dir)
    assert r.status_code == 404


def test_missing_key_woken_by_its_creation(client):
    r = client.get("/v1/kv/later")
    assert r.status_code == 404
    r = assert_woken(client, "/v1/kv/later?", kv_put(client, "later", b"now"))
    assert r.status_code == 200
    assert r.get_json()[0]["Value"] == "bm93"


# -- catalog and health ------------------------------------------------------------------------


def test_catalog_services_woken_by_a_registration(client):
    r = assert_woken(
        client, "/v1/catalog/services?", lambda: register(client, {"Name": "web", "Tags": ["x"]})
    )
    assert r.get_json() == {"web": ["x"], "consul": []}  # consul: the server itself
    # A deregistration wakes it too.
    r = assert_woken(
        client,
        "/v1/catalog/services?",
        lambda: client.put("/v1/agent/service/deregister/web"),
    )
    assert r.get_json() == {"consul": []}


def test_catalog_services_not_woken_by_kv(client):
    register(client, {"Name": "web"})
    assert_not_woken(client, "/v1/catalog/services?", kv_put(client, "k"))


def test_catalog_service_woken_by_its_service_only(client):
    register(client, {"ID": "web-1", "Name": "web"})
    r = assert_woken(
        client,
        "/v1/catalog/service/web?",
        lambda: register(client, {"ID": "web-2", "Name": "web", "Port": 2}),
    )
    assert [s["ServiceID"] for s in r.get_json()] == ["web-1", "web-2"]
    assert_not_woken(client, "/v1/catalog/service/web?", lambda: register(client, {"Name": "db"}))


def test_health_service_woken_by_a_check_change(client):
    register(client, {"ID": "web-1", "Name": "web", "Check": {"CheckID": "c", "TTL": "1h"}})

    def pass_check():
        assert client.put("/v1/agent/check/pass/c").status_code == 200

    r = assert_woken(client, "/v1/health/service/web?passing", pass_check)
    assert [e["Service"]["ID"] for e in r.get_json()] == ["web-1"]


def test_health_service_not_woken_by_another_service(client):
    register(client, {"ID": "web-1", "Name": "web", "Check": {"CheckID": "c", "TTL": "1h"}})
    register(client, {"ID": "db-1", "Name": "db", "Check": {"CheckID": "d", "TTL": "1h"}})

    def other():
        assert client.put("/v1/agent/check/pass/d").status_code == 200
        register(client, {"ID": "cache-1", "Name": "cache"})

    assert_not_woken(client, "/v1/health/service/web?", other)


def test_health_connect_woken_by_a_new_proxy(client):
    register(client, {"ID": "web-1", "Name": "web", "Port": 8080})
    r = assert_woken(
        client,
        "/v1/health/connect/web?",
        lambda: register(
            client, {"name": "web", "id": "web-1", "connect": {"sidecar_service": {}}}
        ),
    )
    assert [e["Service"]["ID"] for e in r.get_json()] == ["web-1-sidecar-proxy"]


def test_health_connect_passing_woken_by_the_proxys_check(client):
    # What a sidecar watches for its upstream: its destination's Connect instances that pass.
    # A check of the proxy changing state must wake it (it used to touch only the proxy's own
    # name, so the upstream stayed empty until the watch's wait ran out).
    register(client, {"ID": "web-1", "Name": "web", "Port": 8080})
    register(
        client,
        {"name": "web", "id": "web-1", "port": 8080, "connect": {"sidecar_service": {
            "checks": [{"check_id": "up", "name": "up", "ttl": "1h"}]}}},
    )  # fmt: skip

    def pass_check():
        assert client.put("/v1/agent/check/pass/up").status_code == 200

    r = assert_woken(client, "/v1/health/connect/web?passing", pass_check)
    assert [e["Service"]["ID"] for e in r.get_json()] == ["web-1-sidecar-proxy"]


def test_health_connect_passing_woken_by_the_proxys_check_written_through_the_catalog(client):
    # The same, when the check's new status comes with a catalog registration: how a node
    # agent writes a check result (anti-entropy), and how Consul's agents do. The sidecar of
    # another node watching its upstream used to wait out its whole wait.
    proxy = {
        "ID": "web-1-sidecar-proxy",
        "Service": "web-sidecar-proxy",
        "Kind": "connect-proxy",
        "Port": 21000,
        "Proxy": {"DestinationServiceName": "web", "DestinationServiceID": "web-1"},
    }

    def write(status: str):
        r = client.put(
            "/v1/catalog/register",
            json={
                "Node": "node-a",
                "Address": "127.0.0.1",
                "Service": proxy,
                "Check": {
                    "CheckID": "listening",
                    "Name": "listening",
                    "ServiceID": "web-1-sidecar-proxy",
                    "Status": status,
                },
            },
        )
        assert r.status_code == 200, r.get_data(as_text=True)

    write("critical")
    r = assert_woken(client, "/v1/health/connect/web?passing", lambda: write("passing"))
    assert [e["Service"]["ID"] for e in r.get_json()] == ["web-1-sidecar-proxy"]


# -- the parameters ----------------------------------------------------------------------------


def test_index_zero_no_index_and_an_old_index_answer_at_once(client):
    kv_put(client, "k")()
    idx = index_of(client.get("/v1/kv/k"))
    for url in (
        "/v1/kv/k?index=0&wait=5s",
        "/v1/kv/k?wait=5s",
        f"/v1/kv/k?index={idx - 1}&wait=5s",
        "/v1/catalog/services?index=0",
        "/v1/health/service/web?index=0&wait=5s",
    ):
        t0 = time.monotonic()
        r = client.get(url)
        assert r.status_code == 200
        assert time.monotonic() - t0 < PROMPT, url
        if url.startswith("/v1/kv/"):
            assert index_of(r) == idx


def test_an_index_the_store_never_gave_answers_at_once(client):
    # A client that held an index from a store since replaced (a server restarted empty) is
    # answered at once with the lower index, so that it can reset, instead of being parked
    # for its whole wait.
    kv_put(client, "k")()
    now = current_index(client)
    for url in ("/v1/kv/k", "/v1/catalog/services", "/v1/health/service/web"):
        t0 = time.monotonic()
        r = client.get(f"{url}?index={now + 1000}&wait=5s")
        assert time.monotonic() - t0 < PROMPT, url
        assert r.status_code == 200, url
        assert index_of(r) <= now, url
    # An index the store did give, above this result's, still parks: that is Consul's
    # blocking, and nothing changed for this key since.
    kv_put(client, "other")()
    idx = index_of(client.get("/v1/kv/k"))
    assert current_index(client) > idx
    q = block(client, f"/v1/kv/k?index={current_index(client)}&wait=1s")
    assert index_of(q.result()) == idx


def test_bad_wait_and_index_are_400(client, subtests):
    kv_put(client, "k")()
    for query, param in (
        ("index=1&wait=abc", "wait"),
        ("index=1&wait=-1s", "wait"),
        ("index=1&wait=1x", "wait"),
        ("index=1&wait=s", "wait"),
        ("wait=abc", "wait"),
        ("index=abc", "index"),
        ("index=-1", "index"),
        ("index=1.5", "index"),
        (f"index={2**64}", "index"),
        ("index=abc&wait=1s", "index"),
    ):
        for url in ("/v1/kv/k", "/v1/catalog/services", "/v1/health/service/web"):
            with subtests.test(url=url, query=query):
                assert_error(client.get(f"{url}?{query}"), 400, "bad_request", f"'{param}'")
    with subtests.test("hash blocking"):
        r = client.get("/v1/agent/services?hash=x&wait=-1s")
        assert_error(r, 400, "bad_request", "'wait'")


def test_wait_above_the_maximum_is_accepted(client):
    kv_put(client, "k")()
    for wait in ("11m", "1h", "99999h"):
        r = client.get(f"/v1/kv/k?index=0&wait={wait}")
        assert r.status_code == 200, wait


def test_wait_is_clamped_to_max_wait(make_client):
    # A small max_wait stands in for Consul's 10 minutes, so that the clamp is observable.
    client = make_client(default_wait=0.2, max_wait=1.0)
    kv_put(client, "k")()
    idx = index_of(client.get("/v1/kv/k"))
    q = InThread(lambda: client.get(f"/v1/kv/k?index={idx}&wait=1h")).start()
    r = q.result(timeout=10)
    assert (r.status_code, index_of(r)) == (200, idx)
    # max_wait plus at most max_wait/16 of jitter, and some slack for a loaded machine.
    assert 0.98 <= q.elapsed < 3.0, q.elapsed
    # Without ?wait, the default applies.
    q = InThread(lambda: client.get(f"/v1/kv/k?index={idx}")).start()
    q.result(timeout=10)
    assert 0.18 <= q.elapsed < 0.9, q.elapsed


# -- hash blocking (agent endpoints) -----------------------------------------------------------


def test_agent_service_hash_blocking(client):
    register(client, {"Name": "web", "Port": 8080})
    r = client.get("/v1/agent/service/web")
    h = r.headers["X-Consul-ContentHash"]

    q = InThread(lambda: client.get(f"/v1/agent/service/web?hash={h}&wait=5s")).start()
    wait_until(lambda: parked(client) >= 1 or q.done())
    assert not q.done()
    t0 = time.monotonic()
    register(client, {"Name": "web", "Port": 8081})
    r = q.result()
    assert time.monotonic() - t0 < PROMPT
    assert r.get_json()["Port"] == 8081
    h2 = r.headers["X-Consul-ContentHash"]
    assert h2 != h
    assert r.get_json()["ContentHash"] == h2

    # A write elsewhere does not change the hash: it answers after its wait, unchanged.
    q = InThread(lambda: client.get(f"/v1/agent/service/web?hash={h2}&wait=500ms")).start()
    wait_until(lambda: parked(client) >= 1 or q.done())
    kv_put(client, "k")()
    r = q.result()
    assert q.elapsed >= 0.475
    assert r.headers["X-Consul-ContentHash"] == h2

    # A stale hash answers at once.
    t0 = time.monotonic()
    r = client.get(f"/v1/agent/service/web?hash={h}&wait=5s")
    assert r.headers["X-Consul-ContentHash"] == h2
    assert time.monotonic() - t0 < PROMPT


def test_agent_services_hash_blocking(client):
    r = client.get("/v1/agent/services")
    h = r.headers["X-Consul-ContentHash"]
    q = InThread(lambda: client.get(f"/v1/agent/services?hash={h}&wait=5s")).start()
    wait_until(lambda: parked(client) >= 1 or q.done())
    assert not q.done()
    t0 = time.monotonic()
    register(client, {"Name": "db"})
    r = q.result()
    assert time.monotonic() - t0 < PROMPT
    assert list(r.get_json()) == ["db"]
    assert r.headers["X-Consul-ContentHash"] != h


def test_many_parked_queries_each_woken_by_their_own_key(client):
    keys = [f"fan/{i}" for i in range(8)]
    for k in keys:
        kv_put(client, k)()
    idx = {k: index_of(client.get(f"/v1/kv/{k}")) for k in keys}
    qs = {
        k: InThread(lambda k=k: client.get(f"/v1/kv/{k}?index={idx[k]}&wait=5s")).start()
        for k in keys
    }
    wait_until(lambda: parked(client) >= len(keys))
    put_json(client, "/v1/agent/service/register", {"Name": "unrelated"})
    kv_put(client, "fan/3", b"new")()
    r = qs.pop("fan/3").result()
    assert index_of(r) > idx["fan/3"]
    # The others are still parked.
    assert parked(client) == len(keys) - 1
    assert not any(q.done() for q in qs.values())
    for k in qs:
        kv_put(client, k, b"new")()
    for q in qs.values():
        assert q.result().status_code == 200
        assert q.elapsed < 5
