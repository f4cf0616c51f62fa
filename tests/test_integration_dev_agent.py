"""``trellis dev`` runs a node agent that owns the API address, in front of its server (issue
11, item 5; DESIGN.md flows 1 and 2).

Real ``trellis dev`` and ``trellis connect proxy`` processes on free ports. Every PID a test
sees (dev's gunicorn workers, its agent, the agent's sidecars) is recorded; one still alive at
the end is ended by PID, and fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.proxy_support import EchoApp, ProxyProcess, exchange, free_port
from tests.support import TRELLIS, TrellisProcess, alive, child_pids, cmdline, wait_until

pytestmark = pytest.mark.integration


class Seen:
    """The PIDs a test saw; what is still alive at the end is SIGKILLed, by PID."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def add(self, *pids: int) -> None:
        self.pids |= set(pids)

    def survivors(self) -> list[int]:
        return sorted(p for p in self.pids if alive(p))


@pytest.fixture
def seen() -> Iterator[Seen]:
    s = Seen()
    yield s
    left = s.survivors()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the test: {[(p, cmdline(p)) for p in left]}"


@pytest.fixture
def started(seen) -> Iterator[list]:
    """Processes a test starts, stopped at its end, before ``seen`` looks for survivors."""
    procs: list = []
    yield procs
    for p in reversed(procs):
        p.stop()


@pytest.fixture
def web() -> Iterator[EchoApp]:
    app = EchoApp(upper=True)
    yield app
    app.close()


def _dev(tmp_path: Path, started: list, *extra: str) -> TrellisProcess:
    dev = TrellisProcess(
        [
            "dev",
            *("-http-port", "0", "-dns-port", "-1", "-node", "laptop"),
            *("-data-dir", str(tmp_path / "data")),
            *extra,
        ]
    )
    started.append(dev)
    return dev.start()


def _agent_pid(dev: TrellisProcess) -> int:
    return wait_until(lambda: next((p for p in child_pids(dev.pid) if "agent" in cmdline(p)), None))


def _sidecars(agent_pid: int, proxy_id: str) -> set[int]:
    return {
        p
        for p in child_pids(agent_pid)
        if "connect" in cmdline(p) and proxy_id in cmdline(p) and alive(p)
    }


def _connect_healthy(url: str, service: str) -> list:
    r = httpx.get(f"{url}/v1/health/connect/{service}", params={"passing": "1"}, timeout=5)
    return r.json() if r.status_code == 200 else []


def _bytes_flow(port: int, payload: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return exchange(s, payload) == payload.upper()
    except OSError:
        return False


def _one_line_file(tmp_path: Path, port: int) -> Path:
    d = tmp_path / "services"
    d.mkdir()
    doc = {"service": {"name": "web", "port": port, "connect": {"proxy": {}}}}
    (d / "web.json").write_text(json.dumps(doc))
    return d


def test_flow_2_through_the_api_of_trellis_dev(tmp_path, started, seen, web):
    """DESIGN.md flow 2 in its API form, against dev's API and nothing else: the one-line
    registration PUT to /v1/agent/service/register gets a managed sidecar a moment later,
    and a developer proxy reaches the app through it."""
    dev = _dev(tmp_path, started)
    server = dev.wait_for_line(r"Server API: http://").split("Server API: ")[1].strip()
    assert server != dev.url  # the agent has the API address; the server a port of its own
    r = httpx.put(
        f"{dev.url}/v1/agent/service/register",
        json={"Name": "web", "Port": web.port, "Connect": {"Proxy": {}}},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    agent = _agent_pid(dev)
    seen.add(agent)
    seen.add(*wait_until(lambda: _sidecars(agent, "web-sidecar-proxy"), timeout=15))
    entry = wait_until(lambda: _connect_healthy(dev.url, "web"), timeout=30)[0]
    assert entry["Service"]["ID"] == "web-sidecar-proxy"
    assert entry["Node"]["Node"] == "laptop"
    up = free_port()
    alice = ProxyProcess(["-service", "alice", "-upstream", f"web:{up}", "-http-addr", dev.url])
    started.append(alice)
    alice.start()
    assert wait_until(lambda: _bytes_flow(up, b"hello web"), timeout=15)
    assert web.accepted >= 1


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigterm"],
)
def test_dev_stops_its_agent_before_its_server(tmp_path, started, seen, web, sig, to_group):
    """The agent's leave (deregister the node's services, stop their sidecars) needs the
    server: dev stops the agent first, also on a Ctrl-C, which the terminal sends to the
    whole foreground process group at once."""
    dev = _dev(tmp_path, started, "-config-dir", str(_one_line_file(tmp_path, web.port)))
    agent = _agent_pid(dev)
    sidecars = wait_until(lambda: _sidecars(agent, "web-sidecar-proxy"), timeout=15)
    wait_until(lambda: _connect_healthy(dev.url, "web"), timeout=30)
    children = child_pids(dev.pid)
    seen.add(agent, *sidecars, *children)
    assert dev.proc is not None
    if to_group:
        os.killpg(dev.pid, sig)
    else:
        dev.proc.send_signal(sig)
    assert dev.proc.wait(30) == 0, dev.output()
    dev._close()
    wait_until(lambda: not seen.survivors(), timeout=15)
    out = dev.lines
    assert not [line for line in out if "cannot deregister" in line or "cannot mark" in line], (
        dev.output()
    )
    assert any("leaving: deregistering" in line for line in out), dev.output()
    stopped = next(i for i, line in enumerate(out) if "==> Trellis agent stopped" in line)
    workers_end = [i for i, line in enumerate(out) if "Worker exiting" in line]
    assert workers_end and stopped < min(workers_end), dev.output()
    assert "Traceback" not in dev.output(), dev.output()
    # The workers end by themselves: none waits on the agent (not its child) until the
    # arbiter kills it.
    assert not [line for line in out if "SIGKILL" in line], dev.output()


def test_sigkill_of_dev_leaves_no_child_behind(tmp_path, started, seen, web):
    """dev's gunicorn workers, its agent and the agent's sidecars all go when dev is killed
    with SIGKILL (only dev itself: its children must notice on their own)."""
    dev = _dev(tmp_path, started, "-config-dir", str(_one_line_file(tmp_path, web.port)))
    agent = _agent_pid(dev)
    sidecars = wait_until(lambda: _sidecars(agent, "web-sidecar-proxy"), timeout=15)
    workers = [p for p in child_pids(dev.pid) if p != agent]
    assert workers, "no gunicorn worker found"
    everyone = [agent, *sidecars, *workers]
    seen.add(*everyone)
    assert dev.proc is not None
    os.kill(dev.pid, signal.SIGKILL)
    dev.proc.wait(10)
    wait_until(lambda: not any(alive(p) for p in everyone), timeout=30)


def test_dev_stops_when_its_agent_dies(tmp_path, started, seen):
    """The agent is dev's HTTP API: if it dies, dev says so and stops (status 1) rather
    than run on with nothing on its API address."""
    dev = _dev(tmp_path, started)
    agent = _agent_pid(dev)
    seen.add(agent, *child_pids(dev.pid))
    os.kill(agent, signal.SIGKILL)
    assert dev.wait(30) == 1, dev.output()
    dev._close()
    assert any("the node agent (dev's HTTP API) exited" in line for line in dev.lines), dev.output()
    wait_until(lambda: not seen.survivors(), timeout=15)


def test_dev_refuses_a_missing_config_dir(tmp_path):
    """Refused before anything starts (the agent would refuse it, leaving dev without its
    API)."""
    missing = tmp_path / "nope"
    r = subprocess.run(
        [TRELLIS, "dev", "-http-port", "0", "-dns-port", "-1", "-config-dir", str(missing)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1, r
    assert f"Error! Config directory {missing} does not exist" in r.stderr


def test_dev_on_its_own_data_dir_stops_quietly_and_removes_it(tmp_path, started):
    """Without -data-dir, dev makes a temporary one and removes it when it stops. gunicorn's
    worker leaves by SystemExit, which unwound dev's own frames in the worker too: the worker
    removed the directory and left the catalog while the master still ran, so the master's
    own leave logged "could not leave the catalog: the data directory ... does not exist"."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dev = TrellisProcess(
        ["dev", "-http-port", "0", "-dns-port", "-1", "-node", "laptop"],
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    started.append(dev)
    dev.start()
    assert [p for p in tmp.iterdir() if p.name.startswith("trellis-dev-")], dev.output()
    assert dev.proc is not None
    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(30) == 0, dev.output()
    dev._close()
    assert not [p for p in tmp.iterdir() if p.name.startswith("trellis-dev-")], dev.output()
    out = dev.output()
    assert "[WARNING]" not in out and "[ERROR]" not in out and "Traceback" not in out, out
