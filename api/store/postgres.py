"""The replicated store: PostgreSQL through psycopg 3, for several API replicas.

Replicas learn of each other's writes through ``LISTEN trellis_changes``: every write
transaction sends ``pg_notify`` with its index, which PostgreSQL delivers only at COMMIT. A
NOTIFY sent while a listener is disconnected is lost for good, so the follower also reads the
``changes`` table every ``poll_interval`` seconds and after every reconnect; it never relies
on a notification alone.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from trellis.api.errors import ConfigError
from trellis.api.store.sql import SQLStore, Tx

log = logging.getLogger("trellis.store.postgres")

CHANNEL = "trellis_changes"
#: The advisory lock every write transaction holds (see ``_begin_write``).
WRITE_LOCK = 7426352
#: The session-level advisory lock of the process that expires sessions (``hold_reaper_role``).
REAPER_LOCK = 7426353
_PLACEHOLDER = re.compile(r"\?")


def check_url(url: str) -> None:
    """Raise ConfigError for a URL libpq cannot parse (the operator's fault, not the database's).

    Without this an unknown option leaks psycopg.ProgrammingError and a non-numeric port looks
    like an unreachable server. The URL may hold a password, so it is not echoed back.
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        reason = str(e).strip().splitlines()[0].replace(url, "<url>")
        raise ConfigError(f"invalid PostgreSQL store URL: {reason}") from None
    for name in ("port", "connect_timeout"):
        value = str(params.get(name, "0"))
        if not all(part.strip().isdigit() for part in value.split(",")):
            raise ConfigError(f"invalid PostgreSQL store URL: {name} must be a number")


class PostgresStore(SQLStore):
    blob_type = "BYTEA"
    key_collation = 'COLLATE "C"'  # byte order, so prefix ranges match SQLite's
    unavailable_errors = (psycopg.OperationalError, psycopg.InterfaceError)
    # Values a column cannot hold (a type, a duplicate key, a missing parent): a restore's 400.
    data_errors = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError)
    # One transaction (one advisory lock, one WAL flush) for the writes a worker has ready at
    # once; while a body waits on the database, the writers that arrive queue into its batch.
    group_commit = True

    def __init__(
        self, url: str, *, poll_interval: float = 1.0, pool_size: int = 8, connect_timeout: int = 5
    ) -> None:
        self.url = url
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self._follower: threading.Thread | None = None
        self._sql_cache: dict[str, str] = {}
        self._reaper: Any = None  # the connection that asks for (and holds) REAPER_LOCK
        self._reaper_held = False
        super().__init__(pool_size=pool_size)

    def _connect(self) -> Any:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)

    def _sql(self, sql: str) -> str:
        out = self._sql_cache.get(sql)
        if out is None:
            out = _PLACEHOLDER.sub("%s", sql)
            self._sql_cache[sql] = out
        return out

    def _begin_write(self, conn: Any) -> None:
        conn.execute("BEGIN")
        # Serialize write transactions from their first statement, as SQLite's BEGIN IMMEDIATE
        # does. The global index row lock alone comes too late: a write reads first (the CAS
        # check, "does this key/node exist?") and takes the index only once it knows it will
        # change something, so two concurrent cas=0 puts both saw "absent" and one failed
        # with UniqueViolation, and two cas=N puts could both win. After this lock, READ
        # COMMITTED gives every later statement a snapshot that includes all earlier writes.
        self._exec(conn, "SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))

    def _begin_read(self, conn: Any) -> None:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    # -- the schema, from PostgreSQL's catalog (trellis.api.store.snapshot) --------------------

    def _schema_tables(self, q: Any) -> list[str]:
        rows = q(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
        return sorted(r[0] for r in rows)

    def _schema_columns(self, q: Any, table: str) -> list[str]:
        rows = q(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            (table,),
        )
        return [r[0] for r in rows]

    def _schema_parents(self, q: Any, table: str) -> list[str]:
        rows = q(
            "SELECT c.confrelid::regclass::text FROM pg_constraint c"
            " WHERE c.contype = 'f' AND c.conrelid = to_regclass(?)",
            (table,),
        )
        return sorted({r[0].strip('"') for r in rows})

    def hold_reaper_role(self) -> bool:
        """The reaper role is a session-level advisory lock on a connection of its own: the
        database releases it when that connection ends, so a replica killed (or cut off:
        TCP keepalives end a silent connection) hands the role to whichever replica asks
        next. The connection is kept by those that lost too, so that asking again each
        round costs a statement, not a connection. A connection that broke has lost the
        role: the next call asks again on a new one."""
        if self._closed.is_set():
            return False
        with self._translate():
            try:
                if self._reaper is None:
                    self._reaper = psycopg.connect(
                        self.url,
                        autocommit=True,
                        connect_timeout=self.connect_timeout,
                        keepalives=1,
                        keepalives_idle=5,
                        keepalives_interval=2,
                        keepalives_count=3,
                    )
                    self._reaper_held = False
                if self._reaper_held:
                    self._reaper.execute("SELECT 1")
                else:
                    row = self._reaper.execute(
                        "SELECT pg_try_advisory_lock(%s)", (REAPER_LOCK,)
                    ).fetchone()
                    self._reaper_held = bool(row[0])
                return self._reaper_held
            except self.unavailable_errors:
                self._drop_reaper()
                raise

    def _drop_reaper(self) -> None:
        conn, self._reaper = self._reaper, None
        self._reaper_held = False
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: S110 - broken already; the role is gone with it
                pass

    def close(self) -> None:
        self._drop_reaper()
        super().close()

    def _lock_migrations(self, tx: Tx) -> None:
        # Replicas starting together must not run the same migration twice.
        tx.execute("SELECT pg_advisory_xact_lock(7426351)")

    def _wake_follower(self) -> None:
        try:
            conn = self._pool.get()
        except Exception:  # closing anyway; the follower's poll timeout will end it
            return
        try:
            self._exec(conn, "SELECT pg_notify(?, ?)", (CHANNEL, "closing"))
        except Exception:  # noqa: S110 - as above
            pass
        finally:
            self._pool.put(conn)

    def _before_commit(self, tx: Tx) -> None:
        tx.execute("SELECT pg_notify(?, ?)", (CHANNEL, str(tx.index)))

    def start_follower(self) -> None:
        if self._follower is not None:
            return
        last = self.current_index()
        self._follower = threading.Thread(
            target=self._follow, args=(last,), name="trellis-pg-follower", daemon=True
        )
        self._follower.start()

    def _follow(self, last: int) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=self.connect_timeout
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Anything committed while we were not listening: read it now.
                    last = self.catch_up(last)
                    backoff = 0.1
                    while not self._closed.is_set():
                        got = False
                        for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
                            got = True
                        last = self.catch_up(last)
                        if not got:
                            # A slow poll, in case a notification was lost.
                            continue
            except Exception as e:  # the follower must never die; it reconnects
                if self._closed.is_set():
                    break
                log.warning("postgres follower: %s; reconnecting", e)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)
