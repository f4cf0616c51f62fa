"""``trellis lock`` end to end: real ``trellis lock`` processes against a real server.

Each command run under the lock prints a line when it starts, then waits for a file the test
creates (a bounded wait, so that a command left behind by a failed test ends by itself), and
exits with a code of its own. The commands run in their own process groups (``trellis lock``
starts them so, to stop them whole); the test records their PIDs and ends those too.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.support import OutputProcess, TrellisProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    p = TrellisProcess(
        [
            "server",
            *("-data-dir", str(tmp_path / "data")),
            *("-http-port", "0", "-dns-port", "-1", "-workers", "1", "-node", "n1"),
            *("-log-level", "warning"),
        ]
    )
    try:
        yield p.start()
    finally:
        p.stop()


class Runs:
    """The ``trellis lock`` processes of a test and the commands they ran, ended at the end."""

    def __init__(self, server: TrellisProcess, tmp_path: Path) -> None:
        self.server = server
        self.dir = tmp_path
        self.procs: list[OutputProcess] = []

    def command(self, name: str, code: int) -> str:
        go = self.dir / f"go-{name}"
        return (
            f"echo {name} started $$; i=0;"
            f" while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done;"
            f" echo {name} done; exit {code}"
        )

    def start(self, *args: str) -> OutputProcess:
        p = OutputProcess(["lock", *args], env={"TRELLIS_HTTP_ADDR": self.server.url})
        p._spawn()
        self.procs.append(p)
        return p

    def go(self, name: str) -> None:
        (self.dir / f"go-{name}").touch()

    def started(self, p: OutputProcess) -> bool:
        return any(" started " in line for line in p.lines)

    def end(self) -> None:
        for p in self.procs:
            for line in p.lines:
                if " started " in line:
                    try:
                        os.killpg(int(line.split()[-1]), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
            p.stop()


@pytest.fixture
def runs(server, tmp_path):
    r = Runs(server, tmp_path)
    try:
        yield r
    finally:
        r.end()


def sessions(server: TrellisProcess) -> int:
    return len(httpx.get(server.url + "/v1/session/list", timeout=5).json())


def test_two_contenders_run_one_at_a_time_with_their_exit_codes(runs, server):
    a = runs.start("jobs/backup", runs.command("A", 7))
    a.wait_for_line("A started")
    b = runs.start("jobs/backup", runs.command("B", 3))
    # B has its session and is waiting on the lock A holds.
    wait_until(lambda: sessions(server) == 2, timeout=10)
    lock = httpx.get(server.url + "/v1/kv/jobs/backup/.lock", timeout=5).json()[0]
    assert lock["LockIndex"] == 1 and lock["Session"]
    assert not runs.started(b)
    runs.go("A")
    assert a.wait(15) == 7  # the command's exit code
    b.wait_for_line("B started")
    assert "A done" in a.output()
    runs.go("B")
    assert b.wait(15) == 3
    # Both released and destroyed their sessions.
    assert sessions(server) == 0
    lock = httpx.get(server.url + "/v1/kv/jobs/backup/.lock", timeout=5).json()[0]
    assert lock["Session"] is None and lock["LockIndex"] == 2


def test_a_lost_lock_stops_the_command(runs, server):
    a = runs.start("jobs/lost", runs.command("A", 0))
    line = a.wait_for_line("A started")
    child = int(line.split()[-1])
    [s] = httpx.get(server.url + "/v1/session/list", timeout=5).json()
    assert httpx.put(server.url + f"/v1/session/destroy/{s['ID']}", timeout=5).json() is True
    assert a.wait(15) == 1
    assert "Lock lost" in a.output()
    assert "A done" not in a.output()
    wait_until(lambda: not os.path.exists(f"/proc/{child}"), timeout=10)


def test_semaphore_lets_n_run_at_once(runs, server):
    a = runs.start("-n", "2", "pool", runs.command("A", 0))
    b = runs.start("-n", "2", "pool", runs.command("B", 0))
    a.wait_for_line("A started")
    b.wait_for_line("B started")
    c = runs.start("-n", "2", "pool", runs.command("C", 0))
    wait_until(lambda: sessions(server) == 3, timeout=10)
    assert not runs.started(c)
    runs.go("B")
    assert b.wait(15) == 0
    c.wait_for_line("C started")
    assert not any("A done" in line for line in a.lines)  # A and C run together
    runs.go("A")
    runs.go("C")
    assert a.wait(15) == 0 and c.wait(15) == 0
    assert sessions(server) == 0
    keys = httpx.get(server.url + "/v1/kv/pool/?keys", timeout=5).json()
    assert keys == ["pool/.lock"]  # the contender keys are gone


def test_try_gives_up(runs, server):
    a = runs.start("jobs/busy", runs.command("A", 0))
    a.wait_for_line("A started")
    b = runs.start("-try", "500ms", "jobs/busy", runs.command("B", 0))
    assert b.wait(15) == 1
    assert "timed out" in b.output() and not runs.started(b)
    runs.go("A")
    assert a.wait(15) == 0
