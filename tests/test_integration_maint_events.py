"""Maintenance mode and user events end to end: a real ``trellis server``, a real node agent
(``trellis agent``), the real ``trellis maint``, ``trellis event`` and ``trellis watch``
commands as subprocesses, and py-consul, the Python client people use with Consul."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import consul
import httpx
import pytest

from tests.support import TRELLIS, OutputProcess, TrellisProcess, server_args, wait_until
from tests.test_integration_agent import agent, server, started, wait_services_token  # noqa: F401 - fixtures
from trellis.api import events

pytestmark = pytest.mark.integration


def trellis(url: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``trellis ARGS`` against ``url`` to its end."""
    return subprocess.run(
        [TRELLIS, *args],
        env={"TRELLIS_HTTP_ADDR": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def passing(url: str, service: str) -> list[str]:
    r = httpx.get(f"{url}/v1/health/service/{service}?passing", timeout=5)
    assert r.status_code == 200, r.text
    return sorted(e["Service"]["ID"] for e in r.json())


def in_catalog(url: str, node: str, service_id: str) -> bool:
    r = httpx.get(f"{url}/v1/catalog/node/{node}", timeout=5)
    return r.status_code == 200 and service_id in ((r.json() or {}).get("Services") or {})


@pytest.fixture
def node_a(server, agent):  # noqa: F811 - the fixtures imported above
    a = agent("node-a", server.url)
    r = httpx.put(
        f"{a.url}/v1/agent/service/register",
        json={"Name": "web", "ID": "web-1", "Port": 8080, "Tags": ["v1"]},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    wait_until(lambda: in_catalog(server.url, "node-a", "web-1"), timeout=15)
    wait_until(lambda: passing(server.url, "web") == ["web-1"], timeout=15)
    return a


def test_trellis_maint_through_a_node_agent(server, node_a):  # noqa: F811
    r = trellis(node_a.url, "maint", "-enable", "-reason", "kernel upgrade")
    assert (r.returncode, r.stdout) == (0, "Node entered maintenance mode\n"), r.stderr
    assert passing(server.url, "web") == []
    r = trellis(node_a.url, "maint", "-enable", "-service", "web-1")
    assert (r.returncode, r.stdout) == (0, "Service entered maintenance mode: web-1\n"), r.stderr

    # With no flags, what is in maintenance on the agent, with the reasons.
    r = trellis(node_a.url, "maint")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n\n")[:2] == [
        "Node:\n  Name:   node-a\n  Reason: kernel upgrade",
        "Service:\n  ID:     web-1\n  Reason: " + "Maintenance mode is enabled for this service,"
        " but no reason was provided. This is a default message.",
    ]
    checks = httpx.get(f"{node_a.url}/v1/agent/checks", timeout=5).json()
    assert checks["_node_maintenance"]["Status"] == "critical"
    assert checks["_service_maintenance:web-1"]["ServiceID"] == "web-1"

    assert trellis(node_a.url, "maint", "-disable").returncode == 0
    assert passing(server.url, "web") == []  # the service is still in maintenance
    r = trellis(node_a.url, "maint", "-disable", "-service", "web-1")
    assert (r.returncode, r.stdout) == (0, "Service left maintenance mode: web-1\n"), r.stderr
    assert passing(server.url, "web") == ["web-1"]
    assert trellis(node_a.url, "maint").stdout == ""

    # Anti-entropy leaves the maintenance checks alone: no checks of the agent's own. A change
    # of the agent's (a service registered) asks for a full sync; wait for one to finish.
    assert trellis(node_a.url, "maint", "-enable", "-service", "web-1").returncode == 0
    syncs = _syncs(node_a.url)
    r = httpx.put(f"{node_a.url}/v1/agent/service/register", json={"Name": "other"}, timeout=10)
    assert r.status_code == 200, r.text
    wait_until(lambda: _syncs(node_a.url) > syncs, timeout=15)
    assert in_catalog(server.url, "node-a", "other")
    assert passing(server.url, "web") == []
    assert "_service_maintenance:web-1" in httpx.get(f"{node_a.url}/v1/agent/checks").json()
    assert trellis(node_a.url, "maint", "-disable", "-service", "web-1").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-enable", "-disable"), "Only one of -enable or -disable"),
        (("-reason", "x"), "Reason may only be provided with -enable"),
        (("-service", "web-1"), "Service requires either -enable or -disable"),
        (("-enable", "-service", "nothing"), "Unknown service ID"),
    ],
)
def test_trellis_maint_refusals(node_a, args, message):
    r = trellis(node_a.url, "maint", *args)
    assert r.returncode == 1 and message in r.stderr, (r.stdout, r.stderr)


def test_trellis_event_and_watch_through_a_node_agent(tmp_path: Path, server, node_a):  # noqa: F811
    out = tmp_path / "handled.jsonl"
    # The handler appends what it was given on stdin as one line.
    handler = f"python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> {out}"
    w = OutputProcess(["watch", "-type", "event", "-name", "deploy", handler],
                      env={"TRELLIS_HTTP_ADDR": node_a.url})  # fmt: skip
    w._spawn()
    try:

        def handled() -> list[list[dict]]:
            if not out.exists():
                return []
            return [json.loads(line) for line in out.read_text().splitlines() if line]

        # The first read hands over every event the agent lists: none yet.
        wait_until(lambda: handled() == [[]], timeout=15)
        r = trellis(node_a.url, "event", "-name", "deploy", "-node", "^node-a$", "v1")
        assert r.returncode == 0, r.stderr
        first_id = r.stdout.removeprefix("Event ID: ").strip()
        got = wait_until(lambda: (h,) if len(h := handled()) == 2 else None, timeout=15)[0]
        assert [e["ID"] for e in got[1]] == [first_id]
        assert base64.b64decode(got[1][0]["Payload"]) == b"v1"
        assert got[1][0]["NodeFilter"] == "^node-a$"

        # For another node, and for another service: the server keeps them, this agent does
        # not process them, so the watch hands nothing over; then one for web's tag v1.
        assert trellis(server.url, "event", "-name", "deploy", "-node", "^other$").returncode == 0
        assert trellis(node_a.url, "event", "-name", "deploy", "-service", "db").returncode == 0
        r = trellis(node_a.url, "event", "-name", "deploy", "-service", "^web$", "-tag", "v1")
        assert r.returncode == 0, r.stderr
        last_id = r.stdout.removeprefix("Event ID: ").strip()
        got = wait_until(lambda: (h,) if len(h := handled()) == 3 else None, timeout=15)[0]
        assert [e["ID"] for e in got[2]] == [last_id]
        # Another name is not this watch's.
        assert trellis(node_a.url, "event", "-name", "other-name").returncode == 0

        on_server = httpx.get(f"{server.url}/v1/event/list?name=deploy").json()
        on_agent = httpx.get(f"{node_a.url}/v1/event/list?name=deploy")
        assert len(on_server) == 4
        assert [e["ID"] for e in on_agent.json()] == [first_id, last_id]
        assert int(on_agent.headers["X-Consul-Index"]) == events.id_to_index(last_id)
        assert len(handled()) == 3
    finally:
        w.stop()
    assert w.proc is not None and w.proc.returncode is not None


def test_trellis_watch_without_a_handler_prints_and_exits(server):  # noqa: F811
    assert trellis(server.url, "event", "-name", "hello", "world").returncode == 0
    r = trellis(server.url, "watch", "-type", "event")
    assert r.returncode == 0, r.stderr
    (ev,) = json.loads(r.stdout)
    assert ev["Name"] == "hello" and base64.b64decode(ev["Payload"]) == b"world"
    r = trellis(server.url, "watch", "-type", "key")
    assert r.returncode == 1 and "supports event" in r.stderr
    r = trellis(server.url, "event", "-tag", "x", "-name", "n")
    assert r.returncode == 1 and "without service filter" in r.stderr


def test_py_consul_maintenance_and_events(server, node_a):  # noqa: F811
    for url in (node_a.url, server.url):
        c = consul.Consul(host="127.0.0.1", port=urlsplit(url).port)
        try:
            if url == node_a.url:
                assert c.agent.service.maintenance("web-1", True, "py-consul")
                assert passing(server.url, "web") == []
                checks = c.agent.checks()
                assert checks["_service_maintenance:web-1"]["Notes"] == "py-consul"
                assert c.agent.service.maintenance("web-1", False)
                assert passing(server.url, "web") == ["web-1"]
            assert c.agent.maintenance(True, "node work")
            assert "_node_maintenance" in c.agent.checks()
            assert c.agent.maintenance(False)
            assert "_node_maintenance" not in c.agent.checks()

            ev = c.event.fire("py-deploy", "payload")
            assert ev["Name"] == "py-deploy"
            index, listed = c.event.list(name="py-deploy")
            assert listed[-1]["ID"] == ev["ID"] and listed[-1]["Payload"] == b"payload"
            assert int(index) == events.id_to_index(ev["ID"])
        finally:
            c.http.session.close()


def test_a_blocking_list_through_the_agent_wakes_on_a_fire(server, node_a):  # noqa: F811
    r = httpx.get(f"{node_a.url}/v1/event/list")
    idx = r.headers["X-Consul-Index"]
    with httpx.Client(timeout=60) as h:
        import threading

        result: dict[str, httpx.Response] = {}
        t = threading.Thread(
            target=lambda: result.setdefault(
                "r", h.get(f"{node_a.url}/v1/event/list?index={idx}&wait=30s")
            ),
            daemon=True,
        )
        t.start()
        wait_until(lambda: _parked(server.url) >= 1, timeout=15)
        # Not this node's: the agent's query goes on waiting.
        httpx.put(f"{server.url}/v1/event/fire/x?node=^elsewhere$", timeout=5)
        fired = httpx.put(f"{server.url}/v1/event/fire/y", timeout=5).json()
        t.join(20)
        assert not t.is_alive()
    got = result["r"]
    assert got.status_code == 200
    assert [e["ID"] for e in got.json()] == [fired["ID"]]


def _syncs(agent_url: str) -> int:
    return int(httpx.get(f"{agent_url}/v1/agent/self").json()["Stats"]["agent"]["syncs"])


def _parked(server_url: str) -> int:
    r = httpx.get(f"{server_url}/v1/agent/self", timeout=5)
    return int(r.json()["Stats"]["blocking"]["waiting"])


def test_acls_through_the_node_agent(tmp_path: Path, started, agent):  # noqa: F811
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    s = TrellisProcess(
        [*server_args(tmp_path / "s", workers=1, node="srv"), "-config", str(cfg)]
    ).start()
    started.append(s)
    root = httpx.put(f"{s.url}/v1/acl/bootstrap").json()["SecretID"]
    mgmt = {"X-Consul-Token": root}

    def token(name: str, rules: str) -> dict[str, str]:
        r = httpx.put(f"{s.url}/v1/acl/policy", json={"Name": name, "Rules": rules}, headers=mgmt)
        assert r.status_code == 200, r.text
        body = {"Policies": [{"Name": name}]}
        r = httpx.put(f"{s.url}/v1/acl/token", json=body, headers=mgmt)
        return {"X-Consul-Token": r.json()["SecretID"]}

    web = token(
        "web", 'service "web" { policy = "write" }\nevent_prefix "dep" { policy = "write" }'
    )
    a = agent("node-a", s.url, extra=("-token", root))
    r = httpx.put(
        f"{a.url}/v1/agent/service/register", json={"Name": "web", "ID": "web-1"}, headers=mgmt
    )
    assert r.status_code == 200, r.text
    wait_services_token(s.url, "node-a", {"web-1"}, root)

    url = f"{a.url}/v1/agent/service/maintenance/web-1?enable=true&reason=r"
    assert httpx.put(url).status_code == 403  # the anonymous token
    assert httpx.put(url, headers=web).status_code == 200
    # Node maintenance needs node:write, which the web token does not have.
    r = httpx.put(f"{a.url}/v1/agent/maintenance?enable=true", headers=web)
    assert r.status_code == 403 and set(r.json()) == {"error", "code", "status"}
    assert httpx.put(f"{a.url}/v1/agent/maintenance?enable=true", headers=mgmt).status_code == 200
    checks = httpx.get(f"{s.url}/v1/health/node/node-a", headers=mgmt).json()
    assert {c["CheckID"] for c in checks} >= {"_node_maintenance", "_service_maintenance:web-1"}
    # Disabling needs the same permissions: refused, the check stays.
    off = f"{a.url}/v1/agent/service/maintenance/web-1?enable=false"
    assert httpx.put(off).status_code == 403
    assert httpx.put(off, headers=web).status_code == 200

    # Events: event:write on the name to fire, event:read to list (else filtered out).
    assert httpx.put(f"{a.url}/v1/event/fire/deploy", headers=web).status_code == 200
    assert httpx.put(f"{a.url}/v1/event/fire/other", headers=web).status_code == 403
    assert httpx.put(f"{a.url}/v1/event/fire/other", headers=mgmt).status_code == 200
    assert httpx.get(f"{a.url}/v1/event/list").json() == []
    names = [e["Name"] for e in httpx.get(f"{a.url}/v1/event/list", headers=mgmt).json()]
    assert names == ["deploy", "other"]
