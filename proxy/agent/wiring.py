"""Which check runner and sidecar supervisor the agent uses: the one place to switch them.

``trellis.proxy.agent.checks.Runner`` runs the checks (alias checks read the servers' health
through the agent's own API: ``LocalAlias``); ``trellis.proxy.agent.supervisor.Supervisor``
runs the managed sidecars. Tests build an ``Agent`` with their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trellis.proxy import client as api
from trellis.proxy.agent.checkrules import AliasCheck
from trellis.proxy.agent.checks import AliasSource, CatalogAliasSource, Runner
from trellis.proxy.agent.ports import (
    CheckResult,
    CheckRunner,
    SidecarSupervisor,
)
from trellis.proxy.agent.supervisor import Supervisor

OnChange = Callable[[str, CheckResult], None]
OnDeregister = Callable[[str], None]


class LocalAlias:
    """Alias checks for the agent: the servers' health of the aliased service, read through
    the agent's own local API (which forwards health reads) with the agent's token. Built
    before the API listens, so the client is made on the first watch."""

    def __init__(self, url: Callable[[], str], *, token: str, node: str) -> None:
        self._url = url
        self._token = token
        self._node = node
        self._source: CatalogAliasSource | None = None

    async def watch(
        self, node: str, service_id: str, index: int | None
    ) -> tuple[Sequence[AliasCheck] | None, int | None]:
        if self._source is None:
            client = api.Client(self._url(), token=self._token or None)
            self._source = CatalogAliasSource(client, node=self._node)
        return await self._source.watch(node, service_id, index)


def make_runner(
    on_change: OnChange,
    on_deregister: OnDeregister,
    *,
    enable_script_checks: bool,
    alias: AliasSource | None = None,
) -> CheckRunner:
    runner: CheckRunner = Runner(
        on_change=on_change,
        on_deregister=on_deregister,
        enable_script_checks=enable_script_checks,
        alias=alias,
    )
    return runner


def make_supervisor() -> SidecarSupervisor:
    supervisor: SidecarSupervisor = Supervisor()
    return supervisor
