"""``trellis snapshot save|restore|inspect`` as real subprocesses, against real ``trellis
server`` subprocesses: one on SQLite, one on PostgreSQL, sharing a CA seal key (as a
deployment moving from one to the other must)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.support import TRELLIS, TrellisProcess, server_args
from trellis.api import snapshot as archive
from trellis.proxy.client import Client

pytestmark = pytest.mark.integration


def trellis(*argv: str, addr: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
    if addr:
        env["TRELLIS_HTTP_ADDR"] = addr
    return subprocess.run(
        [TRELLIS, *argv], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.fixture
def servers(tmp_path, pg_url):
    """A SQLite server and a PostgreSQL server with one CA seal key; ended by PID."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    made: list[TrellisProcess] = []
    try:
        for name, store in (("lite", ""), ("pg", pg_url)):
            data = tmp_path / name
            data.mkdir()
            config = data / "config.json"
            config.write_text(json.dumps({"connect": {"ca_seal_key": key}}))
            args = [*server_args(data, workers=1, node=name), "-config", str(config)]
            if store:
                args += ["-store", store]
            made.append(TrellisProcess(args).start())
        yield made
    finally:
        for p in made:
            p.stop()


def test_save_inspect_restore_from_sqlite_to_postgresql(servers, tmp_path):
    lite, pg = servers
    with Client(lite.url) as c:
        assert c.kv_put("moved/key", b"from sqlite")
        assert c.kv_put("moved/other", b"\x00\xff")
        index = c.request("GET", "/v1/kv/moved/key").index
    with Client(pg.url) as c:
        assert c.kv_put("pg/only", b"gone after the restore")

    file = tmp_path / "backup.snap"
    r = trellis("snapshot", "save", str(file), addr=lite.url)
    assert r.returncode == 0, r.stderr
    got = archive.read_archive(file.read_bytes())
    assert r.stdout == f"Saved and verified snapshot to index {got.manifest.index}\n"
    assert got.manifest.index >= index and got.manifest.store == "sqlite"

    r = trellis("snapshot", "inspect", str(file))  # no server needed
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["Index", str(got.manifest.index)]
    assert lines[1].split() == ["Store", "sqlite"]
    assert ["SHA256", got.manifest.sha256] == lines[7].split()
    assert ["kv", "2"] in [line.split() for line in lines]
    total = sum(t.rows for t in got.manifest.tables.values())
    assert lines[-1].split() == ["Total", str(total)]

    r = trellis("snapshot", "inspect", "-format=json", str(file))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["Index"], out["Verified"], out["Size"]) == (
        got.manifest.index,
        True,
        file.stat().st_size,
    )
    assert "SealCheck" not in out

    r = trellis("snapshot", "restore", str(file), addr=pg.url)
    assert (r.returncode, r.stdout, r.stderr) == (0, "Restored snapshot\n", "")
    with Client(pg.url) as c:
        assert c.kv_get("moved/key").value.value == b"from sqlite"
        assert c.kv_get("moved/other").value.value == b"\x00\xff"
        assert c.kv_get("pg/only").value is None


def test_a_damaged_file_is_refused_before_any_request(servers, tmp_path):
    lite, _ = servers
    file = tmp_path / "backup.snap"
    assert trellis("snapshot", "save", str(file), addr=lite.url).returncode == 0
    data = file.read_bytes()
    with Client(lite.url) as c:
        assert c.kv_put("after/save", b"kept")

    truncated = tmp_path / "truncated.snap"
    truncated.write_bytes(data[: len(data) // 2])
    r = trellis("snapshot", "inspect", str(truncated))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"Error! Snapshot file {truncated}: the snapshot is corrupt or")
    r = trellis("snapshot", "restore", str(truncated), addr=lite.url)
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error! Snapshot file {truncated} is not restorable:")

    # A damaged state under an intact manifest: inspect shows the manifest and says so.
    damaged = tmp_path / "damaged.snap"
    damaged.write_bytes(_with_state(data, lambda s: s.replace(b"serfHealth", b"serfHealtX")))
    r = trellis("snapshot", "inspect", str(damaged))
    assert r.returncode == 1
    assert "(DOES NOT MATCH: damaged)" in r.stdout
    assert (
        r.stderr
        == f"Error! Snapshot file {damaged} is damaged: its state does not match the checksum\n"
    )
    r = trellis("snapshot", "restore", str(damaged), addr=lite.url)
    assert r.returncode == 1 and "checksum does not match" in r.stderr

    # The server, sent the damaged file anyway, refuses it too.
    with Client(lite.url) as c:
        resp = c.request("PUT", "/v1/snapshot", content=damaged.read_bytes(), allow=(400,))
        assert resp.status == 400 and "checksum does not match" in resp.json()["error"]
        assert c.kv_get("after/save").value.value == b"kept"

    r = trellis("snapshot", "inspect", str(tmp_path / "missing.snap"))
    assert r.returncode == 1 and "Cannot read snapshot file" in r.stderr
    r = trellis("snapshot", "save", addr=lite.url)
    assert r.returncode == 1 and r.stderr.startswith("Error! Missing file argument")


def _with_state(data: bytes, change) -> bytes:
    import gzip
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members[archive.STATE] = change(members[archive.STATE])
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def test_restore_needs_acl_write(tmp_path):
    """With ACLs on, save and restore need an acl = "write" token (the -token flag)."""
    data = tmp_path / "acl"
    data.mkdir()
    config = data / "config.json"
    config.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    server = TrellisProcess([*server_args(data, workers=1, node="acl"), "-config", str(config)])
    server.start()
    try:
        with Client(server.url) as c:
            root = c.acl_bootstrap()["SecretID"]
        file = tmp_path / "acl.snap"
        r = trellis("snapshot", "save", str(file), addr=server.url)
        assert r.returncode == 1 and "Permission denied" in r.stderr and not file.exists()
        r = trellis("snapshot", "save", "-token", root, str(file), addr=server.url)
        assert r.returncode == 0, r.stderr
        r = trellis("snapshot", "restore", str(file), addr=server.url)
        assert r.returncode == 1 and "Permission denied" in r.stderr
        r = trellis("snapshot", "restore", "-token", root, str(file), addr=server.url)
        assert (r.returncode, r.stdout) == (0, "Restored snapshot\n"), r.stderr
    finally:
        server.stop()
    assert Path(file).exists()


def test_through_a_node_agent_an_archive_larger_than_its_body_limit(tmp_path):
    """``trellis dev``'s address is its node agent's, which forwards ``/v1/snapshot`` to the
    server: a restore larger than the agent's request body limit (4 MiB) goes through too."""
    dev = TrellisProcess(["dev", "-http-port", "0", "-dns-port", "-1"]).start()
    try:
        file = tmp_path / "dev.snap"
        assert trellis("snapshot", "save", str(file), addr=dev.url).returncode == 0
        got = archive.read_archive(file.read_bytes())
        m = got.manifest
        cols = m.tables["kv"].columns
        rows = {name: list(r) for name, r in got.rows.items()}
        for i in range(6000):  # random values: about 8 MiB even compressed
            row = {"key": f"big/{i:05d}", "value": os.urandom(1000), "flags": 0,
                   "create_index": m.index, "modify_index": m.index, "lock_index": 0,
                   "session": None}  # fmt: skip
            rows["kv"].append(tuple(row[c] for c in cols))
        state, counts = archive.encode_state((name, rows[name]) for name in m.tables)
        big = archive.Manifest(
            store=m.store,
            schema_version=m.schema_version,
            index=m.index,
            created_at=m.created_at,
            trellis_version=m.trellis_version,
            tables={n: archive.TableInfo(t.columns, counts[n]) for n, t in m.tables.items()},
            sha256=archive.sha256(state),
            seal_check=m.seal_check,
        )
        file.write_bytes(archive.write_archive(big, state))
        assert file.stat().st_size > 4 * 1024 * 1024
        r = trellis("snapshot", "restore", str(file), addr=dev.url)
        assert (r.returncode, r.stdout, r.stderr) == (0, "Restored snapshot\n", "")
        with Client(dev.url) as c:
            assert len(c.kv_get("big/", keys=True).value) == 6000
    finally:
        dev.stop()
