"""``PUT /v1/txn`` through the HTTP API, on SQLite and on PostgreSQL (``store_url``).

Consul's semantics (api-docs/txn): every operation runs in one transaction, in order; any
failure (a check, a stale CAS, a lock, a permission) is an error entry ``{OpIndex, What}``
and nothing is written (409); at most 128 operations (413 beyond); a malformed operation is
a 400.
"""

from __future__ import annotations

import base64

import pytest

from tests import api_fixtures
from tests.api_fixtures import (
    NODE,
    InThread,
    assert_error,
    current_index,
    index_of,
    parked,
    wait_until,
)
from tests.test_acl_api import DENY, bootstrap, create_token, tok

client = api_fixtures.client
make_client = api_fixtures.make_client


def b64(v: bytes) -> str:
    return base64.b64encode(v).decode()


def kv(verb: str, key: str, value: bytes | None = None, **extra) -> dict:
    op: dict = {"Verb": verb, "Key": key, **extra}
    if value is not None:
        op["Value"] = b64(value)
    return {"KV": op}


def txn(c, ops, status: int = 200, **kw) -> dict:
    r = c.put("/v1/txn", json=ops, **kw)
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    return r.get_json()


def value(c, key: str) -> bytes | None:
    r = c.get(f"/v1/kv/{key}")
    if r.status_code == 404:
        return None
    return base64.b64decode(r.get_json()[0]["Value"] or "")


def session(c) -> str:
    r = c.put("/v1/session/create", json={"LockDelay": "0s"})
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["ID"]


# -- K/V verbs -----------------------------------------------------------------------------------


def test_set_get_and_get_tree(client):
    out = txn(
        client, [kv("set", "app/a", b"1", Flags=7), kv("set", "app/b", b"2"), kv("get", "app/a")]
    )
    assert out["Errors"] is None
    set_a, set_b, got = (r["KV"] for r in out["Results"])
    # Consul blanks the value of every result but a get's.
    assert set_a["Value"] is None and set_a["Flags"] == 7
    assert got["Value"] == b64(b"1") and got["ModifyIndex"] == set_a["ModifyIndex"]
    # One transaction, one index.
    assert set_a["ModifyIndex"] == set_b["ModifyIndex"]
    tree = txn(client, [kv("get-tree", "app/")])["Results"]
    assert [(r["KV"]["Key"], r["KV"]["Value"]) for r in tree] == [
        ("app/a", b64(b"1")),
        ("app/b", b64(b"2")),
    ]
    assert value(client, "app/b") == b"2"


def test_cas_check_index_and_check_not_exists(client):
    [r] = txn(client, [kv("cas", "k", b"1", Index=0)])["Results"]  # 0: create only
    idx = r["KV"]["ModifyIndex"]
    out = txn(client, [kv("cas", "k", b"2", Index=0)], 409)
    assert out == {
        "Results": None,
        "Errors": [{"OpIndex": 0, "What": 'failed to set key "k", index is stale'}],
    }
    txn(client, [kv("check-index", "k", Index=idx), kv("cas", "k", b"3", Index=idx)])
    assert value(client, "k") == b"3"
    out = txn(client, [kv("check-index", "k", Index=idx)], 409)
    assert "current modify index" in out["Errors"][0]["What"]
    assert txn(client, [kv("check-not-exists", "nope")])["Results"] == []
    out = txn(client, [kv("check-not-exists", "k")], 409)
    assert out["Errors"] == [{"OpIndex": 0, "What": 'key "k" exists'}]
    out = txn(client, [kv("get", "nope")], 409)
    assert out["Errors"] == [{"OpIndex": 0, "What": 'key "nope" doesn\'t exist'}]
    # get-or-empty: the entry, or one with only the key.
    empty, full = txn(client, [kv("get-or-empty", "nope"), kv("get-or-empty", "k")])["Results"]
    assert (empty["KV"]["Key"], empty["KV"]["Value"], empty["KV"]["ModifyIndex"]) == (
        "nope",
        None,
        0,
    )
    assert full["KV"]["Value"] == b64(b"3")


def test_deletes(client):
    txn(client, [kv("set", f"d/{i}", b"x") for i in range(3)] + [kv("set", "keep", b"x")])
    [r] = txn(client, [kv("get", "d/0")])["Results"]
    idx = r["KV"]["ModifyIndex"]
    txn(client, [kv("delete-cas", "d/0", Index=idx + 1)], 409)
    assert value(client, "d/0") == b"x"
    assert txn(client, [kv("delete-cas", "d/0", Index=idx), kv("delete", "d/1")])["Results"] == []
    assert (value(client, "d/0"), value(client, "d/1"), value(client, "d/2")) == (None, None, b"x")
    txn(client, [kv("delete-tree", "d/")])
    assert value(client, "d/2") is None and value(client, "keep") == b"x"


def test_lock_unlock_check_session(client):
    a, b = session(client), session(client)
    [r] = txn(client, [kv("lock", "leader", b"a", Session=a)])["Results"]
    assert (r["KV"]["Session"], r["KV"]["LockIndex"]) == (a, 1)
    txn(client, [kv("check-session", "leader", Session=a)])
    out = txn(client, [kv("lock", "leader", b"b", Session=b)], 409)
    assert out["Errors"][0]["What"] == 'failed to lock key "leader", lock is already held'
    out = txn(client, [kv("unlock", "leader", b"", Session=b)], 409)
    assert "lock isn't held" in out["Errors"][0]["What"]
    txn(client, [kv("check-session", "leader", Session=b)], 409)
    out = txn(client, [kv("lock", "x", Session="no-such-session")], 409)
    assert "no-such-session" in out["Errors"][0]["What"]
    txn(client, [kv("unlock", "leader", b"free", Session=a)])
    [r] = txn(client, [kv("get", "leader")])["Results"]
    assert r["KV"]["Session"] is None and r["KV"]["Value"] == b64(b"free")
    txn(client, [kv("check-session", "leader")])  # no session: checks that none holds it


# -- all-or-nothing ------------------------------------------------------------------------------


def test_failing_check_index_rolls_back_earlier_sets(client):
    txn(client, [kv("set", "guard", b"g")])
    before = current_index(client)
    ops = [
        kv("set", "a", b"1"),
        kv("delete", "guard"),
        {"Node": {"Verb": "set", "Node": {"Node": "n1", "Address": "10.0.0.1"}}},
        kv("check-index", "guard", Index=1),
        kv("check-not-exists", "guard"),
    ]
    out = txn(client, ops, 409)
    # Every failure is reported, each at its position, as Consul does.
    assert [e["OpIndex"] for e in out["Errors"]] == [3]
    assert value(client, "a") is None and value(client, "guard") == b"g"
    assert client.get("/v1/catalog/node/n1").get_json() is None
    assert current_index(client) == before  # no index taken, nothing published


def test_every_failure_is_listed(client):
    out = txn(client, [kv("get", "x"), kv("set", "y", b""), kv("check-index", "z", Index=3)], 409)
    assert [e["OpIndex"] for e in out["Errors"]] == [0, 2]


def test_at_most_128_operations(client):
    txn(client, [kv("set", f"n/{i}", b"v") for i in range(128)])
    assert len(client.get("/v1/kv/n/?keys").get_json()) == 128
    r = client.put("/v1/txn", json=[kv("set", f"m/{i}", b"v") for i in range(129)])
    assert_error(r, 413, contains="too many operations (129 > 128)")
    assert client.get("/v1/kv/m/?keys").status_code == 404


@pytest.mark.parametrize(
    ("body", "contains"),
    [
        ({"KV": {}}, "JSON list"),
        ([{"KV": {"Verb": "frob", "Key": "k"}}], "unknown KV verb"),
        ([{"KV": {"Verb": "get", "Key": "k"}, "Node": {}}], "exactly one"),
        ([{"Session": {}}], "exactly one"),
        ([{"KV": {"Verb": "get", "Key": "k", "Colour": 1}}], "unknown field 'Colour'"),
        (["set"], "must be a JSON object"),
        ([{"KV": {"Verb": "set", "Key": "k", "Value": "!!"}}], "base64"),
        ([{"KV": {"Verb": "set"}}], "Missing key name"),
        ([{"KV": {"Verb": "set", "Key": "a/../b"}}], "segments"),
        ([{"KV": {"Verb": "cas", "Key": "k", "Index": -1}}], "Index"),
        ([{"KV": {"Verb": "set", "Key": "k", "Flags": "7"}}], "Flags"),
        ([{"KV": {"Verb": "lock", "Key": "k"}}], "Session"),
        ([{"Node": {"Verb": "set", "Node": {"Address": "x"}}}], "Node"),
        ([{"Service": {"Verb": "set", "Node": "n", "Service": {}}}], "Name"),
        ([{"Check": {"Verb": "set", "Check": {"Node": "n"}}}], "CheckID"),
        (
            [{"Check": {"Verb": "set", "Check": {"Node": "n", "CheckID": "c", "Status": "ok"}}}],
            "Status",
        ),
        (
            [{"Service": {"Verb": "set", "Node": "n", "Service": {"Service": "s", "Port": "80"}}}],
            "Port",
        ),
        (
            [{"Service": {"Verb": "set", "Node": "n", "Service": {"Service": "s", "Tags": "a"}}}],
            "Tags",
        ),
        ([{"Service": {"Verb": "set", "Node": "n", "Service": {"Service": "s", "X": 1}}}], "X"),
        ([{"Node": {"Verb": "set", "Node": {"Node": "n", "Meta": {"k": 1}}}}], "Meta"),
        ([{"Node": {"Verb": "set", "Node": {"Node": "n", "Meta": {"bad key": "v"}}}}], "Meta"),
        (
            [{"Check": {"Verb": "set", "Check": {"Node": "n", "CheckID": "c", "TTL": "zz"}}}],
            "TTL",
        ),
        (
            [{"Check": {"Verb": "set", "Check": {"Node": "n", "CheckID": "c", "Definition": []}}}],
            "Definition",
        ),
    ],
)
def test_malformed_is_a_400_and_writes_nothing(client, body, contains):
    before = current_index(client)
    assert_error(client.put("/v1/txn", json=body), 400, contains=contains)
    assert current_index(client) == before


def test_value_above_the_kv_limit_is_a_413(make_client):
    c = make_client(kv_max_value_size=16)
    assert_error(c.put("/v1/txn", json=[kv("set", "k", b"x" * 17)]), 413)


# -- node, service and check verbs ---------------------------------------------------------------


def node_op(verb: str, name: str, **fields) -> dict:
    return {"Node": {"Verb": verb, "Node": {"Node": name, **fields}}}


def svc_op(verb: str, node: str, **fields) -> dict:
    return {"Service": {"Verb": verb, "Node": node, "Service": fields}}


def check_op(verb: str, node: str, check_id: str, **fields) -> dict:
    return {"Check": {"Verb": verb, "Check": {"Node": node, "CheckID": check_id, **fields}}}


def test_catalog_verbs(client):
    out = txn(
        client,
        [
            node_op("set", "n1", Address="10.0.0.1", Meta={"rack": "r1"}),
            svc_op("set", "n1", ID="web-1", Service="web", Port=80, Tags=["v1"]),
            check_op("set", "n1", "web-alive", Name="alive", ServiceID="web-1", Status="passing"),
            kv("set", "cfg/web", b"on"),
        ],
    )
    node, svc, chk, _ = out["Results"]
    assert node["Node"]["Meta"] == {"rack": "r1"}
    assert (svc["Service"]["Service"], svc["Service"]["Port"]) == ("web", 80)
    assert (chk["Check"]["ServiceName"], chk["Check"]["Status"]) == ("web", "passing")
    idx = node["Node"]["ModifyIndex"]
    assert svc["Service"]["ModifyIndex"] == chk["Check"]["ModifyIndex"] == idx
    [h] = client.get("/v1/health/service/web?passing").get_json()
    assert h["Node"]["Node"] == "n1" and h["Service"]["Tags"] == ["v1"]

    got = txn(client, [node_op("get", "n1"), svc_op("get", "n1", ID="web-1")])["Results"]
    assert got[0]["Node"]["Address"] == "10.0.0.1" and got[1]["Service"]["ID"] == "web-1"
    out = txn(client, [node_op("cas", "n1", Address="10.0.0.2", ModifyIndex=idx - 1)], 409)
    assert out["Errors"][0]["What"] == 'failed to set node "n1", index is stale'
    txn(client, [node_op("cas", "n1", Address="10.0.0.2", ModifyIndex=idx)])
    out = txn(client, [svc_op("delete-cas", "n1", ID="web-1", ModifyIndex=idx - 1)], 409)
    assert "index is stale" in out["Errors"][0]["What"]
    txn(client, [check_op("delete", "n1", "web-alive"), svc_op("delete", "n1", ID="web-1")])
    assert client.get("/v1/catalog/service/web").get_json() == []
    out = txn(client, [svc_op("get", "n1", ID="web-1")], 409)
    assert out["Errors"][0]["What"] == 'service "web-1" on node "n1" doesn\'t exist'
    out = txn(client, [svc_op("set", "ghost", ID="s", Service="s")], 409)
    assert "Missing node registration" in out["Errors"][0]["What"]
    out = txn(client, [check_op("set", "n1", "c", ServiceID="nope")], 409)
    assert "Missing service registration" in out["Errors"][0]["What"]
    [r] = txn(client, [node_op("get", "n1")])["Results"]
    # A node's ID names it for get and delete, and takes precedence over the name.
    by_id = {"Node": {"Verb": "get", "Node": {"ID": r["Node"]["ID"]}}}
    assert txn(client, [by_id])["Results"] == [r]
    by_id = {"Node": {"Verb": "delete-cas", "Node": {"ID": r["Node"]["ID"], "Node": "other"}}}
    by_id["Node"]["Node"]["ModifyIndex"] = r["Node"]["ModifyIndex"]
    txn(client, [by_id])
    assert client.get("/v1/catalog/node/n1").get_json() is None


# -- indexes and blocking readers ----------------------------------------------------------------


def test_read_only_transactions_carry_the_index_headers(client):
    r = client.put("/v1/txn", json=[kv("set", "k", b"v")])
    assert "X-Consul-Index" not in r.headers
    idx = r.get_json()["Results"][0]["KV"]["ModifyIndex"]
    r = client.put("/v1/txn", json=[kv("get", "k"), kv("check-index", "k", Index=idx)])
    assert r.status_code == 200 and index_of(r) == current_index(client)
    assert r.headers["X-Consul-KnownLeader"] == "true"


def test_blocking_readers_of_every_touched_key_and_service_wake_with_its_one_index(client):
    txn(
        client,
        [kv("set", "w/a", b"0"), kv("set", "w/b", b"0"), node_op("set", "n1", Address="10.0.0.1")],
    )
    ka, kb = index_of(client.get("/v1/kv/w/a")), index_of(client.get("/v1/kv/w/b"))
    si = index_of(client.get("/v1/catalog/service/web"))
    store = client.application.extensions["trellis"].store
    before = current_index(client)
    waiters = [
        InThread(lambda: client.get(f"/v1/kv/w/a?index={ka}&wait=10s")).start(),
        InThread(lambda: client.get(f"/v1/kv/w/b?index={kb}&wait=10s")).start(),
        InThread(lambda: client.get(f"/v1/catalog/service/web?index={si}&wait=10s")).start(),
    ]
    wait_until(lambda: parked(client) == 3, timeout=10)
    out = txn(
        client,
        [
            kv("set", "w/a", b"1"),
            kv("set", "w/b", b"1"),
            svc_op("set", "n1", ID="web", Service="web", Port=1),
        ],
    )
    idx = out["Results"][0]["KV"]["ModifyIndex"]
    assert idx == before + 1  # one index for the whole transaction
    for w in waiters:
        r = w.result()
        assert index_of(r) == idx and w.elapsed < 5
    assert waiters[2].result().get_json()[0]["ServiceID"] == "web"
    # Every change the transaction recorded (what other processes' followers publish) has
    # that one index: readers anywhere wake once for it.
    changes = store.read_changes_after(before)
    assert {c.index for c in changes} == {idx}
    assert {("kv", "w/a"), ("kv", "w/b"), ("catalog", "svc/web")} <= {
        (c.topic, c.key) for c in changes
    }


# -- ACLs ----------------------------------------------------------------------------------------


def test_acl_per_operation(make_client):
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

    txn(
        c,
        [
            kv("set", "app/x", b"0"),
            kv("set", "secret/x", b"s"),
            node_op("set", "n1", Address="10.0.0.1"),
            svc_op("set", "n1", ID="db", Service="db"),
        ],
        headers=tok(root),
    )
    t = token(
        'key_prefix "app/" { policy = "write" }\n'
        'node_prefix "" { policy = "read" }\n'
        'service "web" { policy = "write" }\n'
    )
    # A denied K/V write: an error entry for that operation, nothing of the others written.
    out = txn(c, [kv("set", "app/x", b"1"), kv("set", "secret/x", b"2")], 409, headers=tok(t))
    assert out["Errors"] == [{"OpIndex": 1, "What": "Permission denied"}]
    get = lambda k: txn(c, [kv("get", k)], headers=tok(root))["Results"][0]["KV"]["Value"]  # noqa: E731
    assert (get("app/x"), get("secret/x")) == (b64(b"0"), b64(b"s"))
    # check-index reveals the key: key:read needed.
    out = txn(c, [kv("check-index", "secret/x", Index=1)], 409, headers=tok(t))
    assert out["Errors"] == [{"OpIndex": 0, "What": "Permission denied"}]
    out = txn(c, [kv("delete-tree", "")], 409, headers=tok(t))
    assert out["Errors"][0]["What"] == "Permission denied"
    # Catalog writes: service:write on the service, node:write on the node.
    out = txn(
        c,
        [
            kv("set", "app/y", b"1"),
            svc_op("set", "n1", ID="web", Service="web"),
            node_op("set", "n1"),
        ],
        409,
        headers=tok(t),
    )
    assert out["Errors"] == [{"OpIndex": 2, "What": "Permission denied"}]
    # Renaming db (which the token may not write) into web is refused, as is deleting it.
    out = txn(c, [svc_op("set", "n1", ID="db", Service="web")], 409, headers=tok(t))
    assert out["Errors"][0]["What"] == "Permission denied"
    txn(c, [svc_op("delete", "n1", ID="db", Service="web")], 409, headers=tok(t))
    assert [
        s["ServiceID"] for s in c.get("/v1/catalog/service/db", headers=tok(root)).get_json()
    ] == ["db"]
    # A proxy for db (which the token may not write) would intercept db's traffic.
    proxy = svc_op(
        "set",
        "n1",
        ID="web-proxy",
        Service="web",
        Kind="connect-proxy",
        Proxy={"DestinationServiceName": "db"},
    )
    out = txn(c, [proxy], 409, headers=tok(t))
    assert out["Errors"] == [{"OpIndex": 0, "What": "Permission denied"}]
    out = txn(
        c, [kv("set", "app/y", b"1"), svc_op("set", "n1", ID="web", Service="web")], headers=tok(t)
    )
    assert len(out["Results"]) == 2
    # Reads are filtered, as Consul filters them, and the header says so.
    r = c.put("/v1/txn", json=[kv("get-tree", "")], headers=tok(t))
    assert r.status_code == 200
    assert [x["KV"]["Key"] for x in r.get_json()["Results"]] == ["app/x", "app/y"]
    assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    # The anonymous token may do nothing.
    out = txn(c, [kv("set", "app/z", b"1")], 409)
    assert out["Errors"][0]["What"] == "Permission denied"


def test_dc_other_than_ours_is_refused(client):
    r = client.put("/v1/txn?dc=elsewhere", json=[kv("set", "k", b"v")])
    assert_error(r, 400, contains="No path to datacenter")
    assert value(client, "k") is None
    assert client.put("/v1/txn?dc=dc1", json=[kv("set", "k", b"v")]).status_code == 200
    assert value(client, "k") == b"v"


def test_the_node_of_this_server_is_usable(client):
    # The server's own node (registered at start) takes services through a transaction.
    txn(client, [svc_op("set", NODE, ID="api", Service="api", Port=8080)])
    assert client.get("/v1/catalog/service/api").get_json()[0]["ServicePort"] == 8080
