"""Managed sidecars for real: a small harness process (tests/supervisor_harness.py) runs the
``Supervisor`` with its real launcher, which starts ``trellis connect proxy -proxy-id``
children against a real ``trellis dev`` holding the registrations ``managed`` builds.

Every sidecar PID the harness reports is recorded; the fixture ends the harness by PID and
then any recorded sidecar that is still running (checked to be one of ours by its command
line), and a test that finds a survivor fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio

from tests.proxy_support import EchoApp, exchange, free_port
from tests.support import OutputProcess, alive, wait_until
from trellis.proxy.agent import managed
from trellis.proxy.agent.ports import SidecarSpec
from trellis.proxy.agent.supervisor import ProcessLauncher

pytestmark = pytest.mark.integration

HARNESS = Path(__file__).with_name("supervisor_harness.py")


def sidecar_of(pid: int, parent: int) -> bool:
    """Whether ``pid`` is still a sidecar that ``parent`` started (not a recycled PID)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"-parent-pid" in argv and argv[argv.index(b"-parent-pid") + 1] == str(parent).encode()


class Harness(OutputProcess):
    """The harness process, with a pipe to its stdin for updates. ``pids`` maps each proxy
    ID to every PID the supervisor reported starting for it, in order."""

    def __init__(self) -> None:
        super().__init__([])
        self.args = [sys.executable, str(HARNESS)]
        self.pids: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def start(self) -> Harness:
        self._spawn(stdin=subprocess.PIPE)
        self.wait_for_line(r"^harness ready \d+$", timeout=30)
        return self

    def _line(self, line: str) -> None:
        m = re.match(r"\[(\S+)\] started \(pid (\d+)\)$", line)
        if m:
            with self._lock:
                self.pids.setdefault(m.group(1), []).append(int(m.group(2)))

    def all_pids(self) -> list[int]:
        with self._lock:
            return [p for ps in self.pids.values() for p in ps]

    def current(self, proxy_id: str) -> int | None:
        with self._lock:
            ps = self.pids.get(proxy_id)
            return ps[-1] if ps else None

    def send(self, specs: dict[str, SidecarSpec]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        doc = {
            pid: {"service_id": s.service_id, "args": list(s.args), "env": dict(s.env)}
            for pid, s in specs.items()
        }
        self.proc.stdin.write(json.dumps(doc) + "\n")
        self.proc.stdin.flush()

    def survivors(self) -> list[int]:
        return [p for p in self.all_pids() if alive(p) and sidecar_of(p, self.pid)]


@pytest.fixture
def harnesses():
    """Harness processes; at the end each is stopped by PID, then any sidecar it started that
    is still running is SIGKILLed by PID (and the test that left it fails on its own)."""
    made: list[Harness] = []
    yield made
    for h in made:
        if h.proc is not None and h.proc.stdin is not None:
            try:
                h.proc.stdin.close()
            except OSError:
                pass
        h.stop()
        for pid in h.survivors():
            os.kill(pid, signal.SIGKILL)


def register(url: str, body: dict) -> None:
    r = httpx.put(url + "/v1/agent/service/register", json=body, timeout=10)
    assert r.status_code == 200, r.text


def pass_checks_of(url: str, service_ids: set[str]) -> None:
    """Stand in for the agent's check runner: the sidecars' TCP and alias checks pass."""
    checks = httpx.get(url + "/v1/agent/checks", timeout=10).json()
    ids = [c["CheckID"] for c in checks.values() if c["ServiceID"] in service_ids]
    assert len(ids) == 2 * len(service_ids), checks
    for cid in ids:
        assert httpx.put(f"{url}/v1/agent/check/pass/{cid}", timeout=10).status_code == 200


def managed_sidecars(url: str, apps: list[dict]) -> dict[str, SidecarSpec]:
    """Register ``apps`` (one-line form) and, as the agent will, their sidecars on ports
    from an allocator; the specs that run them."""
    low = min(free_port(), 65535 - 64)
    alloc = managed.PortAllocator(low, low + 63)
    specs = {}
    for app in apps:
        register(url, app)
        pid = managed.proxy_id(app)
        reg = managed.registration(app, alloc.assign(pid, managed.bind_address(app)))
        register(url, reg)
        specs[pid] = managed.sidecar_spec(reg, http_addr=url)
    pass_checks_of(url, set(specs))
    return specs


def two_apps(db_port: int, up_port: int) -> list[dict]:
    """``db`` in the API spelling, ``web`` (with an upstream to db) in the config file's."""
    return [
        {
            "ID": "db",
            "Name": "db",
            "Port": db_port,
            "Address": "127.0.0.1",
            "Connect": {"Proxy": {}},
        },
        {
            "name": "web",
            "port": free_port(),
            "address": "127.0.0.1",
            "connect": {
                "proxy": {
                    "config": {
                        "upstreams": [{"destination_name": "db", "local_bind_port": up_port}]
                    }
                }
            },
        },
    ]


def echoes(port: int, text: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            return exchange(c, text) == text.upper()
    except OSError:
        return False


def test_supervised_sidecars_serve_come_back_after_sigkill_and_stop_when_removed(
    trellis_server, harnesses, apps
):
    url = trellis_server.server_url
    db_app = EchoApp(upper=True)
    apps.append(db_app)
    up_port = free_port()
    specs = managed_sidecars(url, two_apps(db_app.port, up_port))
    h = Harness().start()
    harnesses.append(h)
    h.send(specs)
    h.wait_for_line(r"^\[web-sidecar-proxy\] .*Log data will now stream", timeout=30)
    h.wait_for_line(r"^\[db-sidecar-proxy\] .*Log data will now stream", timeout=30)

    # Bytes: the upstream listener of web's sidecar, mutual TLS, db's sidecar, the app.
    wait_until(lambda: echoes(up_port, b"hello"), timeout=15)

    # SIGKILL of db's sidecar: back and serving within 5 s.
    old = h.current("db-sidecar-proxy")
    assert old is not None and sidecar_of(old, h.pid)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: h.current("db-sidecar-proxy") != old, timeout=5)
    assert new
    wait_until(lambda: echoes(up_port, b"again"), timeout=5)
    assert time.monotonic() - t0 < 5.0
    assert not alive(old)
    h.wait_for_line(
        rf"^\[db-sidecar-proxy\] exited \(pid {old}, signal SIGKILL\); restarting in 1s$"
    )

    # web's spec removed: that PID is gone, and db's sidecar is left alone.
    web = h.current("web-sidecar-proxy")
    db = h.current("db-sidecar-proxy")
    assert web is not None and db is not None
    h.send({"db-sidecar-proxy": specs["db-sidecar-proxy"]})
    wait_until(lambda: not alive(web), timeout=10)
    h.wait_for_line(rf"^\[web-sidecar-proxy\] stopped \(pid {web}, status 0\)$")
    assert alive(db) and h.current("db-sidecar-proxy") == db

    # The harness stops (as the agent does on SIGTERM): so does every sidecar.
    assert h.stop() == 0
    assert h.survivors() == []
    assert "harness stopped" in h.lines


def test_no_sidecar_outlives_its_parent_killed_with_sigkill(trellis_server, harnesses, apps):
    url = trellis_server.server_url
    db_app = EchoApp(upper=True)
    apps.append(db_app)
    specs = managed_sidecars(url, two_apps(db_app.port, free_port()))
    h = Harness().start()
    harnesses.append(h)
    h.send(specs)
    h.wait_for_line(r"^\[web-sidecar-proxy\] .*Log data will now stream", timeout=30)
    h.wait_for_line(r"^\[db-sidecar-proxy\] .*Log data will now stream", timeout=30)
    pids = h.all_pids()
    assert len(pids) == 2 and all(sidecar_of(p, h.pid) for p in pids)

    assert h.proc is not None
    os.kill(h.pid, signal.SIGKILL)  # the parent only: each sidecar has its own process group
    h.proc.wait(10)
    try:
        wait_until(lambda: not any(alive(p) for p in pids), timeout=5)
    finally:
        left = h.survivors()
    assert left == [], f"sidecars outlived their SIGKILLed parent: {left}"


def test_a_proxy_whose_parent_is_not_the_given_pid_exits_at_once(trellis_server):
    """The race where the parent died before the sidecar's prctl: its getppid() is no
    longer that PID, and it stops at once instead of waiting for a signal that never comes."""
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("trellis")),
            *("connect", "proxy", "-service", "alice", "-upstream", f"db:{free_port()}"),
            *("-http-addr", trellis_server.server_url, "-parent-pid", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: the parent process 1 (-parent-pid) is gone"


CHILD = """
import ctypes, signal, sys, time
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
print("ready", flush=True)
time.sleep(300)
"""


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_child_outlives_trios_idle_worker_threads():
    """PR_SET_PDEATHSIG fires when the *thread* that forked the child exits. The launcher
    must not fork on one of trio's worker threads (``trio.lowlevel.open_process`` does), which
    trio ends after 10 idle seconds: every sidecar would then get SIGTERM from a healthy
    agent. Once no trio worker thread is left in this process, the child must still run."""
    out = Lines()
    log = logging.getLogger("tests.supervisor.child")
    log.addHandler(out)
    log.setLevel(logging.INFO)

    async def main() -> None:
        child = ProcessLauncher([sys.executable, "-c", CHILD], log=log).start("child", [], {})
        exited = trio.Event()

        async def watch() -> None:
            await child.wait()
            exited.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                with trio.fail_after(30):
                    while "[child] ready" not in out.lines and not exited.is_set():
                        await trio.sleep(0.01)
                assert not exited.is_set(), out.lines
                with trio.fail_after(20):
                    while any(t.name.startswith("Trio thread") for t in threading.enumerate()):
                        await trio.sleep(0.05)
                with trio.move_on_after(1.5):
                    await exited.wait()
                assert not exited.is_set(), "the child exited when a trio worker thread did"
                child.send_signal(signal.SIGKILL)
        finally:
            child.send_signal(signal.SIGKILL)
            with trio.move_on_after(10):
                await child.wait()

    try:
        trio.run(main)
    finally:
        log.removeHandler(out)


def test_a_sidecar_gets_its_own_token_and_never_the_agents():
    """The agent may run with its own token in the environment; a sidecar gets only the one
    its spec gives (or none), and its output comes back under its proxy ID."""
    out = Lines()
    log = logging.getLogger("tests.supervisor.env")
    log.addHandler(out)
    log.setLevel(logging.INFO)
    show = (
        "import os; e = os.environ; print(e.get('TRELLIS_HTTP_TOKEN'),"
        " e.get('TRELLIS_HTTP_TOKEN_FILE'), e.get('KEEP'), sep='|')"
    )
    agent_env = {"TRELLIS_HTTP_TOKEN": "agent", "TRELLIS_HTTP_TOKEN_FILE": "/agent", "KEEP": "1"}
    launcher = ProcessLauncher([sys.executable, "-c", show], base_env=agent_env, log=log)

    async def main() -> list[int]:
        with trio.fail_after(30):
            own = launcher.start("web-sidecar-proxy", [], {"TRELLIS_HTTP_TOKEN": "sidecar"})
            none = launcher.start("db-sidecar-proxy", [], {})
            return [await own.wait(), await none.wait()]

    try:
        assert trio.run(main) == [0, 0]
    finally:
        log.removeHandler(out)
    assert sorted(out.lines) == [
        "[db-sidecar-proxy] None|None|1",
        "[web-sidecar-proxy] sidecar|None|1",
    ]
