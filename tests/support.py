"""Helpers shared by the tests: real ``trellis`` processes, fresh PostgreSQL databases, polling."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TRELLIS = str(Path(sys.executable).with_name("trellis"))


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server ``admin_url`` names (its URL), dropped
    (connections and all) when the block ends."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.replace("/postgres?", f"/{name}?", 1)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_args(data_dir: Path, *, workers: int, node: str) -> list[str]:
    """``trellis server`` on a fresh data dir and a free HTTP port, DNS off."""
    return [
        "server",
        *("-data-dir", str(data_dir)),
        *("-http-port", "0", "-dns-port", "-1"),
        *("-workers", str(workers), "-node", node),
    ]


class OutputProcess:
    """A real ``trellis`` subprocess in its own session, with its output (stdout and stderr)
    kept line by line by a reader thread, for assertions and failure messages. Subclasses read
    what they need from each line (``_line``) and say when the process is up (``_ready``).
    ``stop`` ends the whole process group, so nothing it started outlives the test."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.args = [TRELLIS, *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()

    def _spawn(self, *, stdin: int | None = None) -> None:
        self.proc = subprocess.Popen(
            self.args,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._line(line)
        self._ready.set()

    def _line(self, line: str) -> None:
        """One line of output, as it arrives (in the reader thread)."""

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if rx.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}:\n" + self.output())

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (master and workers): a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Workers of a killed master exit on their own when they notice; make sure.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


class TrellisProcess(OutputProcess):
    """A real ``trellis dev`` or ``trellis server`` subprocess on free ports.

    It reads the banner the server prints to learn the HTTP URL and the DNS port, waits until
    ``/v1/status/leader`` answers, and keeps the output for failure messages.
    """

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        super().__init__(args, env=env)
        self.url = ""
        self._server_url = ""
        self.dns_port: int | None = None

    @property
    def server_url(self) -> str:
        """The server's own API: ``trellis dev``'s "Server API" (``url`` is its node agent's),
        else ``url``. For tests that stand in for a node agent themselves."""
        return self._server_url or self.url

    def start(self, timeout: float = 30.0) -> TrellisProcess:
        self._spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        if not self._ready.wait(timeout):
            self.stop()
            raise AssertionError("trellis did not print its address:\n" + self.output())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("trellis exited early:\n" + self.output())
            try:
                if httpx.get(self.url + "/v1/status/leader", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError("trellis did not become ready:\n" + self.output())

    def _line(self, line: str) -> None:
        m = re.search(r"HTTP API: (http://\S+)", line)
        if m:
            self.url = m.group(1)
        m = re.search(r"Server API: (http://\S+)", line)
        if m:
            self._server_url = m.group(1)
        m = re.search(r"DNS: \S+:(\d+) ", line)
        if m:
            self.dns_port = int(m.group(1))
        if "Log data will now stream" in line or ("DNS:" in line and self.url):
            self._ready.set()


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has: it only waits to be
    reaped), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # pid (comm) state ...: comm may hold spaces, so split after the last ")".
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` ([] once it is gone), from /proc."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a ``trellis server``'s gunicorn workers), from
    /proc; they are only looked at, never signalled, here."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def worker_pids(pid: int) -> list[int]:
    """A ``trellis server``'s or ``trellis dev``'s gunicorn workers: its children but for
    dev's node agent (``trellis agent -dev``), which is a child of dev's master too."""
    return [p for p in child_pids(pid) if "agent" not in cmdline(p)]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after
    ``timeout``. The one polling helper of the suite: in-process tests and process tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
