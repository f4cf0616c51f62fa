"""Which check runner and sidecar supervisor the agent uses: the one place to switch them.

The real ones are ``trellis.proxy.agent.checks.Runner`` and
``trellis.proxy.agent.supervisor.Supervisor``, built in parallel with the spine. Until they are
merged, ``make_runner`` and ``make_supervisor`` fall back to the small stand-ins below, which
run nothing: TTL checks still work (their results come through the local API), every other
check keeps its initial status, and no sidecar is started.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from trellis.proxy.agent.ports import (
    CheckDef,
    CheckResult,
    CheckRunner,
    SidecarSpec,
    SidecarSupervisor,
)

OnChange = Callable[[str, CheckResult], None]
OnDeregister = Callable[[str], None]


class TTLOnlyRunner:
    """A ``CheckRunner`` that runs nothing but keeps TTL results (see the module docstring)."""

    def __init__(self, on_change: OnChange, on_deregister: OnDeregister) -> None:
        self.on_change = on_change
        self.on_deregister = on_deregister
        self.checks: dict[str, CheckDef] = {}
        self._results: dict[str, CheckResult] = {}

    def update(self, checks: Mapping[str, CheckDef]) -> None:
        self.checks = dict(checks)
        for cid in list(self._results):
            if cid not in self.checks:
                del self._results[cid]
        for cid, d in self.checks.items():
            self._results.setdefault(cid, CheckResult(d.status))

    def ttl_update(self, check_id: str, status: str, output: str) -> bool:
        d = self.checks.get(check_id)
        if d is None or d.kind != "ttl":
            return False
        r = CheckResult(status, output)
        if self._results.get(check_id) != r:
            self._results[check_id] = r
            self.on_change(check_id, r)
        return True

    def results(self) -> Mapping[str, CheckResult]:
        return dict(self._results)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


class NoSidecars:
    """A ``SidecarSupervisor`` that starts nothing and remembers what it was asked for."""

    def __init__(self) -> None:
        self.wanted: dict[str, SidecarSpec] = {}

    def update(self, sidecars: Mapping[str, SidecarSpec]) -> None:
        self.wanted = dict(sidecars)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def stop_all(self) -> None:
        self.wanted = {}


def make_runner(
    on_change: OnChange, on_deregister: OnDeregister, *, enable_script_checks: bool
) -> CheckRunner:
    try:
        from trellis.proxy.agent.checks import Runner  # type: ignore[import-not-found]
    except ImportError:
        return TTLOnlyRunner(on_change, on_deregister)
    runner: CheckRunner = Runner(
        on_change=on_change,
        on_deregister=on_deregister,
        enable_script_checks=enable_script_checks,
    )
    return runner


def make_supervisor() -> SidecarSupervisor:
    try:
        from trellis.proxy.agent.supervisor import Supervisor  # type: ignore[import-not-found]
    except ImportError:
        return NoSidecars()
    supervisor: SidecarSupervisor = Supervisor()
    return supervisor
