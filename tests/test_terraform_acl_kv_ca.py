"""The provider's ``trellis_keys``, ``trellis_acl_policy``, ``trellis_acl_token`` and
``trellis_ca_config`` resources and the ``trellis_key``, ``trellis_keys`` and
``trellis_ca_roots`` data sources, against the real app in process (SQLite and PostgreSQL),
called as the ``tf`` framework calls them (tests/test_terraform_resources.py's harness). The
Vault cases use a real OpenBao (tests/vault_fixtures.py).
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from tf.iface import PlanContext, ReadDataContext
from tf.types import Unknown
from tf.utils import Diagnostics

from tests import vault_fixtures
from tests.api_fixtures import make_client  # noqa: F401 - fixture
from tests.test_terraform_resources import ADDR, Env, call, ok, one_error
from trellis.proxy.client import Client
from trellis.terraform.data_sources.ca_roots import CARoots
from trellis.terraform.data_sources.kv import KeyData, KeysData
from trellis.terraform.provider import TrellisProvider
from trellis.terraform.resources.acl_policy import ACLPolicyResource
from trellis.terraform.resources.acl_token import ACLTokenResource
from trellis.terraform.resources.ca_config import CAConfigResource
from trellis.terraform.resources.keys import KeysResource

openbao = vault_fixtures.openbao
vault_paths = vault_fixtures.vault_paths


@pytest.fixture
def env(make_client):  # noqa: F811
    e = Env(make_client().raw.application)
    yield e
    close(e)


def close(e: Env) -> None:
    e.other.close()
    if e.provider.client is not None:
        e.provider.client.close()


@pytest.fixture
def acl_env(make_client):  # noqa: F811
    """An app with ACLs on (default deny) and a provider holding the management token."""
    app = make_client(acl_enabled=True, acl_default_policy="deny").raw.application
    with Client(ADDR, transport=httpx.WSGITransport(app=app)) as anonymous:
        root = anonymous.acl_bootstrap()["SecretID"]
    e = Env(app, token=root)
    yield e
    close(e)


def plan(resource: Any, current: Any, planned: Any) -> tuple[Any, Diagnostics]:
    diags = Diagnostics()
    changed = {k for k in planned if current is not None and current.get(k) != planned.get(k)}
    name = "trellis_" + type(resource).get_name()
    return resource.plan(PlanContext(diags, name, changed), current, dict(planned)), diags


def warnings(diags: Diagnostics) -> list[Any]:
    return [d for d in diags.diagnostics if d.severity == "warning"]


def validate(resource: Any, config: dict[str, Any]) -> Diagnostics:
    diags = Diagnostics()
    resource.validate(diags, "trellis_" + type(resource).get_name(), config)
    return diags


def read_data(ds: Any, config: dict[str, Any]) -> tuple[Any, Diagnostics]:
    diags = Diagnostics()
    return ds.read(ReadDataContext(diags, "trellis_" + type(ds).get_name()), config), diags


# -- trellis_keys -----------------------------------------------------------------------------


def keys_state(**kw: Any) -> dict[str, Any]:
    state = {
        "id": Unknown,
        "path_prefix": "config/web/",
        "values": {"port": "8080", "db/host": "db.local"},
        "flags": {"port": 42},
        "delete_undeclared": None,
        "undeclared": Unknown,
    }
    return {**state, **kw}


def test_keys_create_drift_import_delete(env):
    r = KeysResource(env.provider)
    env.other.kv_put("config/web/old", "someone else's")
    env.other.kv_put("config/website", "outside the prefix")
    created, d = call("create", r, keys_state())
    ok(d)
    assert created["undeclared"] == ["config/web/old"]  # listed, left alone
    assert env.other.kv_get("config/web/old").value is not None
    pair = env.other.kv_get("config/web/port").value
    assert (pair.value, pair.flags) == (b"8080", 42)
    assert env.other.kv_get("config/web/db/host").value.flags == 0
    assert call("read", r, created)[0] == created  # no change to plan

    # Drift: a value changed, a declared key deleted, flags set on another declared key.
    env.other.kv_put("config/web/port", "9999", flags=42)
    env.other.kv_delete("config/web/db/host")
    read, d = call("read", r, created)
    ok(d)
    assert read["values"] == {"port": "9999"}  # db/host missing: the plan writes it again
    env.other.kv_put("config/web/db/host", "db.local", flags=7)
    read, d = call("read", r, created)
    assert read["flags"] == {"port": 42, "db/host": 7}
    planned, d = plan(r, read, created)
    ok(d)
    assert planned["undeclared"] == ["config/web/old"] and not warnings(d)
    put_back, d = call("update", r, read, planned)
    ok(d)
    got = {p.key: (p.value, p.flags) for p in env.other.kv_get("config/web/", recurse=True).value}
    assert got == {
        "config/web/port": (b"8080", 42),
        "config/web/db/host": (b"db.local", 0),
        "config/web/old": (b"someone else's", 0),
    }
    assert call("read", r, put_back)[0] == put_back

    # A key dropped from values is deleted (it was Terraform's); the undeclared one stays.
    smaller = {**put_back, "values": {"port": "8080"}}
    planned, d = plan(r, put_back, smaller)
    updated, d = call("update", r, put_back, planned)
    ok(d)
    assert env.other.kv_get("config/web/db/host").value is None
    assert env.other.kv_get("config/web/old").value is not None

    # Import by prefix: every key under it declared.
    imported, d = call("import_", r, "config/web/")
    ok(d)
    assert imported["values"] == {"port": "8080", "old": "someone else's"}
    assert imported["flags"] == {"port": 42} and imported["undeclared"] == []

    # Destroy deletes the declared keys only.
    _, d = call("delete", r, updated)
    ok(d)
    left = [p.key for p in env.other.kv_get("config/", recurse=True).value]
    assert left == ["config/web/old", "config/website"]


def test_keys_delete_undeclared_only_after_a_plan_listed_them(env):
    r = KeysResource(env.provider)
    env.other.kv_put("config/web/old", "x")
    env.other.kv_put("config/web/older", "y")
    created, d = call("create", r, keys_state(delete_undeclared=True))
    ok(d)
    # Creation deletes nothing: no plan listed the keys yet.
    assert created["undeclared"] == ["config/web/old", "config/web/older"]
    assert env.other.kv_get("config/web/old").value is not None
    # The next plan lists them, as a change and a warning; the apply deletes exactly those.
    read, _ = call("read", r, created)
    planned, d = plan(r, read, {**read})
    assert planned["undeclared"] == []
    (w,) = warnings(d)
    assert "will delete 2 key(s)" in w.summary
    assert "config/web/old\n  config/web/older" in w.detail
    env.other.kv_put("config/web/newest", "made after the plan")
    done, d = call("update", r, read, planned)
    ok(d)
    assert done["undeclared"] == []
    left = sorted(p.key for p in env.other.kv_get("config/web/", recurse=True).value)
    assert left == ["config/web/db/host", "config/web/newest", "config/web/port"]
    # Without delete_undeclared, nothing is planned for deletion.
    read, _ = call("read", r, done)
    planned, d = plan(r, read, {**read, "delete_undeclared": False})
    assert planned["undeclared"] == ["config/web/newest"] and not warnings(d)


def test_keys_plan_time_validation(env):
    r = KeysResource(env.provider)
    good = {"path_prefix": "config/web/", "values": {"a": "1"}, "flags": {"a": 1}}
    assert not validate(r, good).diagnostics
    for bad, where in (
        ({"path_prefix": "config/web"}, "path_prefix"),  # no trailing /: covers config/website
        ({"path_prefix": "/config/"}, "path_prefix"),
        ({"values": {"a": "1", "": "x"}}, "values"),
        ({"values": {"a": "1", "a/../b": "x"}}, "values"),
        ({"flags": {"b": 1}}, "flags"),  # flags for an undeclared key
        ({"flags": {"a": -1}}, "flags"),
    ):
        d = validate(r, {**good, **bad})
        assert [e.path for e in d.diagnostics] == [[where]], (bad, str(d))
    _, d = call("import_", r, "config/none/")
    assert "there are none" in one_error(d).summary


# -- trellis_acl_policy -----------------------------------------------------------------------

RULES = (
    'service "web" {\n  policy = "write"\n  intentions = "write"\n}\n'
    'key_prefix "config/" { policy = "read" }\n'
)
SAME_RULES_REFORMATTED = (
    'key_prefix "config/" {\n    policy = "read"\n}\n\n'
    'service "web" { intentions = "write"\n policy = "write" }\n'
)
SAME_RULES_JSON = (
    '{"key_prefix": {"config/": {"policy": "read"}},'
    ' "service": {"web": {"policy": "write", "intentions": "write"}}}'
)


def policy_state(**kw: Any) -> dict[str, Any]:
    state = {"id": Unknown, "name": "web", "description": None, "rules": RULES, "datacenters": None}
    return {**state, **kw}


def test_policy_rules_compare_by_meaning(acl_env):
    r = ACLPolicyResource(acl_env.provider)
    created, d = call("create", r, policy_state())
    ok(d)
    assert call("read", r, created)[0] == created
    # Reformatted (or rewritten as JSON) in the configuration: the plan keeps the prior text,
    # so Terraform sees no change.
    for text in (SAME_RULES_REFORMATTED, SAME_RULES_JSON):
        planned, d = plan(r, created, {**created, "rules": text})
        ok(d)
        assert planned == created
    # Rewritten outside Terraform with the same meaning: the read keeps the state's text.
    acl_env.other.acl_policy_update(created["id"], "web", rules=SAME_RULES_JSON)
    assert call("read", r, created)[0] == created
    # A change of meaning is a change.
    wider = RULES.replace('"read"', '"write"')
    planned, _ = plan(r, created, {**created, "rules": wider})
    assert planned["rules"] == wider
    updated, d = call("update", r, created, {**planned, "description": "web's"})
    ok(d)
    got = acl_env.other.acl_policy_read(created["id"])
    assert (got["Rules"], got["Description"]) == (wider, "web's")
    # Drift: changed outside Terraform shows the server's text.
    acl_env.other.acl_policy_update(created["id"], "web", rules=RULES, description="web's")
    assert call("read", r, updated)[0]["rules"] == RULES
    # Import by name and by ID.
    for import_id in ("web", created["id"]):
        imported, d = call("import_", r, import_id)
        ok(d)
        assert imported["id"] == created["id"] and imported["rules"] == RULES
    # A second policy of that name: a conflict that says how to import.
    _, d = call("create", r, policy_state())
    err = one_error(d)
    assert (
        "conflict" in err.summary and "terraform import trellis_acl_policy.NAME web" in err.detail
    )
    _, d = call("delete", r, updated)
    ok(d)
    assert call("read", r, updated)[0] is None  # deleted: planned for creation again
    _, d = call("delete", r, updated)  # gone already: not an error
    ok(d)


def test_policy_plan_time_validation(acl_env):
    r = ACLPolicyResource(acl_env.provider)
    d = validate(r, {"name": "web db", "rules": 'service "web" { policy = "own" }'})
    assert sorted(e.path for e in d.diagnostics) == [["name"], ["rules"]]
    assert (
        "policy must be read, write or deny"
        in next(e for e in d.diagnostics if e.path == ["rules"]).detail
    )
    d = validate(r, {"name": "web", "rules": 'agent "" { policy = "read" }'})
    assert "unknown rule" in one_error(d).detail
    assert not validate(r, {"name": "web", "rules": SAME_RULES_JSON}).diagnostics
    _, d = call("import_", r, "nobody")
    assert "there is none" in one_error(d).summary


# -- trellis_acl_token ------------------------------------------------------------------------


def token_state(**kw: Any) -> dict[str, Any]:
    state = {
        "id": Unknown,
        "accessor_id": Unknown,
        "secret_id": Unknown,
        "description": "ci",
        "policies": ["web"],
        "local": None,
    }
    return {**state, **kw}


def test_token_secret_import_drift(acl_env):
    acl_env.other.acl_policy_create("web", rules=RULES)
    acl_env.other.acl_policy_create("ops", rules='operator = "read"')
    r = ACLTokenResource(acl_env.provider)
    created, d = call("create", r, token_state())
    ok(d)
    secret = created["secret_id"]
    assert secret and created["accessor_id"] == created["id"]
    # The secret works, and holds the policy.
    with Client(ADDR, token=secret, transport=acl_env.transport) as c:
        assert c.acl_token_self()["AccessorID"] == created["accessor_id"]
    assert call("read", r, created)[0] == created
    # Import by accessor ID: everything but the secret, which no read returns.
    imported, d = call("import_", r, created["accessor_id"])
    ok(d)
    assert imported == {**created, "secret_id": None}
    # Drift: a policy added outside Terraform shows.
    acl_env.other.acl_token_update(
        created["accessor_id"], description="ci", policies=[{"Name": "web"}, {"Name": "ops"}]
    )
    read, d = call("read", r, created)
    assert sorted(read["policies"]) == ["ops", "web"] and read["secret_id"] == secret
    updated, d = call("update", r, read, {**created, "local": True})
    ok(d)
    got = acl_env.other.acl_token_read(created["accessor_id"])
    assert [p["Name"] for p in got["Policies"]] == ["web"] and got["Local"] is True
    # A policy that does not exist: the server's message, on policies.
    _, d = call("create", r, token_state(policies=["nope"]))
    err = one_error(d)
    assert err.path == ["policies"] and "nope" in err.detail
    for bad in ("not-a-uuid", secret.upper()[:8]):
        _, d = call("import_", r, bad)
        assert "Invalid import ID" in one_error(d).summary
    _, d = call("delete", r, updated)
    ok(d)
    assert call("read", r, updated)[0] is None


def test_a_token_read_with_an_unknown_provider_token_is_an_error_not_gone(acl_env):
    """The server answers a read of a missing token with 403 "ACL not found", as Consul does,
    and the same words when the caller's own token is unknown. The resource must drop the
    token from its state only in the first case: a provider holding a deleted token must
    report the error, not plan to recreate every token it manages."""
    acl_env.other.acl_policy_create("web", rules=RULES)
    r = ACLTokenResource(acl_env.provider)
    created, d = call("create", r, token_state())
    ok(d)
    p = TrellisProvider({}, transport=acl_env.transport)
    p.configure_provider(Diagnostics(), {"address": ADDR, "token": str(uuid.uuid4())})
    state, d = call("read", ACLTokenResource(p), created)
    assert state == created
    assert "ACL not found" in one_error(d).detail + one_error(d).summary
    # With a working token, a deleted token is gone from the state.
    acl_env.other.acl_token_delete(created["accessor_id"])
    assert call("read", r, created)[0] is None


def test_acl_403_names_the_permission(acl_env):
    acl_env.other.acl_policy_create("keys", rules='key_prefix "" { policy = "write" }')
    limited = acl_env.other.acl_token_create(policy_names=["keys"])["SecretID"]
    p = TrellisProvider({}, transport=acl_env.transport)
    p.configure_provider(Diagnostics(), {"address": ADDR, "token": limited})
    _, d = call("create", ACLPolicyResource(p), policy_state())
    err = one_error(d)
    assert err.summary == "Cannot create ACL policy web: permission denied"
    assert 'acl = "write"' in err.detail
    # The CA's configuration needs operator:write, even to read it.
    _, d = call("read", CAConfigResource(p), ca_state(id="connect-ca"))
    err = one_error(d)
    assert err.summary == "Cannot read the CA configuration: permission denied"
    assert "operator:write" in err.detail and 'operator = "write"' in err.detail
    # The keys it may write: the resource works with it.
    _, d = call("create", KeysResource(p), keys_state())
    ok(d)
    assert p.client is not None
    p.client.close()


# -- trellis_ca_config ------------------------------------------------------------------------


def ca_state(**kw: Any) -> dict[str, Any]:
    state: dict[str, Any] = {a.name: None for a in CAConfigResource.get_schema().attributes}
    return {**state, "id": Unknown, "root_id": Unknown, "connect_provider": "consul", **kw}


def ca_config(state: dict[str, Any]) -> dict[str, Any]:
    """A state as Terraform passes it to validate: computed-only attributes null."""
    return {**state, "id": None, "root_id": None}


def test_ca_config_builtin_rotation_drift_import_destroy(env):
    r = CAConfigResource(env.provider)
    first_root = env.other.ca_roots().value["ActiveRootID"]
    created, d = call("create", r, ca_state(leaf_cert_ttl="24h"))
    ok(d)
    assert created["root_id"] == first_root  # a TTL needs no new root
    assert env.other.ca_get_config()["Config"]["LeafCertTTL"] == "24h"
    assert call("read", r, created)[0] == created  # 24h == 24h0m0s, consul == builtin
    # The same meaning, spelt otherwise: no change.
    planned, d = plan(
        r, created, {**created, "leaf_cert_ttl": "1440m", "connect_provider": "builtin"}
    )
    assert planned == created
    # Configured (plan time): a change of key type warns like a replacement, and the root's
    # ID becomes unknown in the plan.
    config = {**created, "private_key_type": "rsa", "private_key_bits": 2048}
    d = validate(r, ca_config(config))
    ok(d)
    (w,) = warnings(d)
    assert "replaces the CA root" in w.summary and "private_key_type" in w.detail
    assert not validate(r, ca_config(created)).diagnostics
    planned, d = plan(r, created, config)
    assert planned["root_id"] is Unknown
    rotated, d = call("update", r, created, planned)
    ok(d)
    assert rotated["root_id"] != first_root
    assert env.other.ca_roots().value["ActiveRootID"] == rotated["root_id"]
    # Drift: a TTL changed outside Terraform shows; one left at its default does not.
    body = env.other.ca_get_config()
    env.other.ca_set_config(
        {"Provider": "builtin", "Config": {**body["Config"], "LeafCertTTL": "48h"}}
    )
    read, d = call("read", r, rotated)
    assert read["leaf_cert_ttl"] == "48h" and read["root_cert_ttl"] is None
    # Import adopts the cluster's configuration.
    imported, d = call("import_", r, "connect-ca")
    ok(d)
    assert (imported["connect_provider"], imported["private_key_type"]) == ("builtin", "rsa")
    _, d = call("import_", r, "ca")
    assert "Invalid import ID" in one_error(d).summary
    # Destroy forgets it, says so, and leaves the CA alone.
    gone, d = call("delete", r, read)
    assert gone is None and not d.has_errors()
    assert "stays as it is" in warnings(d)[0].summary
    assert env.other.ca_roots().value["ActiveRootID"] == rotated["root_id"]


def test_ca_config_plan_time_validation(env):
    r = CAConfigResource(env.provider)
    for bad, where in (
        ({"connect_provider": "acme"}, "connect_provider"),
        ({"leaf_cert_ttl": "3 days"}, "leaf_cert_ttl"),
        ({"private_key_type": "dsa"}, "private_key_type"),
        ({"vault_address": "https://v"}, "vault_address"),  # a vault setting on consul
        # No token source:
        ({"connect_provider": "vault", "vault_address": "https://v"}, "vault_token_file"),
        (
            {"connect_provider": "vault", "vault_address": "https://v", "vault_token": "t",
             "vault_token_env": "T"},
            "vault_token_env",
        ),
    ):  # fmt: skip
        d = validate(r, ca_config(ca_state(**bad)))
        assert [e.path for e in d.diagnostics if e.severity == "error"] == [[where]], (bad, str(d))


def test_ca_config_vault_token_from_file_or_env_never_in_state(
    make_client,  # noqa: F811
    openbao,
    vault_paths,
    tmp_path,
):
    app = make_client().raw.application
    transport = httpx.WSGITransport(app=app)
    provider = TrellisProvider({"BAO_TOKEN": openbao.token}, transport=transport)
    provider.configure_provider(Diagnostics(), {"address": ADDR})
    r = CAConfigResource(provider)
    token_file = tmp_path / "vault-token"
    token_file.write_text(openbao.token + "\n")
    vault = {
        "connect_provider": "vault",
        "vault_address": openbao.address,
        "vault_root_pki_path": vault_paths.root,
        "vault_intermediate_pki_path": vault_paths.intermediate,
        "vault_token_file": str(token_file),
    }
    ok(validate(r, ca_config(ca_state(**vault))))
    created, d = call("create", r, ca_state(**vault))
    ok(d)
    assert openbao.token not in repr(created)
    with Client(ADDR, transport=transport) as other:
        roots = other.ca_roots().value
        assert roots["ActiveRootID"] == created["root_id"]
        assert other.ca_get_config()["Provider"] == "vault"
    assert call("read", r, created)[0] == created
    # The token from the environment instead: no new root, nothing secret in the state.
    by_env = {**created, "vault_token_file": None, "vault_token_env": "BAO_TOKEN"}
    planned, _ = plan(r, created, by_env)
    assert planned["root_id"] == created["root_id"]
    updated, d = call("update", r, created, planned)
    ok(d)
    assert openbao.token not in repr(updated)
    # A token source that gives nothing is the configuration's error, on its attribute.
    token_file.unlink()
    _, d = call("update", r, updated, {**created, "leaf_cert_ttl": "24h"})
    assert one_error(d).path == ["vault_token_file"]
    _, d = call("update", r, updated, {**by_env, "vault_token_env": "UNSET_VAR"})
    assert one_error(d).path == ["vault_token_env"]


# -- data sources -----------------------------------------------------------------------------


def test_key_keys_and_ca_roots_data_sources(env):
    env.other.kv_put("config/web/port", "8080", flags=3)
    env.other.kv_put("config/web/db/host", "db")
    out, d = read_data(KeyData(env.provider), {"path": "config/web/port", "default": None})
    ok(d)
    assert (out["value"], out["flags"], out["exists"]) == ("8080", 3, True)
    out, d = read_data(KeyData(env.provider), {"path": "config/none", "default": "x"})
    assert (out["value"], out["exists"]) == ("x", False)
    _, d = read_data(KeyData(env.provider), {"path": "config/none", "default": None})
    assert one_error(d).path == ["path"]
    out, d = read_data(KeysData(env.provider), {"path_prefix": "config/web/"})
    ok(d)
    assert out["values"] == {"port": "8080", "db/host": "db"}
    assert out["flags"] == {"port": 3, "db/host": 0}
    out, d = read_data(CARoots(env.provider), {})
    ok(d)
    roots = env.other.ca_roots().value
    assert out["active_root_id"] == roots["ActiveRootID"] == out["root_ids"][0]
    assert out["active_root_cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert out["trust_domain"] == roots["TrustDomain"]
    assert out["pem_bundle"] == env.other.ca_roots_pem()
