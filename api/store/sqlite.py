"""The embedded store: one SQLite file in the data dir, WAL mode, ``synchronous=FULL``.

FULL (not NORMAL) because an acknowledged write must survive power loss, not only a process
crash; see SECURITY.md. Several gunicorn workers may share the file: each process follows the
others' commits by polling ``PRAGMA data_version``, which changes only when another connection
commits, and is a cheap read of the shared WAL index.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from typing import Any

from trellis.api.datadir import private_file
from trellis.api.errors import StoreUnavailable
from trellis.api.store.sql import SQLStore

log = logging.getLogger("trellis.store.sqlite")

#: How long a statement may wait for a lock another connection holds before it fails.
LOCK_TIMEOUT = 30.0


class SQLiteStore(SQLStore):
    blob_type = "BLOB"
    key_collation = ""  # BINARY: byte order of UTF-8, which is code point order
    unavailable_errors = (sqlite3.OperationalError, sqlite3.DatabaseError)
    # IntegrityError is a DatabaseError: listed first where both are caught (a restore).
    data_errors = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)
    # One COMMIT (one fsync, with synchronous=FULL) for the writes a worker has ready at once.
    group_commit = True

    def __init__(self, path: str, *, poll_interval: float = 0.01, pool_size: int = 8) -> None:
        self.path = path
        self.poll_interval = poll_interval
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise StoreUnavailable(f"the data directory {parent} does not exist")
        # SQLite makes a new database 0644 whatever the umask, and its -wal and -shm files
        # take the database's mode: made 0600 here first, none of them is readable by other
        # local users (trellis.api.datadir).
        try:
            for suffix in ("", "-wal", "-shm", "-journal"):
                private_file(path + suffix, create=suffix == "")
        except OSError as e:
            raise StoreUnavailable(f"cannot make {path} private: {e.strerror}") from None
        self._follower: threading.Thread | None = None
        self._reaper_fd: int | None = None
        super().__init__(pool_size=pool_size)

    def _connect(self) -> Any:
        conn = sqlite3.connect(
            self.path, timeout=LOCK_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _begin_write(self, conn: Any) -> None:
        """Take the database's write lock, waiting for another process's write to finish
        without blocking this one.

        SQLite's own busy handler waits in C, and a gevent worker cannot switch away from a C
        call: while one worker held the write lock, the other's ``BEGIN IMMEDIATE`` froze it
        whole (its reads, its parked queries, its accept loop) for up to the busy timeout.
        So the busy handler is off for this one statement, and the wait is a loop of short
        sleeps, which under gevent let everything else in the worker run.
        """
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            delay = 0.0005
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e):
                        raise
                    if time.monotonic() >= deadline:
                        raise
                time.sleep(delay)  # cooperative under gevent
                delay = min(delay * 2, 0.005)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(LOCK_TIMEOUT * 1000)}")

    def _begin_read(self, conn: Any) -> None:
        conn.execute("BEGIN")

    # -- the schema, from SQLite's catalog (trellis.api.store.snapshot) ------------------------

    def _schema_tables(self, q: Any) -> list[str]:
        rows = q("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'")
        return sorted(r[0] for r in rows)

    def _schema_columns(self, q: Any, table: str) -> list[str]:
        return [r[0] for r in q("SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,))]

    def _schema_parents(self, q: Any, table: str) -> list[str]:
        return sorted({r[0] for r in q('SELECT "table" FROM pragma_foreign_key_list(?)', (table,))})

    def hold_reaper_role(self) -> bool:
        """The reaper role is an exclusive ``flock`` on ``<database>.reaper``: one process of
        those sharing the file (gunicorn workers) holds it, and the kernel releases it when
        that process dies, however it dies."""
        if self._reaper_fd is not None:
            return True
        fd = os.open(self.path + ".reaper", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._reaper_fd = fd
        return True

    def close(self) -> None:
        fd, self._reaper_fd = self._reaper_fd, None
        if fd is not None:
            os.close(fd)
        super().close()

    def start_follower(self) -> None:
        if self._follower is not None:
            return
        last = self.current_index()
        self._follower = threading.Thread(
            target=self._follow, args=(last,), name="trellis-sqlite-follower", daemon=True
        )
        self._follower.start()

    def _follow(self, last: int) -> None:
        conn = None
        version = None
        while not self._closed.is_set():
            try:
                if conn is None:
                    conn = self._connect()
                v = conn.execute("PRAGMA data_version").fetchone()[0]
                if v != version:
                    version = v
                    last = self.catch_up(last)
            except Exception as e:  # the follower must never die; it retries
                log.warning("sqlite follower: %s", e)
                conn = None
            self._closed.wait(self.poll_interval)
        if conn is not None:
            conn.close()
