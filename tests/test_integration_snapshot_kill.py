"""SIGKILL a server in the middle of a restore: on restart the store holds either the old state
or the restored one, whole, never a mix.

On both stores: a real ``trellis server`` subprocess, a real archive made large enough that
its restore takes a while (thousands of K/V rows added to a saved archive), and the kill sent
once the restore's transaction is seen writing (SQLite: its WAL grows past what the old state
needs; PostgreSQL: the restore's INSERT is running, seen in ``pg_stat_activity``).
"""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support import TrellisProcess, server_args, wait_until
from trellis.api import snapshot as archive

pytestmark = pytest.mark.integration

#: K/V rows added to the archive: about 20 MB of state, seconds of restore.
ROWS = 20_000
VALUE = b"v" * 1000


def _big(data: bytes) -> bytes:
    """The saved archive with ``ROWS`` more keys under ``big/``, checksum and counts made
    right: the restored state."""
    got = archive.read_archive(data)
    m = got.manifest
    cols = m.tables["kv"].columns
    rows = {name: list(r) for name, r in got.rows.items()}
    for i in range(ROWS):
        row = {
            "key": f"big/{i:06d}",
            "value": VALUE,
            "flags": 0,
            "create_index": m.index,
            "modify_index": m.index,
            "lock_index": 0,
            "session": None,
        }
        rows["kv"].append(tuple(row[c] for c in cols))
    state, counts = archive.encode_state((name, rows[name]) for name in m.tables)
    tables = {name: archive.TableInfo(t.columns, counts[name]) for name, t in m.tables.items()}
    manifest = archive.Manifest(
        store=m.store,
        schema_version=m.schema_version,
        index=m.index,
        created_at=m.created_at,
        trellis_version=m.trellis_version,
        tables=tables,
        sha256=archive.sha256(state),
        seal_check=m.seal_check,
    )
    return archive.write_archive(manifest, state)


@pytest.fixture(params=["sqlite", "postgresql"])
def server_setup(request, tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "trellis.json"
    key = base64.b64encode(os.urandom(32)).decode()
    config.write_text(json.dumps({"connect": {"ca_seal_key": key}}))
    args = [*server_args(data, workers=1, node="kill"), "-config", str(config)]
    pg = ""
    if request.param == "postgresql":
        pg = request.getfixturevalue("pg_url")
        args += ["-store", pg]
    return args, data, pg


def _keys(url: str) -> list[str]:
    r = httpx.get(url + "/v1/kv/?keys", timeout=30)
    return [] if r.status_code == 404 else r.json()


def test_sigkill_during_restore_leaves_the_old_or_the_new_state(server_setup):
    args, data, pg = server_setup
    server = TrellisProcess(args).start()
    try:
        for i in range(5):
            assert httpx.put(f"{server.url}/v1/kv/old/{i}", content=b"old", timeout=10).json()
        saved = httpx.get(server.url + "/v1/snapshot", timeout=60)
        assert saved.status_code == 200
        big = _big(saved.content)
        for i in range(5, 10):
            assert httpx.put(f"{server.url}/v1/kv/old/{i}", content=b"old", timeout=10).json()
        old = _keys(server.url)
        new = sorted({*(k for k in old if k < "old/5"), *(f"big/{i:06d}" for i in range(ROWS))})

        outcome: dict[str, object] = {}

        def send() -> None:
            try:
                outcome["status"] = httpx.put(
                    server.url + "/v1/snapshot", content=big, timeout=120
                ).status_code
            except httpx.HTTPError as e:
                outcome["error"] = e

        wal = data / "trellis.db-wal"
        wal_before = wal.stat().st_size if wal.exists() else 0
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        if pg:
            with psycopg.connect(pg, autocommit=True) as c:

                def inserting() -> bool:
                    row = c.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                        " current_database() AND query LIKE 'INSERT INTO \"kv\"%'"
                    ).fetchone()
                    return bool(row[0])

                wait_until(lambda: inserting() or not sender.is_alive(), timeout=60)
        else:
            # The restore's pages spill into the WAL long before it commits.
            wait_until(
                lambda: (
                    (wal.exists() and wal.stat().st_size > wal_before + 4_000_000)
                    or not sender.is_alive()
                ),
                timeout=60,
            )
        assert sender.is_alive(), f"the restore ended before the kill: {outcome}"
        server.kill()
        sender.join(30)
        assert "error" in outcome, outcome  # the kill cut the request off

        server = TrellisProcess(args).start()
        after = _keys(server.url)
        assert after in (old, new), (len(after), after[:3], after[-3:])
        # And the store still works: a restore now completes.
        r = httpx.put(server.url + "/v1/snapshot", content=big, timeout=120)
        assert r.status_code == 200, r.text
        assert _keys(server.url) == new
    finally:
        server.stop()
