"""Parked blocking queries answered outside the view (``api/longpoll.py``), in-process, on SQLite
and on PostgreSQL.

The blocking behaviour every endpoint must have is ``tests/test_api_blocking.py``; this file is
about what the long-poll path adds: queries woken together run the view once and share its
rendering, a shared rendering only serves a query it fits, and an answer that is not a plain
read (a refusal after a token was deleted) is never shared; the agent's ``?hash=`` reads go the
same way; and one client address holds at most ``blocking.max_per_client`` parked queries.
"""

from __future__ import annotations

import time

from tests import api_fixtures
from tests.api_fixtures import InThread, index_of, parked, put_json, wait_until
from tests.test_acl_api import DENY, bootstrap, create_token, raise_unless, tok

client = api_fixtures.client
make_client = api_fixtures.make_client


def count_views(client, endpoint: str) -> list[int]:
    """Count the runs of the view ``endpoint``, first passes and re-runs (a wrapper around
    the registered view function)."""
    seen = [0]
    views = client.application.view_functions
    view = views[endpoint]

    def counting(*args, **kwargs):
        seen[0] += 1
        return view(*args, **kwargs)

    views[endpoint] = counting
    return seen


def park_many(client, url: str, n: int, headers: dict | None = None, admin=None) -> list[InThread]:
    """Start ``n`` blocking GETs of ``url`` and wait until all are parked. ``admin``: the
    headers that may read ``/v1/agent/self`` when ACLs are on."""

    def now_parked() -> int:
        r = client.get("/v1/agent/self", headers=admin or {})
        return int(r.get_json()["Stats"]["blocking"]["waiting"])

    before = now_parked()
    qs = [InThread(lambda: client.get(url, headers=headers or {})).start() for _ in range(n)]
    wait_until(lambda: now_parked() >= before + n or any(q.done() for q in qs), timeout=20)
    assert not any(q.done() for q in qs), "a query answered before the write"
    return qs


def test_queries_woken_together_run_the_view_once(client):
    client.put("/v1/kv/shared", data=b"a")
    index = index_of(client.get("/v1/kv/shared"))
    views = count_views(client, "kv.get")
    qs = park_many(client, f"/v1/kv/shared?index={index}&wait=30s", 20)
    assert views[0] == 20  # the first passes
    client.put("/v1/kv/shared", data=b"b")
    bodies = set()
    for q in qs:
        r = q.result()
        assert r.status_code == 200 and index_of(r) > index
        bodies.add(r.get_data())
    assert len(bodies) == 1 and b'"Value":"Yg=="' in bodies.pop()
    assert views[0] == 21, f"the view ran {views[0] - 20} times for 20 woken queries"


def test_a_shared_answer_only_serves_the_queries_it_fits(client):
    client.put("/v1/kv/fit", data=b"a")
    index = index_of(client.get("/v1/kv/fit"))
    client.put("/v1/kv/other", data=b"x")  # the store moves on; this key does not
    client.put("/v1/kv/other", data=b"y")
    low = park_many(client, f"/v1/kv/fit?index={index}&wait=30s", 5)
    # An index the store did give, above this key's: parked until the key passes it.
    high = park_many(client, f"/v1/kv/fit?index={index + 2}&wait=30s", 5)
    client.put("/v1/kv/other", data=b"z")  # another key: wakes nobody here
    assert not any(q.done() for q in low + high)
    client.put("/v1/kv/fit", data=b"b")  # above both now: one shared answer serves all
    for q in low + high:
        r = q.result()
        assert index_of(r) > index + 2 and b'"Value":"Yg=="' in r.get_data()


def test_a_token_deleted_while_parked_gets_no_data(make_client):
    c = make_client(**DENY)
    root = bootstrap(c)["SecretID"]
    policy = c.put(
        "/v1/acl/policy",
        json={"Name": "app-read", "Rules": 'key_prefix "app/" { policy = "read" }'},
        headers=tok(root),
    )
    raise_unless(policy, 200)
    reader = create_token(c, root, [{"ID": policy.get_json()["ID"]}])
    raise_unless(c.put("/v1/kv/app/cfg", data=b"a", headers=tok(root)), 200)
    index = index_of(c.get("/v1/kv/app/cfg", headers=tok(reader["SecretID"])))
    url = f"/v1/kv/app/cfg?index={index}&wait=30s"
    qs = park_many(c, url, 5, tok(reader["SecretID"]), admin=tok(root))
    raise_unless(c.delete(f"/v1/acl/token/{reader['AccessorID']}", headers=tok(root)), 200)
    raise_unless(c.put("/v1/kv/app/cfg", data=b"secret", headers=tok(root)), 200)
    for q in qs:
        r = q.result()
        assert r.status_code == 403, r.get_data(as_text=True)
        assert b"c2VjcmV0" not in r.get_data()  # base64 of the new value


def test_the_deadline_answers_with_the_same_index(client):
    client.put("/v1/kv/quiet", data=b"a")
    index = index_of(client.get("/v1/kv/quiet"))
    r = client.get(f"/v1/kv/quiet?index={index}&wait=300ms")
    assert r.status_code == 200 and index_of(r) == index
    assert b'"Value":"YQ=="' in r.get_data()


# -- one mechanism: the agent's ?hash= reads and the agent leaf park here too -------------------


def test_agent_hash_queries_woken_together_run_the_view_once(client):
    h = client.get("/v1/agent/services").headers["X-Consul-ContentHash"]
    views = count_views(client, "agent.list_services")
    qs = park_many(client, f"/v1/agent/services?hash={h}&wait=30s", 20)
    assert views[0] == 20  # the first passes
    put_json(client, "/v1/agent/service/register", {"Name": "db"})
    bodies = set()
    for q in qs:
        r = q.result()
        assert r.status_code == 200 and r.headers["X-Consul-ContentHash"] != h
        bodies.add(r.get_data())
    assert len(bodies) == 1 and b'"db"' in bodies.pop()
    # Parked outside the view, woken together: one re-run renders for all twenty. (Waiting
    # inside the view, as it did, each query re-read and re-rendered for itself.)
    assert views[0] == 21, f"the view ran {views[0] - 20} times for 20 woken queries"


def test_a_hash_rendering_only_serves_the_queries_it_fits(client):
    put_json(client, "/v1/agent/service/register", {"Name": "web", "Port": 1})
    old = client.get("/v1/agent/service/web").headers["X-Consul-ContentHash"]
    put_json(client, "/v1/agent/service/register", {"Name": "web", "Port": 2})
    cur = client.get("/v1/agent/service/web").headers["X-Consul-ContentHash"]
    # A client holding an old hash answers at once; one holding the current one parks.
    r = client.get(f"/v1/agent/service/web?hash={old}&wait=30s")
    assert r.headers["X-Consul-ContentHash"] == cur
    # A change on the node wakes them, but gives them nothing new: they wait on, and answer
    # at their deadline with the same hash.
    qs = park_many(client, f"/v1/agent/service/web?hash={cur}&wait=1s", 5)
    put_json(client, "/v1/agent/service/register", {"Name": "other"})
    for q in qs:
        r = q.result()
        assert q.elapsed >= 0.95 and r.headers["X-Consul-ContentHash"] == cur
    # A change to the service answers them with it.
    qs = park_many(client, f"/v1/agent/service/web?hash={cur}&wait=30s", 5)
    put_json(client, "/v1/agent/service/register", {"Name": "web", "Port": 3})
    for q in qs:
        r = q.result()
        assert r.get_json()["Port"] == 3 and r.headers["X-Consul-ContentHash"] != cur


# -- parked queries per client address (blocking.max_per_client) --------------------------------


def test_a_client_past_its_parked_cap_is_answered_at_once_not_refused(make_client):
    c = make_client(blocking_max_per_client=3)
    c.put("/v1/kv/capped", data=b"a")
    index = index_of(c.get("/v1/kv/capped"))
    url = f"/v1/kv/capped?index={index}&wait=30s"
    held = park_many(c, url, 3)
    # The fourth from the same address does not park: it answers now with what there is,
    # as at its deadline (same index, same value), a 200 and not a refusal.
    t0 = time.monotonic()
    r = c.get(url)
    assert time.monotonic() - t0 < 2
    assert r.status_code == 200 and index_of(r) == index and b'"Value":"YQ=="' in r.get_data()
    assert parked(c) == 3
    # So does a ?hash= read, and any other blocking read from that address.
    h = c.get("/v1/agent/services").headers["X-Consul-ContentHash"]
    assert c.get(f"/v1/agent/services?hash={h}&wait=30s").status_code == 200
    assert parked(c) == 3
    # Another client address still parks.
    other = InThread(lambda: c.get(url, environ_base={"REMOTE_ADDR": "127.0.0.2"})).start()
    wait_until(lambda: parked(c) == 4 or other.done(), timeout=10)
    assert not other.done()
    # A write answers every parked query; then the first client may park again.
    c.put("/v1/kv/capped", data=b"b")
    for q in [*held, other]:
        assert index_of(q.result()) > index
    wait_until(lambda: parked(c) == 0, timeout=10)
    index = index_of(c.get("/v1/kv/capped"))
    again = park_many(c, f"/v1/kv/capped?index={index}&wait=30s", 3)
    c.put("/v1/kv/capped", data=b"c")
    for q in again:
        assert q.result().status_code == 200
