"""Which check runner and sidecar supervisor the agent uses: the one place to switch them.

The real ones are ``trellis.proxy.agent.checks.Runner`` and
``trellis.proxy.agent.supervisor.Supervisor``. Until the check runner is merged,
``make_runner`` falls back to the stand-in below, which runs nothing: TTL checks still work
(their results come through the local API), every other check keeps its initial status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from trellis.proxy.agent.ports import (
    CheckDef,
    CheckResult,
    CheckRunner,
    SidecarSupervisor,
)
from trellis.proxy.agent.supervisor import Supervisor

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
    supervisor: SidecarSupervisor = Supervisor()
    return supervisor
