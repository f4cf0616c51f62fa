"""Joins of nodes, services and checks that both the HTTP health API and DNS answer from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trellis.api.store.base import CRITICAL, PASSING, WARNING, Check, Node, Service, Store

_RANK = {PASSING: 0, WARNING: 1, CRITICAL: 2}


def aggregate(checks: Sequence[Check]) -> str:
    """The worst status among ``checks`` (passing when there are none), as Consul does."""
    worst = PASSING
    for c in checks:
        if _RANK.get(c.status, 2) > _RANK[worst]:
            worst = c.status if c.status in _RANK else CRITICAL
    return worst


@dataclass(frozen=True)
class Instance:
    node: Node
    service: Service
    #: Node-level checks of the instance's node, then the service's own checks.
    checks: tuple[Check, ...]

    @property
    def status(self) -> str:
        return aggregate(self.checks)


def service_instances(
    store: Store,
    name: str,
    *,
    connect: bool = False,
    tags: Sequence[str] = (),
    passing_only: bool = False,
    include_critical: bool = True,
) -> list[Instance]:
    """The instances of service ``name`` with their checks.

    ``connect=True`` gives the instances that can take Connect traffic for ``name``: the
    connect-proxies whose destination is ``name``, and the instances of ``name`` that are
    Connect-native. ``tags`` must all be present. ``passing_only`` keeps instances whose every
    check passes (Consul's ``?passing``); ``include_critical=False`` drops instances with a
    critical check (what DNS serves).
    """
    if connect:
        services = store.services(destination=name) + [
            s for s in store.services(name=name) if (s.connect or {}).get("Native")
        ]
    else:
        services = store.services(name=name)
    if tags:
        want = set(tags)
        services = [s for s in services if want <= set(s.tags)]
    if not services:
        return []
    nodes: dict[str, Node | None] = {}
    by_node: dict[str, list[Check]] = {}
    for node_name in sorted({s.node for s in services}):
        nodes[node_name] = store.node(node_name)
        by_node[node_name] = store.checks(node=node_name)
    out: list[Instance] = []
    for s in services:
        node = nodes.get(s.node)
        if node is None:
            continue
        node_checks = by_node.get(s.node, [])
        checks = tuple(c for c in node_checks if not c.service_id) + tuple(
            c for c in node_checks if c.service_id == s.id
        )
        inst = Instance(node, s, checks)
        st = inst.status
        if passing_only and st != PASSING:
            continue
        if not include_critical and st == CRITICAL:
            continue
        out.append(inst)
    return out
