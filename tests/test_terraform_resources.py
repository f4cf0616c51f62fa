"""The Terraform provider's resources and data source against the real app, in process.

Each resource method is called as the ``tf`` framework calls it (a context with its own
diagnostics, state dicts in and out), over the real Flask app through the provider's own
typed client (``httpx.WSGITransport``: no socket), on SQLite and on PostgreSQL. What Terraform
itself does with the results (plans, drift, import) is tests/test_terraform_e2e.py's part.
"""

from __future__ import annotations

import zipfile
from io import BytesIO
from typing import Any

import httpx
import pytest
from tf.iface import (
    CreateContext,
    DeleteContext,
    ImportContext,
    PlanContext,
    ReadContext,
    ReadDataContext,
    UpdateContext,
)
from tf.types import Unknown
from tf.utils import Diagnostics

from tests.api_fixtures import make_client  # noqa: F401 - fixture
from trellis.proxy.client import Client
from trellis.terraform import mirror
from trellis.terraform.data_sources.intention_check import IntentionCheck
from trellis.terraform.provider import TrellisProvider
from trellis.terraform.resources.intention import IntentionResource
from trellis.terraform.resources.key import KeyResource

ADDR = "http://trellis.test"


class Env:
    """The app, a provider configured against it, and a plain client (someone else changing
    things outside Terraform)."""

    def __init__(self, app: Any, token: str | None = None) -> None:
        self.transport = httpx.WSGITransport(app=app)
        self.provider = TrellisProvider({}, transport=self.transport)
        diags = Diagnostics()
        self.provider.configure_provider(diags, {"address": ADDR, "token": token})
        assert not diags.diagnostics, str(diags)
        self.other = Client(ADDR, token=token, transport=self.transport)


@pytest.fixture
def env(make_client):  # noqa: F811 - the fixture imported above
    e = Env(make_client().raw.application)
    yield e
    e.other.close()
    assert e.provider.client is not None
    e.provider.client.close()


def ok(diags: Diagnostics) -> None:
    assert not diags.has_errors(), str(diags)


def one_error(diags: Diagnostics):
    errors = [d for d in diags.diagnostics if d.severity == "error"]
    assert len(errors) == 1, str(diags)
    return errors[0]


def intention(**kw: Any) -> dict[str, Any]:
    state = {
        "id": Unknown,
        "source": "web",
        "destination": "db",
        "action": "allow",
        "description": None,
        "meta": None,
    }
    return {**state, **kw}


def call(method: str, resource: Any, *args: Any) -> tuple[Any, Diagnostics]:
    ctx_type = {
        "create": CreateContext,
        "read": ReadContext,
        "update": UpdateContext,
        "delete": DeleteContext,
        "import_": ImportContext,
    }[method]
    diags = Diagnostics()
    name = "trellis_" + type(resource).get_name()
    return getattr(resource, method)(ctx_type(diags, name), *args), diags


# -- trellis_intention ------------------------------------------------------------------------


def test_intention_create_read_update_import_delete(env):
    r = IntentionResource(env.provider)
    created, d = call("create", r, intention())
    ok(d)
    assert created["id"] and created["id"] is not Unknown
    # Read back what was written: nothing differs, so a plan would show no change (no ""
    # description or {} meta in place of the unset ones).
    read, d = call("read", r, created)
    ok(d)
    assert read == created
    planned = {**created, "action": "deny", "description": "db is private", "meta": {"t": "a"}}
    updated, d = call("update", r, created, planned)
    ok(d)
    assert updated == planned
    got = env.other.intention_get_exact("web", "db").value
    assert (got["Action"], got["Description"], got["Meta"]) == ("deny", "db is private", {"t": "a"})
    read, d = call("read", r, updated)
    ok(d)
    assert read == updated
    # Import by pair and by UUID give the state a read gives.
    for import_id in ("web/db", created["id"]):
        imported, d = call("import_", r, import_id)
        ok(d)
        assert imported == updated
    _, d = call("delete", r, updated)
    ok(d)
    assert env.other.intention_get_exact("web", "db").value is None
    # Deleting what is gone already (deleted outside Terraform) is not an error.
    _, d = call("delete", r, updated)
    ok(d)


def test_intention_drift_is_read_as_it_is(env):
    r = IntentionResource(env.provider)
    created, d = call("create", r, intention(description=""))
    ok(d)
    # "" stays "" (and None stays None, above): each as the configuration spells it.
    assert call("read", r, created)[0]["description"] == ""
    env.other.intention_upsert_exact("web", "db", "deny", description="changed by hand")
    read, d = call("read", r, created)
    ok(d)
    assert (read["action"], read["description"]) == ("deny", "changed by hand")
    # Deleted and made again outside Terraform: found by pair, with its new ID.
    env.other.intention_delete_exact("web", "db")
    gone, d = call("read", r, created)
    ok(d)
    assert gone is None  # Terraform shows "has been deleted" and plans to create it again
    new_id = env.other.intention_create("web", "db", "allow")
    read, d = call("read", r, created)
    ok(d)
    assert read["id"] == new_id != created["id"]
    # An update after a deletion behind Terraform's back puts the intention back.
    env.other.intention_delete_exact("web", "db")
    _, d = call("update", r, read, {**read, "action": "deny"})
    ok(d)
    assert env.other.intention_get_exact("web", "db").value["Action"] == "deny"


def test_intention_conflict_says_how_to_import(env):
    env.other.intention_create("web", "db", "deny")
    r = IntentionResource(env.provider)
    state, d = call("create", r, intention())
    assert state is None
    err = one_error(d)
    assert "conflict" in err.summary and "web => db" in err.summary
    assert "terraform import trellis_intention.NAME web/db" in err.detail


def test_intention_400_points_at_the_attribute(env):
    # Past plan-time validation (a value Terraform only learnt at apply), the server's message
    # is shown on the attribute that caused it.
    r = IntentionResource(env.provider)
    _, d = call("create", r, intention(meta={"k": "v" * 600}))
    err = one_error(d)
    assert err.path == ["meta"], str(d)
    assert "Meta" in err.detail


def test_intention_plan_time_validation(env):
    r = IntentionResource(env.provider)
    diags = Diagnostics()
    r.validate(
        diags,
        "trellis_intention",
        {"source": "web*", "destination": "db", "action": "permit", "description": "x" * 513},
    )
    assert sorted(tuple(e.path) for e in diags.diagnostics) == [
        ("action",),
        ("description",),
        ("source",),
    ]
    # Values Terraform does not know yet are checked by the server, later.
    diags = Diagnostics()
    r.validate(diags, "trellis_intention", {"source": Unknown, "destination": "*", "action": None})
    assert not diags.diagnostics, str(diags)
    for bad in ("web", "web/db/x", "web*/db"):
        _, d = call("import_", r, bad)
        assert "Invalid import ID" in one_error(d).summary
    _, d = call("import_", r, "nobody/db")
    assert "there is none" in one_error(d).summary


def test_intention_403_names_the_missing_permission(make_client):  # noqa: F811
    app = make_client(acl_enabled=True, acl_default_policy="deny").raw.application
    root = Client(ADDR, transport=httpx.WSGITransport(app=app)).acl_bootstrap()["SecretID"]
    admin = Env(app, token=root).other
    admin.acl_policy_create("keys-only", rules='key_prefix "" { policy = "write" }')
    limited = admin.acl_token_create(policy_names=["keys-only"])["SecretID"]
    env = Env(app, token=limited)
    state, d = call("create", IntentionResource(env.provider), intention())
    assert state is None
    err = one_error(d)
    assert err.summary == "Cannot create intention web => db: permission denied"
    assert "lacks intentions:write on 'db'" in err.detail
    assert 'service "db" { intentions = "write" }' in err.detail
    # The same token may write keys: the key resource works with it.
    _, d = call("create", KeyResource(env.provider), key_state())
    ok(d)


# -- trellis_key ------------------------------------------------------------------------------


def key_state(**kw: Any) -> dict[str, Any]:
    state = {
        "id": Unknown,
        "path": "config/web/port",
        "value": "8080",
        "flags": None,
        "cas": None,
        "modify_index": Unknown,
    }
    return {**state, **kw}


def test_key_create_read_update_import_delete(env):
    r = KeyResource(env.provider)
    created, d = call("create", r, key_state(flags=3))
    ok(d)
    pair = env.other.kv_get("config/web/port").value
    assert (pair.value, pair.flags) == (b"8080", 3)
    assert created["modify_index"] == pair.modify_index and created["id"] == "config/web/port"
    assert call("read", r, created)[0] == created
    planned = {**created, "value": "9090", "flags": None, "modify_index": Unknown}
    updated, d = call("update", r, created, planned)
    ok(d)
    pair = env.other.kv_get("config/web/port").value
    assert (pair.value, pair.flags, updated["modify_index"]) == (b"9090", 0, pair.modify_index)
    # flags removed from the configuration: 0 on the server, and no difference on read.
    assert call("read", r, updated)[0] == updated
    imported, d = call("import_", r, "config/web/port")
    ok(d)
    assert imported == updated
    _, d = call("delete", r, updated)
    ok(d)
    assert env.other.kv_get("config/web/port").value is None
    assert call("read", r, updated)[0] is None  # deleted: Terraform plans to create it again


def test_key_drift_and_cas(env):
    r = KeyResource(env.provider)
    env.other.kv_put("config/web/port", "someone else's")
    # cas: creation does not overwrite a key that exists.
    state, d = call("create", r, key_state(cas=True))
    assert state is None
    err = one_error(d)
    assert "conflict" in err.summary and "terraform import" in err.detail
    assert env.other.kv_get("config/web/port").value.value == b"someone else's"
    env.other.kv_delete("config/web/port")
    created, d = call("create", r, key_state(cas=True))
    ok(d)
    # Changed outside Terraform: the read shows it; an update from the refreshed state puts
    # the value back.
    env.other.kv_put("config/web/port", "drifted")
    read, d = call("read", r, created)
    ok(d)
    assert read["value"] == "drifted" and read["modify_index"] > created["modify_index"]
    put_back, d = call("update", r, read, {**read, "value": "8080", "modify_index": Unknown})
    ok(d)
    assert env.other.kv_get("config/web/port").value.value == b"8080"
    # A change between the plan (the refresh) and the apply is not overwritten with cas...
    env.other.kv_put("config/web/port", "raced")
    _, d = call("update", r, put_back, {**put_back, "value": "8081", "modify_index": Unknown})
    assert "changed after Terraform read it" in one_error(d).detail
    assert env.other.kv_get("config/web/port").value.value == b"raced"
    # ...nor deleted.
    _, d = call("delete", r, put_back)
    assert "conflict" in one_error(d).summary
    assert env.other.kv_get("config/web/port").value is not None
    # A value that is not text reads as something no configuration holds: a difference.
    env.other.kv_put("config/web/port", b"\xff\xfe")
    read, d = call("read", r, put_back)
    ok(d)
    assert read["value"] != "8080" and "\ufffd" in read["value"]


def test_key_plan_marks_modify_index_unknown_only_for_a_write(env):
    r = KeyResource(env.provider)
    prior = key_state(id="k", path="k", modify_index=7)
    planned = r.plan(PlanContext(Diagnostics(), "trellis_key", {"value"}), prior, {**prior})
    assert planned["modify_index"] is Unknown
    planned = r.plan(PlanContext(Diagnostics(), "trellis_key", {"cas"}), prior, {**prior})
    assert planned["modify_index"] == 7
    # Only cas changed: nothing is written.
    same, d = call("update", r, prior, {**prior, "cas": True})
    ok(d)
    assert same["cas"] is True and env.other.kv_get("k").value is None


def test_key_plan_time_validation(env):
    r = KeyResource(env.provider)
    for path in ("", "/config/x", "a/../b", "a\nb", "k" * 1025):
        diags = Diagnostics()
        r.validate(diags, "trellis_key", {"path": path, "value": "v", "flags": None})
        assert [e.path for e in diags.diagnostics] == [["path"]], (path, str(diags))
    diags = Diagnostics()
    r.validate(diags, "trellis_key", {"path": "ok/path", "value": "v", "flags": -1})
    assert [e.path for e in diags.diagnostics] == [["flags"]]


# -- data source and provider -----------------------------------------------------------------


def test_intention_check_names_the_deciding_intention(env):
    ds = IntentionCheck(env.provider)

    def check() -> dict[str, Any]:
        diags = Diagnostics()
        out = ds.read(ReadDataContext(diags, "trellis_intention_check"), {
            "source": "web", "destination": "db",
            "allowed": None, "default": None, "intention_id": None, "intention": None,
            "reason": None,
        })  # fmt: skip
        ok(diags)
        return out

    out = check()
    assert (out["allowed"], out["default"], out["intention_id"]) == (True, True, "")
    deny_all = env.other.intention_create("*", "*", "deny")
    out = check()
    assert (out["allowed"], out["default"], out["intention_id"]) == (False, False, deny_all)
    assert out["intention"] == "* => * (deny)"
    exact = env.other.intention_create("web", "db", "allow")
    out = check()
    assert (out["allowed"], out["intention_id"]) == (True, exact)
    assert out["reason"] == "Matched intention: web => db (allow)"
    # The server's own check agrees.
    assert env.other.intention_check("web", "db") is True


def test_provider_settings_fall_back_to_the_environment(dead_url):
    env = {
        "TRELLIS_HTTP_ADDR": "http://env:1",
        "TRELLIS_HTTP_TOKEN": "env-token",
        "TRELLIS_CACERT": "/env/ca.pem",
    }
    p = TrellisProvider(env)
    s = p.settings({"address": None, "token": None, "ca_file": None})
    assert (s["address"], s["token"], s["ca_file"]) == ("http://env:1", "env-token", "/env/ca.pem")
    s = p.settings({"address": "http://cfg:2", "token": "cfg", "ca_file": "/cfg.pem"})
    assert (s["address"], s["token"], s["ca_file"]) == ("http://cfg:2", "cfg", "/cfg.pem")
    assert TrellisProvider({}).settings({})["address"] == "http://127.0.0.1:8500"
    diags = Diagnostics()
    p.validate_config(diags, {"ca_file": "/x.pem", "insecure_skip_verify": True})
    assert [e.path for e in diags.diagnostics] == [["insecure_skip_verify"]]
    # An address known only at apply cannot be planned with (nor replaced by the environment).
    diags = Diagnostics()
    p.configure_provider(diags, {"address": Unknown, "token": None})
    assert one_error(diags).path == ["address"] and p.client is None
    # A bad address is the provider block's fault, and resources say they cannot go on.
    diags = Diagnostics()
    p.configure_provider(diags, {"address": "ftp://x"})
    assert one_error(diags).path == ["address"]
    _, d = call("read", IntentionResource(p), intention(id="x"))
    assert "not configured" in one_error(d).summary
    # The CA file (here from TRELLIS_CACERT) is what verifies an HTTPS server: one that
    # cannot be read stops the provider before any request.
    diags = Diagnostics()
    TrellisProvider({"TRELLIS_CACERT": "/nonexistent/ca.pem"}).configure_provider(
        diags, {"address": "https://127.0.0.1:1"}
    )
    assert "TLS settings" in one_error(diags).detail
    # No server at the address: the diagnostic says which address and what to check.
    p = TrellisProvider({"TRELLIS_HTTP_ADDR": dead_url})
    p.configure_provider(Diagnostics(), {})
    _, d = call("read", KeyResource(p), key_state(id="k", path="k"))
    err = one_error(d)
    assert dead_url in err.detail and "TRELLIS_HTTP_ADDR" in err.detail


def test_provider_refuses_another_datacenter(make_client):  # noqa: F811
    app = make_client().raw.application
    for dc, errors in (("dc1", 0), ("eu-west", 1)):
        p = TrellisProvider({}, transport=httpx.WSGITransport(app=app))
        diags = Diagnostics()
        p.configure_provider(diags, {"address": ADDR, "datacenter": dc})
        assert len(diags.diagnostics) == errors, str(diags)
    assert one_error(diags).path == ["datacenter"] and "'dc1'" in one_error(diags).summary
    assert p.client is None


def test_mirror_package_is_deterministic_and_executable(tmp_path):
    first = mirror.write_mirror(tmp_path / "m", python="/opt/py/bin/python")
    data = first.read_bytes()
    assert mirror.write_mirror(tmp_path / "m", python="/opt/py/bin/python").read_bytes() == data
    assert first.relative_to(tmp_path / "m").as_posix() == (
        "trellis.invalid/trellis/trellis/"
        f"terraform-provider-trellis_0.1.0_{mirror.target_platform()}.zip"
    )
    (info,) = zipfile.ZipFile(BytesIO(data)).infolist()
    assert info.filename == "terraform-provider-trellis_v0.1.0"
    assert (info.external_attr >> 16) & 0o777 == 0o755
    script = zipfile.ZipFile(BytesIO(data)).read(info)
    assert script.startswith(b"#!/bin/sh\n")
    assert b"exec /opt/py/bin/python -m trellis.terraform" in script
    config = mirror.cli_config(tmp_path / "m")
    assert f'path    = "{tmp_path / "m"}"' in config
    assert 'exclude = ["trellis.invalid/trellis/trellis"]' in config
    assert "disable_checkpoint = true" in config
