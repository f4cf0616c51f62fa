"""Files in the data dir are the server's user's alone (issue 9, item 9).

Real ``trellis server`` subprocesses on real data dirs. The SQLite database used to be created
0644 (SQLite's default, which it applies past the umask), and its -wal and -shm files with it:
in a data dir that already existed with mode 0755, any local user could read every K/V
value. Now every file is 0600 whatever the directory's mode and the umask, an old database
found with wider permissions is narrowed, and a data dir writable by group or others is
refused with a one-line message.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support import TRELLIS, TrellisProcess, server_args

pytestmark = pytest.mark.integration


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    """The umask the server starts with (it inherits it): 0 would let anything through."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(data_dir: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.iterdir() if p.is_file()}


def test_every_file_in_an_open_data_dir_is_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)  # as `mkdir` leaves it: other users may enter and list
    with _umask(0):
        server = TrellisProcess(server_args(data, workers=2, node="n1"))
        server.start()
    try:
        r = httpx.put(server.url + "/v1/kv/secret", content=b"do not read me", timeout=30)
        assert r.status_code == 200, r.text
        files = _modes(data)
        # While the server runs, SQLite's write-ahead log and shared memory exist too.
        assert {"trellis.db", "trellis.db-wal", "trellis.db-shm", "ca-seal.key"} <= set(files)
        assert files == dict.fromkeys(files, 0o600), {k: f"{v:04o}" for k, v in files.items()}
    finally:
        server.stop()
    assert stat.S_IMODE(data.stat().st_mode) == 0o755  # the directory is the operator's


def test_an_old_world_readable_database_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    old = sqlite3.connect(data / "trellis.db")  # as an older Trellis left it: 0644
    old.execute("PRAGMA journal_mode = WAL")
    old.close()
    (data / "trellis.db").chmod(0o644)
    server = TrellisProcess(server_args(data, workers=1, node="n1"))
    server.start()
    try:
        files = _modes(data)
        assert files == dict.fromkeys(files, 0o600), {k: f"{v:04o}" for k, v in files.items()}
        assert "was accessible to other users (mode 0644); it is now 0600" in server.output()
    finally:
        server.stop()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_a_data_dir_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(mode)
    proc = subprocess.Popen(
        [TRELLIS, *server_args(data, workers=1, node="n1")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        out, err = "", "the server did not refuse to start"
    finally:
        if proc.poll() is None:  # it started (the defect): end it and its workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"Error: data dir {data} is writable by"), lines
    assert f"chmod go-w {data}" in lines[0]
    assert list(data.iterdir()) == []  # nothing was created there
    assert "HTTP API" not in out
