"""The node agent's own endpoints decide by the servers' ACLs: ``agent/leave`` and
``agent/reload`` need ``agent:write`` (node:write on the agent's node, Consul's rule), each asked
of the servers (``POST /v1/internal/acl/authorize``) with the caller's token; no server
answering is a 503, never an allow. Real ``trellis server`` (ACLs on, default deny) and
``trellis agent`` processes, each recorded and ended by PID, also when a test fails."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import TrellisProcess, alive, server_args

pytestmark = pytest.mark.integration

NODE = "node-a"


@pytest.fixture
def started() -> Iterator[list[TrellisProcess]]:
    procs: list[TrellisProcess] = []
    yield procs
    for p in reversed(procs):
        p.stop()


def _server(tmp_path: Path, started: list[TrellisProcess], *, acl: bool) -> TrellisProcess:
    args = server_args(tmp_path / "s", workers=1, node="srv")
    if acl:
        cfg = tmp_path / "server.json"
        cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
        args += ["-config", str(cfg)]
    s = TrellisProcess(args)
    started.append(s)
    return s.start()


def _agent(
    tmp_path: Path, started: list[TrellisProcess], server: str, *extra: str
) -> TrellisProcess:
    base = tmp_path / NODE
    (base / "conf").mkdir(parents=True, exist_ok=True)
    a = TrellisProcess(
        [
            "agent",
            "-node",
            NODE,
            "-http-port",
            "0",
            "-server",
            server,
            "-data-dir",
            str(base / "data"),
            "-config-dir",
            str(base / "conf"),
            *extra,
        ]
    )
    started.append(a)
    return a.start()


def _token(server: str, root: str, name: str, rules: str) -> str:
    h = {"X-Consul-Token": root}
    r = httpx.put(f"{server}/v1/acl/policy", json={"Name": name, "Rules": rules}, headers=h)
    assert r.status_code == 200, r.text
    r = httpx.put(f"{server}/v1/acl/token", json={"Policies": [{"Name": name}]}, headers=h)
    assert r.status_code == 200, r.text
    return r.json()["SecretID"]


@pytest.fixture
def cluster(tmp_path, started) -> tuple[TrellisProcess, TrellisProcess, str]:
    s = _server(tmp_path, started, acl=True)
    r = httpx.put(f"{s.url}/v1/acl/bootstrap")
    assert r.status_code == 200, r.text
    root = r.json()["SecretID"]
    return s, _agent(tmp_path, started, s.url, "-token", root), root


def _add_service_file(tmp_path: Path, name: str) -> None:
    (tmp_path / NODE / "conf" / f"{name}.json").write_text(
        json.dumps({"service": {"name": name, "port": 8080}})
    )


def _local_services(agent: TrellisProcess) -> set[str]:
    return {s["Service"] for s in httpx.get(f"{agent.url}/v1/agent/services").json().values()}


def _refused(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "code", "status"}


def test_agent_leave_and_reload_refuse_an_anonymous_caller(tmp_path, cluster):
    """Before: any local process could make the node leave or reload its files, ACLs on."""
    s, a, root = cluster
    _add_service_file(tmp_path, "web")
    _refused(httpx.put(f"{a.url}/v1/agent/reload", timeout=10), 403)
    assert "web" not in _local_services(a)
    _refused(httpx.put(f"{a.url}/v1/agent/leave", timeout=10), 403)
    # A token no server knows is refused the same way ("ACL not found").
    bogus = {"X-Consul-Token": "00000000-0000-4000-8000-00000000dead"}
    _refused(httpx.put(f"{a.url}/v1/agent/leave", headers=bogus, timeout=10), 403)
    assert alive(a.pid)
    assert httpx.get(f"{a.url}/v1/agent/self", timeout=5).status_code == 200
    r = httpx.get(f"{s.url}/v1/catalog/node/{NODE}", headers={"X-Consul-Token": root})
    assert r.status_code == 200 and r.json()["Node"]["Node"] == NODE, r.text


def test_agent_reload_needs_node_write_on_the_agents_node(tmp_path, cluster):
    s, a, root = cluster
    other = _token(s.url, root, "other-node", 'node "elsewhere" { policy = "write" }')
    mine = _token(s.url, root, "this-node", f'node "{NODE}" {{ policy = "write" }}')
    _add_service_file(tmp_path, "web")
    r = httpx.put(f"{a.url}/v1/agent/reload", headers={"X-Consul-Token": other}, timeout=10)
    _refused(r, 403)
    assert "agent:write" in r.json()["error"], r.text
    assert "web" not in _local_services(a)
    # The caller's token in any of its places: a bearer token here.
    r = httpx.put(
        f"{a.url}/v1/agent/reload", headers={"Authorization": f"Bearer {mine}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    assert "web" in _local_services(a)


def test_agent_leave_needs_node_write_on_the_agents_node(tmp_path, cluster):
    s, a, root = cluster
    # operator:write is force-leave's rule (another node), not a node's own graceful leave.
    op = _token(s.url, root, "op", 'operator = "write"')
    other = _token(s.url, root, "other-node", 'node "elsewhere" { policy = "write" }')
    for t in (op, other):
        r = httpx.put(f"{a.url}/v1/agent/leave", headers={"X-Consul-Token": t}, timeout=10)
        _refused(r, 403)
        assert "agent:write" in r.json()["error"], r.text
    assert alive(a.pid)
    mine = _token(s.url, root, "this-node", f'node "{NODE}" {{ policy = "write" }}')
    # ?token=, the place python-consul and py-consul put it.
    r = httpx.put(f"{a.url}/v1/agent/leave", params={"token": mine}, timeout=10)
    assert r.status_code == 200, r.text
    assert a.wait(timeout=15) == 0, a.output()

    # The node is marked as left (its serfHealth check), as a graceful leave does.
    r = httpx.get(f"{s.url}/v1/health/node/{NODE}", headers={"X-Consul-Token": root})
    serf = [c for c in r.json() if c["CheckID"] == "serfHealth"]
    assert serf and serf[0]["Status"] == "critical" and "left" in serf[0]["Output"], r.text


def test_agent_leave_and_reload_are_503_when_no_server_answers(tmp_path, cluster):
    """The servers decide; when none answers the agent refuses, even the management token."""
    s, a, root = cluster
    s.stop()
    h = {"X-Consul-Token": root}
    _refused(httpx.put(f"{a.url}/v1/agent/leave", headers=h, timeout=30), 503)
    _refused(httpx.put(f"{a.url}/v1/agent/reload", headers=h, timeout=30), 503)
    assert alive(a.pid)
    assert httpx.get(f"{a.url}/v1/agent/self", timeout=5).status_code == 200


def test_agent_reload_and_leave_are_allowed_when_the_servers_have_acls_off(tmp_path, started):
    s = _server(tmp_path, started, acl=False)
    a = _agent(tmp_path, started, s.url)
    _add_service_file(tmp_path, "web")
    r = httpx.put(f"{a.url}/v1/agent/reload", timeout=10)
    assert r.status_code == 200, r.text
    assert "web" in _local_services(a)
    assert httpx.put(f"{a.url}/v1/agent/leave", timeout=10).status_code == 200
    assert a.wait(timeout=15) == 0, a.output()


def test_agent_metrics_are_the_agents_own_under_node_read(tmp_path, cluster):
    """Before: a 404 (the agent did not serve agent/metrics)."""
    s, a, root = cluster
    _refused(httpx.get(f"{a.url}/v1/agent/metrics", timeout=10), 403)
    reader = _token(s.url, root, "reader", f'node "{NODE}" {{ policy = "read" }}')
    h = {"X-Consul-Token": reader}
    r = httpx.get(f"{a.url}/v1/agent/metrics", headers=h, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    gauges = {g["Name"]: g["Value"] for g in body["Gauges"]}
    assert gauges["consul.agent.services"] == 0
    assert gauges["consul.runtime.rss_bytes"] > 0
    r = httpx.get(f"{a.url}/v1/agent/metrics?format=prometheus", headers=h, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE consul_agent_services gauge" in r.text
    _refused(httpx.get(f"{a.url}/v1/agent/metrics?format=xml", headers=h, timeout=10), 400)
