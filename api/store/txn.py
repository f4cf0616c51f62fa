"""Transactions (``PUT /v1/txn``) in the store: Consul's verbs run in ONE write transaction.

Theory of operation
-------------------
* ``txn`` opens one ``write()`` and runs every operation in it, in order, each seeing the
  writes of the ones before (as Consul's state store does). An operation that fails (a check
  that does not hold, a stale CAS, a lock held by another session, a write the caller's
  authorizer refuses) is recorded as an error with its position and the next one runs, so
  the client learns of every failure at once; at the end, if there was any error, the
  transaction raises to roll back ALL of it (``_RolledBack``, caught here), so nothing is
  written, no index is taken and nothing is published.
* The catalog verbs reuse the store's own catalog writes (``register``,
  ``deregister_service``, ...): while a transaction runs, ``write()`` called from the same
  thread (greenlet under gevent) joins it instead of opening another (``SQLStore._joined``),
  so every change lands in the one ``Tx``: one index, one commit, and one publication to the
  feed, so each blocking reader of a touched key or service wakes once, with that index.
* Reads inside the transaction go through the open ``Tx`` (never ``read()``, another
  connection that would not see the transaction's own writes).
* What the caller may do is decided outside the store (``trellis.api.views.txn``); only the
  catalog writes whose permission depends on what is stored (the name of the service a
  delete removes, the service a check belongs to) ask the caller's ``may_write`` from inside,
  with the write lock held, so nothing can change between the question and the write.

Mixed into ``SQLStore``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trellis.api.store.base import Check, KVEntry, Node, Registration, Service
from trellis.api.store.errors import InvalidSession

if TYPE_CHECKING:
    from trellis.api.store.sql import Tx

KV, NODE, SERVICE, CHECK = "KV", "Node", "Service", "Check"

#: Verbs that only read; a transaction of only these is a read (Consul answers it with
#: X-Consul-Index and the other query headers).
READ_VERBS = {
    KV: {"get", "get-or-empty", "get-tree", "check-index", "check-session", "check-not-exists"},
    NODE: {"get"},
    SERVICE: {"get"},
    CHECK: {"get"},
}
VERBS = {
    KV: READ_VERBS[KV] | {"set", "cas", "lock", "unlock", "delete", "delete-tree", "delete-cas"},
    NODE: {"get", "set", "cas", "delete", "delete-cas"},
    SERVICE: {"get", "set", "cas", "delete", "delete-cas"},
    CHECK: {"get", "set", "cas", "delete", "delete-cas"},
}


@dataclass(frozen=True)
class TxnOp:
    """One operation, already validated by the caller. ``kind`` is one of KV, NODE,
    SERVICE, CHECK; ``index`` is the CAS/check index."""

    kind: str
    verb: str
    key: str = ""
    value: bytes = b""
    flags: int = 0
    index: int = 0
    session: str = ""
    node: Node | None = None
    #: For SERVICE: the service (``get``/``delete``: only ``node`` and ``id`` matter).
    service: Service | None = None
    #: For CHECK: the check (``get``/``delete``: only ``node`` and ``check_id`` matter).
    check: Check | None = None

    @property
    def read_only(self) -> bool:
        return self.verb in READ_VERBS[self.kind]


@dataclass(frozen=True)
class TxnOutcome:
    """``results`` (``(kind, value)`` with a KVEntry, Node, Service or Check) when it
    committed; else ``errors`` (``(op index, what)``) and nothing was written. ``index``:
    the transaction's index, or the current one for a read-only or empty transaction."""

    results: list[tuple[str, Any]]
    errors: list[tuple[int, str]]
    index: int


def _q(s: str) -> str:
    """Quoted as Consul's messages quote (Go's %q)."""
    return json.dumps(s)


class _RolledBack(Exception):
    def __init__(self, errors: list[tuple[int, str]]) -> None:
        super().__init__("transaction rolled back")
        self.errors = errors


class _OpFailed(Exception):
    """One operation failed; its message is Consul's ``What``."""


#: ``may_write(resource, name)``: resource ``"node"`` or ``"service"``.
MayWrite = Callable[[str, str], bool]

DENIED = "Permission denied"


class TxnStoreMixin:
    """``txn``; see the module's theory of operation."""

    # Provided by SQLStore.
    write: Any
    _joined: Any

    def txn(
        self, ops: Sequence[TxnOp], *, now: float, may_write: MayWrite | None = None
    ) -> TxnOutcome:
        """Run ``ops`` all-or-nothing in one write transaction (see the module)."""
        allowed: MayWrite = may_write or (lambda _r, _n: True)
        try:
            with self.write() as tx, self._joined(tx):
                results: list[tuple[str, Any]] = []
                errors: list[tuple[int, str]] = []
                for i, op in enumerate(ops):
                    try:
                        results.extend(self._txn_op(tx, op, now, allowed))
                    except _OpFailed as e:
                        errors.append((i, str(e)))
                    except InvalidSession as e:
                        errors.append((i, e.message))
                if errors:
                    raise _RolledBack(errors)
                if tx.changes:
                    index = tx.index
                else:
                    index = int(tx.one("SELECT idx FROM indexes WHERE name = 'global'")[0])
        except _RolledBack as e:
            return TxnOutcome([], e.errors, 0)
        return TxnOutcome(results, [], index)

    # -- one operation ---------------------------------------------------------------------

    def _txn_op(self, tx: Tx, op: TxnOp, now: float, may: MayWrite) -> list[tuple[str, Any]]:
        if op.kind == KV:
            return [(KV, e) for e in self._txn_kv(tx, op, now)]
        if op.kind == NODE:
            n = self._txn_node(tx, op, may)
            return [(NODE, n)] if n is not None else []
        if op.kind == SERVICE:
            s = self._txn_service(tx, op, may)
            return [(SERVICE, s)] if s is not None else []
        c = self._txn_check(tx, op, may, now)
        return [(CHECK, c)] if c is not None else []

    def _txn_kv(self, tx: Tx, op: TxnOp, now: float) -> list[KVEntry]:
        from trellis.api.store.sql import KV_COLS, _kv

        key, verb = op.key, op.verb

        def entry() -> KVEntry | None:
            row = tx.one(f"SELECT {KV_COLS} FROM kv WHERE key = ?", (key,))  # noqa: S608
            return _kv(row) if row is not None else None

        def blanked() -> list[KVEntry]:
            # Consul returns the entry of every verb but get without its value.
            e = entry()
            return [dataclasses.replace(e, value=None)] if e is not None else []

        if verb == "get":
            e = entry()
            if e is None:
                raise _OpFailed(f"key {_q(key)} doesn't exist")
            return [e]
        if verb == "get-or-empty":
            # As Consul: the entry, or one with only the key when there is none.
            return [
                entry() or KVEntry(key=key, value=None, flags=0, create_index=0, modify_index=0)
            ]
        if verb == "get-tree":
            where, params = self._prefix_where(key)  # type: ignore[attr-defined]
            rows = tx.execute(
                f"SELECT {KV_COLS} FROM kv WHERE {where} ORDER BY key",  # noqa: S608
                params,
            ).fetchall()
            return [_kv(r) for r in rows]
        if verb == "check-index":
            e = entry()
            if e is None:
                raise _OpFailed(f"failed to check index, key {_q(key)} doesn't exist")
            if e.modify_index != op.index:
                raise _OpFailed(
                    f"failed index check for key {_q(key)}, current modify index"
                    f" {e.modify_index} != {op.index}"
                )
            return blanked()
        if verb == "check-session":
            e = entry()
            if e is None:
                raise _OpFailed(f"failed to check session, key {_q(key)} doesn't exist")
            if (e.session or "") != op.session:
                raise _OpFailed(
                    f"failed session check for key {_q(key)}, current session"
                    f" {_q(e.session or '')} != {_q(op.session)}"
                )
            return blanked()
        if verb == "check-not-exists":
            if entry() is not None:
                raise _OpFailed(f"key {_q(key)} exists")
            return []
        if verb in ("set", "cas"):
            e = entry()
            if verb == "cas" and (e.modify_index if e else 0) != op.index:
                raise _OpFailed(f"failed to set key {_q(key)}, index is stale")
            self.kv_put(key, op.value, flags=op.flags)  # type: ignore[attr-defined]
            return blanked()
        if verb == "lock":
            if not self._kv_lock(  # type: ignore[attr-defined]
                tx, key, op.value, session=op.session, flags=op.flags, now=now
            ):
                e = entry()
                if e is not None and e.session and e.session != op.session:
                    raise _OpFailed(f"failed to lock key {_q(key)}, lock is already held")
                raise _OpFailed(f"failed to lock key {_q(key)} due to lock delay")
            return blanked()
        if verb == "unlock":
            if not self._kv_unlock(  # type: ignore[attr-defined]
                tx, key, op.value, session=op.session, flags=op.flags
            ):
                raise _OpFailed(
                    f"failed to unlock key {_q(key)}, lock isn't held, or is held by"
                    " another session"
                )
            return blanked()
        if verb == "delete-cas":
            e = entry()
            # As Consul: a key that is gone already is no failure.
            if e is not None and e.modify_index != op.index:
                raise _OpFailed(f"failed to delete key {_q(key)}, index is stale")
            self.kv_delete(key)  # type: ignore[attr-defined]
            return []
        if verb == "delete":
            self.kv_delete(key)  # type: ignore[attr-defined]
            return []
        if verb == "delete-tree":
            self.kv_delete(key, recurse=True)  # type: ignore[attr-defined]
            return []
        raise _OpFailed(f"unknown KV verb {_q(verb)}")  # the caller validated: not reached

    # -- the catalog -----------------------------------------------------------------------

    @staticmethod
    def _stored_node(tx: Tx, name: str) -> Node | None:
        from trellis.api.store.sql import NODE_COLS, _node

        row = tx.one(f"SELECT {NODE_COLS} FROM nodes WHERE name = ?", (name,))  # noqa: S608
        return _node(row) if row is not None else None

    @staticmethod
    def _stored_service(tx: Tx, node: str, service_id: str) -> Service | None:
        from trellis.api.store.sql import SVC_COLS, _svc

        row = tx.one(
            f"SELECT {SVC_COLS} FROM services WHERE node = ? AND id = ?",  # noqa: S608
            (node, service_id),
        )
        return _svc(row) if row is not None else None

    @staticmethod
    def _stored_check(tx: Tx, node: str, check_id: str) -> Check | None:
        from trellis.api.store.sql import CHECK_COLS, _check

        row = tx.one(
            f"SELECT {CHECK_COLS} FROM checks WHERE node = ? AND check_id = ?",  # noqa: S608
            (node, check_id),
        )
        return _check(row) if row is not None else None

    def _txn_node(self, tx: Tx, op: TxnOp, may: MayWrite) -> Node | None:
        assert op.node is not None
        name = op.node.name
        if op.node.id and op.verb in ("get", "delete", "delete-cas"):
            # Consul: a node's ID takes precedence over its name when both are given.
            row = tx.one("SELECT name FROM nodes WHERE id = ?", (op.node.id,))
            if row is not None:
                name = row[0]
            elif not name:
                raise _OpFailed(f"node {_q(op.node.id)} doesn't exist")
        old = self._stored_node(tx, name)
        if op.verb == "get":
            if old is None:
                raise _OpFailed(f"node {_q(name)} doesn't exist")
            return old
        if not may("node", name):
            raise _OpFailed(DENIED)
        current = old.modify_index if old else 0
        if op.verb in ("set", "cas"):
            if op.verb == "cas" and current != op.index:
                raise _OpFailed(f"failed to set node {_q(name)}, index is stale")
            self.register(Registration(node=op.node))  # type: ignore[attr-defined]
            return self._stored_node(tx, name)
        if op.verb == "delete-cas" and (old is None or current != op.index):
            raise _OpFailed(f"failed to delete node {_q(name)}, index is stale")
        self.deregister_node(name)  # type: ignore[attr-defined]
        return None

    def _txn_service(self, tx: Tx, op: TxnOp, may: MayWrite) -> Service | None:
        assert op.service is not None
        node, sid = op.service.node, op.service.id
        old = self._stored_service(tx, node, sid)
        if op.verb == "get":
            if old is None:
                raise _OpFailed(f"service {_q(sid)} on node {_q(node)} doesn't exist")
            return old
        # The stored service's name too: a write may not rename (or delete) a service the
        # token may not write, whatever name the body gives.
        names = {old.name} if old else set()
        if op.verb in ("set", "cas"):
            names.add(op.service.name)
            # A proxy needs write on the service it proxies for too, or a token could
            # intercept that service's traffic (CVE-2021-38698; require_registration).
            if op.service.destination:
                names.add(op.service.destination)
        if not all(may("service", n) for n in names):
            raise _OpFailed(DENIED)
        current = old.modify_index if old else 0
        if op.verb in ("set", "cas"):
            if op.verb == "cas" and current != op.index:
                raise _OpFailed(
                    f"failed to set service {_q(sid)} on node {_q(node)}, index is stale"
                )
            n = self._stored_node(tx, node)
            if n is None:
                raise _OpFailed(f"Missing node registration: {_q(node)}")
            self.register(  # type: ignore[attr-defined]
                Registration(node=n, services=(op.service,), keep_existing_node=True)
            )
            return self._stored_service(tx, node, sid)
        if op.verb == "delete-cas" and (old is None or current != op.index):
            raise _OpFailed(
                f"failed to delete service {_q(sid)} on node {_q(node)}, index is stale"
            )
        self.deregister_service(node, sid)  # type: ignore[attr-defined]
        return None

    def _txn_check(self, tx: Tx, op: TxnOp, may: MayWrite, now: float) -> Check | None:
        assert op.check is not None
        node, cid = op.check.node, op.check.check_id
        old = self._stored_check(tx, node, cid)
        if op.verb == "get":
            if old is None:
                raise _OpFailed(f"check {_q(cid)} on node {_q(node)} doesn't exist")
            return old
        # A service's check is the service's to write; a node's check, the node's.
        wanted = [old] if old else []
        new = op.check
        svc: Service | None = None
        if op.verb in ("set", "cas"):
            if new.service_id:
                svc = self._stored_service(tx, node, new.service_id)
                if svc is None:
                    raise _OpFailed(f"Missing service registration: {_q(new.service_id)}")
                new = dataclasses.replace(new, service_name=svc.name)
            wanted.append(new)
        for c in wanted:
            ok = may("service", c.service_name) if c.service_id else may("node", c.node)
            if not ok:
                raise _OpFailed(DENIED)
        current = old.modify_index if old else 0
        if op.verb in ("set", "cas"):
            if op.verb == "cas" and current != op.index:
                raise _OpFailed(f"failed to set check {_q(cid)} on node {_q(node)}, index is stale")
            n = self._stored_node(tx, node)
            if n is None:
                raise _OpFailed(f"Missing node registration: {_q(node)}")
            self.register(  # type: ignore[attr-defined]
                Registration(node=n, checks=(new,), keep_existing_node=True)
            )
            return self._stored_check(tx, node, cid)
        if op.verb == "delete-cas" and (old is None or current != op.index):
            raise _OpFailed(f"failed to delete check {_q(cid)} on node {_q(node)}, index is stale")
        self.deregister_check(node, cid)  # type: ignore[attr-defined]
        return None
