"""Consul's request rules on the node agent's local API, as the servers apply them
(tests/test_api_request_rules.py): registration bodies with field names in any case and
unknown fields refused at every level, ``WriteRequest``/``QueryOptions`` ignored, and
``?replace-existing-checks`` read as Go's ParseBool.

The pure parts (``trellis.proxy.requestrules``, ``trellis.proxy.agent.definitions``) are
table-tested; the rest runs py-consul and plain HTTP against a real ``trellis agent`` in front
of a real ``trellis server`` (with ACLs off, and on for the body-token rule).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import consul
import httpx
import pytest

from tests.support import TrellisProcess, server_args, wait_until
from trellis.api.schemas import _shape
from trellis.api.schemas.catalog import CheckSchema, ServiceSchema
from trellis.proxy.agent.definitions import (
    CHECK,
    SERVICE,
    DefinitionError,
    node_check,
    service_def,
)
from trellis.proxy.requestrules import (
    FieldNameError,
    ListOf,
    MapOf,
    Shape,
    fold_names,
    parse_bool,
    split_request_options,
)

# -- the shared rule (pure) -------------------------------------------------------------------


def test_fold_names_reports_unknown_names_by_path():
    inner = Shape("Inner", {"Port": None})
    shape = Shape("Outer", {"Name": None, "Items": ListOf(inner), "ByKey": MapOf(inner)})
    unknown: list[str] = []
    out = fold_names(
        shape,
        {
            "name": "a",
            "items": [{"PORT": 1}, {"bogus": 2}],
            "bykey": {"K_a": {"port": 3}},
            "x": 0,
        },
        unknown=unknown,
    )
    assert out == {
        "Name": "a",
        "Items": [{"Port": 1}, {"bogus": 2}],
        "ByKey": {"K_a": {"Port": 3}},
        "x": 0,
    }
    assert unknown == ["Items.1.bogus", "x"]
    with pytest.raises(FieldNameError, match=r"'Items\.0\.Port' is given twice"):
        fold_names(shape, {"Items": [{"Port": 1, "port": 2}]})


def test_a_shape_may_hold_itself():
    a = Shape("Service")
    a.define({"Name": None, "Connect": Shape("Connect", {"SidecarService": a})})
    body = {"connect": {"sidecarservice": {"NAME": "x", "connect": {"sidecarservice": {}}}}}
    assert fold_names(a, body) == {
        "Connect": {"SidecarService": {"Name": "x", "Connect": {"SidecarService": {}}}}
    }
    with pytest.raises(ValueError, match="differ only in case"):
        Shape("Bad", {"Name": None, "NAME": None})


@pytest.mark.parametrize(
    ("body", "rest", "token", "where"),
    [
        ({"Name": "a"}, {"Name": "a"}, "", ""),
        ({"Name": "a", "WriteRequest": {"Token": "t"}}, {"Name": "a"}, "t", "WriteRequest.Token"),
        ({"writerequest": {"token": "t"}, "QUERYOPTIONS": {}}, {}, "t", "writerequest.token"),
        ({"WriteRequest": None, "queryoptions": {"AllowStale": True}}, {}, "", ""),
        ({"WriteRequest": {"Token": ""}}, {}, "", ""),
    ],
)
def test_request_options_are_split_off(body, rest, token, where):
    assert tuple(split_request_options(body)) == (rest, token, where)


def test_a_request_option_that_is_not_an_object_is_refused():
    with pytest.raises(FieldNameError, match="WriteRequest must be an object"):
        split_request_options({"WriteRequest": "t"})


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        *[("", True), ("1", True), ("t", True), ("True", True), ("TRUE", True)],
        *[("0", False), ("f", False), ("false", False), ("FALSE", False)],
        *[("None", None), ("yes", None), ("tRuE", None), ("2", None)],
    ],
)
def test_parse_bool_is_gos(value, parsed):
    assert parse_bool(value) is parsed


# -- the agent's definitions (pure) -----------------------------------------------------------


def _paths(shape: Shape, prefix: str = "", seen: frozenset[int] = frozenset()) -> set[str]:
    """Every field of a shape as a dotted path, down to where a shape holds itself."""
    if id(shape) in seen:
        return set()
    out = set()
    for name, kind in shape.fields.items():
        path = f"{prefix}{name}"
        out.add(path)
        while isinstance(kind, ListOf | MapOf):
            kind = kind.item if isinstance(kind, ListOf) else kind.value
            path += "[]"
        if isinstance(kind, Shape):
            out |= _paths(kind, f"{path}.", seen | {id(shape)})
    return out


def test_the_agents_shapes_are_the_servers_schemas():
    """The agent refuses exactly the names the servers refuse, and folds the same ones: its
    hand-written shapes (proxy/ imports no schema) against the schemas'. The one difference:
    a script check's ScriptArgs, which only an agent runs."""
    agent, server = _paths(SERVICE), _paths(_shape(ServiceSchema()))
    assert {p for p in agent - server} == {p for p in agent if p.endswith(".ScriptArgs")}
    assert server <= agent
    assert _paths(CHECK) - _paths(_shape(CheckSchema())) == {"ScriptArgs"}
    assert _paths(_shape(CheckSchema())) <= _paths(CHECK)


def test_a_service_in_any_case_as_py_consul_sends_it():
    svc = service_def(
        {
            "name": "db",
            "id": "pgha/pg1",
            "port": 5432,
            "enabletagoverride": True,
            "meta": {"Role_Name": "primary"},
            "weights": {"passing": 3, "WARNING": 1},
            "taggedaddresses": {"LAN_v4": {"address": "10.0.0.1", "port": 5432}},
            "checks": [{"http": "http://127.0.0.1:8008/health", "interval": "10s", "checkid": "c"}],
            "connect": {
                "sidecarservice": {
                    "proxy": {"upstreams": [{"destinationname": "x", "LOCALBINDPORT": 9}]}
                }
            },
            "CreateIndex": 7,
            "modifyindex": 8,
        }
    )
    assert (svc.id, svc.name) == ("pgha/pg1", "db")
    b = svc.body
    assert b["EnableTagOverride"] is True
    assert b["Meta"] == {"Role_Name": "primary"}  # a map's keys are data
    assert b["Weights"] == {"Passing": 3, "Warning": 1}
    assert b["TaggedAddresses"] == {"LAN_v4": {"Address": "10.0.0.1", "Port": 5432}}
    assert "CreateIndex" not in b and "ModifyIndex" not in b
    [c] = svc.checks
    assert (c["CheckID"], c["HTTP"], c["ServiceID"]) == (
        "c",
        "http://127.0.0.1:8008/health",
        "pgha/pg1",
    )
    assert svc.sidecar == {"Proxy": {"Upstreams": [{"DestinationName": "x", "LocalBindPort": 9}]}}


def test_a_check_in_any_case():
    c = node_check({"NAME": "disk", "id": "disk", "ttl": "30s", "serviceid": "db", "notes": "n"})
    assert (c.id, c.body["TTL"], c.body["ServiceID"], c.body["Notes"]) == ("disk", "30s", "db", "n")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Name": "x", "Bogus": 1}, "unknown service field 'Bogus'"),
        ({"Name": "x", "check": {"ttl": "1s", "tll": "2s"}}, "unknown service field 'Check.Tll'"),
        ({"Name": "x", "Checks": [{"TTL": "1s"}, {"bogus": 1}]}, "'Checks.1.Bogus'"),
        ({"Name": "x", "Weights": {"Pasing": 1}}, "'Weights.Pasing'"),
        (
            {"Name": "x", "proxy": {"upstreams": [{"destname": "d"}]}},
            "'Proxy.Upstreams.0.Destname'",
        ),
        (
            {"Name": "x", "connect": {"sidecarservice": {"prot": 1}}},
            "'Connect.SidecarService.Prot'",
        ),
        ({"Name": "x", "name": "y"}, "given twice"),
        ({"Name": "x", "WriteRequest": {}}, "unknown service field 'WriteRequest'"),
    ],
)
def test_unknown_fields_are_refused_at_every_level(body, message):
    with pytest.raises(DefinitionError, match=message.replace(".", r"\.")):
        service_def(body)


# -- through a real agent ---------------------------------------------------------------------


@pytest.fixture
def started() -> Iterator[list[TrellisProcess]]:
    procs: list[TrellisProcess] = []
    yield procs
    for p in reversed(procs):
        p.stop()


def _cluster(tmp_path, started, *, acl: bool) -> tuple[TrellisProcess, TrellisProcess, str]:
    args = server_args(tmp_path / "s", workers=1, node="srv")
    root = ""
    if acl:
        cfg = tmp_path / "acl.json"
        cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
        args += ["-config", str(cfg)]
    s = TrellisProcess(args)
    started.append(s)
    s.start()
    if acl:
        r = httpx.put(f"{s.url}/v1/acl/bootstrap")
        assert r.status_code == 200, r.text
        root = r.json()["SecretID"]
    (tmp_path / "conf").mkdir()
    a = TrellisProcess(
        [
            *("agent", "-node", "node-a", "-http-port", "0", "-server", s.url),
            *("-data-dir", str(tmp_path / "agent"), "-config-dir", str(tmp_path / "conf")),
            *(("-token", root) if root else ()),
        ]
    )
    started.append(a)
    a.start()
    return s, a, root


@pytest.mark.integration
def test_py_consul_registers_in_lowercase_through_an_agent(tmp_path, started):
    _, agent, _ = _cluster(tmp_path, started, acl=False)
    c = consul.Consul(host="127.0.0.1", port=urlsplit(agent.url).port)
    try:
        # py-consul sends "enabletagoverride", "weights": {"passing"...} and, for a check,
        # "serviceid": each a Consul field in another case.
        assert c.agent.service.register(
            "db",
            service_id="pgha/pg1",
            port=5432,
            tags=["primary"],
            check=consul.Check.ttl("30s"),
            enable_tag_override=True,
            weights={"passing": 3, "warning": 1},
        )
        assert c.agent.check.register(
            "disk", check=consul.Check.ttl("30s"), check_id="pgha/pg1/disk", service_id="pgha/pg1"
        )
        mine = c.agent.services()["pgha/pg1"]
        assert (mine["EnableTagOverride"], mine["Weights"]) == (True, {"Passing": 3, "Warning": 1})
        assert c.agent.checks()["pgha/pg1/disk"]["ServiceID"] == "pgha/pg1"
        _, [inst] = c.catalog.service("db")
        assert (inst["ServiceID"], inst["ServiceEnableTagOverride"]) == ("pgha/pg1", True)
        assert inst["ServiceWeights"] == {"Passing": 3, "Warning": 1}
        _, checks = c.health.checks("db")
        assert {ch["CheckID"] for ch in checks} == {"service:pgha/pg1", "pgha/pg1/disk"}

        # agent/check/update in any case too, and WriteRequest/QueryOptions ignored.
        r = httpx.put(
            f"{agent.url}/v1/agent/check/update/pgha/pg1/disk",
            json={"STATUS": "warning", "output": "80%", "WriteRequest": {"Token": "x"}},
        )
        assert r.status_code == 200, r.text
        got = c.agent.checks()["pgha/pg1/disk"]
        assert (got["Status"], got["Output"]) == ("warning", "80%")
        body = {"Name": "web", "QueryOptions": {"AllowStale": True}, "writerequest": None}
        r = httpx.put(f"{agent.url}/v1/agent/service/register", json=body)
        assert r.status_code == 200, r.text
        assert "web" in c.agent.services()

        # Unknown fields are refused at every level, as the servers refuse them.
        for path, bad in [
            ("service/register", {"Name": "x", "check": {"ttl": "1s", "tll": "2s"}}),
            ("service/register", {"Name": "x", "weights": {"pasing": 1}}),
            ("service/register", {"Name": "x", "WriteRequest": "token"}),
            ("check/register", {"Name": "c", "TTL": "1s", "servceid": "web"}),
            ("check/update/pgha/pg1/disk", {"Status": "passing", "Outptu": "x"}),
        ]:
            r = httpx.put(f"{agent.url}/v1/agent/{path}", json=bad)
            assert r.status_code == 400, (path, r.text)
            assert set(r.json()) == {"error", "code", "status"}
        assert "x" not in c.agent.services()
    finally:
        c.http.session.close()


@pytest.mark.integration
def test_replace_existing_checks_is_read_as_go_parses_a_bool(tmp_path, started):
    _, agent, _ = _cluster(tmp_path, started, acl=False)
    two = {
        "Name": "api",
        "Checks": [{"CheckID": "a", "TTL": "30s"}, {"CheckID": "b", "TTL": "30s"}],
    }
    one = {"Name": "api", "Checks": [{"CheckID": "a", "TTL": "30s"}]}

    def register(body: dict, query: str) -> httpx.Response:
        return httpx.put(f"{agent.url}/v1/agent/service/register?{query}", json=body)

    def checks() -> set[str]:
        return set(httpx.get(f"{agent.url}/v1/agent/checks").json())

    for query, replaced in [
        ("replace-existing-checks=false", False),
        ("replace-existing-checks=0", False),
        ("replace-existing-checks=1", True),
        ("replace-existing-checks", True),
        ("replace-existing-checks=True", True),
        ("", False),
    ]:
        assert register(two, "").status_code == 200
        assert checks() == {"a", "b"}
        r = register(one, query)
        assert r.status_code == 200, (query, r.text)
        assert checks() == ({"a"} if replaced else {"a", "b"}), query
    for bad in ("None", "yes"):
        r = register(one, f"replace-existing-checks={bad}")
        assert r.status_code == 400, r.text
        assert "replace-existing-checks" in r.json()["error"]


@pytest.mark.integration
def test_a_token_only_in_write_request_gets_the_servers_answer(tmp_path, started):
    server, agent, root = _cluster(tmp_path, started, acl=True)
    body = {"Name": "web", "WriteRequest": {"Token": root}}
    # Consul would run it as anonymous; the servers answer 400 saying where the token goes,
    # and so does the agent in front of them.
    r = httpx.put(f"{agent.url}/v1/agent/service/register", json=body)
    assert r.status_code == 400, r.text
    assert "X-Consul-Token" in r.json()["error"]
    r = httpx.put(f"{agent.url}/v1/agent/check/register", json={"Name": "c", "TTL": "9s", **body})
    assert r.status_code == 400, r.text
    headers = {"X-Consul-Token": root}
    r = httpx.put(f"{agent.url}/v1/agent/service/register", json=body, headers=headers)
    assert r.status_code == 200, r.text
    wait_until(
        lambda: httpx.get(f"{server.url}/v1/catalog/service/web", headers=headers).json() != []
    )
