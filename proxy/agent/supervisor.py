"""The node agent's sidecar supervisor: one ``trellis connect proxy`` child per managed sidecar.

Theory of operation
-------------------
The agent hands ``update`` the whole desired set, by proxy ID, whenever it changes (a reload,
a registration through the API). ``run`` keeps the children matching it, one loop over a
*slot* per proxy ID; every event (an update, a child's exit, a backoff timer) wakes the loop,
which reconciles and sleeps until the next event or timer:

- a desired proxy with no slot gets one, and its child is started at once;
- a child whose spec changed, or whose proxy is no longer desired, is stopped (SIGTERM, then
  SIGKILL after ``stop_grace``); once it has exited, a changed spec starts again at once and a
  removed one's slot is dropped;
- a child that exits on its own is restarted after a backoff that doubles from
  ``backoff[0]`` up to ``backoff[1]`` with each exit in a row, and starts from
  ``backoff[0]`` again once a child has stayed up ``reset_after`` seconds.

``stop_all`` (the agent stopping) is final: it stops every child the same way, and later
updates are ignored. Only the children the supervisor started are ever signalled, through the
handle ``Launcher.start`` returned for them (a pidfd, so a recycled PID is never hit).

Every child gets ``-parent-pid <this process>``: it asks Linux for SIGTERM when its parent
goes (PR_SET_PDEATHSIG) and checks getppid() besides, so no sidecar outlives an agent that
was SIGKILLed. Linux sends that signal when the *thread* that forked the child exits, so
``ProcessLauncher`` forks on the calling thread (the one running this supervisor, which lives
as long as it) and not, as ``trio.lowlevel.open_process`` does, on a worker thread, which
trio ends after ten idle seconds and which would take every sidecar with it.

Everything happens in the trio thread that runs ``run``; ``update``, ``status`` are
synchronous and must be called from it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from trellis.proxy.agent.ports import SidecarSpec

_log = logging.getLogger("trellis.agent.supervisor")

#: The environment variables that carry a token to a ``trellis`` command: a sidecar gets
#: only the one its spec gives, never the agent's own.
_TOKEN_ENV = ("TRELLIS_HTTP_TOKEN", "TRELLIS_HTTP_TOKEN_FILE")
RUNNING = "running"
STOPPING = "stopping"
WAITING = "waiting"  # exited; restarts when its backoff is over


class Child(Protocol):
    """A started process. ``wait`` may be awaited by several tasks at once, and again after
    the exit (it returns the same status); ``send_signal`` after the exit does nothing."""

    pid: int

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class Launcher(Protocol):
    def start(self, proxy_id: str, args: Sequence[str], env: Mapping[str, str]) -> Child:
        """Start ``trellis *args`` with ``env`` added to the environment; ``OSError`` if it
        cannot be started."""
        ...


@dataclass(frozen=True)
class ProcStatus:
    pid: int | None  # None between an exit and the restart
    restarts: int  # restarts after the child exited on its own
    last_exit: int | None  # its last exit status (negative: killed by that signal)
    state: str  # RUNNING | STOPPING | WAITING


class _Slot:
    def __init__(self, spec: SidecarSpec) -> None:
        self.spec = spec  # what its child runs (or will run next)
        self.child: Child | None = None
        self.stopping = False  # the supervisor asked the child to stop
        self.started_at = 0.0
        self.retry_at = -math.inf
        self.failures = 0  # exits in a row, each within reset_after of its start
        self.restarts = 0
        self.last_exit: int | None = None


class Supervisor:
    """Keeps one child per ``SidecarSpec`` running (see the module's theory of operation)."""

    def __init__(
        self,
        *,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = trio.current_time,
        backoff: tuple[float, float] = (1.0, 30.0),
        stop_grace: float = 5.0,
        reset_after: float = 10.0,
        log: logging.Logger = _log,
    ) -> None:
        self._log = log
        self._launcher = launcher if launcher is not None else ProcessLauncher(log=log)
        self._clock = clock
        self._backoff = backoff
        self._grace = stop_grace
        self._reset_after = reset_after
        self._desired: dict[str, SidecarSpec] = {}
        self._slots: dict[str, _Slot] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closed = False

    # -- the agent's side -----------------------------------------------------------------

    def update(self, sidecars: Mapping[str, SidecarSpec]) -> None:
        """The desired set, by proxy ID (the whole of it, every time)."""
        if self._closed:
            self._log.debug("sidecar update after stop_all: ignored")
            return
        self._desired = dict(sidecars)
        self._wake.set()

    def status(self) -> Mapping[str, ProcStatus]:
        return {
            pid: ProcStatus(
                pid=slot.child.pid if slot.child is not None else None,
                restarts=slot.restarts,
                last_exit=slot.last_exit,
                state=STOPPING if slot.stopping else RUNNING if slot.child else WAITING,
            )
            for pid, slot in self._slots.items()
        }

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    self._wake = trio.Event()
                    deadline = self._reconcile()
                    with trio.move_on_at(deadline):
                        await self._wake.wait()
            finally:
                self._nursery = None

    async def stop_all(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after ``stop_grace``) and wait for them;
        the supervisor starts nothing after this."""
        self._closed = True
        self._desired = {}
        children = [s for s in self._slots.values() if s.child is not None]
        async with trio.open_nursery() as nursery:
            for slot in children:
                assert slot.child is not None
                slot.stopping = True
                nursery.start_soon(self._terminate, slot, slot.child)
        self._slots.clear()
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------

    def _reconcile(self) -> float:
        """Start, stop and restart what differs from the desired set; the time of the next
        timer (inf for none)."""
        assert self._nursery is not None
        now = self._clock()
        deadline = math.inf
        for proxy_id, spec in self._desired.items():
            if proxy_id not in self._slots:
                self._slots[proxy_id] = _Slot(spec)
        for proxy_id, slot in list(self._slots.items()):
            want = self._desired.get(proxy_id)
            if slot.child is not None:
                if not slot.stopping and want != slot.spec:
                    slot.stopping = True  # now, so that the next pass does not stop it again
                    self._nursery.start_soon(self._terminate, slot, slot.child)
                continue
            if want is None:
                del self._slots[proxy_id]
                continue
            if want != slot.spec:
                # A new configuration is not a crash: no backoff for it.
                slot.spec, slot.failures, slot.retry_at = want, 0, -math.inf
            if slot.retry_at <= now:
                self._start(slot, now)
            if slot.child is None:
                deadline = min(deadline, slot.retry_at)
        return deadline

    def _start(self, slot: _Slot, now: float) -> None:
        assert self._nursery is not None
        spec = slot.spec
        slot.started_at = now  # a start that fails counts as a quick exit
        args = (*spec.args, "-parent-pid", str(os.getpid()))
        try:
            child = self._launcher.start(spec.proxy_id, args, spec.env)
        except OSError as e:
            self._log.error("[%s] cannot start: %s", spec.proxy_id, e)
            self._exited(slot, now, None)
            return
        slot.child = child
        self._log.info("[%s] started (pid %d)", spec.proxy_id, child.pid)
        self._nursery.start_soon(self._watch, slot, child)

    async def _watch(self, slot: _Slot, child: Child) -> None:
        status = await child.wait()
        if slot.child is not child:
            return  # already accounted for
        slot.child = None
        if slot.stopping:
            slot.stopping = False
            slot.last_exit, slot.failures, slot.retry_at = status, 0, -math.inf
            self._log.info("[%s] stopped (pid %d, %s)", slot.spec.proxy_id, child.pid, _how(status))
        else:
            self._exited(slot, self._clock(), status, child.pid)
        self._wake.set()

    def _exited(self, slot: _Slot, now: float, status: int | None, pid: int = 0) -> None:
        """The child exited on its own (or could not start): back off, then restart."""
        if status is not None:
            slot.last_exit = status
        if now - slot.started_at >= self._reset_after:
            slot.failures = 0  # it ran a good while: this is a fresh failure, not a loop
        slot.failures += 1
        slot.restarts += 1
        first, cap = self._backoff
        delay = min(cap, first * 2 ** (slot.failures - 1))
        slot.retry_at = now + delay
        what = _how(status) if status is not None else "did not start"
        self._log.warning(
            "[%s] %s%s; restarting in %gs",
            slot.spec.proxy_id,
            f"exited (pid {pid}, {what})" if status is not None else what,
            "" if slot.failures == 1 else f" ({slot.failures} times in a row)",
            delay,
        )

    async def _terminate(self, slot: _Slot, child: Child) -> None:
        slot.stopping = True
        child.send_signal(signal.SIGTERM)
        with trio.move_on_after(self._grace):
            await child.wait()
            return
        self._log.warning(
            "[%s] pid %d still running %gs after SIGTERM: SIGKILL",
            slot.spec.proxy_id,
            child.pid,
            self._grace,
        )
        child.send_signal(signal.SIGKILL)
        await child.wait()


def _how(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


# -- real processes ---------------------------------------------------------------------------


def trellis_argv() -> list[str]:
    """How to run ``trellis`` from this interpreter: ``python -m`` on the CLI's module works
    in an editable install and in a wheel alike, wherever the console script was put."""
    return [sys.executable, "-m", "trellis.api.cli.main"]


class ProcessLauncher:
    """Starts real processes, forking on the calling thread (see the module's docstring for
    why), each in its own process group (a terminal's Ctrl-C goes to the agent, which stops
    its sidecars in order), with its output forwarded line by line to ``log`` under a
    ``[proxy-id]`` prefix."""

    def __init__(
        self,
        argv: Sequence[str] | None = None,
        *,
        base_env: Mapping[str, str] | None = None,
        log: logging.Logger = _log,
    ) -> None:
        self._argv = list(argv) if argv is not None else trellis_argv()
        self._base_env = base_env  # None: this process's environment, when a child starts
        self._log = log

    def start(self, proxy_id: str, args: Sequence[str], env: Mapping[str, str]) -> Child:
        base = os.environ if self._base_env is None else self._base_env
        full_env = {k: v for k, v in base.items() if k not in _TOKEN_ENV}
        full_env.update(env)
        read_end, write_end = os.pipe()
        try:
            popen = subprocess.Popen(
                [*self._argv, *args],
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=subprocess.STDOUT,
                env=full_env,
                close_fds=True,
                process_group=0,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return _Process(popen, read_end, proxy_id, self._log)


class _Process:
    """A child started by ``ProcessLauncher``: exit through its pidfd (trio waits for it to
    become readable), output through a pipe."""

    def __init__(
        self, popen: subprocess.Popen[bytes], out_fd: int, label: str, log: logging.Logger
    ):
        self.pid = popen.pid
        self._popen = popen
        self._label = label
        self._log = log
        self._out = trio.lowlevel.FdStream(out_fd)
        self._partial = b""
        self._eof = trio.Event()
        self._lock = trio.Lock()
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            self._pidfd = None  # no pidfd (old kernel): wait() polls

    def send_signal(self, sig: int) -> None:
        if self._popen.returncode is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                self._popen.send_signal(sig)
        except ProcessLookupError:
            pass  # exited a moment ago, not reaped yet

    async def wait(self) -> int:
        async with self._lock:
            if self._popen.returncode is None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._forward)
                    await self._exit()
                    # What it wrote last is in the pipe: read it, but do not wait on a pipe
                    # that something it left behind may still hold open.
                    with trio.move_on_after(1.0):
                        await self._eof.wait()
                    nursery.cancel_scope.cancel()
                await self._close()
        assert self._popen.returncode is not None
        return self._popen.returncode

    async def _exit(self) -> None:
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
        while self._popen.poll() is None:
            await trio.sleep(0.1)

    async def _forward(self) -> None:
        while not self._eof.is_set():
            chunk = await self._out.receive_some(65536)
            if not chunk:
                self._eof.set()
                chunk = b"\n" if self._partial else b""
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    self._log.info("[%s] %s", self._label, text)

    async def _close(self) -> None:
        await self._out.aclose()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
