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

from api.store.sql import SQLStore, Tx

log = logging.getLogger("trellis.store.postgres")

CHANNEL = "trellis_changes"
_PLACEHOLDER = re.compile(r"\?")


class PostgresStore(SQLStore):
    blob_type = "BYTEA"
    key_collation = 'COLLATE "C"'  # byte order, so prefix ranges match SQLite's
    unavailable_errors = (psycopg.OperationalError, psycopg.InterfaceError)

    def __init__(
        self, url: str, *, poll_interval: float = 1.0, pool_size: int = 8, connect_timeout: int = 5
    ) -> None:
        self.url = url
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self._follower: threading.Thread | None = None
        self._sql_cache: dict[str, str] = {}
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

    def _begin_read(self, conn: Any) -> None:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _lock_migrations(self, tx: Tx) -> None:
        # Replicas starting together must not run the same migration twice.
        tx.execute("SELECT pg_advisory_xact_lock(7426351)")

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
