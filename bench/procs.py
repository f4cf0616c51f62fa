"""Processes and CPU accounting shared by the benchmarks (``control_plane.py``, ``ca.py``).

Every server a benchmark starts is a ``Proc``: its output is kept for the report, and ``stop``
ends it by PID (SIGTERM, then SIGKILL if it lingers), then every child it made, also by PID.
Nothing here signals a process the benchmark did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

#: Below this much CPU (percent of one core, all processes) the machine counts as quiet.
QUIET_PCT = 25.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_pair() -> int:
    """A port P with P and P+1 free on 127.0.0.1 (an OpenBao dev server takes both)."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports on 127.0.0.1")


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children_of(pid: int) -> list[int]:
    """The descendants of ``pid``, from /proc (PIDs only; each is signalled by PID)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent[int(entry)] = int(_stat_fields(entry)[1])
        except (OSError, IndexError, ValueError):
            continue
    out: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    return [pid, *children_of(pid)]


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) each process has used so far."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_by_pid(pids).values())


def system_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _busy_pct(before: float, seconds: float) -> float:
    return 100 * (system_busy() - before) / seconds


def wait_quiet(budget: float) -> tuple[float, float]:
    """Wait (at most ``budget`` seconds) until the machine, servers included, is nearly idle:
    other processes sharing the cores would otherwise be measured as slowness.
    Returns (seconds waited, busy % last seen)."""
    t0 = time.monotonic()
    while True:
        b0 = system_busy()
        time.sleep(0.5)
        busy = _busy_pct(b0, 0.5)
        waited = time.monotonic() - t0
        if busy <= QUIET_PCT or waited >= budget:
            return round(waited, 1), round(busy, 1)


def background_before_run(budget: float, log: Callable[[str], None]) -> float:
    """The CPU other processes use before a run (percent of one core, sampled over 1 s),
    waiting up to ``budget`` seconds for it to fall to 20 % or less, and warning if it does
    not: the figures would be noisy."""
    deadline = time.monotonic() + budget
    while True:
        b0 = system_busy()
        time.sleep(1.0)
        busy = round(100 * (system_busy() - b0), 1)
        if busy <= 20 or time.monotonic() >= deadline:
            break
        log(f"waiting for a quiet machine: others use {busy}% CPU")
    if busy > 20:
        log(
            f"warning: other processes use {busy}% CPU;"
            " the figures will be noisy (see the other% column)"
        )
    return busy


async def wait_quiet_async(budget: float) -> float:
    """``wait_quiet`` for a benchmark's event loop; returns the seconds waited."""
    if budget <= 0:
        return 0.0
    t0 = time.monotonic()
    while True:
        b0 = system_busy()
        await asyncio.sleep(0.5)
        waited = time.monotonic() - t0
        if _busy_pct(b0, 0.5) <= QUIET_PCT or waited >= budget:
            return round(waited, 1)


def log_problems(lines: list[str]) -> dict[str, int]:
    """What a gunicorn server's output says went wrong: warnings, errors, tracebacks, and
    workers killed for timing out."""
    return {
        "warnings": sum("[WARNING]" in x for x in lines),
        "errors": sum("[ERROR]" in x or "[CRITICAL]" in x for x in lines),
        "tracebacks": sum(x.startswith("Traceback") for x in lines),
        "worker_timeouts": sum("WORKER TIMEOUT" in x for x in lines),
    }


class Proc:
    """A subprocess we started: output kept; ``stop`` ends it and the children it made."""

    name = "proc"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self.known_children: set[int] = set()

    def spawn(self, args: list[str], *, cwd: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if len(self.lines) > 5000:
                del self.lines[:1000]
            self.on_line(line)

    def on_line(self, line: str) -> None:
        pass

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """This process and its children now (remembered, so that ``stop`` can end them)."""
        if not self.alive():
            return []
        kids = children_of(self.pid)
        self.known_children.update(kids)
        return [self.pid, *kids]

    def output(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self) -> None:
        """SIGTERM the process, SIGKILL it if it lingers, then any child of it still alive."""
        if self.proc is None:
            return
        self.pids()  # remember the children while the parent still names them
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        for pid in self.known_children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
