"""The values the node agent's parts hand each other. Pure.

The agent's spine (local state, anti-entropy, the local HTTP API) drives two parts through
small protocols: the check runner (``trellis.proxy.agent.checks``) and the managed-sidecar
supervisor (``trellis.proxy.agent.supervisor``). Each receives the whole desired set whenever
it changes and works out the difference itself, so the spine never tracks what they run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"


@dataclass(frozen=True)
class CheckDef:
    """One health check the agent runs, from a service definition or the local API."""

    check_id: str
    name: str
    service_id: str = ""  # "" = a node-level check
    kind: str = "ttl"  # "http" | "tcp" | "ttl" | "alias" | "script"
    interval: float = 10.0
    timeout: float = 10.0
    http: str = ""
    method: str = "GET"
    header: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tls_skip_verify: bool = False
    tcp: str = ""
    ttl: float = 0.0
    alias_service: str = ""
    alias_node: str = ""
    args: tuple[str, ...] = ()
    deregister_critical_after: float = 0.0  # 0 = never
    status: str = CRITICAL  # the initial status
    notes: str = ""


@dataclass(frozen=True)
class CheckResult:
    status: str  # PASSING | WARNING | CRITICAL
    output: str = ""


@dataclass(frozen=True)
class SidecarSpec:
    """A managed sidecar the agent keeps running: ``trellis`` with ``args``."""

    proxy_id: str  # the connect-proxy service's ID ("web-sidecar-proxy")
    service_id: str  # the app's service ID
    args: tuple[str, ...]  # argv after ``trellis``: ("connect", "proxy", "-proxy-id", ...)
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. TRELLIS_HTTP_TOKEN


class CheckRunner(Protocol):
    """Runs checks; reports a changed result through the ``on_change`` callback it was built
    with, and a service critical for longer than its ``deregister_critical_after`` through
    ``on_deregister``."""

    def update(self, checks: Mapping[str, CheckDef]) -> None: ...

    def ttl_update(self, check_id: str, status: str, output: str) -> bool: ...

    def results(self) -> Mapping[str, CheckResult]: ...

    async def run(self, task_status: Any = ...) -> None: ...


class SidecarSupervisor(Protocol):
    """Keeps one child process per ``SidecarSpec`` running, by proxy ID."""

    def update(self, sidecars: Mapping[str, SidecarSpec]) -> None: ...

    async def run(self, task_status: Any = ...) -> None: ...

    async def stop_all(self) -> None: ...
