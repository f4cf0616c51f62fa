"""ACL breadth: roles, service and node identities, templated policies, token expiry, clone,
token list filters, and Consul's small rules (an unknown or deleted token is a 403 "ACL not
found"; an accessor keeps its case), in-process on SQLite and on PostgreSQL, every response
checked against openapi.yaml. Expiry is tested against the resolver's injected clock (no
waiting) and through the store's reaper.

Which token may call which of these endpoints is ``tests/test_acl_matrix.py``.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest

from tests import api_fixtures
from tests.api_fixtures import assert_error
from tests.support import wait_until
from trellis.api.acl.cache import AuthorizerCache, hash_secret
from trellis.api.errors import PermissionDenied
from trellis.api.store.security import ACLPolicy, ACLRole, ACLToken

make_client = api_fixtures.make_client

DENY = {"acl_enabled": True, "acl_default_policy": "deny"}
KV_APP = 'key_prefix "app/" { policy = "write" }'


@pytest.fixture
def c(make_client):
    return make_client(**DENY)


@pytest.fixture
def mgmt(c) -> dict[str, str]:
    r = c.put("/v1/acl/bootstrap")
    assert r.status_code == 200, r.get_data(as_text=True)
    return tok(r.get_json()["SecretID"])


def tok(secret: str) -> dict[str, str]:
    return {"X-Consul-Token": secret}


def ok(r, status: int = 200):
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    return r.get_json()


def store_of(c):
    return c.application.extensions["trellis"].store


def token(c, mgmt, **body) -> dict:
    return ok(c.put("/v1/acl/token", json={"Description": "t", **body}, headers=mgmt))


def register(c, secret: str, name: str) -> int:
    body = {"Name": name, "ID": name, "Port": 80}
    return c.put("/v1/agent/service/register", json=body, headers=tok(secret)).status_code


# -- roles ---------------------------------------------------------------------------------------


def test_role_create_read_update_delete_and_list(c, mgmt):
    p = ok(c.put("/v1/acl/policy", json={"Name": "app", "Rules": KV_APP}, headers=mgmt))
    body = {
        "Name": "deployer",
        "Description": "deploys",
        "Policies": [{"Name": "app"}, {"ID": p["ID"]}],  # the same one twice: kept once
        "ServiceIdentities": [{"ServiceName": "web", "Datacenters": ["dc1"]}],
        "NodeIdentities": [{"NodeName": "node-1", "Datacenter": "dc1"}],
        "TemplatedPolicies": [{"TemplateName": "builtin/dns"}],
    }
    role = ok(c.put("/v1/acl/role", json=body, headers=mgmt))
    assert str(uuid.UUID(role["ID"])) == role["ID"]
    assert role["Name"] == "deployer" and role["Description"] == "deploys"
    assert role["Policies"] == [{"ID": p["ID"], "Name": "app"}]
    assert role["ServiceIdentities"] == [{"ServiceName": "web", "Datacenters": ["dc1"]}]
    assert role["NodeIdentities"] == [{"NodeName": "node-1", "Datacenter": "dc1"}]
    assert role["TemplatedPolicies"] == [{"TemplateName": "builtin/dns"}]
    assert ok(c.get(f"/v1/acl/role/{role['ID']}", headers=mgmt)) == role
    assert ok(c.get("/v1/acl/role/name/deployer", headers=mgmt)) == role

    # Names are unique; unknown policies, IDs on create, bad identities are the client's.
    assert_error(c.put("/v1/acl/role", json=body, headers=mgmt), 409, None, "deployer")
    bad = {"Name": "x", "Policies": [{"Name": "nothing"}]}
    assert_error(c.put("/v1/acl/role", json=bad, headers=mgmt), 400, None, "nothing")
    bad = {"Name": "x", "ServiceIdentities": [{"ServiceName": "Not Valid"}]}
    assert_error(c.put("/v1/acl/role", json=bad, headers=mgmt), 400, None, "ServiceName")
    bad = {"Name": "x", "TemplatedPolicies": [{"TemplateName": "builtin/service"}]}
    assert_error(c.put("/v1/acl/role", json=bad, headers=mgmt), 400, None, "Name")
    bad = {"Name": "x", "ID": role["ID"]}
    assert_error(c.put("/v1/acl/role", json=bad, headers=mgmt), 400, None, "ID")

    other = ok(c.put("/v1/acl/role", json={"Name": "other"}, headers=mgmt))
    assert "ServiceIdentities" not in other and other["Policies"] == []
    names = [r["Name"] for r in ok(c.get("/v1/acl/roles", headers=mgmt))]
    assert names == ["deployer", "other"]
    only = ok(c.get(f"/v1/acl/roles?policy={p['ID']}", headers=mgmt))
    assert [r["Name"] for r in only] == ["deployer"]

    updated = ok(c.put(f"/v1/acl/role/{role['ID']}", json={"Name": "deployer2"}, headers=mgmt))
    assert updated["Name"] == "deployer2" and updated["Policies"] == []
    assert updated["ModifyIndex"] > role["ModifyIndex"]
    assert updated["CreateIndex"] == role["CreateIndex"]
    renamed = {"Name": "other"}
    assert_error(c.put(f"/v1/acl/role/{role['ID']}", json=renamed, headers=mgmt), 409)

    assert ok(c.delete(f"/v1/acl/role/{role['ID']}", headers=mgmt)) is True
    assert_error(c.get(f"/v1/acl/role/{role['ID']}", headers=mgmt), 404)
    assert_error(c.delete(f"/v1/acl/role/{role['ID']}", headers=mgmt), 404)
    assert_error(c.put(f"/v1/acl/role/{role['ID']}", json=renamed, headers=mgmt), 404)
    assert_error(c.get("/v1/acl/role/not-a-uuid", headers=mgmt), 400)


def test_a_token_is_granted_its_roles_policies_and_identities_at_once(c, mgmt):
    ok(c.put("/v1/acl/policy", json={"Name": "app", "Rules": KV_APP}, headers=mgmt))
    role = ok(
        c.put(
            "/v1/acl/role",
            json={"Name": "r", "Policies": [{"Name": "app"}]},
            headers=mgmt,
        )
    )
    t = token(c, mgmt, Roles=[{"Name": "r"}])
    assert t["Roles"] == [{"ID": role["ID"], "Name": "r"}]
    secret = t["SecretID"]
    assert c.put("/v1/kv/app/x", data=b"1", headers=tok(secret)).status_code == 200
    assert c.put("/v1/kv/other", data=b"1", headers=tok(secret)).status_code == 403
    assert register(c, secret, "web") == 403

    # The role gains a service identity: the token may register web at once.
    body = {
        "Name": "r",
        "Policies": [{"Name": "app"}],
        "ServiceIdentities": [{"ServiceName": "web"}],
    }
    ok(c.put(f"/v1/acl/role/{role['ID']}", json=body, headers=mgmt))
    assert register(c, secret, "web") == 200
    assert register(c, secret, "web-sidecar-proxy") == 200
    assert register(c, secret, "db") == 403
    listed = ok(c.get(f"/v1/acl/tokens?role={role['ID']}", headers=mgmt))
    assert [x["AccessorID"] for x in listed] == [t["AccessorID"]]

    # The role is deleted: its grants are gone at once, and the token no longer lists it.
    ok(c.delete(f"/v1/acl/role/{role['ID']}", headers=mgmt))
    assert c.put("/v1/kv/app/x", data=b"2", headers=tok(secret)).status_code == 403
    assert register(c, secret, "web") == 403
    assert "Roles" not in ok(c.get(f"/v1/acl/token/{t['AccessorID']}", headers=mgmt))


def test_a_role_holding_global_management_makes_a_management_token(c, mgmt):
    body = {"Name": "admins", "Policies": [{"Name": "global-management"}]}
    ok(c.put("/v1/acl/role", json=body, headers=mgmt))
    t = token(c, mgmt, Roles=[{"Name": "admins"}])
    assert ok(c.get("/v1/acl/tokens", headers=tok(t["SecretID"])))


def test_service_identity_grants_consuls_synthetic_policy(c, mgmt):
    t = token(c, mgmt, ServiceIdentities=[{"ServiceName": "web"}])
    assert t["ServiceIdentities"] == [{"ServiceName": "web"}]
    s = t["SecretID"]
    assert register(c, s, "web") == 200
    assert register(c, s, "web-sidecar-proxy") == 200
    assert register(c, s, "db") == 403
    # service_prefix "" read and node_prefix "" read: the catalog shows every service.
    assert register(c, dict_secret(mgmt), "db") == 200
    assert set(ok(c.get("/v1/catalog/services", headers=tok(s)))) >= {"web", "db"}
    assert c.get("/v1/kv/x", headers=tok(s)).status_code == 403
    listed = ok(c.get("/v1/acl/tokens?servicename=web", headers=mgmt))
    assert [x["AccessorID"] for x in listed] == [t["AccessorID"]]
    assert ok(c.get("/v1/acl/tokens?servicename=db", headers=mgmt)) == []


def test_node_identity_grants_node_write_and_service_read(c, mgmt):
    t = token(c, mgmt, NodeIdentities=[{"NodeName": "node-1", "Datacenter": "dc1"}])
    s = t["SecretID"]
    reg = {"Node": "node-1", "Address": "10.0.0.1"}
    assert c.put("/v1/catalog/register", json=reg, headers=tok(s)).status_code == 200
    reg = {"Node": "node-2", "Address": "10.0.0.2"}
    assert c.put("/v1/catalog/register", json=reg, headers=tok(s)).status_code == 403
    assert register(c, s, "web") == 403  # read on services, not write
    bad = {"NodeIdentities": [{"NodeName": "node-1"}]}
    assert_error(c.put("/v1/acl/token", json=bad, headers=mgmt), 400, None, "Datacenter")


def test_templated_policies_on_tokens_and_their_endpoints(c, mgmt):
    svc = [{"TemplateName": "builtin/service", "TemplateVariables": {"Name": "api"}}]
    t = token(c, mgmt, TemplatedPolicies=svc)
    assert t["TemplatedPolicies"] == svc
    assert register(c, t["SecretID"], "api") == 200
    assert register(c, t["SecretID"], "api-sidecar-proxy") == 200
    assert register(c, t["SecretID"], "web") == 403

    node = [{"TemplateName": "builtin/node", "TemplateVariables": {"Name": "node-9"}}]
    n = token(c, mgmt, TemplatedPolicies=node)
    reg = {"Node": "node-9", "Address": "10.0.0.9"}
    assert c.put("/v1/catalog/register", json=reg, headers=tok(n["SecretID"])).status_code == 200

    dns = token(c, mgmt, TemplatedPolicies=[{"TemplateName": "builtin/dns"}])
    assert c.get("/v1/catalog/services", headers=tok(dns["SecretID"])).status_code == 200
    assert register(c, dns["SecretID"], "api") == 403

    for bad, word in (
        ([{"TemplateName": "builtin/nothing"}], "builtin/nothing"),
        ([{"TemplateName": "builtin/service"}], "Name"),
        ([{"TemplateName": "builtin/service", "TemplateVariables": {"Name": "A B"}}], "Name"),
    ):
        r = c.put("/v1/acl/token", json={"TemplatedPolicies": bad}, headers=mgmt)
        assert_error(r, 400, None, word)

    listed = ok(c.get("/v1/acl/templated-policies", headers=mgmt))
    assert set(listed) == {"builtin/service", "builtin/node", "builtin/dns"}
    read = ok(c.get("/v1/acl/templated-policy/name/builtin/service", headers=mgmt))
    assert read["TemplateName"] == "builtin/service"
    assert 'service "{{.Name}}-sidecar-proxy"' in read["Template"]
    assert_error(c.get("/v1/acl/templated-policy/name/builtin/nothing", headers=mgmt), 404)
    preview = ok(
        c.post("/v1/acl/templated-policy/preview/builtin/node", json={"Name": "n1"}, headers=mgmt)
    )
    assert 'node "n1"' in preview["Rules"]
    r = c.post("/v1/acl/templated-policy/preview/builtin/node", json={}, headers=mgmt)
    assert_error(r, 400, None, "Name")


# -- expiry --------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_expired_token_stops_resolving_at_once_even_from_the_cache(store):
    """With an injected clock: valid up to its ExpirationTime, then "ACL not found" on the
    very next resolve, cached or not, before anything is deleted; the reaper then deletes it
    and only it."""
    t0 = 1_900_000_000.0
    clock = Clock(t0)
    policy = store.acl_policy_put(
        ACLPolicy(id=str(uuid.uuid4()), name="p", rules=KV_APP), create=True
    )
    for name, expires in (("short", t0 + 60), ("long", t0 + 3600), ("never", None)):
        store.acl_token_put(
            ACLToken(
                accessor_id=str(uuid.uuid4()),
                secret_hash=hash_secret(name),
                description=name,
                policies=(policy.id,),
                expires_at=expires,
            ),
            create=True,
        )
    cache = AuthorizerCache(
        store, default_allow=False, fresh=lambda: store.topic_indexes("acl"), clock=clock
    )
    assert cache.resolve("short")[1].key_write("app/x")
    assert cache.resolve("short")[1].key_write("app/x")  # a cache hit
    clock.now = t0 + 60
    with pytest.raises(PermissionDenied, match="ACL not found"):
        cache.resolve("short")
    assert cache.resolve("long")[1].key_write("app/x")
    # Not yet reaped: still in the store; the reaper deletes exactly the expired ones.
    assert store.acl_expire_tokens(t0 + 59) == 0
    assert store.acl_expire_tokens(clock.now) == 1
    assert {t.description for t in store.acl_tokens()} == {"long", "never"}
    clock.now = t0 + 10 * 3600
    with pytest.raises(PermissionDenied, match="ACL not found"):
        cache.resolve("long")
    assert cache.resolve("never")[1].key_write("app/x")
    assert store.acl_expire_tokens(clock.now) == 1
    assert store.acl_expire_tokens(clock.now) == 0


def test_expiration_over_http(c, mgmt):
    before = time.time()
    t = token(c, mgmt, ExpirationTTL="1h")
    at = dt.datetime.fromisoformat(t["ExpirationTime"].replace("Z", "+00:00")).timestamp()
    assert before + 3600 <= at <= time.time() + 3600
    # Go's client sends a time.Duration: nanoseconds.
    t2 = token(c, mgmt, ExpirationTTL=120 * 10**9)
    assert "ExpirationTime" in t2
    when = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    t3 = token(c, mgmt, ExpirationTime=when)
    assert t3["ExpirationTime"].startswith(when[:19])
    assert "ExpirationTime" not in token(c, mgmt)

    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    far = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for body, word in (
        ({"ExpirationTTL": "10s"}, "ExpirationTTL"),
        ({"ExpirationTTL": "25h"}, "ExpirationTTL"),
        ({"ExpirationTTL": "soon"}, "ExpirationTTL"),
        ({"ExpirationTime": "tomorrow"}, "ExpirationTime"),
        ({"ExpirationTime": past}, "past"),
        ({"ExpirationTime": far}, "24h"),
        ({"ExpirationTTL": "1h", "ExpirationTime": when}, "not both"),
    ):
        assert_error(c.put("/v1/acl/token", json=body, headers=mgmt), 400, None, word)
    # An update may send the expiry back, not change it.
    url = f"/v1/acl/token/{t3['AccessorID']}"
    ok(c.put(url, json={"Description": "d", "ExpirationTime": t3["ExpirationTime"]}, headers=mgmt))
    assert ok(c.get(url, headers=mgmt))["ExpirationTime"] == t3["ExpirationTime"]
    assert_error(c.put(url, json={"ExpirationTTL": "2h"}, headers=mgmt), 400, None, "expiration")
    assert_error(c.put(url, json={"ExpirationTime": far}, headers=mgmt), 400, None, "expiration")


def test_an_expired_token_is_acl_not_found_then_reaped(c, mgmt):
    """A token past its expiry (written straight to the store: the API refuses a time in the
    past) is a 403 "ACL not found" everywhere, also on token/self, until the reaper deletes
    it."""
    store = store_of(c)
    store.acl_token_put(
        ACLToken(
            accessor_id=str(uuid.uuid4()),
            secret_hash=hash_secret("expired-secret"),
            description="expired",
            expires_at=time.time() - 1,
        ),
        create=True,
    )
    for url in ("/v1/acl/token/self", "/v1/kv/x", "/v1/catalog/services"):
        assert_error(c.get(url, headers=tok("expired-secret")), 403, None, "ACL not found")
    assert store.acl_expire_tokens(time.time()) == 1
    assert "expired" not in {t.description for t in store.acl_tokens()}


def test_the_background_reaper_deletes_expired_tokens(make_client):
    """The maintenance loop of the process holding the reaper role (the one that expires
    sessions) deletes expired tokens, and only those."""
    c = make_client(**DENY, ttl_check_interval=0.05)
    store = store_of(c)
    for name, expires in (("expired", time.time() - 1), ("live", time.time() + 3600)):
        store.acl_token_put(
            ACLToken(
                accessor_id=str(uuid.uuid4()),
                secret_hash=hash_secret(name),
                description=name,
                expires_at=expires,
            ),
            create=True,
        )
    wait_until(lambda: "expired" not in {t.description for t in store.acl_tokens()})
    assert "live" in {t.description for t in store.acl_tokens()}
    assert c.application.extensions["trellis"].reaper


# -- clone, filters, Consul's small rules -------------------------------------------------------


def test_clone_copies_grants_with_new_ids(c, mgmt):
    ok(c.put("/v1/acl/policy", json={"Name": "app", "Rules": KV_APP}, headers=mgmt))
    ok(c.put("/v1/acl/role", json={"Name": "r"}, headers=mgmt))
    src = token(
        c,
        mgmt,
        Description="original",
        Policies=[{"Name": "app"}],
        Roles=[{"Name": "r"}],
        ServiceIdentities=[{"ServiceName": "web"}],
        ExpirationTTL="2h",
    )
    url = f"/v1/acl/token/{src['AccessorID']}/clone"
    clone = ok(c.put(url, json={"Description": "copy"}, headers=mgmt))
    assert clone["AccessorID"] != src["AccessorID"]
    assert clone["SecretID"] != src["SecretID"]
    assert clone["Description"] == "copy"
    for key in ("Policies", "Roles", "ServiceIdentities", "ExpirationTime", "Local"):
        assert clone[key] == src[key], key
    assert c.put("/v1/kv/app/x", data=b"1", headers=tok(clone["SecretID"])).status_code == 200
    # No body: the original's description.
    assert ok(c.put(url, headers=mgmt))["Description"] == "original"
    # Deleting the original leaves the clone working.
    ok(c.delete(f"/v1/acl/token/{src['AccessorID']}", headers=mgmt))
    assert c.put("/v1/kv/app/y", data=b"1", headers=tok(clone["SecretID"])).status_code == 200
    assert_error(c.put(url, headers=mgmt), 403, None, "ACL not found")
    bad = c.put(f"/v1/acl/token/{clone['AccessorID']}/clone", json={"Description": 5}, headers=mgmt)
    assert_error(bad, 400, None, "Description")


def test_token_list_filters_by_policy(c, mgmt):
    p = ok(c.put("/v1/acl/policy", json={"Name": "app", "Rules": KV_APP}, headers=mgmt))
    t = token(c, mgmt, Policies=[{"Name": "app"}])
    token(c, mgmt)
    listed = ok(c.get(f"/v1/acl/tokens?policy={p['ID']}", headers=mgmt))
    assert [x["AccessorID"] for x in listed] == [t["AccessorID"]]


def test_a_deleted_or_unknown_token_is_403_acl_not_found(c, mgmt):
    t = token(c, mgmt)
    ok(c.get("/v1/acl/token/self", headers=tok(t["SecretID"])))
    ok(c.delete(f"/v1/acl/token/{t['AccessorID']}", headers=mgmt))
    for secret in (t["SecretID"], str(uuid.uuid4())):
        for url in ("/v1/acl/token/self", "/v1/acl/roles", "/v1/kv/x"):
            assert_error(c.get(url, headers=tok(secret)), 403, None, "ACL not found")


def test_reading_or_cloning_a_deleted_or_expired_token_is_403_acl_not_found(c, mgmt):
    """Consul answers a read (and a clone) of a token that does not exist with its
    ``acl.ErrNotFound``, a 403 "ACL not found", not a 404; an expired token not yet reaped
    reads as gone, and lists leave it out. Trellis answered 404 and showed expired tokens."""
    t = token(c, mgmt)
    ok(c.delete(f"/v1/acl/token/{t['AccessorID']}", headers=mgmt))
    for aid in (t["AccessorID"], str(uuid.uuid4())):
        r = c.get(f"/v1/acl/token/{aid}", headers=mgmt)
        assert_error(r, 403, "permission_denied", "ACL not found")
        r = c.put(f"/v1/acl/token/{aid}/clone", headers=mgmt)
        assert_error(r, 403, "permission_denied", "ACL not found")
    expired = str(uuid.uuid4())
    store_of(c).acl_token_put(
        ACLToken(
            accessor_id=expired,
            secret_hash=hash_secret("gone"),
            description="expired",
            expires_at=time.time() - 1,
        ),
        create=True,
    )
    assert_error(c.get(f"/v1/acl/token/{expired}", headers=mgmt), 403, None, "ACL not found")
    assert_error(c.put(f"/v1/acl/token/{expired}/clone", headers=mgmt), 403)
    listed = {x["AccessorID"] for x in ok(c.get("/v1/acl/tokens", headers=mgmt))}
    assert expired not in listed


def test_an_update_may_send_the_tokens_own_secret_back(c, mgmt):
    """Consul's Go client updates a token by sending the whole token back, its SecretID
    included; Consul accepts the same secret and refuses another. Trellis refused both."""
    t = token(c, mgmt)
    url = f"/v1/acl/token/{t['AccessorID']}"
    same = {"SecretID": t["SecretID"], "Description": "renamed"}
    assert ok(c.put(url, json=same, headers=mgmt))["Description"] == "renamed"
    other = {"SecretID": str(uuid.uuid4())}
    assert_error(c.put(url, json=other, headers=mgmt), 400, None, "SecretID cannot be changed")
    ok(c.get("/v1/acl/token/self", headers=tok(t["SecretID"])))


def test_an_accessor_id_keeps_the_case_it_was_given(c, mgmt):
    """Consul keeps the accessor as given and finds it whatever the case; Trellis used to
    lower-case it on create, so a client that compared its own ID with the answer failed."""
    upper = str(uuid.uuid4()).upper()
    t = token(c, mgmt, AccessorID=upper)
    assert t["AccessorID"] == upper
    for aid in (upper, upper.lower()):
        assert ok(c.get(f"/v1/acl/token/{aid}", headers=mgmt))["AccessorID"] == upper
    # The same ID in another case is the same token.
    r = c.put("/v1/acl/token", json={"AccessorID": upper.lower()}, headers=mgmt)
    assert_error(r, 409)
    updated = ok(c.put(f"/v1/acl/token/{upper.lower()}", json={"Description": "new"}, headers=mgmt))
    assert updated["AccessorID"] == upper
    assert upper in {x["AccessorID"] for x in ok(c.get("/v1/acl/tokens", headers=mgmt))}
    assert ok(c.delete(f"/v1/acl/token/{upper.lower()}", headers=mgmt)) is True
    assert_error(c.get(f"/v1/acl/token/{upper}", headers=mgmt), 403, None, "ACL not found")


def test_identities_in_roles_survive_a_damaged_store_as_deny_all(store):
    """An identity the templates cannot render (only a damaged store holds one: they are
    checked on write) denies everything rather than granting what is left."""
    store.acl_role_put(
        ACLRole(id=str(uuid.uuid4()), name="bad", identities={"TemplatedPolicies": [{}]}),
        create=True,
    )
    role = store.acl_role(name="bad")
    store.acl_token_put(
        ACLToken(
            accessor_id=str(uuid.uuid4()),
            secret_hash=hash_secret("s"),
            roles=(role.id,),
            identities={"ServiceIdentities": [{"ServiceName": "web"}]},
        ),
        create=True,
    )
    cache = AuthorizerCache(store, default_allow=True, fresh=lambda: store.topic_indexes("acl"))
    a = cache.resolve("s")[1]
    assert not a.service_write("web") and not a.key_read("x")


def dict_secret(headers: dict[str, str]) -> str:
    return headers["X-Consul-Token"]
