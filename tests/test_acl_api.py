"""The ACL endpoints (``/v1/acl/*``) and how tokens reach every other endpoint, in-process, on
SQLite and on PostgreSQL, every response checked against openapi.yaml.

Covers bootstrap (once), policies and tokens (create, read, update, delete, list), ``token/self``,
the two ways to send a token (``X-Consul-Token``, ``Authorization: Bearer``), unknown tokens,
secrets (shown once, stored as a SHA-256, never logged), rules in HCL and JSON, the builtin
policy and token, ACLs disabled, and the default policy (which intentions fall back on too).
Which token may call which endpoint is ``tests/test_acl_matrix.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path

import pytest

from tests import api_fixtures
from tests.api_fixtures import assert_error, index_of
from trellis.api.acl.service import ANONYMOUS_ACCESSOR, MANAGEMENT_POLICY_ID
from trellis.api.store import POSTGRESQL, SQLITE, store_kind

make_client = api_fixtures.make_client

DENY = {"acl_enabled": True, "acl_default_policy": "deny"}
ALLOW = {"acl_enabled": True, "acl_default_policy": "allow"}
MANAGEMENT = {"ID": MANAGEMENT_POLICY_ID, "Name": "global-management"}
TOKEN_KEYS = {
    "AccessorID",
    "Description",
    "Policies",
    "Local",
    "CreateTime",
    "CreateIndex",
    "ModifyIndex",
}
KV_APP_WRITE_HCL = 'key_prefix "app/" {\n  policy = "write"\n}\n'
KV_APP_WRITE_JSON = json.dumps({"key_prefix": {"app/": {"policy": "write"}}})


@pytest.fixture
def acl_client(make_client):
    """The app with ACLs on and the default policy deny (a production configuration)."""
    return make_client(**DENY)


def tok(secret: str) -> dict[str, str]:
    return {"X-Consul-Token": secret}


def bootstrap(client) -> dict:
    r = client.put("/v1/acl/bootstrap")
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def raise_unless(r, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))


def create_token(client, secret: str, policies: list[dict], **extra) -> dict:
    body = {"Description": "test", "Policies": policies, **extra}
    r = client.put("/v1/acl/token", json=body, headers=tok(secret))
    raise_unless(r, 200)
    return r.get_json()


def store_of(client):
    return client.application.extensions["trellis"].store


# -- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_once_then_refused(acl_client):
    c = acl_client
    boot = bootstrap(c)
    assert set(boot) == TOKEN_KEYS | {"SecretID"}
    assert str(uuid.UUID(boot["AccessorID"])) == boot["AccessorID"]
    assert str(uuid.UUID(boot["SecretID"])) == boot["SecretID"]
    assert boot["AccessorID"] != boot["SecretID"]
    assert boot["Description"] == "Bootstrap Token (Global Management)"
    assert boot["Policies"] == [MANAGEMENT]
    assert boot["Local"] is False
    assert boot["CreateTime"].endswith("Z")
    # The bootstrap token is a management token.
    r = c.get("/v1/acl/tokens", headers=tok(boot["SecretID"]))
    raise_unless(r, 200)
    assert {t["AccessorID"] for t in r.get_json()} == {ANONYMOUS_ACCESSOR, boot["AccessorID"]}

    before = store_of(c).current_index()
    for headers in ({}, tok(boot["SecretID"])):
        r = c.put("/v1/acl/bootstrap", headers=headers)
        assert_error(r, 403, "permission_denied", "ACL bootstrap no longer allowed")
    assert store_of(c).current_index() == before
    assert len(store_of(c).acl_tokens()) == 2


def test_builtins_exist_before_bootstrap_and_anonymous_is_powerless(acl_client):
    c = acl_client
    r = c.get("/v1/acl/token/self")
    raise_unless(r, 200)
    assert r.get_json()["AccessorID"] == ANONYMOUS_ACCESSOR
    assert r.get_json()["Description"] == "Anonymous Token"
    assert r.get_json()["Policies"] == []
    assert "SecretID" not in r.get_json()
    assert_error(c.get("/v1/acl/policies"), 403, "permission_denied", "acl:read")
    assert_error(c.put("/v1/kv/k", data=b"v"), 403, "permission_denied", "key:write")
    assert_error(c.get("/v1/kv/k"), 403, "permission_denied", "key:read")
    # Consul's well-known secret of the anonymous token names the same token.
    r = c.get("/v1/acl/token/self", headers=tok("anonymous"))
    assert r.get_json()["AccessorID"] == ANONYMOUS_ACCESSOR


# -- policies --------------------------------------------------------------------------------


def test_policy_create_read_update_delete_list(acl_client):
    c = acl_client
    root = bootstrap(c)["SecretID"]
    h = tok(root)
    r = c.put(
        "/v1/acl/policy",
        json={"Name": "app-kv", "Description": "app keys", "Rules": KV_APP_WRITE_HCL},
        headers=h,
    )
    raise_unless(r, 200)
    p = r.get_json()
    assert set(p) == {
        "ID",
        "Name",
        "Description",
        "Rules",
        "Datacenters",
        "CreateIndex",
        "ModifyIndex",
    }
    assert (p["Name"], p["Description"], p["Rules"], p["Datacenters"]) == (
        "app-kv",
        "app keys",
        KV_APP_WRITE_HCL,
        [],
    )
    assert str(uuid.UUID(p["ID"])) == p["ID"]
    assert p["CreateIndex"] == p["ModifyIndex"] > 0

    r = c.get(f"/v1/acl/policy/{p['ID']}", headers=h)
    raise_unless(r, 200)
    assert r.get_json() == p
    assert index_of(r) == p["ModifyIndex"]
    r = c.get("/v1/acl/policy/name/app-kv", headers=h)
    assert r.get_json() == p

    # Update: the whole new state; the ID stays, CreateIndex stays, ModifyIndex moves.
    r = c.put(
        f"/v1/acl/policy/{p['ID']}",
        json={"ID": p["ID"], "Name": "app-kv2", "Rules": KV_APP_WRITE_JSON},
        headers=h,
    )
    raise_unless(r, 200)
    p2 = r.get_json()
    assert (p2["ID"], p2["Name"], p2["Description"], p2["Rules"]) == (
        p["ID"],
        "app-kv2",
        "",
        KV_APP_WRITE_JSON,
    )
    assert p2["CreateIndex"] == p["CreateIndex"] < p2["ModifyIndex"]
    assert_error(c.get("/v1/acl/policy/name/app-kv", headers=h), 404, "not_found")

    # The list: every policy, by name, without rules.
    r = c.get("/v1/acl/policies", headers=h)
    raise_unless(r, 200)
    listed = r.get_json()
    assert [x["Name"] for x in listed] == ["app-kv2", "global-management"]
    assert all("Rules" not in x for x in listed)
    assert listed[0] == {k: v for k, v in p2.items() if k != "Rules"}

    # A name is unique; an ID in the body on create, or one that disagrees with the path, is 400.
    r = c.put("/v1/acl/policy", json={"Name": "app-kv2"}, headers=h)
    assert_error(r, 409, "conflict")
    r = c.put("/v1/acl/policy", json={"Name": "x", "ID": str(uuid.uuid4())}, headers=h)
    assert_error(r, 400, "bad_request")
    r = c.put(f"/v1/acl/policy/{p['ID']}", json={"ID": str(uuid.uuid4()), "Name": "y"}, headers=h)
    assert_error(r, 400, "bad_request", "does not match")

    r = c.delete(f"/v1/acl/policy/{p['ID']}", headers=h)
    raise_unless(r, 200)
    assert r.get_json() is True
    assert_error(c.get(f"/v1/acl/policy/{p['ID']}", headers=h), 404, "not_found")
    assert_error(c.delete(f"/v1/acl/policy/{p['ID']}", headers=h), 404, "not_found")
    assert_error(c.put(f"/v1/acl/policy/{p['ID']}", json={"Name": "z"}, headers=h), 404)
    assert_error(c.get("/v1/acl/policy/not-a-uuid", headers=h), 400, "bad_request")
    r = c.get("/v1/acl/policies", headers=h)
    assert [x["Name"] for x in r.get_json()] == ["global-management"]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ('key_prefix "app/" {', "not valid HCL"),
        ('{"key_prefix": ', "not valid JSON"),
        ('agent "" { policy = "read" }', 'unknown rule "agent"'),
        ('service "web" { policy = "admin" }', "policy must be read, write or deny"),
        ('node "n1" { policy = "list" }', 'policy "list" is only for key'),
        ('key "a" { policy = "read" intentions = "write" }', "intentions are only for service"),
        ('operator = "read"\noperator = "write"', 'duplicate "operator"'),
        ('service "web" { }', "policy is required"),
        (json.dumps({"service": {"web": {"policy": "write", "colour": "red"}}}), "unknown field"),
    ],
)
def test_bad_rules_are_a_400_and_nothing_is_stored(acl_client, rules, message):
    c = acl_client
    h = tok(bootstrap(c)["SecretID"])
    before = store_of(c).current_index()
    r = c.put("/v1/acl/policy", json={"Name": "bad", "Rules": rules}, headers=h)
    body = assert_error(r, 400, "bad_request", message)
    assert body["error"].startswith("Rules: "), body
    assert store_of(c).current_index() == before
    r = c.put("/v1/acl/policy", json={"Name": "good", "Rules": 'operator = "read"'}, headers=h)
    raise_unless(r, 200)
    r = c.put(
        f"/v1/acl/policy/{r.get_json()['ID']}", json={"Name": "good", "Rules": rules}, headers=h
    )
    assert_error(r, 400, "bad_request", message)
    r = c.get("/v1/acl/policy/name/good", headers=h)
    assert r.get_json()["Rules"] == 'operator = "read"'


def test_rules_in_hcl_and_json_grant_the_same(acl_client):
    c = acl_client
    root = bootstrap(c)["SecretID"]
    h = tok(root)
    secrets = {}
    for name, rules in (("hcl", KV_APP_WRITE_HCL), ("json", KV_APP_WRITE_JSON)):
        r = c.put("/v1/acl/policy", json={"Name": name, "Rules": rules}, headers=h)
        raise_unless(r, 200)
        secrets[name] = create_token(c, root, [{"Name": name}])["SecretID"]
    for name, secret in secrets.items():
        r = c.put(f"/v1/kv/app/{name}", data=b"v", headers=tok(secret))
        raise_unless(r, 200)
        r = c.get(f"/v1/kv/app/{name}", headers=tok(secret))
        raise_unless(r, 200)
        assert_error(
            c.put("/v1/kv/other", data=b"v", headers=tok(secret)), 403, "permission_denied"
        )
        assert_error(c.get("/v1/kv/other", headers=tok(secret)), 403, "permission_denied")


def test_policy_changes_reach_tokens_at_once(acl_client):
    """The per-process authorizer cache follows ACL writes (update, delete)."""
    c = acl_client
    root = bootstrap(c)["SecretID"]
    h = tok(root)
    r = c.put("/v1/acl/policy", json={"Name": "kv", "Rules": KV_APP_WRITE_HCL}, headers=h)
    pid = r.get_json()["ID"]
    secret = create_token(c, root, [{"ID": pid}])["SecretID"]
    raise_unless(c.put("/v1/kv/app/a", data=b"1", headers=tok(secret)), 200)
    raise_unless(
        c.put(
            f"/v1/acl/policy/{pid}",
            json={"Name": "kv", "Rules": 'key_prefix "b/" { policy = "write" }'},
            headers=h,
        ),
        200,
    )
    assert_error(c.put("/v1/kv/app/a", data=b"2", headers=tok(secret)), 403, "permission_denied")
    raise_unless(c.put("/v1/kv/b/a", data=b"2", headers=tok(secret)), 200)
    raise_unless(c.delete(f"/v1/acl/policy/{pid}", headers=h), 200)
    assert_error(c.put("/v1/kv/b/a", data=b"3", headers=tok(secret)), 403, "permission_denied")
    # The token keeps no link to a deleted policy.
    r = c.get("/v1/acl/token/self", headers=tok(secret))
    assert r.get_json()["Policies"] == []


def test_global_management_cannot_be_changed_or_deleted(acl_client):
    c = acl_client
    h = tok(bootstrap(c)["SecretID"])
    before = store_of(c).current_index()
    r = c.put(
        f"/v1/acl/policy/{MANAGEMENT_POLICY_ID}",
        json={"Name": "global-management", "Rules": 'operator = "read"'},
        headers=h,
    )
    assert_error(r, 400, "bad_request", "global-management policy cannot be changed")
    r = c.delete(f"/v1/acl/policy/{MANAGEMENT_POLICY_ID}", headers=h)
    assert_error(r, 400, "bad_request", "global-management policy cannot be deleted")
    r = c.delete(f"/v1/acl/token/{ANONYMOUS_ACCESSOR}", headers=h)
    assert_error(r, 400, "bad_request", "anonymous token cannot be deleted")
    assert store_of(c).current_index() == before
    r = c.get(f"/v1/acl/policy/{MANAGEMENT_POLICY_ID}", headers=h)
    assert (r.get_json()["Name"], r.get_json()["Rules"]) == ("global-management", "")
    assert c.get(f"/v1/acl/token/{ANONYMOUS_ACCESSOR}", headers=h).status_code == 200


# -- tokens ----------------------------------------------------------------------------------


def test_token_create_read_update_delete_list(acl_client):
    c = acl_client
    root = bootstrap(c)["SecretID"]
    h = tok(root)
    p1 = c.put("/v1/acl/policy", json={"Name": "p1", "Rules": KV_APP_WRITE_HCL}, headers=h)
    p2 = c.put("/v1/acl/policy", json={"Name": "p2", "Rules": 'operator = "read"'}, headers=h)
    p1, p2 = p1.get_json(), p2.get_json()

    # Policies by Name and by ID; the answer names both ways.
    t = create_token(c, root, [{"Name": "p1"}, {"ID": p2["ID"]}], Description="app deployer")
    assert set(t) == TOKEN_KEYS | {"SecretID"}
    assert t["Policies"] == [{"ID": p1["ID"], "Name": "p1"}, {"ID": p2["ID"], "Name": "p2"}]
    assert t["Description"] == "app deployer"
    assert str(uuid.UUID(t["SecretID"])) == t["SecretID"] != t["AccessorID"]
    secret = t["SecretID"]

    # Reads never show the secret: read, list, self.
    r = c.get(f"/v1/acl/token/{t['AccessorID']}", headers=h)
    raise_unless(r, 200)
    read = r.get_json()
    assert read == {k: v for k, v in t.items() if k != "SecretID"}
    assert index_of(r) == t["ModifyIndex"]
    r = c.get("/v1/acl/tokens", headers=h)
    listed = r.get_json()
    assert [x["AccessorID"] for x in listed][-1] == t["AccessorID"]
    assert all("SecretID" not in x for x in listed)
    assert secret not in r.get_data(as_text=True)
    r = c.get("/v1/acl/token/self", headers=tok(secret))
    assert r.get_json() == read
    assert secret not in r.get_data(as_text=True)

    # Update: the whole new state; the secret stays the same and keeps working.
    r = c.put(
        f"/v1/acl/token/{t['AccessorID']}",
        json={
            "AccessorID": t["AccessorID"],
            "Description": "renamed",
            "Policies": [{"Name": "p2"}],
        },
        headers=h,
    )
    raise_unless(r, 200)
    up = r.get_json()
    assert "SecretID" not in up
    assert (up["Description"], up["Policies"], up["CreateTime"]) == (
        "renamed",
        [{"ID": p2["ID"], "Name": "p2"}],
        t["CreateTime"],
    )
    assert up["CreateIndex"] == t["CreateIndex"] < up["ModifyIndex"]
    r = c.get("/v1/acl/token/self", headers=tok(secret))
    assert r.get_json()["Description"] == "renamed"
    # p1 (keys) is gone from the token, p2 (operator:read) stays.
    assert_error(c.put("/v1/kv/app/x", data=b"v", headers=tok(secret)), 403, "permission_denied")
    # A secret cannot be changed; a policy that does not exist is a 400.
    r = c.put(f"/v1/acl/token/{t['AccessorID']}", json={"SecretID": str(uuid.uuid4())}, headers=h)
    assert_error(r, 400, "bad_request", "SecretID cannot be changed")
    r = c.put("/v1/acl/token", json={"Policies": [{"Name": "nope"}]}, headers=h)
    assert_error(r, 400, "bad_request", "no such ACL policy: nope")
    r = c.put("/v1/acl/token", json={"Policies": [{"ID": str(uuid.uuid4())}]}, headers=h)
    assert_error(r, 400, "bad_request", "no such ACL policy")
    # A lifetime outside Consul's bounds (1m to 24h; tests/test_acl_roles.py has the rest).
    r = c.put("/v1/acl/token", json={"ExpirationTTL": "1s"}, headers=h)
    assert_error(r, 400, "bad_request", "ExpirationTTL")

    # Delete: the secret stops working at once.
    r = c.delete(f"/v1/acl/token/{t['AccessorID']}", headers=h)
    raise_unless(r, 200)
    assert r.get_json() is True
    assert_error(
        c.get("/v1/acl/token/self", headers=tok(secret)), 403, "permission_denied", "ACL not found"
    )
    # As in Consul, a read of a token that is gone is a 403 "ACL not found".
    r = c.get(f"/v1/acl/token/{t['AccessorID']}", headers=h)
    assert_error(r, 403, "permission_denied", "ACL not found")
    assert_error(c.delete(f"/v1/acl/token/{t['AccessorID']}", headers=h), 404, "not_found")
    assert_error(c.get("/v1/acl/token/not-a-uuid", headers=h), 400, "bad_request")


def test_token_with_given_ids_and_conflicts(acl_client):
    c = acl_client
    root = bootstrap(c)["SecretID"]
    accessor, secret = str(uuid.uuid4()), str(uuid.uuid4())
    t = create_token(c, root, [], AccessorID=accessor, SecretID=secret)
    assert (t["AccessorID"], t["SecretID"]) == (accessor, secret)
    r = c.put("/v1/acl/token", json={"AccessorID": accessor}, headers=tok(root))
    assert_error(r, 409, "conflict")
    r = c.put("/v1/acl/token", json={"SecretID": secret}, headers=tok(root))
    assert_error(r, 409, "conflict")
    assert secret not in r.get_data(as_text=True)
    r = c.put("/v1/acl/token", json={"SecretID": "not-a-uuid"}, headers=tok(root))
    assert_error(r, 400, "bad_request")


@pytest.mark.parametrize(
    ("url", "body", "problems"),
    [
        # Consul's policy name rule (and openapi.yaml's): ASCII only. isalnum() took "café".
        ("/v1/acl/policy", {"Name": "café"}, ["Name: must be 1-128 letters, digits"]),
        (
            "/v1/acl/policy",
            {"Name": "p", "Rules": 5, "Datacenters": "dc1", "Colour": 1},
            ["Rules: Not a valid string.", "Datacenters: Not a valid list.", "Colour: Unknown"],
        ),
        (
            "/v1/acl/token",
            {"Policies": [{"Name": "p"}, {"ID": "nope"}, {}], "Local": "yes"},
            ["Policies.1.ID: must be a UUID", "Policies.2: needs an ID or a Name", "Local: must"],
        ),
        # A mistyped secret is still a secret: the message does not repeat it.
        ("/v1/acl/token", {"SecretID": "s3cr3t-not-a-uuid"}, ["SecretID: must be a UUID"]),
    ],
)
def test_bad_bodies_name_every_problem_and_repeat_no_secret(acl_client, url, body, problems):
    c = acl_client
    h = tok(bootstrap(c)["SecretID"])
    before = store_of(c).current_index()
    got = assert_error(c.put(url, json=body, headers=h), 400, "bad_request")["error"]
    for problem in problems:
        assert problem in got, got
    assert "s3cr3t" not in got
    assert store_of(c).current_index() == before


def test_tokens_by_header_and_bearer_and_unknown_tokens(acl_client):
    c = acl_client
    root = bootstrap(c)
    for headers in (
        {"X-Consul-Token": root["SecretID"]},
        {"Authorization": f"Bearer {root['SecretID']}"},
        {"Authorization": f"bearer {root['SecretID']}"},
    ):
        r = c.get("/v1/acl/token/self", headers=headers)
        raise_unless(r, 200)
        assert r.get_json()["AccessorID"] == root["AccessorID"]
        raise_unless(c.put("/v1/kv/k", data=b"v", headers=headers), 200)
    unknown = str(uuid.uuid4())
    for headers in ({"X-Consul-Token": unknown}, {"Authorization": f"Bearer {unknown}"}):
        for method, url in (
            ("GET", "/v1/acl/token/self"),
            ("GET", "/v1/kv/k"),
            ("PUT", "/v1/kv/k"),
            ("GET", "/v1/catalog/services"),
            ("GET", "/v1/connect/intentions"),
        ):
            r = c.open(url, method=method, headers=headers, data=b"x")
            body = assert_error(r, 403, "permission_denied", "ACL not found")
            assert unknown not in body["error"]
    # The accessor ID is not a credential.
    r = c.get("/v1/acl/token/self", headers=tok(root["AccessorID"]))
    assert_error(r, 403, "permission_denied", "ACL not found")
    # X-Consul-Token wins over a bearer token, as in Consul.
    r = c.get(
        "/v1/acl/token/self",
        headers={"X-Consul-Token": root["SecretID"], "Authorization": f"Bearer {unknown}"},
    )
    assert r.get_json()["AccessorID"] == root["AccessorID"]


# -- secrets: shown once, stored hashed, never logged ------------------------------------------


def _tables_as_text(client, store_url: str) -> str:
    """Every row of every table of the store, as text."""
    if store_kind(store_url) == POSTGRESQL:
        import psycopg

        with psycopg.connect(store_url) as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                )
            ]
            assert "acl_tokens" in names
            return "\n".join(
                str(row)
                for name in names
                for row in conn.execute(f'SELECT t::text FROM "{name}" t')  # noqa: S608
            )
    import sqlite3

    path = store_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert "acl_tokens" in names
        return "\n".join(
            repr(row)
            for name in names
            for row in conn.execute(f'SELECT * FROM "{name}"')  # noqa: S608
        )
    finally:
        conn.close()


def test_secrets_are_stored_hashed(acl_client, store_url, tmp_path):
    c = acl_client
    boot = bootstrap(c)
    made = create_token(c, boot["SecretID"], [])
    given = str(uuid.uuid4())
    create_token(c, boot["SecretID"], [], SecretID=given)
    secrets = [boot["SecretID"], made["SecretID"], given]

    store = store_of(c)
    for accessor, secret in (
        (boot["AccessorID"], boot["SecretID"]),
        (made["AccessorID"], made["SecretID"]),
    ):
        row = store.acl_token(accessor_id=accessor)
        assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert store.acl_token(secret_hash=row.secret_hash).accessor_id == accessor

    text = _tables_as_text(c, store_url)
    assert boot["AccessorID"] in text  # the check can see what is there
    for secret in secrets:
        assert secret not in text
        assert secret.replace("-", "") not in text
    if store_kind(store_url) == SQLITE:
        files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"trellis.db", "trellis.db-wal"} <= names, names
        for p in files:
            data = p.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, p
                assert secret.encode("utf-16-le") not in data, p
        db = (Path(tmp_path) / "trellis.db").read_bytes() + (
            Path(tmp_path) / "trellis.db-wal"
        ).read_bytes()
        assert boot["AccessorID"].encode() in db  # the grep looks where the tokens are


def test_secrets_are_never_logged(acl_client, caplog):
    c = acl_client
    caplog.set_level(logging.DEBUG)
    boot = bootstrap(c)
    root = boot["SecretID"]
    given = str(uuid.uuid4())
    unknown = str(uuid.uuid4())
    t = create_token(c, root, [], SecretID=given)
    for secret in (root, given):
        for headers in (tok(secret), {"Authorization": f"Bearer {secret}"}):
            c.get("/v1/acl/token/self", headers=headers)
            c.put("/v1/kv/app/x", data=b"v", headers=headers)  # 200 or 403
            c.get("/v1/kv/missing", headers=headers)  # 403 or 404
            c.get("/v1/kv/a/../b", headers=headers)  # 400
            c.put("/v1/agent/service/register", json={"Name": "web"}, headers=headers)
            c.get("/v1/catalog/services?index=1&wait=1ms", headers=headers)
    c.get("/v1/acl/token/self", headers=tok(unknown))
    c.put("/v1/acl/token", json={"SecretID": given}, headers=tok(root))  # 409
    c.delete(f"/v1/acl/token/{t['AccessorID']}", headers=tok(root))
    c.get("/v1/acl/token/self", headers=tok(given))  # now unknown
    logged = (
        "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
        + caplog.text
    )
    for secret in (root, given, unknown):
        assert secret not in logged


# -- ACLs disabled -------------------------------------------------------------------------------


def test_acl_endpoints_with_acls_disabled_are_401(make_client):
    c = make_client()
    some = str(uuid.uuid4())
    for method, url, body in (
        ("PUT", "/v1/acl/bootstrap", None),
        ("PUT", "/v1/acl/policy", {"Name": "p"}),
        ("GET", f"/v1/acl/policy/{some}", None),
        ("GET", "/v1/acl/policy/name/p", None),
        ("PUT", f"/v1/acl/policy/{some}", {"Name": "p"}),
        ("DELETE", f"/v1/acl/policy/{some}", None),
        ("GET", "/v1/acl/policies", None),
        ("PUT", "/v1/acl/token", {}),
        ("GET", "/v1/acl/token/self", None),
        ("GET", f"/v1/acl/token/{some}", None),
        ("PUT", f"/v1/acl/token/{some}", {}),
        ("DELETE", f"/v1/acl/token/{some}", None),
        ("GET", "/v1/acl/tokens", None),
    ):
        r = c.open(url, method=method, json=body)
        body = assert_error(r, 401, "acl_disabled")
        assert body["error"] == "ACL support disabled"
    # Without ACLs every other endpoint takes any token, or none (trellis dev).
    raise_unless(c.put("/v1/kv/k", data=b"v", headers=tok(some)), 200)
    assert store_of(c).acl_tokens() == []


# -- the default policy ------------------------------------------------------------------------


def _trust_domain(c) -> str:
    return c.get("/v1/connect/ca/roots").get_json()["TrustDomain"]


def _uri(td: str, service: str) -> str:
    return f"spiffe://{td}/ns/default/dc/dc1/svc/{service}"


def test_default_policy_deny(acl_client):
    c = acl_client
    h = tok(bootstrap(c)["SecretID"])
    td = _trust_domain(c)
    assert_error(c.put("/v1/kv/k", data=b"v"), 403, "permission_denied")
    assert_error(
        c.put("/v1/agent/service/register", json={"Name": "web"}), 403, "permission_denied"
    )
    assert c.get("/v1/catalog/services").get_json() == {}
    # Intentions fall back on the ACL default policy: deny.
    r = c.get("/v1/connect/intentions/check?source=web&destination=db", headers=h)
    assert r.get_json() == {"Allowed": False}
    r = c.post(
        "/v1/agent/connect/authorize",
        json={"Target": "db", "ClientCertURI": _uri(td, "web")},
        headers=h,
    )
    assert r.get_json() == {
        "Authorized": False,
        "Reason": "Default behavior configured by ACLs (deny)",
    }
    r = c.put(
        "/v1/connect/intentions/exact?source=web&destination=db",
        json={"Action": "allow"},
        headers=h,
    )
    raise_unless(r, 200)
    r = c.get("/v1/connect/intentions/check?source=web&destination=db", headers=h)
    assert r.get_json() == {"Allowed": True}
    r = c.post(
        "/v1/agent/connect/authorize",
        json={"Target": "db", "ClientCertURI": _uri(td, "web")},
        headers=h,
    )
    assert r.get_json() == {"Authorized": True, "Reason": "Matched intention: web => db (allow)"}


def test_default_policy_allow(make_client):
    c = make_client(**ALLOW)
    td = _trust_domain(c)
    # The anonymous token may do what no rule forbids...
    raise_unless(c.put("/v1/kv/k", data=b"v"), 200)
    raise_unless(c.put("/v1/agent/service/register", json={"Name": "web"}), 200)
    assert "web" in c.get("/v1/catalog/services").get_json()
    raise_unless(c.get("/v1/connect/ca/configuration"), 200)
    # ...but never ACLs: acl:* is not granted by a default.
    assert_error(c.get("/v1/acl/tokens"), 403, "permission_denied", "acl:read")
    assert_error(c.put("/v1/acl/policy", json={"Name": "p"}), 403, "permission_denied")
    # Intentions fall back on the default: allow.
    r = c.get("/v1/connect/intentions/check?source=web&destination=db")
    assert r.get_json() == {"Allowed": True}
    r = c.post(
        "/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": _uri(td, "web")}
    )
    assert r.get_json() == {
        "Authorized": True,
        "Reason": "Default behavior configured by ACLs (allow)",
    }
    # A deny rule still denies under a default allow.
    root = bootstrap(c)["SecretID"]
    r = c.put(
        "/v1/acl/policy",
        json={"Name": "no-db", "Rules": 'service "db" { policy = "deny" }'},
        headers=tok(root),
    )
    secret = create_token(c, root, [{"Name": "no-db"}])["SecretID"]
    raise_unless(
        c.put("/v1/agent/service/register", json={"Name": "api"}, headers=tok(secret)), 200
    )
    assert_error(
        c.put("/v1/agent/service/register", json={"Name": "db"}, headers=tok(secret)),
        403,
        "permission_denied",
        "service:write",
    )


# -- operator rules and the CA configuration (CVE-2020-28053) -----------------------------------


def test_ca_configuration_needs_operator_write_and_never_shows_a_key(acl_client):
    c = acl_client
    root = bootstrap(c)["SecretID"]
    h = tok(root)
    ids = {}
    for name, rules in (("op-read", 'operator = "read"'), ("op-write", 'operator = "write"')):
        raise_unless(c.put("/v1/acl/policy", json={"Name": name, "Rules": rules}, headers=h), 200)
        ids[name] = create_token(c, root, [{"Name": name}])["SecretID"]
    # operator:read is not enough to read the CA configuration (Consul since 1.8.6).
    r = c.get("/v1/connect/ca/configuration", headers=tok(ids["op-read"]))
    assert_error(r, 403, "permission_denied", "operator:write")
    for secret in (ids["op-write"], root):
        r = c.get("/v1/connect/ca/configuration", headers=tok(secret))
        raise_unless(r, 200)
        text = r.get_data(as_text=True)
        assert "PRIVATE KEY" not in text
        assert "PrivateKey" not in r.get_json()["Config"]


# -- K/V listings: filtered, and acl.enable_key_list_policy ----------------------------------


def _kv_world(c) -> tuple[str, str]:
    """Keys app/a, app/b and secret/x; a token that may read app/ only. Returns (root, app)."""
    root = bootstrap(c)["SecretID"]
    for k in ("app/a", "app/b", "secret/x"):
        raise_unless(c.put(f"/v1/kv/{k}", data=b"v", headers=tok(root)), 200)
    p = c.put(
        "/v1/acl/policy",
        json={"Name": "app-read", "Rules": 'key_prefix "app/" { policy = "read" }'},
        headers=tok(root),
    )
    raise_unless(p, 200)
    app = create_token(c, root, [{"ID": p.get_json()["ID"]}])["SecretID"]
    return root, app


FILTERED = "X-Consul-Results-Filtered-By-ACLs"


def test_listings_show_only_what_the_token_may_read_and_say_so(acl_client):
    c = acl_client
    root, app = _kv_world(c)
    r = c.get("/v1/kv/?keys", headers=tok(app))
    raise_unless(r, 200)
    assert r.get_json() == ["app/a", "app/b"] and r.headers[FILTERED] == "true"
    r = c.get("/v1/kv/?recurse", headers=tok(app))
    raise_unless(r, 200)
    assert [e["Key"] for e in r.get_json()] == ["app/a", "app/b"]
    assert r.headers[FILTERED] == "true"
    # Nothing hidden: no header.
    for url in ("/v1/kv/app/?keys", "/v1/kv/app/?recurse"):
        r = c.get(url, headers=tok(app))
        raise_unless(r, 200)
        assert FILTERED not in r.headers
    r = c.get("/v1/kv/?keys", headers=tok(root))
    assert r.get_json() == ["app/a", "app/b", "secret/x"] and FILTERED not in r.headers
    # Everything hidden: a 404, as for an empty prefix, and the header says why.
    r = c.get("/v1/kv/secret/?keys", headers=tok(app))
    raise_unless(r, 404)
    assert r.headers[FILTERED] == "true"


def test_enable_key_list_policy_needs_list_on_the_prefix(make_client):
    c = make_client(**DENY, acl_enable_key_list_policy=True)
    root, app = _kv_world(c)
    r = c.get("/v1/kv/?keys", headers=tok(app))
    assert_error(r, 403, "permission_denied", contains="key:list")
    r = c.get("/v1/kv/app/?keys", headers=tok(app))  # read on app/ grants list there
    raise_unless(r, 200)
    assert r.get_json() == ["app/a", "app/b"]
    raise_unless(c.get("/v1/kv/?keys", headers=tok(root)), 200)
    # recurse is unchanged by the policy: filtered, not refused.
    raise_unless(c.get("/v1/kv/?recurse", headers=tok(app)), 200)
