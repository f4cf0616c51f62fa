"""A gevent worker on PostgreSQL keeps serving while one of its queries waits on the database.

psycopg is cooperative under gevent only if it finds ``select`` patched when it is first
imported (psycopg's documented gevent support); imported earlier, it waits in C, and one query
that waits (a lock, a slow disk, the LISTEN follower) stops every request of the worker. This
is what breaks if the server ever imports psycopg before its workers patch themselves, or if
psycopg's gevent support changes, so it is tested on a real ``trellis server``.

The test checks that the master never loaded the driver (its memory maps hold no
``psycopg_binary``) while the worker did, then holds the store's write lock from its own
connection, sends a K/V write (which waits for the lock inside the worker), and times other
requests meanwhile.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support import TrellisProcess, child_pids, wait_until
from tests.test_integration_replicas import seal_config
from trellis.api.store.postgres import WRITE_LOCK

pytestmark = pytest.mark.integration

#: A request that needs no store, on an idle worker, answers in milliseconds; a worker whose
#: hub is blocked does not answer until the lock is released (never, here).
PROMPT = 2.0


def loaded_psycopg(pid: int) -> bool:
    """Whether the process has psycopg's compiled implementation (and libpq) mapped."""
    return "psycopg_binary" in Path(f"/proc/{pid}/maps").read_text()


def waiting_on_the_lock(admin: psycopg.Connection) -> int:
    """Backends of this database waiting for an advisory lock."""
    row = admin.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND NOT l.granted AND a.datname = current_database()"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_query_waiting_on_postgresql_does_not_stop_the_gevent_worker(tmp_path, pg_url):
    server = TrellisProcess(
        [
            "server", "-config", str(seal_config(tmp_path)), "-store", pg_url,
            "-data-dir", str(tmp_path / "data"), "-workers", "1", "-worker-class", "gevent",
            "-http-port", "0", "-dns-port", "-1", "-log-level", "warning", "-node", "pg-gevent",
        ]
    )  # fmt: skip
    locker = psycopg.connect(pg_url)
    admin = psycopg.connect(pg_url, autocommit=True)
    writes: list[int] = []
    writer = threading.Thread(
        target=lambda: writes.append(
            httpx.put(f"{server.url}/v1/kv/held", content=b"v", timeout=60).status_code
        ),
        daemon=True,
    )
    try:
        server.start()
        [worker] = child_pids(server.pid)
        assert loaded_psycopg(worker)
        assert not loaded_psycopg(server.pid), "the master imported psycopg before the fork"
        with httpx.Client(base_url=server.url, timeout=PROMPT * 5) as http:
            assert http.put("/v1/kv/warm", content=b"up").status_code == 200
            locker.execute("SELECT pg_advisory_lock(%s)", (WRITE_LOCK,))
            writer.start()
            wait_until(lambda: waiting_on_the_lock(admin) >= 1, timeout=20)
            for _ in range(5):
                t0 = time.monotonic()
                r = http.get("/v1/status/leader")
                elapsed = time.monotonic() - t0
                assert r.status_code == 200
                assert elapsed < PROMPT, f"the worker stalled for {elapsed:.1f}s"
            assert writer.is_alive(), "the write did not wait for the lock"
            locker.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK,))
            writer.join(30)
            assert writes == [200]
            assert http.get("/v1/kv/held?raw").content == b"v"
    finally:
        locker.close()
        admin.close()
        server.stop()
