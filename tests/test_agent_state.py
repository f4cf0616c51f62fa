"""The node agent's pure parts: definitions from config files, the local state and its data
dir, and the anti-entropy planner. No sockets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trellis.proxy.agent import sync
from trellis.proxy.agent.definitions import (
    DefinitionError,
    check_def,
    load_config,
    node_check,
    service_def,
)
from trellis.proxy.agent.ports import CheckResult
from trellis.proxy.agent.state import LocalState

# -- definitions -------------------------------------------------------------------------------


def test_both_spellings_give_the_same_service():
    snake = service_def(
        {
            "name": "web",
            "id": "web-1",
            "port": 8080,
            "tags": ["v1"],
            "meta": {"team_name": "a"},
            "check": {"http": "http://127.0.0.1:8080/health", "interval": "10s"},
        }
    )
    pascal = service_def(
        {
            "Name": "web",
            "ID": "web-1",
            "Port": 8080,
            "Tags": ["v1"],
            "Meta": {"team_name": "a"},
            "Check": {"HTTP": "http://127.0.0.1:8080/health", "Interval": "10s"},
        }
    )
    assert snake == pascal
    assert snake.body["Meta"] == {"team_name": "a"}  # an opaque map keeps its keys
    [c] = snake.checks
    assert (c["CheckID"], c["ServiceID"]) == ("service:web-1", "web-1")
    d = check_def(c)
    assert (d.kind, d.http, d.interval, d.service_id) == (
        "http",
        "http://127.0.0.1:8080/health",
        10.0,
        "web-1",
    )


def test_check_fields_become_a_checkdef():
    c = node_check(
        {
            "id": "mem",
            "name": "Memory",
            "tcp": "127.0.0.1:22",
            "interval": "1m30s",
            "timeout": "2s",
            "deregister_critical_service_after": "5m",
            "status": "passing",
        }
    )
    d = check_def(c.body)
    assert (d.check_id, d.name, d.kind, d.tcp, d.interval, d.timeout, d.status) == (
        "mem",
        "Memory",
        "tcp",
        "127.0.0.1:22",
        90.0,
        2.0,
        "passing",
    )
    assert d.deregister_critical_after == 300.0
    ttl = check_def(node_check({"Name": "beat", "TTL": "15s"}).body)
    assert (ttl.check_id, ttl.kind, ttl.ttl) == ("beat", "ttl", 15.0)
    alias = check_def(node_check({"name": "a", "alias_service": "db"}).body)
    assert (alias.kind, alias.alias_service) == ("alias", "db")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "x", "ttl": "soon"}, "TTL"),
        ({"name": "x", "http": "http://a", "ttl": "5s"}, "one type"),
        ({"name": "x", "http": "http://a"}, "Interval"),
        ({"name": "x", "http": "ftp://a", "interval": "1s"}, "http://"),
        ({"name": "x"}, "needs one of"),
        ({"name": "x", "ttl": "5s", "status": "fine"}, "Status"),
        ({"name": "x", "args": ["/bin/true"], "interval": "5s"}, "script checks"),
        ({"name": "x", "ttl": "5s", "intervall": "5s"}, "unknown check field 'Intervall'"),
    ],
)
def test_bad_checks_are_refused_with_the_reason(body, words):
    with pytest.raises(DefinitionError, match=words):
        node_check(body)


def test_a_misspelled_service_field_is_refused():
    with pytest.raises(DefinitionError, match="unknown service field 'Prot'"):
        service_def({"name": "web", "prot": 80})


def test_script_checks_only_when_enabled():
    c = node_check(
        {"name": "s", "args": ["/bin/true"], "interval": "5s"}, enable_script_checks=True
    )
    assert check_def(c.body).args == ("/bin/true",)


def test_one_line_connect_proxy_marks_a_managed_sidecar():
    s = service_def({"service": {"name": "web", "port": 8080, "connect": {"proxy": {}}}})
    assert s.managed_proxy
    assert s.body["Connect"] == {"Proxy": {}}


def test_a_managed_sidecar_is_registered_once_it_has_a_port_and_keeps_it(tmp_path):
    app = service_def(
        {
            "service": {
                "name": "web",
                "port": 8080,
                "connect": {
                    "proxy": {
                        "config": {
                            "upstreams": [{"destination_name": "db", "local_bind_port": 9191}]
                        }
                    }
                },
            }
        },
        token="web-token",
    )
    state = LocalState(str(tmp_path))
    state.add_service(app)
    assert "web-sidecar-proxy" not in state.services()  # no port yet: not registered
    state.set_proxy_ports({"web-sidecar-proxy": 20007})
    proxy = state.services()["web-sidecar-proxy"]
    assert proxy.body["Kind"] == "connect-proxy" and proxy.body["Port"] == 20007
    assert proxy.body["Proxy"]["DestinationServiceID"] == "web"
    assert proxy.body["Proxy"]["Upstreams"][0]["LocalBindPort"] == 9191
    assert proxy.token == "web-token" and proxy.source == "managed:web"
    again = LocalState(str(tmp_path))  # the agent restarted
    assert again.load() == []
    assert again.proxy_ports == {"web-sidecar-proxy": 20007}
    assert again.services()["web-sidecar-proxy"].body["Port"] == 20007


def _write(p: Path, doc: object) -> Path:
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def test_a_bad_file_is_refused_with_its_path_and_the_rest_are_kept(tmp_path):
    d = tmp_path / "conf"
    d.mkdir()
    _write(d / "a.json", {"service": {"name": "web", "port": 80}})
    _write(d / "b.json", "{not json")
    _write(d / "c.hcl", 'service {\n  name = "db"\n  port = 5432\n}\n')
    _write(d / "d.json", {"services": [{"Name": "api"}], "checks": [{"name": "n", "ttl": "5s"}]})
    _write(d / "e.json", {"service": {"name": "Not A Name!"}})
    _write(d / "f.json", {"service": {"name": "web", "id": "web"}})  # the ID of a.json
    _write(d / "notes.txt", "ignored")
    defs, errors = load_config([str(d)], [])
    assert sorted(s.id for s in defs.services) == ["api", "db", "web"]
    assert [c.id for c in defs.checks] == ["n"]
    assert len(errors) == 3
    assert errors[0].startswith(f"{d / 'b.json'}: cannot decode")
    assert errors[1].startswith(f"{d / 'e.json'}: service name 'Not A Name!' is not valid")
    assert errors[2] == f"{d / 'f.json'}: service ID 'web' is also defined in {d / 'a.json'}"


def test_a_missing_config_dir_is_reported(tmp_path):
    defs, errors = load_config([str(tmp_path / "nope")], [])
    assert defs.services == [] and len(errors) == 1 and "cannot read the directory" in errors[0]


# -- local state and its data dir --------------------------------------------------------------


def test_api_registrations_survive_a_restart(tmp_path):
    st = LocalState(str(tmp_path))
    st.add_service(service_def({"name": "web", "port": 80, "check": {"ttl": "5s"}}, token="t1"))
    st.add_check(node_check({"name": "disk", "ttl": "1m"}))
    st.synced_services.add("web")
    st.save_synced()
    again = LocalState(str(tmp_path))
    assert again.load() == []
    assert again.api_services["web"].token == "t1"
    assert again.api_services["web"] == st.api_services["web"]
    assert list(again.api_checks) == ["disk"]
    assert again.synced_services == {"web"}
    assert not list(tmp_path.glob("*.tmp.*"))  # nothing left of the atomic writes


def test_an_unwritable_data_dir_does_not_acknowledge_a_registration(tmp_path):
    st = LocalState(str(tmp_path / "missing" / "dir"))
    with pytest.raises(OSError):
        st.add_service(service_def({"name": "web"}))
    assert st.api_services == {}


def test_sidecar_service_gets_a_port_and_checks():
    st = LocalState()
    st.add_service(service_def({"name": "web", "port": 80, "connect": {"sidecar_service": {}}}))
    st.add_service(service_def({"name": "taken", "port": 21000}))
    svcs = st.services()
    sc = svcs["web-sidecar-proxy"]
    assert sc.body["Kind"] == "connect-proxy"
    assert sc.body["Port"] == 21001
    assert sc.body["Proxy"]["DestinationServiceName"] == "web"
    assert [c["CheckID"] for c in sc.checks] == [
        "service:web-sidecar-proxy:1",
        "service:web-sidecar-proxy:2",
    ]
    assert "SidecarService" not in svcs["web"].body["Connect"]


# -- the anti-entropy planner ------------------------------------------------------------------


def _catalog_entry(body: dict) -> dict:
    """A service as /v1/catalog/node answers it."""
    return {
        "ID": body["ID"],
        "Service": body["Name"],
        "Tags": body.get("Tags", []),
        "Address": body.get("Address", ""),
        "TaggedAddresses": {},
        "Meta": body.get("Meta", {}),
        "Port": body.get("Port", 0),
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "Kind": "",
        "Proxy": None,
        "Connect": None,
        "CreateIndex": 5,
        "ModifyIndex": 5,
    }


def _desired(st: LocalState) -> tuple[dict, dict]:
    svcs = {sid: sync.Desired(s.body, s.token) for sid, s in st.services().items()}
    checks = {
        cid: sync.DesiredCheck(b, st.result(cid, b), tok) for cid, (b, tok) in st.checks().items()
    }
    return svcs, checks


def _state() -> LocalState:
    st = LocalState()
    st.set_files(
        [service_def({"name": "web", "port": 80, "check": {"ttl": "5s"}}, token="tw")],
        [node_check({"name": "disk", "ttl": "5s"})],
    )
    return st


def test_plan_registers_what_is_missing_with_its_token():
    svcs, checks = _desired(_state())
    ops = sync.plan(svcs, checks, {}, {}, set(), set())
    assert [type(o).__name__ for o in ops] == ["RegisterService", "RegisterCheck"]
    reg = ops[0]
    assert isinstance(reg, sync.RegisterService)
    assert reg.token == "tw"
    [c] = reg.checks
    assert (c["CheckID"], c["Status"], c["Type"]) == ("service:web", "critical", "ttl")
    assert "TTL" not in c  # the agent runs the TTL, not the server


def test_plan_is_empty_when_the_catalog_matches():
    st = _state()
    svcs, checks = _desired(st)
    cat_services = {"web": _catalog_entry(dict(svcs["web"].body))}
    cat_checks = {cid: {**dc.catalog(), "Node": "n1"} for cid, dc in checks.items()}
    assert sync.plan(svcs, checks, cat_services, cat_checks, {"web"}, set(checks)) == []
    # a changed result: that check alone
    st.set_result("service:web", CheckResult("passing", "ok"))
    svcs, checks = _desired(st)
    ops = sync.plan(svcs, checks, cat_services, cat_checks, {"web"}, set(checks))
    assert len(ops) == 1
    op = ops[0]
    assert isinstance(op, sync.RegisterCheck)
    assert (op.check_id, op.check["Status"], op.check["Output"], op.token) == (
        "service:web",
        "passing",
        "ok",
        "tw",
    )
    # a changed service: registered again, with its checks
    cat_services["web"] = {**cat_services["web"], "Port": 81}
    ops = sync.plan(svcs, checks, cat_services, cat_checks, {"web"}, set(checks))
    assert [type(o).__name__ for o in ops] == ["RegisterService"]


def test_plan_removes_only_what_the_agent_registered():
    svcs, checks = _desired(_state())
    cat_services = {
        "web": _catalog_entry(dict(svcs["web"].body)),
        "old": _catalog_entry({"ID": "old", "Name": "old"}),
        "someone-elses": _catalog_entry({"ID": "someone-elses", "Name": "x"}),
    }
    cat_checks = {cid: dc.catalog() for cid, dc in checks.items()}
    cat_checks["service:web:stale"] = {"CheckID": "service:web:stale", "ServiceID": "web"}
    cat_checks["old-node-check"] = {"CheckID": "old-node-check", "ServiceID": ""}
    cat_checks["foreign-node-check"] = {"CheckID": "foreign-node-check", "ServiceID": ""}
    cat_checks["serfHealth"] = {"CheckID": "serfHealth", "ServiceID": ""}
    ops = sync.plan(
        svcs,
        checks,
        cat_services,
        cat_checks,
        {"web", "old"},
        {"service:web", "disk", "old-node-check"},
    )
    assert ops == [
        sync.DeregisterCheck("old-node-check", ""),
        sync.DeregisterCheck("service:web:stale", "tw"),
        sync.DeregisterService("old", ""),
    ]


def test_plan_leaves_maintenance_checks_alone():
    # Maintenance mode's checks live in the catalog only: on the agent's node and on one of
    # its services, neither in its definitions, both must stay (even if once synced).
    svcs, checks = _desired(_state())
    cat_services = {"web": _catalog_entry(dict(svcs["web"].body))}
    cat_checks = {cid: dc.catalog() for cid, dc in checks.items()}
    cat_checks["_node_maintenance"] = {"CheckID": "_node_maintenance", "ServiceID": ""}
    cat_checks["_service_maintenance:web"] = {
        "CheckID": "_service_maintenance:web",
        "ServiceID": "web",
    }
    synced = {"service:web", "disk", "_node_maintenance"}
    assert sync.plan(svcs, checks, cat_services, cat_checks, {"web"}, synced) == []


class _CountingState(LocalState):
    """Counts how often the node's services are built (they are remembered between changes)."""

    built = 0

    def _compute_services(self):
        self.built += 1
        return super()._compute_services()


def test_the_services_are_built_once_per_change_and_every_change_shows(tmp_path):
    one_line = {"service": {"name": "web", "port": 8080, "connect": {"proxy": {}}}}
    state = _CountingState(str(tmp_path))
    state.add_service(service_def(one_line))
    state.set_proxy_ports({"web-sidecar-proxy": 20001})
    for _ in range(50):  # fifty sidecars' blocking reads, woken by one change
        assert set(state.services()) == {"web", "web-sidecar-proxy"}
    assert state.built == 1
    state.set_result("service:web", CheckResult("passing"))  # a result is not a service change
    state.services()
    assert state.built == 1
    state.add_service(service_def({"service": {"name": "db", "port": 5432}}))
    assert set(state.services()) == {"web", "web-sidecar-proxy", "db"}
    state.remove_service("web")
    assert set(state.services()) == {"db"}
    state.set_files([service_def({"service": {"name": "api", "port": 1}})], [])
    assert set(state.services()) == {"db", "api"}
    assert state.built == 4
