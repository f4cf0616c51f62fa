"""The store's value objects and its interface.

Views and domain code see only these frozen values, never driver rows. Two implementations
(``trellis.api.store.sqlite`` and ``trellis.api.store.postgres``) share one SQL body
(``trellis.api.store.sql``) and pass the same contract tests (``tests/test_store_contract.py``) on
real databases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from trellis.api.feed import ChangeFeed
from trellis.api.store.events import UserEvent
from trellis.api.store.logins import AuthMethod, BindingRule
from trellis.api.store.security import (
    ACLPolicy,
    ACLRole,
    ACLToken,
    IntentionRecord,
    TokenLogin,
)
from trellis.api.store.sessions import Session

if TYPE_CHECKING:
    from trellis.api.store.snapshot import StoreDump
    from trellis.api.store.txn import MayWrite, TxnOp, TxnOutcome

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


class NodeView(Protocol):
    """One node's catalog as a registration's own write transaction reads it (see
    ``Store.register``'s ``prepare``): nothing another writer commits can come in between
    these reads and the write."""

    def node(self) -> Node | None: ...
    def service(self, service_id: str) -> Service | None: ...
    def check(self, check_id: str) -> Check | None: ...
    def ports_in_use(self, low: int, high: int, *, except_ids: Iterable[str] = ()) -> set[int]:
        """The ports in ``low..high`` of the node's services, but those with these IDs."""
        ...


#: ``prepare(view, registration)`` of ``Store.register``: the registration to write.
Prepare = Callable[[NodeView, Registration], Registration]


class Store(Protocol):
    """What the control plane needs from its database. Every write bumps the global index.

    Reads return value objects (never driver rows), and ``None`` (or an empty list) for what
    does not exist. Errors, all from ``trellis.api.store.errors``: ``StoreUnavailable`` from
    any method when the database cannot be reached or refuses the work; ``UnstorableValue``
    for text holding NUL; ``StoreConflict`` and ``NotFoundInStore`` only from the writes whose
    docstrings say so. Both implementations satisfy this Protocol (tests/test_store_contract.py
    checks their signatures against it).
    """

    feed: ChangeFeed

    def close(self) -> None: ...
    def start_follower(self) -> None: ...
    def ping(self) -> None: ...

    # the index
    def current_index(self) -> int: ...
    def topic_index(self, *topics: str) -> int: ...
    def topic_indexes(self, *topics: str) -> dict[str, int]: ...
    def cluster_id(self) -> str: ...

    # K/V
    def kv_get(self, key: str) -> KVEntry | None: ...
    def kv_list(self, prefix: str) -> list[KVEntry]: ...
    def kv_index(self, prefix: str, *, exact: bool) -> int: ...
    def kv_put(self, key: str, value: bytes, *, flags: int = 0, cas: int | None = None) -> bool: ...
    def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool: ...

    # sessions and locks (trellis.api.store.sessions)
    def session_create(self, s: Session, *, now: float) -> Session:
        """InvalidSession: the node or a check is not registered, or a check is critical."""
        ...

    def session_get(self, session_id: str) -> Session | None: ...
    def sessions(self, *, node: str | None = None) -> list[Session]: ...
    def session_destroy(self, session_id: str, *, now: float) -> bool: ...
    def session_renew(self, session_id: str, *, now: float) -> Session | None: ...
    def expire_sessions(self, now: float) -> int: ...
    def kv_acquire(
        self, key: str, value: bytes, *, session: str, flags: int = 0, now: float
    ) -> bool:
        """InvalidSession: no such session."""
        ...

    def kv_release(self, key: str, value: bytes, *, session: str, flags: int = 0) -> bool: ...
    def txn(
        self, ops: Sequence[TxnOp], *, now: float, may_write: MayWrite | None = None
    ) -> TxnOutcome:
        """Run a transaction's operations all-or-nothing in one write transaction
        (``trellis.api.store.txn``); a failed operation is an error of the outcome, not an
        exception."""
        ...

    def hold_reaper_role(self) -> bool:
        """Whether this process is (now) the one that expires sessions: takes the role if no
        live process holds it. The role ends with the process (or its store connection)."""
        ...

    # user events (trellis.api.store.events)
    def event_fire(self, ev: UserEvent, *, keep: int) -> UserEvent:
        """Store an event and keep only the newest ``keep``; the event with its ``ltime``."""
        ...

    def events(self) -> list[UserEvent]: ...

    # catalog
    def register(self, reg: Registration, *, prepare: Prepare | None = None) -> int:
        """Write a registration; the index of the write (or the current one if it changed
        nothing).

        ``prepare``, if given, runs inside the write's transaction, with the write lock held,
        before anything is written: it reads the node through the ``NodeView`` and returns
        the registration to write (the same node), filling in what depends on the stored
        state (a free sidecar port), or raises to write nothing (an ACL refusal of what the
        registration would overwrite). So no other write can land between what it read and
        the write. It must be quick and must not use the store otherwise.
        """
        ...

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
    def system_list(self, prefix: str) -> list[tuple[str, Any, int, int]]:
        """Every system document whose key starts with ``prefix``, by key, read in one
        snapshot: ``(key, value, create_index, modify_index)``."""
        ...

    # intentions
    def intentions(self) -> list[IntentionRecord]: ...
    def intentions_at(self) -> tuple[list[IntentionRecord], int]: ...
    def intention(self, intention_id: str) -> IntentionRecord | None: ...
    def intention_exact(self, source: str, destination: str) -> IntentionRecord | None: ...
    def intention_put(
        self, rec: IntentionRecord, *, create_only: bool = False, expect_id: str | None = None
    ) -> IntentionRecord:
        """Create or replace the intention of ``(rec.source, rec.destination)``.

        StoreConflict: ``create_only`` and the pair exists, or (with ``expect_id``) the pair
        belongs to another intention. NotFoundInStore: no intention ``expect_id``.
        """
        ...

    def intention_delete(self, intention_id: str) -> bool: ...

    # ACL tokens and policies
    def acl_tokens(self) -> list[ACLToken]: ...
    def acl_resolve(self, secret_hash: str) -> tuple[ACLToken | None, list[ACLPolicy], int]: ...
    def acl_token(
        self, *, accessor_id: str | None = None, secret_hash: str | None = None
    ) -> ACLToken | None: ...
    def acl_token_put(self, t: ACLToken, *, create: bool) -> ACLToken | None:
        """Create (StoreConflict if the accessor ID or the secret exists) or update (None if
        there is no such token)."""
        ...

    def acl_token_delete(self, accessor_id: str) -> bool: ...
    def acl_policies(self) -> list[ACLPolicy]: ...
    def acl_policy(
        self, *, policy_id: str | None = None, name: str | None = None
    ) -> ACLPolicy | None: ...
    def acl_policy_put(self, p: ACLPolicy, *, create: bool) -> ACLPolicy | None:
        """Create (StoreConflict if the ID exists) or update (None if there is no such
        policy); StoreConflict if another policy has the name."""
        ...

    def acl_policy_delete(self, policy_id: str) -> bool: ...

    # ACL roles and token expiry
    def acl_roles(self) -> list[ACLRole]: ...
    def acl_role(
        self, *, role_id: str | None = None, name: str | None = None
    ) -> ACLRole | None: ...
    def acl_role_put(self, r: ACLRole, *, create: bool) -> ACLRole | None:
        """Create (StoreConflict if the ID exists) or update (None if there is no such role);
        StoreConflict if another role has the name."""
        ...

    def acl_role_delete(self, role_id: str) -> bool: ...
    def acl_expire_tokens(self, now: float) -> int:
        """Delete the tokens expired at ``now`` (epoch seconds); how many."""
        ...

    # ACL auth methods, binding rules, login tokens (trellis.api.store.logins)
    def acl_auth_methods(self) -> list[AuthMethod]: ...
    def acl_auth_method(self, name: str) -> AuthMethod | None: ...
    def acl_auth_method_put(self, m: AuthMethod, *, create: bool) -> AuthMethod | None: ...
    def acl_auth_method_delete(self, name: str) -> bool: ...
    def acl_binding_rules(self, auth_method: str | None = None) -> list[BindingRule]: ...
    def acl_binding_rule(self, rule_id: str) -> BindingRule | None: ...
    def acl_binding_rule_put(self, b: BindingRule, *, create: bool) -> BindingRule | None: ...
    def acl_binding_rule_delete(self, rule_id: str) -> bool: ...
    def acl_login_token_put(self, t: ACLToken, login: TokenLogin) -> ACLToken: ...
    def acl_login_tokens_reap(self, now: float) -> int: ...

    # snapshots: the whole state (trellis.api.store.snapshot)
    def snapshot_tables(self) -> dict[str, tuple[str, ...]]: ...
    def snapshot_dump(self) -> StoreDump:
        """Every table of state, read in one snapshot, with the index it is the state of."""
        ...

    def snapshot_restore(self, dump: StoreDump, *, now: float) -> int:
        """Replace the whole state in one transaction; the restore's index, above every index
        given before. SnapshotRefused: the dump does not fit this store (nothing changed)."""
        ...


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
