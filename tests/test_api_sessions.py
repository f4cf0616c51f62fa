"""Sessions and K/V locks through the HTTP API, on SQLite and on PostgreSQL (``store_url``).

Consul's semantics (agent/consul/state/session.go, kvs.go): a session is invalidated when
destroyed, when a check it names turns critical or goes away, when its node is deregistered,
and 2 x TTL after its last renew; its locks are then released (or its keys deleted) and each
key's lock delay starts.
"""

from __future__ import annotations

import time

from tests import api_fixtures
from tests.api_fixtures import NODE, InThread, assert_error, index_of, wait_until
from tests.test_acl_api import DENY, bootstrap, create_token, tok

# Fixtures, bound here so that pytest finds them in this module.
client = api_fixtures.client
make_client = api_fixtures.make_client


def create(c, body=None, **kw) -> str:
    r = c.put("/v1/session/create", json=body if body is not None else {}, **kw)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["ID"]


def info(c, sid: str) -> list:
    r = c.get(f"/v1/session/info/{sid}")
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def acquire(c, key: str, sid: str, value: bytes = b"v") -> bool:
    r = c.put(f"/v1/kv/{key}?acquire={sid}", data=value)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def release(c, key: str, sid: str, value: bytes = b"v") -> bool:
    r = c.put(f"/v1/kv/{key}?release={sid}", data=value)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def entry(c, key: str) -> dict | None:
    r = c.get(f"/v1/kv/{key}")
    return r.get_json()[0] if r.status_code == 200 else None


# -- create and read -----------------------------------------------------------------------------


def test_create_defaults_and_read_back(client):
    sid = create(client)
    [s] = info(client, sid)
    assert s["ID"] == sid
    assert (s["Node"], s["Behavior"], s["TTL"], s["LockDelay"]) == (NODE, "release", "", 15 * 10**9)
    assert s["NodeChecks"] == ["serfHealth"]
    assert s["CreateIndex"] == s["ModifyIndex"] > 0
    assert [x["ID"] for x in client.get("/v1/session/list").get_json()] == [sid]
    assert [x["ID"] for x in client.get(f"/v1/session/node/{NODE}").get_json()] == [sid]
    assert client.get("/v1/session/node/elsewhere").get_json() == []
    assert info(client, "no-such-session") == []


def test_field_names_in_any_case_as_python_consul_sends_them(client):
    # python-consul: lower-case names, lockdelay as "<n>s", ttl as "<float>s", checks=[].
    sid = create(
        client,
        {"name": "patroni", "lockdelay": "1s", "ttl": "15.0s", "behavior": "delete", "checks": []},
    )
    [s] = info(client, sid)
    assert (s["Name"], s["LockDelay"], s["TTL"], s["Behavior"]) == (
        "patroni",
        10**9,
        "15.0s",
        "delete",
    )
    assert s["NodeChecks"] == []  # an explicit empty list: no checks, not the default
    # A bare number below 1000 is seconds, above it nanoseconds (Consul).
    assert info(client, create(client, {"LockDelay": 5}))[0]["LockDelay"] == 5 * 10**9
    assert info(client, create(client, {"LockDelay": 2 * 10**9}))[0]["LockDelay"] == 2 * 10**9


def test_node_checks_settle_against_the_older_checks_field_as_in_consul(client, subtests):
    assert (
        client.put("/v1/agent/check/register", json={"Name": "hb", "TTL": "30s"}).status_code == 200
    )
    assert client.put("/v1/agent/check/pass/hb").status_code == 200
    for body, want in [
        ({}, ["serfHealth"]),
        ({"Checks": []}, []),
        ({"Checks": None}, []),
        ({"NodeChecks": []}, []),
        ({"Checks": ["serfHealth"], "NodeChecks": []}, []),
        ({"Checks": []}, []),
        ({"Checks": ["serfHealth"]}, ["serfHealth"]),
        ({"Checks": ["serfHealth", "hb"]}, ["serfHealth", "hb"]),
        ({"NodeChecks": ["hb"]}, ["hb"]),
        ({"NodeChecks": ["hb"], "Checks": ["serfHealth"]}, ["hb"]),
        ({"NodeChecks": ["hb"], "Checks": []}, []),
    ]:
        with subtests.test(body=body):
            assert info(client, create(client, body))[0]["NodeChecks"] == want


def test_bad_create_bodies_are_400_and_store_nothing(client, subtests):
    for body, words in [
        ({"TTL": "5s"}, "Invalid Session TTL"),
        ({"TTL": "25h"}, "Invalid Session TTL"),
        ({"TTL": 30}, "TTL"),
        ({"Behavior": "explode"}, "Invalid Behavior"),
        ({"LockDelay": "61s"}, "LockDelay"),
        ({"LockDelay": "soon"}, "LockDelay"),
        ({"Node": "nowhere"}, "Missing node"),
        ({"NodeChecks": ["nothing"]}, "Missing check"),
        ({"Colour": "red"}, "Colour: Unknown field"),
        ({"lockdelay": True}, "LockDelay"),
        ({"NodeChecks": "serfHealth"}, "NodeChecks"),
        ({"Name": "a", "name": "b"}, "twice"),
        ({"ServiceChecks": [{"ID": ""}]}, "ID"),
    ]:
        with subtests.test(body=body):
            assert_error(client.put("/v1/session/create", json=body), 400, "bad_request", words)
    assert client.get("/v1/session/list").get_json() == []


def test_a_critical_check_refuses_the_session(client):
    r = client.put("/v1/agent/check/register", json={"Name": "hb", "TTL": "30s"})
    assert r.status_code == 200  # a new TTL check starts critical
    body = {"NodeChecks": ["serfHealth", "hb"]}
    assert_error(client.put("/v1/session/create", json=body), 400, "bad_request", "critical")


# -- locks ------------------------------------------------------------------------------------


def test_acquire_release_semantics(client):
    a, b = create(client, {"LockDelay": "0s"}), create(client, {"LockDelay": "0s"})
    assert acquire(client, "svc/leader", a, b"a")
    e = entry(client, "svc/leader")
    assert (e["Session"], e["LockIndex"]) == (a, 1)
    assert not acquire(client, "svc/leader", b, b"b")  # held by another session
    # The holder acquiring again updates the value, not the LockIndex.
    assert acquire(client, "svc/leader", a, b"a2")
    e = entry(client, "svc/leader")
    assert (e["Session"], e["LockIndex"]) == (a, 1)
    assert client.get("/v1/kv/svc/leader?raw").get_data() == b"a2"
    # A plain write leaves the lock alone.
    assert client.put("/v1/kv/svc/leader", data=b"plain").get_json() is True
    assert entry(client, "svc/leader")["Session"] == a
    assert not release(client, "svc/leader", b)  # not the holder
    assert release(client, "svc/leader", a, b"released")
    e = entry(client, "svc/leader")
    assert (e["Session"], e["LockIndex"]) == (None, 1)
    assert client.get("/v1/kv/svc/leader?raw").get_data() == b"released"
    assert acquire(client, "svc/leader", b)
    assert entry(client, "svc/leader")["LockIndex"] == 2
    assert not release(client, "missing", a)
    assert_error(client.put("/v1/kv/x?acquire=no-such-session"), 400, "bad_request", "session")
    assert_error(client.put("/v1/kv/x?acquire="), 400, "bad_request", "session")
    assert entry(client, "x") is None


def test_destroy_releases_and_lock_delay_holds_the_key(client):
    a = create(client, {"LockDelay": "1s"})
    b = create(client, {"LockDelay": "0s"})
    assert acquire(client, "lk", a)
    assert client.put(f"/v1/session/destroy/{a}").get_json() is True
    assert info(client, a) == []
    e = entry(client, "lk")
    assert e["Session"] is None and e["LockIndex"] == 1
    # Within the lock delay, nobody may take it; after it, the next one does.
    assert not acquire(client, "lk", b)
    wait_until(lambda: acquire(client, "lk", b), timeout=5)
    assert entry(client, "lk")["Session"] == b
    assert client.put(f"/v1/session/destroy/{a}").get_json() is True  # already gone: still true


def test_behavior_delete_deletes_the_keys(client):
    a = create(client, {"Behavior": "delete", "LockDelay": "0s"})
    assert acquire(client, "ephemeral/member", a)
    assert acquire(client, "ephemeral/other", a)
    client.put(f"/v1/session/destroy/{a}")
    assert client.get("/v1/kv/ephemeral/?recurse").status_code == 404


def test_a_check_turning_critical_invalidates_the_session(client):
    assert (
        client.put("/v1/agent/check/register", json={"Name": "hb", "TTL": "30s"}).status_code == 200
    )
    assert client.put("/v1/agent/check/pass/hb").status_code == 200
    sid = create(client, {"NodeChecks": ["serfHealth", "hb"], "LockDelay": "0s"})
    other = create(client, {"NodeChecks": ["serfHealth"]})
    assert acquire(client, "leader", sid)
    assert client.put("/v1/agent/check/fail/hb").status_code == 200
    assert info(client, sid) == []
    assert entry(client, "leader")["Session"] is None
    assert info(client, other) != []  # a session not naming the check lives on


def test_removing_a_check_or_the_node_invalidates_its_sessions(client):
    assert (
        client.put("/v1/agent/check/register", json={"Name": "hb", "TTL": "30s"}).status_code == 200
    )
    assert client.put("/v1/agent/check/pass/hb").status_code == 200
    sid = create(client, {"NodeChecks": ["hb"]})
    assert client.put("/v1/agent/check/deregister/hb").status_code == 200
    assert info(client, sid) == []
    node = {
        "Node": "n2",
        "Address": "10.0.0.2",
        "Check": {"CheckID": "serfHealth", "Name": "serf", "Status": "passing"},
    }
    assert client.put("/v1/catalog/register", json=node).get_json() is True
    on_n2 = create(client, {"Node": "n2", "Behavior": "delete"})
    assert acquire(client, "n2-key", on_n2)
    assert client.put("/v1/catalog/deregister", json={"Node": "n2"}).get_json() is True
    assert info(client, on_n2) == []
    assert entry(client, "n2-key") is None


def test_ttl_expiry_and_renew(make_client):
    c = make_client(session_ttl_min="1s", ttl_check_interval=0.05)
    lapsed = create(c, {"TTL": "1s", "LockDelay": "0s"})
    renewed = create(c, {"TTL": "1s"})
    assert acquire(c, "ttl-lock", lapsed)
    start = time.monotonic()
    # Renewed every 0.3 s, a 1 s session outlives the other, which dies after 2 x TTL.
    while info(c, lapsed):
        r = c.put(f"/v1/session/renew/{renewed}")
        assert r.status_code == 200 and r.get_json()[0]["ID"] == renewed
        assert time.monotonic() - start < 10, "the unrenewed session never expired"
        time.sleep(0.3)  # the renewing client's pace, not a synchronization
    assert time.monotonic() - start >= 2.0 - 0.1  # not before 2 x TTL
    assert entry(c, "ttl-lock")["Session"] is None
    assert info(c, renewed) != []
    assert_error(c.put(f"/v1/session/renew/{lapsed}"), 404, "not_found")
    stats = c.get("/v1/agent/self").get_json()
    assert stats["Stats"]["sessions"]["reaper"] == "true"
    assert stats["Config"]["SessionTTLMin"] == 10**9


# -- blocking ---------------------------------------------------------------------------------


def test_blocking_reads_wake_on_session_and_lock_changes(client):
    sid = create(client)
    r = client.get(f"/v1/session/info/{sid}")
    idx = index_of(r)
    waiter = InThread(lambda: client.get(f"/v1/session/info/{sid}?index={idx}&wait=10s")).start()
    kv0 = client.put("/v1/kv/watched", data=b"0")
    assert kv0.get_json() is True
    kidx = index_of(client.get("/v1/kv/watched"))
    key_waiter = InThread(lambda: client.get(f"/v1/kv/watched?index={kidx}&wait=10s")).start()
    assert acquire(client, "watched", sid)
    got = key_waiter.result()
    assert got.get_json()[0]["Session"] == sid and key_waiter.elapsed < 5
    assert client.put(f"/v1/session/destroy/{sid}").get_json() is True
    got = waiter.result()
    assert got.get_json() == [] and waiter.elapsed < 5


# -- ACLs -------------------------------------------------------------------------------------


def test_session_acls_are_node_rules(make_client):
    c = make_client(**DENY)
    root = bootstrap(c)["SecretID"]

    def token(rules: str) -> str:
        r = c.put(
            "/v1/acl/policy",
            json={"Name": f"p{abs(hash(rules))}", "Rules": rules},
            headers=tok(root),
        )
        assert r.status_code == 200, r.get_data(as_text=True)
        return create_token(c, root, [{"ID": r.get_json()["ID"]}])["SecretID"]

    writer = token(f'session "{NODE}" {{ policy = "write" }}\nkey_prefix "" {{ policy = "write" }}')
    reader = token('session_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }')
    assert_error(c.put("/v1/session/create", json={}, headers=tok(reader)), 403)
    sid = create(c, {}, headers=tok(writer))
    assert c.put(f"/v1/kv/app?acquire={sid}", headers=tok(writer)).get_json() is True
    assert [s["ID"] for s in c.get("/v1/session/list", headers=tok(reader)).get_json()] == [sid]
    anon = c.get("/v1/session/list")
    assert anon.get_json() == [] and anon.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    assert_error(c.put(f"/v1/session/destroy/{sid}", headers=tok(reader)), 403)
    assert_error(c.put(f"/v1/session/renew/{sid}", headers=tok(reader)), 403)
    assert c.put(f"/v1/session/destroy/{sid}", headers=tok(writer)).get_json() is True


def test_service_checks_bind_the_session_to_the_service(client):
    body = {"Name": "web", "ID": "web-1", "Check": {"CheckID": "web-ttl", "TTL": "30s"}}
    assert client.put("/v1/agent/service/register", json=body).status_code == 200
    assert client.put("/v1/agent/check/pass/web-ttl").status_code == 200
    sid = create(client, {"servicechecks": [{"id": "web-ttl", "namespace": ""}]})
    [s] = info(client, sid)
    assert s["ServiceChecks"] == [{"ID": "web-ttl", "Namespace": ""}]
    assert s["NodeChecks"] == ["serfHealth"]  # still the default, as in Consul
    assert acquire(client, "web/leader", sid)
    assert client.put("/v1/agent/service/deregister/web-1").status_code == 200
    assert info(client, sid) == []
    assert entry(client, "web/leader")["Session"] is None
