"""Sessions and K/V locks in the store: the value object and the SQL that keeps them.

Theory of operation
-------------------
Consul's model (agent/consul/state/session.go, kvs.go), kept in the database so that every
replica sees one truth and a SIGKILL loses nothing acknowledged:

* A session belongs to a node and names checks of that node (``node_checks``,
  ``service_checks``). It exists until it is *invalidated*: destroyed, its node deregistered,
  one of its checks critical or gone, or its TTL run out (``expires_at``, moved by each renew
  to ``now + 2 x TTL``, as Consul's session TTL multiplier). Every invalidation is one call,
  ``_invalidate_session``, inside the write transaction that caused it, so no reader ever sees
  a dead session that still holds a lock.
* A lock is a K/V key whose ``session`` column names its holder. Acquire succeeds if the key
  is free (``LockIndex`` + 1) or already held by the same session (the value is updated, the
  ``LockIndex`` is not); it fails while another session holds it, and while the key's *lock
  delay* runs: when a session is invalidated, each key it held may not be acquired again for
  the session's ``LockDelay`` (``kv_lock_delays``), so that a holder which lost its session
  without knowing it has time to notice before another takes over.
* On invalidation the session's keys are released (``Behavior`` ``release``: the key stays,
  ``Session`` cleared, ``ModifyIndex`` moves) or deleted (``delete``).
* Renewing moves only ``expires_at``: no index, no change recorded (Consul's renew is no Raft
  write either), so renewals do not wake blocking readers.
* Every session write touches topic ``session`` (key: the session ID) and every lock change
  touches ``kv`` with the key, so blocking readers of either wake.

Expiring TTLs is a periodic sweep (``expire_sessions``) that exactly one server process runs
(the reaper role, ``trellis.api.reaper``); each expiry re-checks its deadline inside its write,
so a renewal committed after the sweep's read wins, and two sweeps could never invalidate a
session twice.

Mixed into ``SQLStore``; uses its ``read``/``write`` plumbing and its ``Tx``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trellis.api.store.errors import InvalidSession

if TYPE_CHECKING:
    from trellis.api.store.sql import Tx

RELEASE, DELETE = "release", "delete"

#: Consul's session TTL multiplier: a session lives this many TTLs after its last renew.
TTL_MULTIPLIER = 2

MIGRATION = (
    "CREATE TABLE sessions (id TEXT PRIMARY KEY, name TEXT NOT NULL, node TEXT NOT NULL,"
    " lock_delay DOUBLE PRECISION NOT NULL, behavior TEXT NOT NULL, ttl TEXT NOT NULL,"
    " ttl_seconds DOUBLE PRECISION NOT NULL, node_checks TEXT NOT NULL,"
    " service_checks TEXT NOT NULL, expires_at DOUBLE PRECISION,"
    " create_index BIGINT NOT NULL, modify_index BIGINT NOT NULL)",
    "CREATE INDEX sessions_by_node ON sessions (node)",
    "CREATE INDEX sessions_by_expiry ON sessions (expires_at)",
    "CREATE INDEX kv_by_session ON kv (session)",
    # Epoch seconds until which a key may not be acquired (set when its holder's session
    # is invalidated).
    "CREATE TABLE kv_lock_delays (key TEXT {collate} PRIMARY KEY,"
    " until_ts DOUBLE PRECISION NOT NULL)",
)

SESSION_COLS = (
    "id, name, node, lock_delay, behavior, ttl, ttl_seconds, node_checks, service_checks,"
    " expires_at, create_index, modify_index"
)


@dataclass(frozen=True)
class Session:
    id: str
    node: str
    name: str = ""
    #: Seconds.
    lock_delay: float = 15.0
    behavior: str = RELEASE
    #: As the client gave it ("30s"), "" for none; ``ttl_seconds`` is its value.
    ttl: str = ""
    ttl_seconds: float = 0.0
    node_checks: tuple[str, ...] = ()
    service_checks: tuple[str, ...] = ()
    #: Epoch seconds after which the reaper invalidates it (None: no TTL).
    expires_at: float | None = None
    create_index: int = 0
    modify_index: int = 0

    @property
    def checks(self) -> tuple[str, ...]:
        return self.node_checks + self.service_checks


def _session(r: Sequence[Any]) -> Session:
    return Session(
        id=r[0],
        name=r[1],
        node=r[2],
        lock_delay=float(r[3]),
        behavior=r[4],
        ttl=r[5],
        ttl_seconds=float(r[6]),
        node_checks=tuple(json.loads(r[7])),
        service_checks=tuple(json.loads(r[8])),
        expires_at=r[9],
        create_index=int(r[10]),
        modify_index=int(r[11]),
    )


class SessionStoreMixin:
    """Sessions and locks; see the module's theory of operation."""

    # Provided by SQLStore.
    read: Any
    write: Any

    # -- sessions ----------------------------------------------------------------------------

    def session_create(self, s: Session, *, now: float) -> Session:
        """Store a new session (``s.id`` fresh); the session as stored.

        InvalidSession: the node is not registered, a check is not registered on it, or a
        check is critical (as Consul, which would otherwise hand out a session that is dead
        on arrival).
        """
        with self.write() as tx:
            if tx.one("SELECT name FROM nodes WHERE name = ?", (s.node,)) is None:
                raise InvalidSession(f"Missing node registration: {s.node!r}")
            for check_id in dict.fromkeys(s.checks):
                row = tx.one(
                    "SELECT status FROM checks WHERE node = ? AND check_id = ?",
                    (s.node, check_id),
                )
                if row is None:
                    raise InvalidSession(f"Missing check '{check_id}' registration")
                if row[0] == "critical":
                    raise InvalidSession(f"Check '{check_id}' is in critical state")
            idx = tx.index
            expires = now + TTL_MULTIPLIER * s.ttl_seconds if s.ttl_seconds else None
            tx.execute(
                f"INSERT INTO sessions ({SESSION_COLS}) VALUES"  # noqa: S608
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    s.id,
                    s.name,
                    s.node,
                    s.lock_delay,
                    s.behavior,
                    s.ttl,
                    s.ttl_seconds,
                    json.dumps(list(s.node_checks)),
                    json.dumps(list(s.service_checks)),
                    expires,
                    idx,
                    idx,
                ),
            )
            tx.touch("session", s.id, topic_index_key=False)
            row = tx.one(f"SELECT {SESSION_COLS} FROM sessions WHERE id = ?", (s.id,))  # noqa: S608
        return _session(row)

    def session_get(self, session_id: str) -> Session | None:
        with self.read() as q:
            rows = q(f"SELECT {SESSION_COLS} FROM sessions WHERE id = ?", (session_id,))  # noqa: S608
        return _session(rows[0]) if rows else None

    def sessions(self, *, node: str | None = None) -> list[Session]:
        where, params = ("WHERE node = ?", (node,)) if node is not None else ("", ())
        with self.read() as q:
            rows = q(
                f"SELECT {SESSION_COLS} FROM sessions {where} ORDER BY create_index",  # noqa: S608
                params,
            )
        return [_session(r) for r in rows]

    def session_destroy(self, session_id: str, *, now: float) -> bool:
        """Invalidate a session (its locks released or keys deleted, per its behaviour);
        False if there was none."""
        with self.write() as tx:
            return self._invalidate_session(tx, session_id, now)

    def session_renew(self, session_id: str, *, now: float) -> Session | None:
        """Move a session's TTL deadline to ``now + 2 x TTL``; None if there is no such
        session (expired or destroyed: the client must create a new one). No index moves."""
        with self.write() as tx:
            row = tx.one(f"SELECT {SESSION_COLS} FROM sessions WHERE id = ?", (session_id,))  # noqa: S608
            if row is None:
                return None
            s = _session(row)
            if s.ttl_seconds:
                expires = now + TTL_MULTIPLIER * s.ttl_seconds
                tx.execute("UPDATE sessions SET expires_at = ? WHERE id = ?", (expires, s.id))
                s = dataclasses.replace(s, expires_at=expires)
            return s

    def expire_sessions(self, now: float) -> int:
        """Invalidate the sessions whose TTL ran out (not renewed for 2 x TTL); how many."""
        with self.read() as q:
            due = [
                r[0]
                for r in q(
                    "SELECT id FROM sessions WHERE expires_at IS NOT NULL AND expires_at < ?",
                    (now,),
                )
            ]
        n = 0
        for session_id in due:
            # Re-checked inside the write: a renew committed since the read above wins.
            with self.write() as tx:
                row = tx.one("SELECT expires_at FROM sessions WHERE id = ?", (session_id,))
                if row is None or row[0] is None or row[0] >= now:
                    continue
                if self._invalidate_session(tx, session_id, now):
                    n += 1
        return n

    # -- locks -------------------------------------------------------------------------------

    def kv_acquire(
        self, key: str, value: bytes, *, session: str, flags: int = 0, now: float
    ) -> bool:
        """Take (or, for the holder, refresh) the lock on ``key`` and write ``value``.

        False while another session holds it or its lock delay runs. InvalidSession: no
        such session."""
        with self.write() as tx:
            return self._kv_lock(tx, key, value, session=session, flags=flags, now=now)

    def kv_release(self, key: str, value: bytes, *, session: str, flags: int = 0) -> bool:
        """Release the lock ``session`` holds on ``key`` and write ``value``; False if the
        key is missing or ``session`` does not hold it."""
        with self.write() as tx:
            return self._kv_unlock(tx, key, value, session=session, flags=flags)

    def _kv_lock(
        self, tx: Tx, key: str, value: bytes, *, session: str, flags: int, now: float
    ) -> bool:
        """The acquire of ``kv_acquire`` inside ``tx`` (for transactions too)."""
        from trellis.api.store.sql import _to_i64

        if tx.one("SELECT id FROM sessions WHERE id = ?", (session,)) is None:
            raise InvalidSession(f"invalid session {session!r}")
        row = tx.one("SELECT session, lock_index FROM kv WHERE key = ?", (key,))
        if row is not None and row[0] is not None and row[0] != session:
            return False  # someone else holds it
        held = row is not None and row[0] == session
        if not held:
            delay = tx.one("SELECT until_ts FROM kv_lock_delays WHERE key = ?", (key,))
            if delay is not None and delay[0] > now:
                return False
        idx = tx.index
        if row is None:
            tx.execute(
                "INSERT INTO kv (key, value, flags, create_index, modify_index, lock_index,"
                " session) VALUES (?, ?, ?, ?, ?, 1, ?)",
                (key, value, _to_i64(flags), idx, idx, session),
            )
            tx.execute("DELETE FROM kv_tombstones WHERE key = ?", (key,))
        else:
            lock_index = int(row[1]) + (0 if held else 1)
            tx.execute(
                "UPDATE kv SET value = ?, flags = ?, modify_index = ?, lock_index = ?,"
                " session = ? WHERE key = ?",
                (value, _to_i64(flags), idx, lock_index, session, key),
            )
        tx.touch("kv", key, topic_index_key=False)
        return True

    def _kv_unlock(self, tx: Tx, key: str, value: bytes, *, session: str, flags: int) -> bool:
        """The release of ``kv_release`` inside ``tx``."""
        from trellis.api.store.sql import _to_i64

        row = tx.one("SELECT session FROM kv WHERE key = ?", (key,))
        if row is None or row[0] != session:
            return False
        tx.execute(
            "UPDATE kv SET value = ?, flags = ?, modify_index = ?, session = NULL WHERE key = ?",
            (value, _to_i64(flags), tx.index, key),
        )
        tx.touch("kv", key, topic_index_key=False)
        return True

    # -- invalidation (called by the catalog writes too) -------------------------------------

    def _invalidate_session(self, tx: Tx, session_id: str, now: float) -> bool:
        row = tx.one("SELECT behavior, lock_delay FROM sessions WHERE id = ?", (session_id,))
        if row is None:
            return False
        behavior, lock_delay = row[0], float(row[1])
        keys = [r[0] for r in tx.execute("SELECT key FROM kv WHERE session = ?", (session_id,))]
        idx = tx.index
        for key in keys:
            if lock_delay > 0:
                tx.execute(
                    "INSERT INTO kv_lock_delays (key, until_ts) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET until_ts = excluded.until_ts",
                    (key, now + lock_delay),
                )
            if behavior == DELETE:
                tx.execute("DELETE FROM kv WHERE key = ?", (key,))
                tx.execute(
                    "INSERT INTO kv_tombstones (key, idx) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET idx = excluded.idx",
                    (key, idx),
                )
            else:
                tx.execute(
                    "UPDATE kv SET session = NULL, modify_index = ? WHERE key = ?", (idx, key)
                )
            tx.touch("kv", key, topic_index_key=False)
        tx.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        tx.touch("session", session_id, topic_index_key=False)
        # Old lock delays are of no use once passed; drop them here, where it costs nothing.
        tx.execute("DELETE FROM kv_lock_delays WHERE until_ts < ?", (now,))
        return True

    def _invalidate_node_sessions(self, tx: Tx, node: str) -> None:
        """The node is being deregistered: every session on it ends."""
        now = time.time()
        for r in tx.execute("SELECT id FROM sessions WHERE node = ?", (node,)).fetchall():
            self._invalidate_session(tx, r[0], now)

    def _invalidate_check_sessions(self, tx: Tx, node: str, check_ids: Iterable[str]) -> None:
        """These checks of ``node`` went critical or were removed: the sessions that name
        them end (Consul)."""
        ids = set(check_ids)
        if not ids:
            return
        now = time.time()
        rows = tx.execute(
            "SELECT id, node_checks, service_checks FROM sessions WHERE node = ?", (node,)
        ).fetchall()
        for r in rows:
            if ids & (set(json.loads(r[1])) | set(json.loads(r[2]))):
                self._invalidate_session(tx, r[0], now)
