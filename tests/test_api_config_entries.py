"""``/v1/config`` (issue 15, item 4): service-defaults and proxy-defaults kept as written,
service-intentions backed by the intentions store, ``?cas=``, blocking reads, the kinds
Trellis does not take. On SQLite and on PostgreSQL (``client``)."""

from __future__ import annotations

from tests import api_fixtures
from tests.api_fixtures import InThread, assert_error, index_of, parked, wait_until

client = api_fixtures.client
make_client = api_fixtures.make_client


def ok(resp, status: int = 200):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    return resp


def put(c, body: dict, **query):
    return c.put("/v1/config", json=body, query_string=query)


def test_service_defaults_crud_and_cas(client):
    assert ok(put(client, {"Kind": "service-defaults", "Name": "web", "Protocol": "http"})).json
    r = ok(client.get("/v1/config/service-defaults/web"))
    entry = r.get_json()
    assert (entry["Kind"], entry["Name"], entry["Protocol"]) == ("service-defaults", "web", "http")
    assert entry["CreateIndex"] == entry["ModifyIndex"] == index_of(r)
    first = entry["ModifyIndex"]
    # A stale cas changes nothing and answers false; the right one applies.
    assert ok(put(client, {"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"},
                  cas=first + 999)).json is False  # fmt: skip
    assert ok(client.get("/v1/config/service-defaults/web")).json["Protocol"] == "http"
    assert ok(put(client, {"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"},
                  cas=first)).json is True  # fmt: skip
    entry = ok(client.get("/v1/config/service-defaults/web")).json
    assert entry["Protocol"] == "grpc"
    assert (entry["CreateIndex"], entry["ModifyIndex"] > first) == (first, True)
    # cas=0: only if there is none.
    body = {"Kind": "service-defaults", "Name": "db", "Protocol": "tcp"}
    assert ok(put(client, body, cas=0)).json is True
    assert ok(put(client, body, cas=0)).json is False
    names = [e["Name"] for e in ok(client.get("/v1/config/service-defaults")).json]
    assert names == ["db", "web"]
    # Deletion: {} without cas, a bool with it; a missing entry is a 404 afterwards.
    modify = ok(client.get("/v1/config/service-defaults/web")).json["ModifyIndex"]
    assert ok(client.delete(f"/v1/config/service-defaults/web?cas={modify + 1}")).json is False
    assert ok(client.delete(f"/v1/config/service-defaults/web?cas={modify}")).json is True
    assert_error(client.get("/v1/config/service-defaults/web"), 404, "not_found", "not found")
    assert ok(client.delete("/v1/config/service-defaults/db")).json == {}
    assert ok(client.get("/v1/config/service-defaults")).json == []


def test_proxy_defaults_is_global_and_kept_as_written(client):
    body = {
        "Kind": "proxy-defaults",
        "Name": "global",
        "Config": {"local_connect_timeout_ms": 1000, "handshake_timeout_ms": 10000},
        "Mode": "direct",
        "Meta": {"team": "core"},
    }
    assert ok(put(client, body)).json is True
    got = ok(client.get("/v1/config/proxy-defaults/global")).json
    assert {k: got[k] for k in body} == body
    assert_error(put(client, {**body, "Name": "other"}), 400, "bad_request", "'global'")


def test_bad_entries_and_unsupported_kinds_are_400s(client, subtests):
    cases = [
        ({"Kind": "ingress-gateway", "Name": "gw"}, "service-intentions, proxy-defaults"),
        ({"Name": "web"}, "Kind is required"),
        ({"Kind": "service-defaults"}, "Name is required"),
        ({"Kind": "service-defaults", "Name": "web", "Protocol": "smtp"}, "Protocol"),
        ({"Kind": "service-defaults", "Name": "web", "Colour": "red"}, "Colour"),
        ({"Kind": "service-defaults", "Name": "bad name!"}, "not valid"),
        ({"Kind": "service-defaults", "Name": "web", "Meta": {"a": 1}}, "Meta"),
        ({"Kind": "proxy-defaults", "Name": "global", "Config": []}, "Config"),
        ({"Kind": "service-intentions", "Name": "db",
          "Sources": [{"Name": "web", "Permissions": []}]}, "L7"),
        ({"Kind": "service-intentions", "Name": "db",
          "Sources": [{"Name": "web", "Action": "maybe"}]}, "Action"),
        ({"Kind": "service-intentions", "Name": "db",
          "Sources": [{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}]},
         "twice"),
    ]  # fmt: skip
    for body, words in cases:
        with subtests.test(body=body):
            assert_error(put(client, body), 400, "bad_request", words)
    assert_error(client.get("/v1/config/mesh"), 400, "bad_request", "not supported")
    assert_error(client.get("/v1/config/ingress-gateway/gw"), 400, "bad_request", "supported")
    assert_error(client.put("/v1/config?cas=x", json={}), 400, "bad_request", "cas")


def test_service_intentions_are_the_intentions(client):
    """An entry's Sources are the intentions to its destination: a write through either API
    is read through the other."""
    ok(client.put("/v1/connect/intentions/exact?source=api&destination=db",
                  json={"Action": "deny", "Description": "native"}))  # fmt: skip
    entry = ok(client.get("/v1/config/service-intentions/db")).json
    assert [(s["Name"], s["Action"], s["Description"]) for s in entry["Sources"]] == [
        ("api", "deny", "native")
    ]
    native_id = entry["Sources"][0]["LegacyID"]
    body = {
        "Kind": "service-intentions",
        "Name": "db",
        "Sources": [
            {"Name": "web", "Action": "allow", "Description": "from config"},
            {"Name": "api", "Action": "allow"},
            {"Name": "*", "Action": "deny"},
        ],
    }
    assert ok(put(client, body)).json is True
    rows = ok(client.get("/v1/connect/intentions")).json
    got = sorted((r["SourceName"], r["DestinationName"], r["Action"]) for r in rows)
    assert got == [("*", "db", "deny"), ("api", "db", "allow"), ("web", "db", "allow")]
    # The intention that was there kept its ID (replaced in place, not deleted and re-made).
    assert ok(client.get(f"/v1/connect/intentions/{native_id}")).json["Action"] == "allow"
    check = ok(client.get("/v1/connect/intentions/check?source=web&destination=db")).json
    assert check == {"Allowed": True}
    # Sources are listed in precedence order, exact names first.
    entry = ok(client.get("/v1/config/service-intentions/db")).json
    assert [s["Name"] for s in entry["Sources"]] == ["api", "web", "*"]
    # A PUT without a source removes its intention; a native delete removes the source.
    body["Sources"] = body["Sources"][:2]
    assert ok(put(client, body)).json is True
    ok(client.delete("/v1/connect/intentions/exact?source=api&destination=db"))
    entry = ok(client.get("/v1/config/service-intentions/db")).json
    assert [s["Name"] for s in entry["Sources"]] == ["web"]
    listed = ok(client.get("/v1/config/service-intentions")).json
    assert [e["Name"] for e in listed] == ["db"]
    # cas against the destination's entry; deletion removes every intention to it.
    modify = entry["ModifyIndex"]
    assert ok(put(client, {**body, "Sources": []}, cas=modify + 5)).json is False
    assert ok(client.delete(f"/v1/config/service-intentions/db?cas={modify}")).json is True
    assert ok(client.get("/v1/connect/intentions")).json == []
    assert_error(client.get("/v1/config/service-intentions/db"), 404, "not_found")


def test_entry_reads_block_until_the_entry_changes(client):
    ok(put(client, {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}))
    r = ok(client.get("/v1/config/service-defaults/web"))
    idx = index_of(r)
    q = InThread(lambda: client.get(f"/v1/config/service-defaults/web?index={idx}&wait=20s"))
    q.start()
    wait_until(lambda: parked(client) >= 1 or q.done(), timeout=10)
    assert not q.done()
    ok(put(client, {"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"}))
    r = ok(q.result())
    assert (r.get_json()["Protocol"], index_of(r) > idx) == ("grpc", True)
    # service-intentions: woken by a native intention write.
    r = client.get("/v1/config/service-intentions")
    idx = index_of(r)
    q = InThread(lambda: client.get(f"/v1/config/service-intentions?index={idx}&wait=20s"))
    q.start()
    wait_until(lambda: parked(client) >= 1 or q.done(), timeout=10)
    assert not q.done()
    ok(client.put("/v1/connect/intentions/exact?source=a&destination=b", json={"Action": "allow"}))
    r = ok(q.result())
    assert [e["Name"] for e in r.get_json()] == ["b"]


def test_concurrent_writes_to_one_kind_all_land(client):
    """Entries of one kind share a document written with compare-and-set: writers that race
    retry, and no acknowledged write is lost."""
    names = [f"svc-{i}" for i in range(8)]
    threads = [
        InThread(lambda n=n: put(client, {"Kind": "service-defaults", "Name": n})).start()
        for n in names
    ]
    for t in threads:
        assert ok(t.result()).get_json() is True
    listed = [e["Name"] for e in ok(client.get("/v1/config/service-defaults")).json]
    assert listed == sorted(names)


def test_a_restore_renumbers_entry_indexes_and_keeps_cas_honest(client):
    """An entry's indexes are its document's, which a snapshot restore renumbers above every
    index a client saw before it: a cas read before the restore no longer matches."""
    ok(put(client, {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}))
    ok(put(client, {"Kind": "service-defaults", "Name": "db", "Protocol": "tcp"}))
    before = ok(client.get("/v1/config/service-defaults/web")).json
    archive = ok(client.get("/v1/snapshot")).data
    ok(put(client, {"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"}))
    seen = ok(client.get("/v1/config/service-defaults/web")).json["ModifyIndex"]
    ok(client.put("/v1/snapshot", data=archive))
    after = ok(client.get("/v1/config/service-defaults/web")).json
    assert after["Protocol"] == "http"
    assert after["CreateIndex"] == after["ModifyIndex"] > seen
    body = {"Kind": "service-defaults", "Name": "web", "Protocol": "tcp"}
    assert ok(put(client, body, cas=before["ModifyIndex"])).json is False
    assert ok(put(client, body, cas=after["ModifyIndex"])).json is True


def test_system_list_reads_a_prefix_in_one_snapshot(client):
    store = client.application.extensions["trellis"].store
    idx = store.system_write({"config/a/x": {"v": 1}, "config/a/y": {"v": 2}, "config/ab": {}})
    store.system_write({"config/a/y": {"v": 3}})
    got = store.system_list("config/a/")
    assert [(k, v) for k, v, _, _ in got] == [("config/a/x", {"v": 1}), ("config/a/y", {"v": 3})]
    (_, _, created, modified) = got[1]
    assert created == idx < modified
    assert store.system_list("config/%") == []  # no wildcard: the prefix is taken literally
