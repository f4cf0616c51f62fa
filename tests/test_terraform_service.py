"""``trellis_service`` and the ``trellis_service`` / ``trellis_services`` data sources against
the real app in process (both stores), called as the ``tf`` framework calls them (see
tests/test_terraform_resources.py, whose helpers these tests share)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tf.iface import PlanContext, ReadDataContext
from tf.types import Unknown
from tf.utils import Diagnostics

from tests.api_fixtures import make_client  # noqa: F401 - fixture
from tests.test_terraform_resources import ADDR, Env, call, env, ok, one_error  # noqa: F401
from trellis.proxy.client import Client
from trellis.proxy.config import SIDECAR_MIN_PORT
from trellis.terraform.data_sources.service import ServiceData
from trellis.terraform.data_sources.services import ServicesData
from trellis.terraform.resources.service import ServiceResource


def service(**kw: Any) -> dict[str, Any]:
    state = {
        "id": Unknown,
        "name": "web",
        "service_id": None,
        "node": "node-1",
        "address": "10.0.0.5",
        "port": 8080,
        "tags": None,
        "meta": None,
        "sidecar": None,
        "sidecar_port": Unknown,
        "check": [],
        "upstream": [],
    }
    return {**state, **kw}


def check_block(**kw: Any) -> dict[str, Any]:
    c = {
        "check_id": "web-alive",
        "name": "alive",
        "notes": None,
        "status": "passing",
        "tcp": None,
        "http": None,
        "ttl": None,
        "interval": None,
        "timeout": None,
    }
    return {**c, **kw}


def upstream(dest: str, port: int, address: str | None = None) -> dict[str, Any]:
    return {"destination_name": dest, "local_bind_port": port, "local_bind_address": address}


def node_services(api: Client, node: str = "node-1") -> dict[str, Any]:
    return (api.catalog_node(node).value or {}).get("Services") or {}


def test_service_with_sidecar_create_read_update_import_delete(env):  # noqa: F811
    r = ServiceResource(env.provider)
    planned = service(
        tags=["b", "a"],
        meta={"team": "web"},
        sidecar=True,
        check=[check_block(tcp="10.0.0.5:8080", interval="10s")],
        upstream=[upstream("db", 9191)],
    )
    created, d = call("create", r, planned)
    ok(d)
    assert (created["id"], created["service_id"]) == ("node-1/web", "web")
    assert created["sidecar_port"] == SIDECAR_MIN_PORT
    svcs = node_services(env.other)
    assert sorted(svcs) == ["web", "web-sidecar-proxy"]
    sc = svcs["web-sidecar-proxy"]
    # The registration the server's connect.sidecar_service makes (shared code), with the
    # upstreams, and without the agent-run checks nobody would run here.
    assert (sc["Kind"], sc["Port"], sc["Address"]) == ("connect-proxy", 21000, "10.0.0.5")
    assert sc["Proxy"]["DestinationServiceID"] == "web"
    assert sc["Proxy"]["LocalServicePort"] == 8080
    assert sc["Proxy"]["Upstreams"] == [{"DestinationName": "db", "LocalBindPort": 9191}]
    assert (sorted(sc["Tags"]), sc["Meta"]) == (["a", "b"], {"team": "web"})
    checks = {c["CheckID"]: c for c in env.other.health_node("node-1")}
    assert set(checks) == {"web-alive"} and checks["web-alive"]["Status"] == "passing"
    # Healthy through the sidecar: what an upstream proxy dials.
    (inst,) = env.other.health_connect("web", passing=True).value
    assert inst["Service"]["Port"] == 21000

    # Read back: nothing differs (tags as a set, unset fields stay unset).
    read, d = call("read", r, created)
    ok(d)
    assert {**read, "tags": sorted(read["tags"])} == {**created, "tags": ["a", "b"]}
    # A check's status changed by whoever runs it is not drift.
    env.other.catalog_register(
        {
            "Node": "node-1",
            "Address": "10.0.0.5",
            "SkipNodeUpdate": True,
            "Check": {"CheckID": "web-alive", "Name": "alive", "ServiceID": "web",
                      "Status": "critical", "TCP": "10.0.0.5:8080", "Interval": "10s"},
        }
    )  # fmt: skip
    assert call("read", r, created)[0]["check"] == created["check"]

    # Update: another upstream, a tag, no check; the sidecar keeps its port.
    planned = {
        **read,
        "tags": ["a"],
        "check": [],
        "upstream": [upstream("db", 9191), upstream("cache", 9292, "127.0.0.2")],
    }
    planned = r.plan(PlanContext(Diagnostics(), "trellis_service", {"tags"}), read, planned)
    updated, d = call("update", r, read, planned)
    ok(d)
    sc = node_services(env.other)["web-sidecar-proxy"]
    assert sc["Port"] == 21000 and len(sc["Proxy"]["Upstreams"]) == 2
    assert env.other.health_node("node-1") == []
    read, d = call("read", r, updated)
    ok(d)
    assert sorted(read["upstream"], key=str) == sorted(updated["upstream"], key=str)
    assert read["tags"] == ["a"] and read["check"] == []

    # Import gives what a read gives.
    imported, d = call("import_", r, "node-1/web")
    ok(d)
    assert imported["sidecar"] is True and imported["sidecar_port"] == 21000
    assert sorted(imported["upstream"], key=str) == sorted(read["upstream"], key=str)

    # The sidecar switched off: deregistered, and the plan says the port goes.
    off = r.plan(
        PlanContext(Diagnostics(), "trellis_service", {"sidecar"}),
        read,
        {**read, "sidecar": False, "upstream": []},
    )
    assert off["sidecar_port"] is None
    updated, d = call("update", r, read, off)
    ok(d)
    assert sorted(node_services(env.other)) == ["web"]
    _, d = call("delete", r, updated)
    ok(d)
    assert node_services(env.other) == {}
    _, d = call("delete", r, updated)  # gone already: not an error
    ok(d)
    assert call("read", r, updated)[0] is None


def test_service_plain_reads_with_no_change_and_drift_shows(env):  # noqa: F811
    r = ServiceResource(env.provider)
    created, d = call("create", r, service(address=None, port=None, service_id="web-1"))
    ok(d)
    assert created["sidecar_port"] is None
    read, d = call("read", r, created)
    ok(d)
    assert read == created  # no "" address, no port 0, no [] tags, no {} meta
    # Changed outside Terraform: the read shows it.
    env.other.catalog_register(
        {"Node": "node-1", "Address": "127.0.0.1", "SkipNodeUpdate": True,
         "Service": {"ID": "web-1", "Service": "web", "Port": 9999, "Tags": ["x"]}}
    )  # fmt: skip
    read, d = call("read", r, created)
    ok(d)
    assert (read["port"], read["tags"]) == (9999, ["x"])
    # Deregistered outside Terraform: gone.
    env.other.catalog_deregister("node-1", service_id="web-1")
    assert call("read", r, created)[0] is None


def test_service_sidecar_ports_do_not_collide(env):  # noqa: F811
    r = ServiceResource(env.provider)
    # A port someone else holds on the node is skipped; two sidecars get two ports.
    env.other.catalog_register(
        {"Node": "node-1", "Address": "127.0.0.1",
         "Service": {"ID": "other", "Service": "other", "Port": SIDECAR_MIN_PORT}}
    )  # fmt: skip
    ports = []
    for name in ("web", "api"):
        created, d = call("create", r, service(name=name, port=None, sidecar=True))
        ok(d)
        ports.append(created["sidecar_port"])
    assert ports == [SIDECAR_MIN_PORT + 1, SIDECAR_MIN_PORT + 2]
    # A given port is kept as given.
    created, d = call("create", r, service(name="db", sidecar=True, sidecar_port=30000))
    ok(d)
    assert node_services(env.other)["db-sidecar-proxy"]["Port"] == 30000


def test_service_errors_are_diagnostics(env):  # noqa: F811
    r = ServiceResource(env.provider)
    _, d = call("create", r, service())
    ok(d)
    # The same ID again, from another configuration: a conflict that says how to import.
    state, d = call("create", r, service())
    assert state is None
    err = one_error(d)
    assert "conflict" in err.summary
    assert "terraform import trellis_service.NAME node-1/web" in err.detail
    # A 400 past plan-time validation points at the attribute.
    state, d = call("create", r, service(name="api", meta={"k": "v" * 600}))
    assert state is None and one_error(d).path == ["meta"], str(d)
    for bad in ("web", "node-1/", "/web", "no de/web"):
        _, d = call("import_", r, bad)
        assert "Invalid import ID" in one_error(d).summary, bad
    _, d = call("import_", r, "node-1/nothing")
    assert "there is none" in one_error(d).summary


def test_service_plan_time_validation(env):  # noqa: F811
    r = ServiceResource(env.provider)

    def errors(**kw: Any) -> list[Any]:
        diags = Diagnostics()
        r.validate(diags, "trellis_service", service(**{"id": None, "sidecar_port": None, **kw}))
        return sorted(e.path[0] for e in diags.diagnostics)

    assert errors() == []
    assert errors(name="web*", node="a b", port=70000) == ["name", "node", "port"]
    assert errors(sidecar_port=21000) == ["sidecar_port"]  # without sidecar = true
    assert errors(upstream=[upstream("db", 1)]) == ["upstream"]
    assert errors(sidecar=True, upstream=[upstream("db", 1), upstream("x", 1)]) == ["upstream"]
    assert errors(check=[check_block(status="ok", tcp="a:1")]) == ["check", "check"]
    assert errors(check=[check_block(ttl="10 s")]) == ["check"]
    # Values known only at apply are left to the server.
    assert errors(name=Unknown, sidecar=Unknown, upstream=[upstream("db", 9)]) == []


def test_service_403_names_the_missing_permission(make_client):  # noqa: F811
    app = make_client(acl_enabled=True, acl_default_policy="deny").raw.application
    root = Client(ADDR, transport=httpx.WSGITransport(app=app)).acl_bootstrap()["SecretID"]
    admin = Env(app, token=root).other
    admin.acl_policy_create("web-only", rules='service "web" { policy = "write" }')
    limited = admin.acl_token_create(policy_names=["web-only"])["SecretID"]
    e = Env(app, token=limited)
    state, d = call("create", ServiceResource(e.provider), service(name="db"))
    assert state is None
    err = one_error(d)
    assert err.summary == "Cannot create service node-1/db: permission denied"
    assert 'service "db" { policy = "write" }' in err.detail


def read_data(ds: Any, config: dict[str, Any]) -> dict[str, Any]:
    diags = Diagnostics()
    out = ds.read(ReadDataContext(diags, "trellis_" + ds.get_name()), config)
    ok(diags)
    return out


def test_service_data_sources(env):  # noqa: F811
    r = ServiceResource(env.provider)
    for node, status in (("node-1", "passing"), ("node-2", "passing"), ("node-3", "critical")):
        _, d = call(
            "create",
            r,
            service(node=node, tags=["v1"], check=[check_block(check_id="c", status=status)]),
        )
        ok(d)
    _, d = call("create", r, service(name="db", node="node-4", address=None, port=5432))
    ok(d)
    out = read_data(ServiceData(env.provider), {"name": "web", "tag": None, "instances": None})
    assert [(i["node"], i["id"], i["port"], i["tags"]) for i in out["instances"]] == [
        ("node-1", "web", 8080, ["v1"]),
        ("node-2", "web", 8080, ["v1"]),
    ]  # node-3's instance is critical
    out = read_data(ServiceData(env.provider), {"name": "db", "tag": None, "instances": None})
    assert out["instances"][0]["address"] == "127.0.0.1"  # the node's: the service has none
    out = read_data(ServiceData(env.provider), {"name": "web", "tag": "v2", "instances": None})
    assert out["instances"] == []
    out = read_data(ServicesData(env.provider), {"names": None, "tags": None})
    assert "web" in out["names"] and "db" in out["names"]
    assert out["tags"]["web"] == ["v1"] and out["tags"]["db"] == []
    assert out["names"] == sorted(out["names"])


@pytest.mark.parametrize("bad", ["web*", ""])
def test_service_data_source_validates_the_name(env, bad):  # noqa: F811
    diags = Diagnostics()
    ServiceData(env.provider).validate(diags, "trellis_service", {"name": bad, "tag": None})
    assert one_error(diags).path == ["name"]


def test_service_with_a_token_scoped_to_the_service_and_its_sidecar(make_client):  # noqa: F811
    # A team's token: write on its service and its sidecar, read on the node (which exists:
    # an agent's). Creating, switching the sidecar off and deleting need nothing more.
    app = make_client(acl_enabled=True, acl_default_policy="deny").raw.application
    root = Client(ADDR, transport=httpx.WSGITransport(app=app)).acl_bootstrap()["SecretID"]
    admin = Env(app, token=root).other
    admin.catalog_register({"Node": "node-1", "Address": "10.0.0.5"})
    admin.acl_policy_create(
        "web", rules='service "web" { policy = "write" }\n'
        'service "web-sidecar-proxy" { policy = "write" }\nnode "node-1" { policy = "read" }',
    )  # fmt: skip
    admin.acl_policy_create(
        "web-only", rules='service "web" { policy = "write" }\nnode "node-1" { policy = "read" }'
    )
    admin.acl_policy_create("no-node-read", rules='service "web" { policy = "write" }')
    team = Env(app, token=admin.acl_token_create(policy_names=["web"])["SecretID"])
    r = ServiceResource(team.provider)
    created, d = call("create", r, service(sidecar=True))
    ok(d)
    assert sorted(node_services(admin)) == ["web", "web-sidecar-proxy"]
    off, d = call("update", r, created, {**created, "sidecar": False, "sidecar_port": None})
    ok(d)
    assert sorted(node_services(admin)) == ["web"]
    _, d = call("delete", r, off)
    ok(d)
    assert node_services(admin) == {}
    # Write on the service alone is not enough for its sidecar; the diagnostic says so.
    narrow = Env(app, token=admin.acl_token_create(policy_names=["web-only"])["SecretID"])
    state, d = call("create", ServiceResource(narrow.provider), service(sidecar=True))
    err = one_error(d)
    assert "lacks service:write on 'web-sidecar-proxy'" in err.detail, err.detail
    assert 'service "web-sidecar-proxy" { policy = "write" }' in err.detail
    # The service itself was registered: it is returned (Terraform keeps it, tainted), so that
    # destroy removes it rather than the next apply taking it for someone else's.
    assert sorted(node_services(admin)) == ["web"] and state["id"] == "node-1/web"
    _, d = call("delete", ServiceResource(narrow.provider), state)
    ok(d)
    assert node_services(admin) == {}
    # Without node:read the token cannot read what it registered: said at once, rather than
    # planning to create the service again at every run.
    blind = Env(app, token=admin.acl_token_create(policy_names=["no-node-read"])["SecretID"])
    state, d = call("create", ServiceResource(blind.provider), service())
    err = one_error(d)
    assert (
        "cannot read it back" in err.summary and 'node "node-1" { policy = "read" }' in err.detail
    )
    assert state is not None  # registered: in the state (tainted), so destroy can remove it
