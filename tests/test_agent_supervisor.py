"""The sidecar supervisor's logic with a fake launcher (small process objects the test makes
exit) and trio's MockClock: crash loops, backoff growth and reset, spec changes, removal,
stop_all's escalation to SIGKILL."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Mapping, Sequence

import trio
import trio.testing

from trellis.proxy.agent.ports import SidecarSpec
from trellis.proxy.agent.supervisor import RUNNING, WAITING, Supervisor


class FakeChild:
    """A process that exits when the test says, or on a signal it does not ignore."""

    def __init__(self, pid: int, args: Sequence[str], env: Mapping[str, str], *, stubborn: bool):
        self.pid = pid
        self.args = tuple(args)
        self.env = dict(env)
        self.stubborn = stubborn  # ignores SIGTERM
        self.signals: list[int] = []
        self.status: int | None = None
        self._done = trio.Event()

    def exit(self, status: int) -> None:
        if self.status is None:
            self.status = status
            self._done.set()

    def send_signal(self, sig: int) -> None:
        if self.status is not None:
            return
        self.signals.append(sig)
        if sig == signal.SIGKILL or not self.stubborn:
            self.exit(-sig)

    async def wait(self) -> int:
        await self._done.wait()
        assert self.status is not None
        return self.status


class FakeLauncher:
    def __init__(self) -> None:
        self.started: list[tuple[str, FakeChild]] = []
        self.stubborn = False
        self.fail = False
        self._next_pid = 1000
        self.attempts: list[float] = []
        self._started = trio.Event()

    async def starts(self, n: int) -> None:
        """Wait until ``n`` children have been started in all."""
        while len(self.started) < n:
            await self._started.wait()

    async def attempted(self, n: int) -> None:
        """Wait until ``start`` has been called ``n`` times in all (failed calls too)."""
        while len(self.attempts) < n:
            await self._started.wait()

    def start(self, proxy_id: str, args: Sequence[str], env: Mapping[str, str]) -> FakeChild:
        self.attempts.append(trio.current_time())
        if self.fail:
            self._started.set()
            self._started = trio.Event()
            raise OSError("no such file")
        self._next_pid += 1
        child = FakeChild(self._next_pid, args, env, stubborn=self.stubborn)
        self.started.append((proxy_id, child))
        self._started.set()
        self._started = trio.Event()
        return child

    def of(self, proxy_id: str) -> list[FakeChild]:
        return [c for p, c in self.started if p == proxy_id]

    def live(self) -> list[FakeChild]:
        return [c for _, c in self.started if c.status is None]


def spec(proxy_id: str = "web-sidecar-proxy", token: str = "t1") -> SidecarSpec:  # noqa: S107
    return SidecarSpec(
        proxy_id=proxy_id,
        service_id=proxy_id.removesuffix("-sidecar-proxy"),
        args=("connect", "proxy", "-proxy-id", proxy_id),
        env={"TRELLIS_HTTP_TOKEN": token},
    )


def run(test) -> None:
    """Run ``test(supervisor, launcher)`` against a running supervisor under a MockClock
    that jumps ahead whenever every task is waiting."""
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        launcher = FakeLauncher()
        sup = Supervisor(launcher=launcher, backoff=(1.0, 30.0), stop_grace=5.0, reset_after=10.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await test(sup, launcher)
            await sup.stop_all()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


async def settle() -> None:
    """Let every task run until all wait (no time passes)."""
    await trio.testing.wait_all_tasks_blocked()


def test_starts_one_child_per_spec_with_its_argv_env_and_parent_pid():
    import os

    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        sup.update({"web-sidecar-proxy": spec(), "db-sidecar-proxy": spec("db-sidecar-proxy")})
        await settle()
        (web,) = launcher.of("web-sidecar-proxy")
        assert web.args == (
            "connect",
            "proxy",
            "-proxy-id",
            "web-sidecar-proxy",
            "-parent-pid",
            str(os.getpid()),
        )
        assert web.env == {"TRELLIS_HTTP_TOKEN": "t1"}
        assert len(launcher.of("db-sidecar-proxy")) == 1
        st = sup.status()["web-sidecar-proxy"]
        assert (st.pid, st.state, st.restarts, st.last_exit) == (web.pid, RUNNING, 0, None)
        # The same set again changes nothing.
        sup.update({"web-sidecar-proxy": spec(), "db-sidecar-proxy": spec("db-sidecar-proxy")})
        await settle()
        assert len(launcher.started) == 2

    run(test)


def test_a_crash_loop_backs_off_doubling_up_to_the_cap():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        sup.update({"web-sidecar-proxy": spec()})
        await settle()
        delays = []
        for _ in range(8):
            child = launcher.of("web-sidecar-proxy")[-1]
            child.exit(1)
            t0 = trio.current_time()
            await settle()
            st = sup.status()["web-sidecar-proxy"]
            assert (st.pid, st.state, st.last_exit) == (None, WAITING, 1)
            await launcher.starts(len(delays) + 2)
            delays.append(round(trio.current_time() - t0, 2))
        assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
        assert sup.status()["web-sidecar-proxy"].restarts == 8

    run(test)


def test_the_backoff_starts_over_after_the_child_stayed_up_a_while():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        sup.update({"web-sidecar-proxy": spec()})
        await settle()
        for _ in range(3):  # three quick exits: the next delay would be 8 s
            launcher.of("web-sidecar-proxy")[-1].exit(1)
            await launcher.starts(len(launcher.started) + 1)
        await trio.sleep(10.0)  # mock time: it stays up reset_after
        launcher.of("web-sidecar-proxy")[-1].exit(-9)
        t0 = trio.current_time()
        await launcher.starts(5)
        assert round(trio.current_time() - t0, 2) == 1.0
        assert sup.status()["web-sidecar-proxy"].last_exit == -9

    run(test)


def test_a_changed_spec_restarts_the_child_at_once_without_backoff():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        sup.update({"web-sidecar-proxy": spec(token="t1")})
        await settle()
        (old,) = launcher.of("web-sidecar-proxy")
        t0 = trio.current_time()
        sup.update({"web-sidecar-proxy": spec(token="t2")})
        await settle()
        assert old.signals == [signal.SIGTERM]
        assert old.status == -signal.SIGTERM
        _, new = launcher.of("web-sidecar-proxy")
        assert new.env == {"TRELLIS_HTTP_TOKEN": "t2"}
        assert trio.current_time() == t0
        st = sup.status()["web-sidecar-proxy"]
        assert (st.pid, st.restarts, st.last_exit) == (new.pid, 0, -signal.SIGTERM)

    run(test)


def test_a_changed_spec_replaces_a_child_that_is_waiting_to_restart():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        sup.update({"web-sidecar-proxy": spec(token="t1")})
        await settle()
        launcher.of("web-sidecar-proxy")[0].exit(1)
        await settle()
        assert sup.status()["web-sidecar-proxy"].state == WAITING
        t0 = trio.current_time()
        sup.update({"web-sidecar-proxy": spec(token="t2")})
        await settle()
        assert trio.current_time() == t0  # not after the 1 s backoff
        assert launcher.of("web-sidecar-proxy")[-1].env == {"TRELLIS_HTTP_TOKEN": "t2"}

    run(test)


def test_a_removed_spec_stops_its_child_and_only_that_one():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        sup.update({"web-sidecar-proxy": spec(), "db-sidecar-proxy": spec("db-sidecar-proxy")})
        await settle()
        sup.update({"db-sidecar-proxy": spec("db-sidecar-proxy")})
        await settle()
        (web,) = launcher.of("web-sidecar-proxy")
        (db,) = launcher.of("db-sidecar-proxy")
        assert web.signals == [signal.SIGTERM] and web.status is not None
        assert db.signals == [] and db.status is None
        assert set(sup.status()) == {"db-sidecar-proxy"}
        await trio.sleep(60)  # and it is not started again
        assert len(launcher.of("web-sidecar-proxy")) == 1

    run(test)


def test_a_removed_spec_waiting_to_restart_is_not_restarted():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        sup.update({"web-sidecar-proxy": spec()})
        await settle()
        launcher.of("web-sidecar-proxy")[0].exit(1)
        await settle()
        sup.update({})
        await trio.sleep(60)
        assert len(launcher.started) == 1
        assert sup.status() == {}

    run(test)


def test_stop_all_escalates_to_sigkill_after_the_grace_and_is_final():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        launcher.stubborn = True
        sup.update({"web-sidecar-proxy": spec(), "db-sidecar-proxy": spec("db-sidecar-proxy")})
        await settle()
        launcher.of("db-sidecar-proxy")[0].stubborn = False
        t0 = trio.current_time()
        await sup.stop_all()
        (web,) = launcher.of("web-sidecar-proxy")
        (db,) = launcher.of("db-sidecar-proxy")
        assert web.signals == [signal.SIGTERM, signal.SIGKILL]
        assert web.status == -signal.SIGKILL
        assert db.signals == [signal.SIGTERM]
        assert trio.current_time() - t0 == 5.0
        sup.update({"web-sidecar-proxy": spec()})
        await trio.sleep(60)
        assert launcher.live() == [] and len(launcher.started) == 2

    run(test)


def test_removal_escalates_to_sigkill_too():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        launcher.stubborn = True
        sup.update({"web-sidecar-proxy": spec()})
        await settle()
        t0 = trio.current_time()
        sup.update({})
        (web,) = launcher.of("web-sidecar-proxy")
        await web.wait()
        assert web.signals == [signal.SIGTERM, signal.SIGKILL]
        assert round(trio.current_time() - t0, 2) == 5.0

    run(test)


def test_a_child_that_cannot_start_is_retried_with_backoff():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        launcher.fail = True
        sup.update({"web-sidecar-proxy": spec()})
        await settle()
        assert sup.status()["web-sidecar-proxy"].state == WAITING
        launcher.fail = False
        t0 = trio.current_time()
        await launcher.starts(1)
        assert round(trio.current_time() - t0, 2) == 1.0

    run(test)


def test_a_child_that_keeps_failing_to_start_backs_off_like_a_crash_loop():
    async def test(sup: Supervisor, launcher: FakeLauncher) -> None:
        launcher.fail = True
        sup.update({"web-sidecar-proxy": spec()})
        await launcher.attempted(7)
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(launcher.attempts)]
        assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
        assert sup.status()["web-sidecar-proxy"].restarts == 7

    run(test)
