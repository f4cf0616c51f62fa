"""The store, written once in SQL that both SQLite and PostgreSQL run.

Theory of operation
-------------------
* Every write is one transaction that first bumps the single row ``indexes.global`` (``UPDATE ...
  RETURNING``). On PostgreSQL that row lock serializes writers, so indexes commit in order; on
  SQLite ``BEGIN IMMEDIATE`` does the same. The write then records its changes in ``changes``
  (read by other processes' followers) and raises the ``indexes`` row of every topic it touched
  (what ``X-Consul-Index`` of a watched read reports).
* A write is acknowledged only after COMMIT returns; with SQLite in WAL mode and
  ``synchronous=FULL`` that commit is on disk, so SIGKILL (or power loss) loses nothing
  that was acknowledged.
* After the commit the writer publishes its changes to this process's feed. The dialect's
  follower publishes the changes other processes made (see ``trellis.api.feed``).
* Deleted K/V keys leave a tombstone holding the index of the delete, so that the index of a
  key or prefix never goes backwards when something under it disappears.

Dialects differ only in connecting, beginning a write, placeholders, the blob type and the
follower; see ``sqlite.py`` and ``postgres.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from greenlet import getcurrent  # type: ignore[import-untyped]  # no stubs shipped

from trellis.api.errors import StoreUnavailable
from trellis.api.feed import ANY, Change, ChangeFeed
from trellis.api.store.base import (
    CRITICAL,
    Check,
    KVEntry,
    Node,
    Prepare,
    Registration,
    Service,
    changed_catalog_keys,
)
from trellis.api.store.errors import UnstorableValue
from trellis.api.store.events import EventStoreMixin
from trellis.api.store.events import migration as events_migration
from trellis.api.store.logins import MIGRATION as LOGINS_MIGRATION
from trellis.api.store.logins import LoginStoreMixin
from trellis.api.store.security import MIGRATION as SECURITY_MIGRATION
from trellis.api.store.security import ROLES_MIGRATION, SecurityStoreMixin
from trellis.api.store.sessions import MIGRATION as SESSIONS_MIGRATION
from trellis.api.store.sessions import SessionStoreMixin
from trellis.api.store.snapshot import SnapshotStoreMixin
from trellis.api.store.txn import TxnStoreMixin

log = logging.getLogger("trellis.store")

U64 = 1 << 64
I64 = 1 << 63


def _to_i64(v: int) -> int:
    """K/V flags are uint64 (Consul); both databases hold signed 64-bit integers."""
    return v - U64 if v >= I64 else v


def _from_i64(v: int) -> int:
    return v + U64 if v < 0 else v


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def _loads(v: str | None, default: Any = None) -> Any:
    if v is None or v == "":
        return default
    return json.loads(v)


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix``."""
    for i in range(len(prefix) - 1, -1, -1):
        c = ord(prefix[i])
        if c == 0xD7FF:
            # The next storable code point after U+D7FF is U+E000 (surrogates cannot be encoded).
            # Skipping to the previous character instead would make the range over-reach:
            # "z\ud7ff" would list "z\ue000".
            return prefix[:i] + "\ue000"
        if c < 0x10FFFF and not (0xD800 <= c < 0xE000):
            return prefix[:i] + chr(c + 1)
    return None


def migrations(blob: str) -> list[tuple[int, list[str]]]:
    """Versioned schema changes; append, never edit an applied one."""
    return [
        (
            1,
            [
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                "CREATE TABLE indexes (name TEXT PRIMARY KEY, idx BIGINT NOT NULL)",
                "INSERT INTO indexes (name, idx) VALUES ('global', 0)",
                "CREATE TABLE changes (idx BIGINT NOT NULL, topic TEXT NOT NULL,"
                " key TEXT NOT NULL, PRIMARY KEY (idx, topic, key))",
                f"CREATE TABLE kv (key TEXT {{collate}} PRIMARY KEY, value {blob},"
                " flags BIGINT NOT NULL DEFAULT 0, create_index BIGINT NOT NULL,"
                " modify_index BIGINT NOT NULL, lock_index BIGINT NOT NULL DEFAULT 0,"
                " session TEXT)",
                "CREATE TABLE kv_tombstones (key TEXT {collate} PRIMARY KEY, idx BIGINT NOT NULL)",
                "CREATE TABLE nodes (name TEXT PRIMARY KEY, id TEXT NOT NULL,"
                " address TEXT NOT NULL, datacenter TEXT NOT NULL,"
                " tagged_addresses TEXT NOT NULL, meta TEXT NOT NULL,"
                " create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL)",
                "CREATE TABLE services (node TEXT NOT NULL REFERENCES nodes(name)"
                " ON DELETE CASCADE, id TEXT NOT NULL, name TEXT NOT NULL, tags TEXT NOT NULL,"
                " address TEXT NOT NULL, port INTEGER NOT NULL, meta TEXT NOT NULL,"
                " tagged_addresses TEXT NOT NULL, weights TEXT NOT NULL, kind TEXT NOT NULL,"
                " proxy TEXT, connect TEXT, enable_tag_override INTEGER NOT NULL,"
                " destination TEXT, create_index BIGINT NOT NULL,"
                " modify_index BIGINT NOT NULL, PRIMARY KEY (node, id))",
                "CREATE INDEX services_by_name ON services (name)",
                "CREATE INDEX services_by_destination ON services (destination)",
                "CREATE TABLE checks (node TEXT NOT NULL REFERENCES nodes(name)"
                " ON DELETE CASCADE, check_id TEXT NOT NULL, name TEXT NOT NULL,"
                " status TEXT NOT NULL, notes TEXT NOT NULL, output TEXT NOT NULL,"
                " service_id TEXT NOT NULL, service_name TEXT NOT NULL, type TEXT NOT NULL,"
                " definition TEXT NOT NULL, ttl DOUBLE PRECISION, expires_at DOUBLE PRECISION,"
                " create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL,"
                " PRIMARY KEY (node, check_id))",
                "CREATE INDEX checks_by_service ON checks (service_name)",
            ],
        ),
        (
            2,
            [
                # Documents of the control plane's own subsystems (the CA's configuration,
                # roots and sealed keys), written with compare-and-set on modify_index.
                "CREATE TABLE system (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
                " create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL)",
            ],
        ),
        # Intentions and ACL tokens and policies (api/store/security.py).
        (3, list(SECURITY_MIGRATION)),
        (
            4,
            [
                # The server processes sharing this store and when each was last seen
                # (epoch seconds), so that cluster-wide limits can be split among them
                # (api/members.py). Written without an index: nothing watches it.
                "CREATE TABLE members (id TEXT PRIMARY KEY, seen DOUBLE PRECISION NOT NULL)",
            ],
        ),
        # Sessions and K/V lock delays (api/store/sessions.py).
        (5, list(SESSIONS_MIGRATION)),
        # User events, a bounded history (api/store/events.py).
        (6, events_migration(blob)),
        # ACL roles; tokens' roles, identities and expiry (api/store/security.py).
        (7, list(ROLES_MIGRATION)),
        # ACL auth methods, binding rules and login tokens (api/store/logins.py).
        (8, list(LOGINS_MIGRATION)),
    ]


class Pool:
    """A small blocking connection pool, cooperative under gevent like everything here.

    Built from a plain lock and one event per waiter, not from ``queue.Queue`` or
    ``threading.Semaphore``: under gevent those yield to the hub on every call, even when a
    connection is free (``Condition.notify`` probes its lock with a non-blocking acquire, and
    gevent's lock answers a failed probe with a sleep). A yield in the middle of a read let a
    thousand woken blocking queries each start the same read before the first one finished,
    so none of them could share its result.
    """

    def __init__(self, connect: Callable[[], Any], size: int, timeout: float = 10.0) -> None:
        self._connect = connect
        self._free: list[Any] = []  # LIFO: the most recently used connection is warmest
        self._slots = size
        self._waiters: deque[threading.Event] = deque()
        self._timeout = timeout
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> Any:
        # After close() nothing may open a connection (the follower thread may still be
        # finishing a poll): it would never be closed, and would leak past the store's life.
        if self._closed:
            raise StoreUnavailable("the store is closed")
        with self._lock:
            if self._slots > 0:
                self._slots -= 1
                waiter = None
            else:
                waiter = threading.Event()
                self._waiters.append(waiter)
        if waiter is not None:
            try:
                got = waiter.wait(self._timeout)
            except BaseException:
                # Interrupted (a greenlet killed at the end of a graceful stop): give back a
                # slot handed over meanwhile, or it would be lost to every later caller.
                if not self._forget(waiter):
                    self._release_slot()
                raise
            if not got and self._forget(waiter):
                raise StoreUnavailable("no store connection became free in time")
        # This caller now holds a slot.
        with self._lock:
            if self._free:
                return self._free.pop()
        try:
            conn = self._connect()
        except BaseException:
            self._release_slot()
            raise
        with self._lock:
            self._all.append(conn)
        return conn

    def _forget(self, waiter: threading.Event) -> bool:
        """Take ``waiter`` off the queue; False if a slot was handed to it already."""
        with self._lock:
            try:
                self._waiters.remove(waiter)
                return True
            except ValueError:
                return False

    def _release_slot(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the slot passes straight to the first waiter
            else:
                self._slots += 1

    def put(self, conn: Any, *, broken: bool = False) -> None:
        close = broken
        with self._lock:
            if broken or self._closed:
                # A broken connection, or one handed back after close() (which could not see
                # it in the free list), is closed here, by the thread that held it.
                close = True
                if conn in self._all:
                    self._all.remove(conn)
            else:
                self._free.append(conn)
        if close:
            try:
                conn.close()
            except Exception:  # noqa: S110 - a broken connection may fail to close; it is gone
                pass
        self._release_slot()

    def close(self) -> None:
        """Close the free connections now, and each checked-out one when it is handed back.

        Closing a SQLite connection that another thread is using crashes the process, so a
        connection is only ever closed by the thread that holds it (or from the free list).
        """
        with self._lock:
            self._closed = True
            conns, self._free = self._free, []
            for c in conns:
                if c in self._all:
                    self._all.remove(c)
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: S110 - closing on shutdown; nothing left to do
                pass


class _Batch:
    """Writes that share one transaction and one COMMIT (``SQLStore._group_write``)."""

    __slots__ = ("bodies", "closed", "conn", "done", "error", "lock", "ready", "rolled_back")

    def __init__(self) -> None:
        self.conn: Any = None
        self.bodies = 0  # bodies run (or running) in this batch
        self.rolled_back = False  # its first body failed: the transaction was rolled back
        self.lock = threading.Lock()  # one body at a time on the shared connection
        self.ready = threading.Event()  # the leader holds the write lock (or failed to)
        self.done = threading.Event()  # committed (or failed: ``error``)
        self.closed = False
        self.error: BaseException | None = None


class Tx:
    """An open write transaction: takes the next index once, records changes."""

    def __init__(self, store: SQLStore, conn: Any) -> None:
        self.store = store
        self.conn = conn
        self._index: int | None = None
        self.changes: list[Change] = []
        self._topics: set[str] = set()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.store._exec(self.conn, sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.execute(sql, params).fetchone()

    @property
    def index(self) -> int:
        if self._index is None:
            row = self.one("UPDATE indexes SET idx = idx + 1 WHERE name = 'global' RETURNING idx")
            self._index = int(row[0])
        return self._index

    def jump_index(self, index: int) -> None:
        """Make ``index`` this transaction's index, for a write that sets the global index
        itself (a snapshot restore: trellis.api.store.snapshot) instead of taking the next."""
        self._index = index

    def touch(self, topic: str, key: str, *, topic_index_key: bool = True) -> None:
        idx = self.index
        c = Change(idx, topic, key)
        if c in self.changes:
            return
        self.changes.append(c)
        self.execute("INSERT INTO changes (idx, topic, key) VALUES (?, ?, ?)", (idx, topic, key))
        names = [topic] + ([f"{topic}/{key}"] if topic_index_key else [])
        for name in names:
            if name in self._topics:
                continue
            self._topics.add(name)
            self.execute(
                "INSERT INTO indexes (name, idx) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET idx = excluded.idx",
                (name, idx),
            )


KV_COLS = "key, value, flags, create_index, modify_index, lock_index, session"
NODE_COLS = "name, id, address, datacenter, tagged_addresses, meta, create_index, modify_index"
SVC_COLS = (
    "node, id, name, tags, address, port, meta, tagged_addresses, weights, kind, proxy,"
    " connect, enable_tag_override, create_index, modify_index"
)
CHECK_COLS = (
    "node, check_id, name, status, notes, output, service_id, service_name, type, definition,"
    " ttl, expires_at, create_index, modify_index"
)


def _kv(row: Sequence[Any]) -> KVEntry:
    value = row[1]
    return KVEntry(
        key=row[0],
        value=bytes(value) if value is not None else None,
        flags=_from_i64(int(row[2])),
        create_index=int(row[3]),
        modify_index=int(row[4]),
        lock_index=int(row[5]),
        session=row[6],
    )


def _node(row: Sequence[Any]) -> Node:
    return Node(
        name=row[0],
        id=row[1],
        address=row[2],
        datacenter=row[3],
        tagged_addresses=_loads(row[4], {}),
        meta=_loads(row[5], {}),
        create_index=int(row[6]),
        modify_index=int(row[7]),
    )


def _svc(row: Sequence[Any]) -> Service:
    return Service(
        node=row[0],
        id=row[1],
        name=row[2],
        tags=tuple(_loads(row[3], [])),
        address=row[4],
        port=int(row[5]),
        meta=_loads(row[6], {}),
        tagged_addresses=_loads(row[7], {}),
        weights=_loads(row[8], {"Passing": 1, "Warning": 1}),
        kind=row[9],
        proxy=_loads(row[10]),
        connect=_loads(row[11]),
        enable_tag_override=bool(row[12]),
        create_index=int(row[13]),
        modify_index=int(row[14]),
    )


def _svc_content(s: Service) -> tuple[Any, ...]:
    """A service's stored columns from ``name`` to ``enable_tag_override``, as written."""
    return (
        s.name,
        _dumps(list(s.tags)),
        s.address,
        s.port,
        _dumps(dict(s.meta)),
        _dumps(dict(s.tagged_addresses)),
        _dumps(dict(s.weights)),
        s.kind,
        _dumps(s.proxy) if s.proxy is not None else None,
        _dumps(s.connect) if s.connect is not None else None,
        int(s.enable_tag_override),
    )


def _svc_row_content(row: Sequence[Any]) -> tuple[Any, ...]:
    """The same columns of a stored row (``SVC_COLS``), comparable with ``_svc_content``."""
    return (*row[2:5], int(row[5]), *row[6:12], int(row[12]))


def _check_content(c: Check) -> tuple[Any, ...]:
    """A check's stored columns from ``name`` to ``expires_at``, as written."""
    return (
        c.name,
        c.status,
        c.notes,
        c.output,
        c.service_id,
        c.service_name,
        c.type,
        _dumps(dict(c.definition)),
        c.ttl,
        c.expires_at,
    )


def _check_row_content(row: Sequence[Any]) -> tuple[Any, ...]:
    """Columns ``name`` to ``expires_at`` of a stored check row (``CHECK_COLS``)."""
    return tuple(row[2:12])


def _check(row: Sequence[Any]) -> Check:
    return Check(
        node=row[0],
        check_id=row[1],
        name=row[2],
        status=row[3],
        notes=row[4],
        output=row[5],
        service_id=row[6],
        service_name=row[7],
        type=row[8],
        definition=_loads(row[9], {}),
        ttl=row[10],
        expires_at=row[11],
        create_index=int(row[12]),
        modify_index=int(row[13]),
    )


class _NodeRows:
    """One node's rows as a registration's write transaction reads them, each read once: what
    ``prepare`` sees through the ``NodeView`` methods is what the write then compares against
    (no second query for the same row). The write forgets a row it has just written."""

    _MISSING = object()

    def __init__(self, tx: Tx, node: str) -> None:
        self._tx = tx
        self._node = node
        self._node_row: Any = self._MISSING
        self._services: dict[str, Any] = {}
        self._checks: dict[str, Any] = {}

    # -- rows, for the write

    def node_row(self) -> Any:
        if self._node_row is self._MISSING:
            self._node_row = self._tx.one(
                f"SELECT {NODE_COLS} FROM nodes WHERE name = ?",  # noqa: S608
                (self._node,),
            )
        return self._node_row

    def service_row(self, service_id: str) -> Any:
        if service_id not in self._services:
            self._services[service_id] = self._tx.one(
                f"SELECT {SVC_COLS} FROM services WHERE node = ? AND id = ?",  # noqa: S608
                (self._node, service_id),
            )
        return self._services[service_id]

    def check_row(self, check_id: str) -> Any:
        if check_id not in self._checks:
            self._checks[check_id] = self._tx.one(
                f"SELECT {CHECK_COLS} FROM checks WHERE node = ? AND check_id = ?",  # noqa: S608
                (self._node, check_id),
            )
        return self._checks[check_id]

    def forget_service(self, service_id: str) -> None:
        """The write is about to change this row: a later read must see the change."""
        self._services.pop(service_id, None)

    def forget_check(self, check_id: str) -> None:
        self._checks.pop(check_id, None)

    # -- NodeView, for ``prepare``

    def node(self) -> Node | None:
        row = self.node_row()
        return _node(row) if row is not None else None

    def service(self, service_id: str) -> Service | None:
        row = self.service_row(service_id)
        return _svc(row) if row is not None else None

    def check(self, check_id: str) -> Check | None:
        row = self.check_row(check_id)
        return _check(row) if row is not None else None

    def ports_in_use(self, low: int, high: int, *, except_ids: Iterable[str] = ()) -> set[int]:
        skip = set(except_ids)
        rows = self._tx.execute(
            "SELECT id, port FROM services WHERE node = ? AND port >= ? AND port <= ?",
            (self._node, low, high),
        ).fetchall()
        return {int(r[1]) for r in rows if r[0] not in skip}


def _running() -> Any:
    """The greenlet running now (under gevent, one per request; in a plain thread, that
    thread's main greenlet)."""
    return getcurrent()


class SQLStore(
    SecurityStoreMixin,
    LoginStoreMixin,
    SessionStoreMixin,
    TxnStoreMixin,
    SnapshotStoreMixin,
    EventStoreMixin,
):
    """The shared body of both stores. Subclasses provide the dialect hooks below."""

    blob_type = "BLOB"
    key_collation = ""
    #: Driver exceptions that mean "the database is unavailable or refused": StoreUnavailable.
    unavailable_errors: tuple[type[BaseException], ...] = ()
    #: How many old change rows to keep for followers in other processes.
    change_history = 20_000
    #: Writes that arrive together share one transaction and one COMMIT (see _group_write).
    group_commit = False

    def __init__(self, pool_size: int = 8) -> None:
        self.feed = ChangeFeed()
        self._pool = Pool(self._connect, pool_size)
        self._writes = 0
        self._batch: _Batch | None = None
        self._batch_guard = threading.Lock()
        self._trimming = False
        self._closed = threading.Event()
        # The transactions ``txn`` runs, by the greenlet (or thread) running each: see write().
        self._joined_txs: dict[Any, Tx] = {}
        self._migrate()

    # -- dialect hooks -------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _begin_write(self, conn: Any) -> None:
        raise NotImplementedError

    def _begin_read(self, conn: Any) -> None:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def _lock_migrations(self, tx: Tx) -> None:
        """Serialize migrations between processes (the write transaction does on SQLite)."""

    def _wake_follower(self) -> None:
        """Make a follower that is waiting for news look at its stop flag now."""

    def _before_commit(self, tx: Tx) -> None:
        """Last words of a write transaction that changed something (PostgreSQL: NOTIFY)."""

    def start_follower(self) -> None:
        """Start publishing the changes that other processes commit (see ``trellis.api.feed``)."""
        raise NotImplementedError

    def catch_up(self, last: int) -> int:
        """Publish the changes committed after index ``last``; return the new ``last``."""
        changes = self.read_changes_after(last)
        if changes and last and changes[0].index > last + 1:
            # Rows we never saw were trimmed: wake everyone to re-read.
            self.feed.publish([Change(changes[0].index, ANY, ANY)])
        if changes:
            self.feed.publish(changes)
            last = changes[-1].index
        return last

    # -- plumbing --------------------------------------------------------------------------

    def _exec(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        # PostgreSQL text cannot hold NUL (psycopg raises DataError) while SQLite stores it:
        # refuse it on both, as the client's fault, so the two stores keep one contract.
        for p in params:
            if isinstance(p, str) and "\x00" in p:
                raise UnstorableValue("names and keys cannot contain the NUL character")
        return conn.execute(self._sql(sql), tuple(params))

    def _exec_many(self, conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many rows (a snapshot restore): one round trip per batch of
        rows on PostgreSQL (psycopg pipelines ``executemany``), not one per row."""
        for row in rows:
            for p in row:
                if isinstance(p, str) and "\x00" in p:
                    raise UnstorableValue("names and keys cannot contain the NUL character")
        cur = conn.cursor()
        try:
            cur.executemany(self._sql(sql), [tuple(r) for r in rows])
        finally:
            cur.close()

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except self.unavailable_errors as e:
            # The caller reports it (a 503, or the start-up refusal); log only for debugging.
            log.debug("store error: %s", e)
            raise StoreUnavailable(f"the store is unavailable: {str(e).strip()[:200]}") from e

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction. Changes are published to the feed after COMMIT returns.

        Inside ``_joined`` (a ``txn`` running in this thread), the write joins that open
        transaction instead: it commits, publishes or rolls back with it.
        """
        joined = self._joined_txs.get(_running()) if self._joined_txs else None
        if joined is not None:
            yield joined
            return
        if self.group_commit:
            with self._group_write() as tx:
                yield tx
            return
        with self._translate():
            conn = self._pool.get()
            broken = False
            try:
                self._begin_write(conn)
                tx = Tx(self, conn)
                try:
                    yield tx
                    if tx.changes:
                        self._before_commit(tx)
                    self._exec(conn, "COMMIT")
                except BaseException:
                    try:
                        self._exec(conn, "ROLLBACK")
                    except Exception:
                        broken = True
                    raise
            except self.unavailable_errors:
                broken = True
                raise
            finally:
                self._pool.put(conn, broken=broken)
        if tx.changes:
            self._writes += 1
            self.feed.publish(tx.changes)
            if self._writes % 1000 == 0:
                self._schedule_trim()

    @contextmanager
    def _joined(self, tx: Tx) -> Iterator[None]:
        """Make every ``write()`` of this greenlet (thread) join ``tx`` (trellis.api.store.txn).

        Keyed by the greenlet itself, not a ``threading.local``: a local made before gevent
        patched ``threading`` would be shared by every request of the worker, and a plain
        write of another request, run while the transaction waits on the database, would
        join it and be rolled back with it after being acknowledged.
        """
        me = _running()
        self._joined_txs[me] = tx
        try:
            yield
        finally:
            del self._joined_txs[me]

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A consistent read snapshot; yields a function ``q(sql, params) -> rows``."""
        with self._translate():
            conn = self._pool.get()
            broken = False
            try:
                self._begin_read(conn)
                try:
                    yield lambda sql, params=(): self._exec(conn, sql, params).fetchall()
                finally:
                    self._exec(conn, "COMMIT")
            except self.unavailable_errors:
                broken = True
                raise
            finally:
                self._pool.put(conn, broken=broken)

    @contextmanager
    def _group_write(self) -> Iterator[Tx]:
        """``write`` with group commit: the writes that arrive together share one transaction,
        so one fsync acknowledges them all.

        The first writer (the leader) takes the write lock and opens a batch; each writer runs
        its body inside a savepoint of the batch's transaction (a body that fails rolls back
        to its savepoint and fails alone). After its own body the leader yields once, so that
        the writers ready to run join the batch, then closes it and commits. A writer returns
        only after that COMMIT: an acknowledged write is on disk, as without batching. If the
        COMMIT fails, every writer of the batch fails with it and none of their changes is
        published.
        """
        with self._translate():
            while True:
                with self._batch_guard:
                    batch = self._batch
                    leader = batch is None
                    if leader:
                        batch = self._batch = _Batch()
                assert batch is not None
                if leader:
                    try:
                        batch.conn = self._pool.get()
                        self._begin_write(batch.conn)
                    except BaseException as e:
                        self._end_batch(batch, e, broken=batch.conn is not None)
                        raise
                    batch.ready.set()
                else:
                    batch.ready.wait()
                if batch.closed or batch.error is not None:
                    continue  # too late for this batch, or it never started: the next one
                tx = None
                try:
                    with batch.lock:
                        if batch.closed or batch.error is not None:
                            continue  # the batch failed or ended while this writer queued
                        # The first body of a batch needs no savepoint (two statements, two
                        # round trips on PostgreSQL): if it fails, nothing else is in the
                        # transaction yet, so all of it is rolled back, and the writers queued
                        # behind it start a new batch.
                        first = batch.bodies == 0
                        batch.bodies += 1
                        tx = Tx(self, batch.conn)
                        if not first:
                            self._exec(batch.conn, "SAVEPOINT w")
                        try:
                            yield tx
                            if tx.changes:
                                self._before_commit(tx)
                            if not first:
                                self._exec(batch.conn, "RELEASE w")
                        except BaseException:
                            self._undo_body(batch, first)
                            raise
                finally:
                    if leader:
                        self._commit_batch(batch)
                if not leader:
                    batch.done.wait()
                if batch.error is not None:
                    raise StoreUnavailable(
                        f"the store is unavailable: {str(batch.error).strip()[:200]}"
                    ) from batch.error
                break
        if tx is not None and tx.changes:
            self._writes += 1
            self.feed.publish(tx.changes)
            if self._writes % 1000 == 0:
                self._schedule_trim()

    def _undo_body(self, batch: _Batch, first: bool) -> None:
        """Undo a body that failed: its savepoint, or, for the first, the whole transaction."""
        try:
            if first:
                self._exec(batch.conn, "ROLLBACK")
                batch.rolled_back = batch.closed = True
            else:
                self._exec(batch.conn, "ROLLBACK TO w")
                self._exec(batch.conn, "RELEASE w")
        except Exception as e:  # the transaction is gone: the whole batch fails
            batch.error = e
            batch.closed = True  # and no queued writer may run in what is left of it

    def _commit_batch(self, batch: _Batch) -> None:
        if not batch.rolled_back:
            time.sleep(0)  # under gevent: the writers ready to run join this batch first
        with self._batch_guard:
            if self._batch is batch:
                self._batch = None  # writers from now on start the next batch
        broken = False
        with batch.lock:  # once the last joiner's body is done
            batch.closed = True
            if batch.rolled_back:
                pass  # nothing to commit; the writers still queued retry in the next batch
            elif batch.error is None:
                try:
                    self._exec(batch.conn, "COMMIT")
                except BaseException as e:
                    batch.error = e
            if batch.error is not None:
                try:
                    self._exec(batch.conn, "ROLLBACK")
                except Exception:
                    broken = True
        self._end_batch(batch, batch.error, broken=broken)

    def _end_batch(self, batch: _Batch, error: BaseException | None, *, broken: bool) -> None:
        with self._batch_guard:
            if self._batch is batch:
                self._batch = None
        batch.closed = True
        batch.error = error
        if batch.conn is not None:
            self._pool.put(batch.conn, broken=broken)
        batch.ready.set()
        batch.done.set()

    def _schedule_trim(self) -> None:
        """Trim the change log in the background: the write that triggers it is committed and
        must be acknowledged as such, whatever the trim meets (a lock wait running out, a
        failed commit), and it should not wait for a second fsync."""
        with self._batch_guard:
            if self._trimming:
                return
            self._trimming = True

        def trim() -> None:
            try:
                self._trim_changes()
            except Exception as e:  # the next thousandth write tries again
                log.warning("trimming the change log failed (retried later): %s", e)
            finally:
                self._trimming = False

        threading.Thread(target=trim, name="trellis-trim-changes", daemon=True).start()

    def _trim_changes(self) -> None:
        # Through write(), like every other write: a statement outside it would wait for the
        # write lock in SQLite's C busy handler, which a batch held across its yield would
        # turn into a stall of the whole worker.
        with self.write() as tx:
            tx.execute(
                "DELETE FROM changes WHERE idx < (SELECT idx FROM indexes WHERE name = 'global')"
                " - ?",
                (self.change_history,),
            )

    def _migrate(self) -> None:
        with self.write() as tx:
            self._lock_migrations(tx)
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            done = {int(r[0]) for r in tx.execute("SELECT version FROM schema_migrations")}
            for version, statements in migrations(self.blob_type):
                if version in done:
                    continue
                for st in statements:
                    tx.execute(st.replace("{collate}", self.key_collation))
                tx.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
                log.info("applied store migration %d", version)
            row = tx.one("SELECT value FROM meta WHERE key = 'cluster_id'")
            if row is None:
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('cluster_id', ?)", (str(uuid.uuid4()),)
                )

    def close(self) -> None:
        self._closed.set()
        follower = getattr(self, "_follower", None)
        if follower is not None and follower is not threading.current_thread():
            self._wake_follower()
            follower.join(timeout=10)
        self._pool.close()

    def ping(self) -> None:
        with self.read() as q:
            q("SELECT 1")

    def read_changes_after(self, index: int) -> list[Change]:
        with self.read() as q:
            rows = q(
                "SELECT idx, topic, key FROM changes WHERE idx > ? ORDER BY idx LIMIT 10000",
                (index,),
            )
        return [Change(int(r[0]), r[1], r[2]) for r in rows]

    # -- the index -------------------------------------------------------------------------

    def current_index(self) -> int:
        with self.read() as q:
            return int(q("SELECT idx FROM indexes WHERE name = 'global'")[0][0])

    def topic_index(self, *topics: str) -> int:
        if not topics:
            return 0
        marks = ",".join("?" * len(topics))
        with self.read() as q:
            rows = q(f"SELECT max(idx) FROM indexes WHERE name IN ({marks})", topics)  # noqa: S608 - only placeholders are formatted in
        return int(rows[0][0] or 0)

    def topic_indexes(self, *topics: str) -> dict[str, int]:
        """The index of each topic (0 for a topic never written), read by one statement.

        No transaction around it (the connections are in autocommit mode, and one statement
        reads one snapshot), so it costs one round trip on PostgreSQL instead of three: the
        ACL and intention caches run it at the start of every request they serve (see
        ``trellis.api.acl.cache``).
        """
        if not topics:
            return {}
        marks = ",".join("?" * len(topics))
        sql = f"SELECT name, idx FROM indexes WHERE name IN ({marks})"  # noqa: S608 - only placeholders
        with self._translate():
            conn = self._pool.get()
            broken = False
            try:
                rows = self._exec(conn, sql, topics).fetchall()
            except self.unavailable_errors:
                broken = True
                raise
            finally:
                self._pool.put(conn, broken=broken)
        found = {r[0]: int(r[1]) for r in rows}
        return {t: found.get(t, 0) for t in topics}

    def cluster_id(self) -> str:
        with self.read() as q:
            return str(q("SELECT value FROM meta WHERE key = 'cluster_id'")[0][0])

    # -- K/V --------------------------------------------------------------------------------

    def _prefix_where(self, prefix: str) -> tuple[str, list[Any]]:
        if prefix == "":
            return "1 = 1", []
        upper = prefix_upper_bound(prefix)
        if upper is None:
            return "key >= ?", [prefix]
        return "key >= ? AND key < ?", [prefix, upper]

    def kv_get(self, key: str) -> KVEntry | None:
        with self.read() as q:
            rows = q(f"SELECT {KV_COLS} FROM kv WHERE key = ?", (key,))  # noqa: S608
        return _kv(rows[0]) if rows else None

    def kv_list(self, prefix: str) -> list[KVEntry]:
        where, params = self._prefix_where(prefix)
        with self.read() as q:
            rows = q(f"SELECT {KV_COLS} FROM kv WHERE {where} ORDER BY key", params)  # noqa: S608
        return [_kv(r) for r in rows]

    def kv_index(self, prefix: str, *, exact: bool) -> int:
        """The index a read of ``prefix`` reports: the newest write or delete under it.

        With nothing there (and no tombstone) it is the index of the whole K/V table, as in
        Consul, so that a client never sees an index of 0.
        """
        if exact:
            where, params = "key = ?", [prefix]
        else:
            where, params = self._prefix_where(prefix)
        with self.read() as q:
            live = q(f"SELECT max(modify_index) FROM kv WHERE {where}", params)[0][0]  # noqa: S608
            dead = q(f"SELECT max(idx) FROM kv_tombstones WHERE {where}", params)[0][0]  # noqa: S608
            best = max(int(live or 0), int(dead or 0))
            if best:
                return best
            table = q("SELECT idx FROM indexes WHERE name = 'kv'")
        return max(1, int(table[0][0]) if table else 1)

    def kv_put(self, key: str, value: bytes, *, flags: int = 0, cas: int | None = None) -> bool:
        with self.write() as tx:
            row = tx.one("SELECT modify_index FROM kv WHERE key = ?", (key,))
            if cas is not None:
                current = int(row[0]) if row else 0
                if current != cas:
                    return False
            idx = tx.index
            if row is None:
                tx.execute(
                    "INSERT INTO kv (key, value, flags, create_index, modify_index)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (key, value, _to_i64(flags), idx, idx),
                )
                tx.execute("DELETE FROM kv_tombstones WHERE key = ?", (key,))
            else:
                tx.execute(
                    "UPDATE kv SET value = ?, flags = ?, modify_index = ? WHERE key = ?",
                    (value, _to_i64(flags), idx, key),
                )
            tx.touch("kv", key, topic_index_key=False)
            return True

    def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        with self.write() as tx:
            if recurse:
                where, params = self._prefix_where(key)
                keys = [r[0] for r in tx.execute(f"SELECT key FROM kv WHERE {where}", params)]  # noqa: S608
            else:
                row = tx.one("SELECT modify_index FROM kv WHERE key = ?", (key,))
                if cas is not None and (row is None or int(row[0]) != cas):
                    return False
                keys = [key] if row else []
            if not keys:
                return True
            idx = tx.index
            for k in keys:
                tx.execute("DELETE FROM kv WHERE key = ?", (k,))
                tx.execute(
                    "INSERT INTO kv_tombstones (key, idx) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET idx = excluded.idx",
                    (k, idx),
                )
                tx.touch("kv", k, topic_index_key=False)
            return True

    # -- catalog -----------------------------------------------------------------------------

    def register(self, reg: Registration, *, prepare: Prepare | None = None) -> int:
        """See ``Store.register``."""
        with self.write() as tx:
            rows = _NodeRows(tx, reg.node.name)
            if prepare is not None:
                prepared = prepare(rows, reg)
                if prepared.node.name != reg.node.name:
                    raise ValueError("prepare() must keep the registration's node")
                reg = prepared
            n = reg.node
            # The index is taken (bumped) only by the first statement that changes something:
            # re-registering an existing node with nothing new (keep_existing_node, or the same
            # node again) must neither bump the index nor leave a gap in ``changes``, which
            # followers would read as lost history and wake every waiter.
            row = rows.node_row()
            touched: set[str] = set()
            if row is None:
                tx.execute(
                    f"INSERT INTO nodes ({NODE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        n.name,
                        n.id or str(uuid.uuid4()),
                        n.address,
                        n.datacenter,
                        _dumps(dict(n.tagged_addresses)),
                        _dumps(dict(n.meta)),
                        tx.index,
                        tx.index,
                    ),
                )
                touched.add(f"node/{n.name}")
            elif not reg.keep_existing_node:
                old = _node(row)
                if (
                    old.id,
                    old.address,
                    old.datacenter,
                    dict(old.tagged_addresses),
                    dict(old.meta),
                ) != (
                    n.id or old.id,
                    n.address,
                    n.datacenter,
                    dict(n.tagged_addresses),
                    dict(n.meta),
                ):
                    tx.execute(
                        "UPDATE nodes SET id = ?, address = ?, datacenter = ?,"
                        " tagged_addresses = ?, meta = ?, modify_index = ? WHERE name = ?",
                        (
                            n.id or old.id,
                            n.address,
                            n.datacenter,
                            _dumps(dict(n.tagged_addresses)),
                            _dumps(dict(n.meta)),
                            tx.index,
                            n.name,
                        ),
                    )
                    touched.add(f"node/{n.name}")
                    touched |= {
                        f"svc/{r[0]}"
                        for r in tx.execute("SELECT name FROM services WHERE node = ?", (n.name,))
                    }
            for s in reg.services:
                # Read once, by prepare() or here; forgotten once written (an ID given twice).
                old_row = rows.service_row(s.id)
                rows.forget_service(s.id)
                content = _svc_content(s)
                if old_row is not None and _svc_row_content(old_row) == content:
                    # The same service again (an agent re-syncing, a client retrying): Consul
                    # leaves its ModifyIndex alone and wakes nobody; so does Trellis.
                    continue
                create = tx.index
                if old_row is not None:
                    old_s = _svc(old_row)
                    create = old_s.create_index
                    touched |= changed_catalog_keys([old_s])
                tx.execute(
                    f"INSERT INTO services ({SVC_COLS}, destination) VALUES"  # noqa: S608
                    " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (node, id) DO UPDATE SET name = excluded.name,"
                    " tags = excluded.tags, address = excluded.address, port = excluded.port,"
                    " meta = excluded.meta, tagged_addresses = excluded.tagged_addresses,"
                    " weights = excluded.weights, kind = excluded.kind, proxy = excluded.proxy,"
                    " connect = excluded.connect,"
                    " enable_tag_override = excluded.enable_tag_override,"
                    " destination = excluded.destination, modify_index = excluded.modify_index",
                    (n.name, s.id, *content, create, tx.index, s.destination),
                )
                touched |= changed_catalog_keys([s])
            keep = {c.check_id for c in reg.checks}
            for sid in reg.replace_checks_for:
                for r in tx.execute(
                    "SELECT check_id, service_name FROM checks WHERE node = ? AND service_id = ?",
                    (n.name, sid),
                ).fetchall():
                    if r[0] not in keep:
                        tx.execute(
                            "DELETE FROM checks WHERE node = ? AND check_id = ?", (n.name, r[0])
                        )
                        self._invalidate_check_sessions(tx, n.name, [r[0]])
                        touched.add(f"svc/{r[1]}")
                        touched |= self._proxied(tx, n.name, sid)
            for c in reg.checks:
                old_check = rows.check_row(c.check_id)
                rows.forget_check(c.check_id)
                if not self._upsert_check(tx, n.name, c, old_check):
                    continue  # the same check again: nothing changed
                if c.status == CRITICAL:
                    self._invalidate_check_sessions(tx, n.name, [c.check_id])
                touched.add(f"svc/{c.service_name}" if c.service_name else f"node/{n.name}")
                touched |= self._proxied(tx, n.name, c.service_id)
                if not c.service_name:
                    touched |= {
                        f"svc/{r[0]}"
                        for r in tx.execute("SELECT name FROM services WHERE node = ?", (n.name,))
                    }
            for key in sorted(touched):
                tx.touch("catalog", key)
            if tx.changes:
                return tx.index
            return int(tx.one("SELECT idx FROM indexes WHERE name = 'global'")[0])

    def _upsert_check(self, tx: Tx, node: str, c: Check, old: Any) -> bool:
        """Write the check unless it is stored exactly so (``old``, its row) already; whether
        it wrote."""
        content = _check_content(c)
        if old is not None and _check_row_content(old) == content:
            return False
        if (
            old is not None
            and c.expires_at is not None
            and _check_row_content(old)[:-1] == content[:-1]
        ):
            # The same TTL check registered again (a node agent refreshing its serfHealth):
            # only its deadline moves, as a TTL pass does (_update_check); no index, so no
            # blocking query wakes for a heartbeat.
            tx.execute(
                "UPDATE checks SET expires_at = ? WHERE node = ? AND check_id = ?",
                (c.expires_at, node, c.check_id),
            )
            return False
        idx = tx.index
        create = int(old[12]) if old else idx
        tx.execute(
            f"INSERT INTO checks ({CHECK_COLS}) VALUES"  # noqa: S608
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (node, check_id) DO UPDATE SET name = excluded.name,"
            " status = excluded.status, notes = excluded.notes, output = excluded.output,"
            " service_id = excluded.service_id, service_name = excluded.service_name,"
            " type = excluded.type, definition = excluded.definition, ttl = excluded.ttl,"
            " expires_at = excluded.expires_at, modify_index = excluded.modify_index",
            (node, c.check_id, *content, create, idx),
        )
        return True

    def deregister_service(self, node: str, service_id: str) -> bool:
        with self.write() as tx:
            row = tx.one(
                f"SELECT {SVC_COLS} FROM services WHERE node = ? AND id = ?",  # noqa: S608
                (node, service_id),
            )
            if row is None:
                return False
            s = _svc(row)
            gone = tx.execute(
                "SELECT check_id FROM checks WHERE node = ? AND service_id = ?", (node, service_id)
            ).fetchall()
            self._invalidate_check_sessions(tx, node, [r[0] for r in gone])
            tx.execute("DELETE FROM checks WHERE node = ? AND service_id = ?", (node, service_id))
            tx.execute("DELETE FROM services WHERE node = ? AND id = ?", (node, service_id))
            for key in sorted(changed_catalog_keys([s])):
                tx.touch("catalog", key)
            return True

    @staticmethod
    def _proxied(tx: Tx, node: str, service_id: str) -> set[str]:
        """The change key of the service that ``service_id`` proxies, if it is a proxy: a
        proxy's health is its destination's Connect health, so /v1/health/connect/<dest>
        (what sidecars watch for their upstreams) must wake when a check of it changes, by
        whichever path: a TTL update, a registration, a check's removal."""
        if not service_id:
            return set()
        row = tx.one(
            "SELECT destination FROM services WHERE node = ? AND id = ?", (node, service_id)
        )
        return {f"svc/{row[0]}"} if row is not None and row[0] else set()

    def deregister_check(self, node: str, check_id: str) -> bool:
        with self.write() as tx:
            row = tx.one(
                "SELECT service_name, service_id FROM checks WHERE node = ? AND check_id = ?",
                (node, check_id),
            )
            if row is None:
                return False
            tx.execute("DELETE FROM checks WHERE node = ? AND check_id = ?", (node, check_id))
            self._invalidate_check_sessions(tx, node, [check_id])
            if row[0]:
                tx.touch("catalog", f"svc/{row[0]}")
                for key in self._proxied(tx, node, row[1]):
                    tx.touch("catalog", key)
            else:
                self._touch_node(tx, node)
            return True

    def _touch_node(self, tx: Tx, node: str) -> None:
        tx.touch("catalog", f"node/{node}")
        rows = tx.execute(f"SELECT {SVC_COLS} FROM services WHERE node = ?", (node,)).fetchall()  # noqa: S608
        for key in sorted(changed_catalog_keys([_svc(r) for r in rows])):
            tx.touch("catalog", key)

    def deregister_node(self, node: str) -> bool:
        with self.write() as tx:
            if tx.one("SELECT name FROM nodes WHERE name = ?", (node,)) is None:
                return False
            self._touch_node(tx, node)
            self._invalidate_node_sessions(tx, node)
            tx.execute("DELETE FROM checks WHERE node = ?", (node,))
            tx.execute("DELETE FROM services WHERE node = ?", (node,))
            tx.execute("DELETE FROM nodes WHERE name = ?", (node,))
            return True

    def nodes(self) -> list[Node]:
        with self.read() as q:
            return [_node(r) for r in q(f"SELECT {NODE_COLS} FROM nodes ORDER BY name")]  # noqa: S608

    def node(self, name: str) -> Node | None:
        with self.read() as q:
            rows = q(f"SELECT {NODE_COLS} FROM nodes WHERE name = ?", (name,))  # noqa: S608
        return _node(rows[0]) if rows else None

    def services(
        self, *, node: str | None = None, name: str | None = None, destination: str | None = None
    ) -> list[Service]:
        where, params = [], []
        for col, val in (("node", node), ("name", name), ("destination", destination)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self.read() as q:
            rows = q(f"SELECT {SVC_COLS} FROM services {clause} ORDER BY node, id", params)  # noqa: S608
        return [_svc(r) for r in rows]

    def checks(
        self,
        *,
        node: str | None = None,
        service_name: str | None = None,
        service_id: str | None = None,
        state: str | None = None,
        check_id: str | None = None,
    ) -> list[Check]:
        where, params = [], []
        for col, val in (
            ("node", node),
            ("service_name", service_name),
            ("service_id", service_id),
            ("status", state),
            ("check_id", check_id),
        ):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self.read() as q:
            rows = q(f"SELECT {CHECK_COLS} FROM checks {clause} ORDER BY node, check_id", params)  # noqa: S608
        return [_check(r) for r in rows]

    def update_check(
        self, node: str, check_id: str, status: str, output: str | None, *, now: float
    ) -> Check | None:
        with self.write() as tx:
            return self._update_check(tx, node, check_id, status, output, now=now)

    def _update_check(
        self,
        tx: Tx,
        node: str,
        check_id: str,
        status: str,
        output: str | None,
        *,
        now: float,
        only_if_expired: bool = False,
    ) -> Check | None:
        row = tx.one(
            f"SELECT {CHECK_COLS} FROM checks WHERE node = ? AND check_id = ?",  # noqa: S608
            (node, check_id),
        )
        if row is None:
            return None
        c = _check(row)
        if only_if_expired and (
            c.expires_at is None or c.expires_at >= now or c.status == CRITICAL
        ):
            # Refreshed (or already critical) since expire_ttl_checks read it: leave it.
            return None
        new_output = c.output if output is None else output
        expires = now + c.ttl if c.ttl else None
        if c.status == status and c.output == new_output:
            # Consul does not bump the index when nothing visible changed; only the
            # TTL deadline moves.
            if expires is not None:
                tx.execute(
                    "UPDATE checks SET expires_at = ? WHERE node = ? AND check_id = ?",
                    (expires, node, check_id),
                )
                # Report the deadline as stored, not the one before this refresh.
                c = dataclasses.replace(c, expires_at=expires)
            return c
        idx = tx.index
        tx.execute(
            "UPDATE checks SET status = ?, output = ?, expires_at = ?, modify_index = ?"
            " WHERE node = ? AND check_id = ?",
            (status, new_output, expires, idx, node, check_id),
        )
        if c.service_name:
            tx.touch("catalog", f"svc/{c.service_name}")
            for key in self._proxied(tx, node, c.service_id):
                tx.touch("catalog", key)
        else:
            self._touch_node(tx, node)
        if status == CRITICAL:
            self._invalidate_check_sessions(tx, node, [check_id])
        return _check(
            tx.one(
                f"SELECT {CHECK_COLS} FROM checks WHERE node = ? AND check_id = ?",  # noqa: S608
                (node, check_id),
            )
        )

    def expire_ttl_checks(self, now: float) -> int:
        """Turn TTL checks that were not refreshed in time critical. Returns how many."""
        with self.read() as q:
            due = q(
                "SELECT node, check_id FROM checks WHERE expires_at IS NOT NULL"
                " AND expires_at < ? AND status <> ?",
                (now, CRITICAL),
            )
        n = 0
        for node, check_id in due:
            # Re-check inside the write: a refresh committed since the read above (another
            # request, another server) must not be overwritten with "TTL expired".
            with self.write() as tx:
                c = self._update_check(
                    tx, node, check_id, CRITICAL, "TTL expired", now=now, only_if_expired=True
                )
            if c is not None:
                n += 1
        return n

    # -- members (server processes sharing the store) --------------------------------------------

    def member_beat(self, member_id: str, now: float, dead_before: float) -> list[str]:
        """Record that ``member_id`` is alive at ``now``, forget the members last seen before
        ``dead_before``, and return the IDs of the members left, sorted.

        Takes no index and records no change: no blocking query wakes, no ``X-Consul-Index``
        moves, however often processes beat.
        """
        with self.write() as tx:
            tx.execute("DELETE FROM members WHERE seen < ?", (dead_before,))
            tx.execute(
                "INSERT INTO members (id, seen) VALUES (?, ?)"
                " ON CONFLICT (id) DO UPDATE SET seen = excluded.seen",
                (member_id, now),
            )
            rows = tx.execute("SELECT id FROM members").fetchall()
        return sorted(r[0] for r in rows)

    def member_leave(self, member_id: str) -> None:
        """``member_id`` stops (a graceful stop): the others take over its share at once."""
        with self.write() as tx:
            tx.execute("DELETE FROM members WHERE id = ?", (member_id,))

    # -- system documents ----------------------------------------------------------------------

    def system_get(self, key: str) -> tuple[Any, int] | None:
        """A system document and its modify index, or None."""
        with self.read() as q:
            rows = q("SELECT value, modify_index FROM system WHERE key = ?", (key,))
        return (json.loads(rows[0][0]), int(rows[0][1])) if rows else None

    def system_list(self, prefix: str) -> list[tuple[str, Any, int, int]]:
        """System documents by key prefix (config entries: ``config/<kind>/``), one read."""
        # substr, not LIKE: no wildcard in the prefix to escape, and no collation involved.
        with self.read() as q:
            rows = q(
                "SELECT key, value, create_index, modify_index FROM system"
                " WHERE substr(key, 1, ?) = ? ORDER BY key",
                (len(prefix), prefix),
            )
        return [(str(k), json.loads(v), int(c), int(m)) for k, v, c, m in rows]

    def system_write(
        self, puts: dict[str, Any], expect: dict[str, int] | None = None
    ) -> int | None:
        """Write (or, with a None value, delete) several documents in one transaction.

        ``expect`` maps keys to the modify index they must still have (0: must not exist);
        if any differs nothing is written and None is returned. Returns the write's index.
        Each written key touches topic ``system`` with the key, so blocking reads wake.
        """
        with self.write() as tx:
            for key, want in (expect or {}).items():
                row = tx.one("SELECT modify_index FROM system WHERE key = ?", (key,))
                have = int(row[0]) if row else 0
                if have != want:
                    return None
            idx = tx.index
            for key, value in puts.items():
                if value is None:
                    tx.execute("DELETE FROM system WHERE key = ?", (key,))
                else:
                    tx.execute(
                        "INSERT INTO system (key, value, create_index, modify_index)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                        " value = excluded.value, modify_index = excluded.modify_index",
                        (key, _dumps(value), idx, idx),
                    )
                tx.touch("system", key)
            return idx
