"""The node agent carrying the mesh: managed sidecars from the one-line ``connect.proxy`` form,
health checks run on the node, and no sidecar outliving its agent (issue 11).

Real ``trellis server``/``dev``/``agent``/``connect proxy`` processes on free ports. The agents'
sidecars are their children (the supervisor's), found through /proc; every PID a test sees is
recorded and, if still alive at the end, ended by PID, and such a survivor fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dnslib import QTYPE, DNSRecord

from tests.proxy_support import EchoApp, ProxyProcess, exchange, free_port
from tests.support import TrellisProcess, alive, child_pids, cmdline, server_args, wait_until

pytestmark = pytest.mark.integration


class Sidecars:
    """The managed sidecars of agents, by PID; what is still alive at the end is ended."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def of(self, agent_pid: int, proxy_id: str | None = None) -> set[int]:
        out = set()
        for pid in child_pids(agent_pid):
            cmd = cmdline(pid)
            if "connect" in cmd and "proxy" in cmd and alive(pid):
                if proxy_id is None or proxy_id in cmd:
                    out.add(pid)
        self.seen |= out
        return out

    def survivors(self) -> list[int]:
        return sorted(p for p in self.seen if alive(p))


@pytest.fixture
def sidecars() -> Iterator[Sidecars]:
    s = Sidecars()
    yield s
    left = s.survivors()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"sidecars outlived the test: {left}"


@pytest.fixture
def started(sidecars) -> Iterator[list]:
    """Processes a test starts, stopped at its end; before ``sidecars`` looks for survivors
    (a stopped agent must have stopped its sidecars)."""
    procs: list = []
    yield procs
    for p in reversed(procs):
        p.stop()


@pytest.fixture
def apps() -> Iterator[list[EchoApp]]:
    made: list[EchoApp] = []
    yield made
    for a in made:
        a.close()


def _connect_healthy(url: str, service: str) -> list:
    r = httpx.get(f"{url}/v1/health/connect/{service}", params={"passing": "1"}, timeout=5)
    return r.json() if r.status_code == 200 else []


def _agent(tmp_path: Path, node: str, server: str, port: int, started: list) -> TrellisProcess:
    """An agent whose managed sidecars get exactly ``port`` (two agents on one machine must not
    both pick the first free port of the default range)."""
    base = tmp_path / node
    p = TrellisProcess(
        [
            "agent",
            *("-node", node, "-http-port", "0", "-server", server),
            *("-data-dir", str(base / "data"), "-config-dir", str(base / "conf")),
            *("-proxy-min-port", str(port), "-proxy-max-port", str(port)),
            *("-node-ttl", "10s"),
        ]
    )
    started.append(p)
    return p.start()


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _bytes_flow(port: int, payload: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return exchange(s, payload) == payload.upper()
    except OSError:
        return False


def test_the_users_flow_2_one_line_and_a_sidecar_is_listening(tmp_path, started, apps, sidecars):
    """README, "The node agent starts the sidecar": `trellis dev -config-dir ./services` with
    the one-line file, then `trellis connect proxy -service alice -upstream web:9191`."""
    web = EchoApp(upper=True)
    apps.append(web)
    services = tmp_path / "services"
    _write(
        services / "web.json",
        {"service": {"name": "web", "port": web.port, "connect": {"proxy": {}}}},
    )
    dev = TrellisProcess(
        [
            "dev",
            *("-http-port", "0", "-dns-port", "-1", "-node", "laptop"),
            *("-data-dir", str(tmp_path / "data"), "-config-dir", str(services)),
        ]
    )
    started.append(dev)
    dev.start()
    agent_pid = wait_until(
        lambda: next((p for p in child_pids(dev.pid) if "agent" in cmdline(p)), None)
    )
    # A moment later the agent runs the sidecar, registered with a port of 20000-20255...
    wait_until(lambda: sidecars.of(agent_pid, "web-sidecar-proxy"), timeout=15)
    entry = wait_until(lambda: _connect_healthy(dev.url, "web"), timeout=30)[0]
    assert entry["Service"]["Kind"] == "connect-proxy"
    assert 20000 <= entry["Service"]["Port"] <= 20255
    assert entry["Service"]["Proxy"]["DestinationServiceName"] == "web"
    # ...that accepts only mTLS and forwards to the app.
    with socket.create_connection(("127.0.0.1", entry["Service"]["Port"]), timeout=5) as s:
        assert exchange(s, b"plain text, no TLS") != b"PLAIN TEXT, NO TLS"
    up = free_port()
    alice = ProxyProcess(["-service", "alice", "-upstream", f"web:{up}", "-http-addr", dev.url])
    started.append(alice)
    alice.start()
    assert wait_until(lambda: _bytes_flow(up, b"hello web"), timeout=15)
    assert web.accepted >= 1
    # Stopping dev stops its agent, and the agent its sidecar.
    dev.stop()
    wait_until(lambda: not sidecars.survivors(), timeout=15)


def test_two_nodes_talk_through_managed_sidecars_that_come_back_and_go_away(
    tmp_path, started, apps, sidecars
):
    server = TrellisProcess(server_args(tmp_path / "server", workers=1, node="srv"))
    started.append(server)
    server.start()
    web = EchoApp(upper=True)
    apps.append(web)
    up = free_port()
    _write(
        tmp_path / "node-a" / "conf" / "web.json",
        {"service": {"name": "web", "port": web.port, "connect": {"proxy": {}}}},
    )
    _write(
        tmp_path / "node-b" / "conf" / "api.json",
        {
            "service": {
                "name": "api",
                "port": free_port(),
                "connect": {
                    "proxy": {
                        "config": {
                            "upstreams": [{"destination_name": "web", "local_bind_port": up}]
                        }
                    }
                },
            }
        },
    )
    a = _agent(tmp_path, "node-a", server.url, free_port(), started)
    b = _agent(tmp_path, "node-b", server.url, free_port(), started)
    wait_until(lambda: _connect_healthy(server.url, "web"), timeout=30)
    # api on node B reaches web on node A: B's sidecar (upstream) -> A's sidecar -> the app.
    assert wait_until(lambda: _bytes_flow(up, b"from node b"), timeout=20)
    node = httpx.get(f"{server.url}/v1/catalog/node/node-a", timeout=5).json()
    assert {"web", "web-sidecar-proxy"} <= set(node["Services"])

    # A managed sidecar killed with SIGKILL is back, and serving, within 5 s.
    (old,) = sidecars.of(a.pid, "web-sidecar-proxy")
    os.kill(old, signal.SIGKILL)
    (new,) = wait_until(lambda: sidecars.of(a.pid, "web-sidecar-proxy") - {old}, timeout=5)
    assert wait_until(lambda: _bytes_flow(up, b"after the kill"), timeout=10)

    # Removing the file and a SIGHUP stop that sidecar and take it out of the catalog.
    (tmp_path / "node-b" / "conf" / "api.json").unlink()
    (b_sidecar,) = sidecars.of(b.pid, "api-sidecar-proxy")
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not alive(b_sidecar), timeout=15)
    wait_until(
        lambda: (
            "api-sidecar-proxy"
            not in (httpx.get(f"{server.url}/v1/catalog/node/node-b", timeout=5).json() or {}).get(
                "Services", {}
            )
        ),
        timeout=15,
    )
    assert not _bytes_flow(up, b"nobody listens")
    assert alive(new)


def test_an_agent_killed_with_sigkill_leaves_no_sidecar(tmp_path, started, apps, sidecars):
    server = TrellisProcess(server_args(tmp_path / "server", workers=1, node="srv"))
    started.append(server)
    server.start()
    web = EchoApp(upper=True)
    apps.append(web)
    _write(
        tmp_path / "node-a" / "conf" / "web.json",
        {"service": {"name": "web", "port": web.port, "connect": {"proxy": {}}}},
    )
    a = _agent(tmp_path, "node-a", server.url, free_port(), started)
    pids = wait_until(lambda: sidecars.of(a.pid, "web-sidecar-proxy"), timeout=15)
    os.kill(a.pid, signal.SIGKILL)
    a.proc.wait(10)
    # Each sidecar notices its parent is gone and drains (nothing is open: it exits at once).
    wait_until(lambda: not any(alive(p) for p in pids), timeout=15)


def test_an_http_check_run_by_the_agent_takes_a_stopped_app_out_of_passing_and_dns(
    tmp_path, started
):
    server = TrellisProcess(
        [
            "server",
            *("-data-dir", str(tmp_path / "server"), "-http-port", "0", "-dns-port", "0"),
            *("-workers", "1", "-node", "srv"),
        ]
    )
    started.append(server)
    server.start()
    assert server.dns_port is not None
    app = _HealthApp()
    try:
        _write(
            tmp_path / "node-a" / "conf" / "web.json",
            {
                "service": {
                    "name": "web",
                    "port": app.port,
                    "check": {"http": f"http://127.0.0.1:{app.port}/health", "interval": "1s"},
                }
            },
        )
        _agent(tmp_path, "node-a", server.url, free_port(), started)

        def passing() -> list:
            r = httpx.get(f"{server.url}/v1/health/service/web", params={"passing": "1"})
            return r.json() if r.status_code == 200 else []

        def dns_answers() -> int:
            q = DNSRecord.question("web.service.trellis", "A")
            r = DNSRecord.parse(q.send("127.0.0.1", server.dns_port, timeout=2))
            return len([rr for rr in r.rr if rr.rtype == QTYPE.A])

        wait_until(passing, timeout=15)
        assert wait_until(dns_answers, timeout=10) == 1
        app.close()  # the app stops: its HTTP check fails
        wait_until(lambda: not passing(), timeout=15)
        assert wait_until(lambda: dns_answers() == 0 or None, timeout=10)
        checks = httpx.get(f"{server.url}/v1/health/checks/web").json()
        assert [c["Status"] for c in checks] == ["critical"]
    finally:
        app.close()


class _HealthApp:
    """A tiny HTTP app answering 200 on /health, on 127.0.0.1 (port 0), until closed."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.httpd.shutdown()
            self.httpd.server_close()


def test_the_mesh_fails_static_while_the_server_is_gone_and_the_agents_resync(
    tmp_path, started, apps, sidecars
):
    """Issue 11 item 4: with the server stopped, the agents keep answering the CA roots and
    the reads their sidecars share, the sidecars keep opening new connections with what they
    hold; the server started again on its data dir, the agents and their watches resync."""
    # The server must come back at the address the agents know: a port free a moment ago,
    # given again to the restarted server (gunicorn binds with SO_REUSEADDR).
    port = free_port()
    args = [
        "server",
        *("-data-dir", str(tmp_path / "server"), "-http-port", str(port), "-dns-port", "-1"),
        *("-workers", "1", "-node", "srv"),
    ]
    server = TrellisProcess(args)
    started.append(server)
    server.start()
    web = EchoApp(upper=True)
    apps.append(web)
    up = free_port()
    _write(
        tmp_path / "node-a" / "conf" / "web.json",
        {"service": {"name": "web", "port": web.port, "connect": {"proxy": {}}}},
    )
    _write(
        tmp_path / "node-b" / "conf" / "api.json",
        {
            "service": {
                "name": "api",
                "port": free_port(),
                "connect": {
                    "proxy": {
                        "config": {
                            "upstreams": [{"destination_name": "web", "local_bind_port": up}]
                        }
                    }
                },
            }
        },
    )
    a = _agent(tmp_path, "node-a", server.url, free_port(), started)
    b = _agent(tmp_path, "node-b", server.url, free_port(), started)
    wait_until(lambda: _connect_healthy(server.url, "web"), timeout=30)
    assert wait_until(lambda: _bytes_flow(up, b"before"), timeout=20)

    # The roots through an agent are the server's, body and index.
    direct = httpx.get(f"{server.url}/v1/connect/ca/roots", timeout=5)
    for path in ("/v1/connect/ca/roots", "/v1/agent/connect/ca/roots"):
        via = httpx.get(f"{b.url}{path}", timeout=5)
        assert via.status_code == 200
        assert via.content == direct.content
        assert via.headers["x-consul-index"] == direct.headers["x-consul-index"]
    health = httpx.get(f"{b.url}/v1/health/connect/web", params={"passing": "1"}, timeout=5)
    health_index = int(health.headers["x-consul-index"])
    # A blocking read of it (as B's sidecar holds one): the agent's shared watch now has it.
    blocked = httpx.get(
        f"{b.url}/v1/health/connect/web",
        params={"passing": "1", "index": str(health_index - 1), "wait": "1s"},
        timeout=5,
    )
    assert blocked.status_code == 200 and blocked.json() == health.json()

    server.stop()  # by PID (SIGTERM: its workers go with it)
    assert not alive(server.pid)

    def stale_roots(agent_url: str) -> httpx.Response | None:
        r = httpx.get(f"{agent_url}/v1/agent/connect/ca/roots", timeout=5)
        return r if r.headers.get("x-consul-knownleader") == "false" else None

    for agent in (a, b):
        r = wait_until(lambda agent=agent: stale_roots(agent.url), timeout=20)
        assert r.status_code == 200 and r.content == direct.content
    # A sidecar's re-read after a failure (no index) and a blocking re-read with an older
    # index get what the agent holds instead of a 503.
    for params in ({"passing": "1"}, {"passing": "1", "index": "1", "wait": "1s"}):
        r = httpx.get(f"{b.url}/v1/health/connect/web", params=params, timeout=5)
        assert r.status_code == 200 and r.json() == health.json()
        assert r.headers["x-consul-knownleader"] == "false"
    # The held index blocks its wait out, then the held answer (the sidecars do not spin).
    r = httpx.get(
        f"{b.url}/v1/health/connect/web",
        params={"passing": "1", "index": str(health_index), "wait": "1s"},
        timeout=10,
    )
    assert r.status_code == 200 and r.headers["x-consul-index"] == str(health_index)
    # New connections B -> A go on working, for a while (each one new: its own TLS handshake
    # and authorization, with the sidecars' held leaves, roots, intentions and instances).
    t0, n = time.monotonic(), 0
    while time.monotonic() - t0 < 3.0 or n < 5:
        assert _bytes_flow(up, b"server gone %d" % n), f"connection {n} failed"
        n += 1

    restarted = TrellisProcess(args)
    started.append(restarted)
    restarted.start()
    # The agents resync: their watches answer from a server again, their nodes are alive and
    # their services passing, and bytes flow.
    for agent in (a, b):
        wait_until(
            lambda agent=agent: (
                httpx.get(f"{agent.url}/v1/agent/connect/ca/roots", timeout=5).headers.get(
                    "x-consul-knownleader"
                )
                != "false"
            ),
            timeout=30,
        )
    wait_until(lambda: _connect_healthy(restarted.url, "web"), timeout=30)
    wait_until(lambda: _connect_healthy(restarted.url, "api"), timeout=30)
    wait_until(
        lambda: (
            not [
                c
                for c in httpx.get(f"{restarted.url}/v1/health/state/critical", timeout=5).json()
                if c["CheckID"] == "serfHealth"
            ]
        ),
        timeout=30,
    )
    assert _bytes_flow(up, b"after the restart")
