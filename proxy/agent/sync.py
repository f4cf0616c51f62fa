"""Anti-entropy: the writes that make the catalog's view of this node match the agent. Pure.

``plan`` compares what the agent has (its services with their checks, its node-level checks,
each with its current result and token) with what the catalog holds for the node, and lists
the writes: a service that is missing or differs is registered again with all its checks; a
check whose status, output or definition differs is registered again on its own; what the
agent registered before (``synced``) and no longer has is deregistered. What the agent never
registered is never touched, whoever put it there; nor are maintenance mode's checks, which
live in the catalog only (``trellis.api.maintenance``). The catalog is made to match the agent,
never the reverse.

Comparison is by the fields the agent sets, normalised as the catalog answers them (it fills
in defaults: Weights, TaggedAddresses), so a steady node plans nothing and costs the servers
no writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

from trellis.api.maintenance import is_maintenance_check
from trellis.proxy.agent.definitions import catalog_check
from trellis.proxy.agent.ports import CheckResult

SERF_CHECK = "serfHealth"


@dataclass(frozen=True)
class Desired:
    """One service as the agent wants it in the catalog."""

    body: Mapping[str, Any]  # PascalCase, as registered
    token: str


@dataclass(frozen=True)
class DesiredCheck:
    body: Mapping[str, Any]  # PascalCase check definition, CheckID set
    result: CheckResult
    token: str

    def catalog(self) -> dict[str, Any]:
        return catalog_check(self.body, self.result.status, self.result.output)


@dataclass(frozen=True)
class RegisterService:
    service_id: str
    body: Mapping[str, Any]
    checks: tuple[Mapping[str, Any], ...]
    token: str


@dataclass(frozen=True)
class RegisterCheck:
    check_id: str
    check: Mapping[str, Any]
    token: str


@dataclass(frozen=True)
class DeregisterService:
    service_id: str
    token: str


@dataclass(frozen=True)
class DeregisterCheck:
    check_id: str
    token: str


Op = RegisterService | RegisterCheck | DeregisterService | DeregisterCheck


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def service_view(body: Mapping[str, Any], *, catalog: bool) -> str:
    """The fields of a service the agent sets, from its own body (``catalog=False``) or from
    a ``/v1/catalog/node`` entry (``catalog=True``), in one comparable form."""
    connect = body.get("Connect") or None
    if isinstance(connect, Mapping):
        connect = {k: v for k, v in connect.items() if k != "SidecarService"} or None
    weights = body.get("Weights") or {"Passing": 1, "Warning": 1}
    return _canon(
        {
            "ID": body.get("ID") or (body.get("Service") if catalog else body.get("Name")),
            "Name": body.get("Service") if catalog else body.get("Name"),
            "Tags": list(body.get("Tags") or []),
            "Address": body.get("Address") or "",
            "Port": body.get("Port") or 0,
            "Meta": dict(body.get("Meta") or {}),
            "Kind": body.get("Kind") or "",
            "Proxy": body.get("Proxy") or None,
            "Connect": connect,
            "Weights": {"Passing": weights.get("Passing", 1), "Warning": weights.get("Warning", 1)},
            "EnableTagOverride": bool(body.get("EnableTagOverride", False)),
        }
    )


def check_view(c: Mapping[str, Any]) -> str:
    """A check's comparable fields, from ``catalog_check`` or a ``/v1/health/node`` entry."""
    return _canon(
        {
            "Name": c.get("Name") or "",
            "Status": c.get("Status") or "",
            "Output": c.get("Output") or "",
            "Notes": c.get("Notes") or "",
            "ServiceID": c.get("ServiceID") or "",
        }
    )


def plan(
    services: Mapping[str, Desired],
    checks: Mapping[str, DesiredCheck],
    catalog_services: Mapping[str, Mapping[str, Any]],
    catalog_checks: Mapping[str, Mapping[str, Any]],
    synced_services: Set[str],
    synced_checks: Set[str],
) -> list[Op]:
    """The writes, in a safe order: registrations, then check removals, then service
    removals (which take their checks with them)."""
    ops: list[Op] = []
    by_service: dict[str, list[str]] = {}
    for cid, dc in checks.items():
        sid = str(dc.body.get("ServiceID") or "")
        if sid:
            by_service.setdefault(sid, []).append(cid)
    covered: set[str] = set()
    for sid, want in sorted(services.items()):
        have = catalog_services.get(sid)
        if have is None or service_view(want.body, catalog=False) != service_view(
            have, catalog=True
        ):
            own = sorted(by_service.get(sid, []))
            ops.append(
                RegisterService(sid, want.body, tuple(checks[c].catalog() for c in own), want.token)
            )
            covered.update(own)
    for cid, dc in sorted(checks.items()):
        if cid in covered:
            continue
        sid = str(dc.body.get("ServiceID") or "")
        if sid and sid not in services:
            continue  # a check for a service the agent does not have: nothing to hang it on
        have_check = catalog_checks.get(cid)
        want_check = dc.catalog()
        if have_check is None or check_view(want_check) != check_view(have_check):
            ops.append(RegisterCheck(cid, want_check, dc.token))
    for cid, stale in sorted(catalog_checks.items()):
        if cid in checks or cid == SERF_CHECK:
            continue
        if is_maintenance_check(cid):
            # Maintenance mode's checks live in the catalog only (Agent.maintenance): never
            # the agent's own definitions, and not stale for missing from them.
            continue
        sid = str(stale.get("ServiceID") or "")
        if sid in services:
            # A check of a service the agent has, that its definition no longer holds.
            ops.append(DeregisterCheck(cid, services[sid].token))
        elif cid in synced_checks and not sid:
            # A node-level check the agent registered and no longer has.
            ops.append(DeregisterCheck(cid, ""))
    for sid in sorted(synced_services):
        if sid in catalog_services and sid not in services:
            ops.append(DeregisterService(sid, ""))
    return ops


def check_changed(
    check_id: str,
    dc: DesiredCheck,
) -> RegisterCheck:
    """The write for one check whose result changed (the runner's ``on_change``)."""
    return RegisterCheck(check_id, dc.catalog(), dc.token)
