"""The store's value objects and its interface.

Views and domain code see only these frozen values, never driver rows. Two implementations
(``trellis.api.store.sqlite`` and ``trellis.api.store.postgres``) share one SQL body
(``trellis.api.store.sql``) and pass the same contract tests (``tests/test_store_contract.py``) on
real databases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from trellis.api.feed import ChangeFeed

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
CHECK_STATES = (PASSING, WARNING, CRITICAL)


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None


@dataclass(frozen=True)
class Node:
    name: str
    id: str
    address: str
    datacenter: str
    tagged_addresses: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class Service:
    node: str
    id: str
    name: str
    tags: tuple[str, ...] = ()
    address: str = ""
    port: int = 0
    meta: Mapping[str, str] = field(default_factory=dict)
    tagged_addresses: Mapping[str, Any] = field(default_factory=dict)
    weights: Mapping[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    kind: str = ""
    proxy: Mapping[str, Any] | None = None
    connect: Mapping[str, Any] | None = None
    enable_tag_override: bool = False
    create_index: int = 0
    modify_index: int = 0

    @property
    def destination(self) -> str | None:
        """For a connect-proxy, the name of the service it proxies for."""
        if self.kind == "connect-proxy" and self.proxy:
            return self.proxy.get("DestinationServiceName") or None
        return None


@dataclass(frozen=True)
class Check:
    node: str
    check_id: str
    name: str
    status: str = CRITICAL
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    type: str = ""
    #: The check's definition as registered (HTTP, TCP, Interval, TTL, ...), PascalCase.
    definition: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds; for TTL checks only.
    ttl: float | None = None
    #: Wall-clock time (epoch seconds) at which a TTL check turns critical.
    expires_at: float | None = None
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class Registration:
    """One catalog write: a node, optionally services and checks on it."""

    node: Node
    services: tuple[Service, ...] = ()
    checks: tuple[Check, ...] = ()
    #: Drop this node's checks for these service IDs that are not in ``checks``.
    replace_checks_for: tuple[str, ...] = ()
    #: Leave the node row alone if it exists (agent registrations that only add a service).
    keep_existing_node: bool = False


class Store(Protocol):
    """What the control plane needs from its database. Every write bumps the global index."""

    feed: ChangeFeed

    def close(self) -> None: ...
    def start_follower(self) -> None: ...
    def ping(self) -> None: ...

    # the index
    def current_index(self) -> int: ...
    def topic_index(self, *topics: str) -> int: ...
    def cluster_id(self) -> str: ...

    # K/V
    def kv_get(self, key: str) -> KVEntry | None: ...
    def kv_list(self, prefix: str) -> list[KVEntry]: ...
    def kv_index(self, prefix: str, *, exact: bool) -> int: ...
    def kv_put(self, key: str, value: bytes, *, flags: int = 0, cas: int | None = None) -> bool: ...
    def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool: ...

    # catalog
    def register(self, reg: Registration) -> int: ...
    def deregister_service(self, node: str, service_id: str) -> bool: ...
    def deregister_check(self, node: str, check_id: str) -> bool: ...
    def deregister_node(self, node: str) -> bool: ...
    def nodes(self) -> list[Node]: ...
    def node(self, name: str) -> Node | None: ...
    def services(
        self, *, node: str | None = None, name: str | None = None, destination: str | None = None
    ) -> list[Service]: ...
    def checks(
        self,
        *,
        node: str | None = None,
        service_name: str | None = None,
        service_id: str | None = None,
        state: str | None = None,
        check_id: str | None = None,
    ) -> list[Check]: ...
    def update_check(
        self, node: str, check_id: str, status: str, output: str | None, *, now: float
    ) -> Check | None: ...
    def expire_ttl_checks(self, now: float) -> int: ...

    # members: the server processes sharing the store (trellis.api.members)
    def member_beat(self, member_id: str, now: float, dead_before: float) -> list[str]: ...
    def member_leave(self, member_id: str) -> None: ...

    # system documents (the CA's state)
    def system_get(self, key: str) -> tuple[Any, int] | None: ...
    def system_write(
        self, puts: dict[str, Any], expect: dict[str, int] | None = None
    ) -> int | None: ...


def changed_catalog_keys(services: Iterable[Service], node: str | None = None) -> set[str]:
    """The catalog change keys a write to these services (and node) touches.

    A proxy's write also touches the service it proxies for, so that ``/health/connect/<dest>``
    and ``<dest>.connect`` DNS watchers wake.
    """
    keys: set[str] = set()
    if node is not None:
        keys.add(f"node/{node}")
    for s in services:
        keys.add(f"svc/{s.name}")
        keys.add(f"node/{s.node}")
        if s.destination:
            keys.add(f"svc/{s.destination}")
    return keys
