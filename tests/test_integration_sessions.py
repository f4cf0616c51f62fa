"""Sessions and locks across real ``trellis server`` processes.

* 20 clients compete for one lock through two replicas on one PostgreSQL database; every
  acquire and release is recorded in one history, which must never show two holders at once
  (and a counter that only holders increment, with a plain read-modify-write, must count
  every acquisition exactly once).
* Exactly one replica expires sessions; when it is killed (SIGKILL, master and worker), the
  other takes the role over and expires a TTL session in time.
* An acknowledged session create and lock acquire survive a SIGKILL of the server.

A holder's interval in the history runs from the moment its acquire answered ``true`` to the
moment it sent its release: inside the interval the store really held the lock for it, so two
overlapping recorded intervals would be a real violation.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import TrellisProcess, wait_until

pytestmark = pytest.mark.integration

CLIENTS = 20
#: Acquisitions each client makes before it stops (bounded by DEADLINE too).
ROUNDS = 3
DEADLINE = 90.0
KEY = "race/lock"
COUNTER = "race/counter"


def config(tmp_path: Path, **extra) -> str:
    """Servers sharing PostgreSQL must share a CA seal key (config file only, no flag)."""
    path = tmp_path / "shared.json"
    if not path.exists():
        key = base64.b64encode(os.urandom(32)).decode()
        path.write_text(json.dumps({"connect": {"ca_seal_key": key}, **extra}))
    return str(path)


def start_server(*args: str) -> TrellisProcess:
    p = TrellisProcess(
        ["server", "-http-port", "0", "-dns-port", "-1", "-log-level", "warning", *args]
    )
    try:
        return p.start()
    except BaseException:
        p.stop()
        raise


@pytest.fixture
def replicas(tmp_path, pg_url):
    cfg = config(tmp_path, session_ttl_min="1s")
    started: list[TrellisProcess] = []
    try:
        for name in ("replica-a", "replica-b"):
            started.append(
                start_server("-config", cfg, "-store", pg_url, "-workers", "1", "-node", name)
            )
        yield started
    finally:
        for p in started:
            p.stop()


def create_session(http: httpx.Client, **body) -> str:
    r = http.put("/v1/session/create", json=body)
    assert r.status_code == 200, r.text
    return r.json()["ID"]


class History:
    """Acquire and release events in one total order (appended under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, int]] = []

    def add(self, what: str, who: int) -> None:
        with self.lock:
            self.events.append((what, who))

    def violations(self) -> list[str]:
        holder: int | None = None
        out = []
        for i, (what, who) in enumerate(self.events):
            if what == "acquired":
                if holder is not None:
                    out.append(f"event {i}: {who} acquired while {holder} held the lock")
                holder = who
            elif what == "releasing":
                if holder != who:
                    out.append(f"event {i}: {who} released a lock held by {holder}")
                holder = None
        return out


def test_the_history_check_can_fail():
    """The checker the race test relies on sees two holders, and a release by a non-holder."""
    h = History()
    for what, who in [("acquired", 1), ("acquired", 2), ("releasing", 2), ("releasing", 1)]:
        h.add(what, who)
    assert len(h.violations()) == 2
    ok = History()
    for what, who in [("acquired", 1), ("releasing", 1), ("acquired", 2), ("releasing", 2)]:
        ok.add(what, who)
    assert ok.violations() == []


def test_twenty_clients_one_lock_two_replicas(replicas):
    a, b = replicas
    history = History()
    errors: list[str] = []
    acquired = [0] * CLIENTS
    with httpx.Client(base_url=a.url, timeout=10) as http:
        assert http.put(f"/v1/kv/{COUNTER}", content=b"0").json() is True
    deadline = time.monotonic() + DEADLINE

    def client(n: int) -> None:
        mine = a if n % 2 == 0 else b
        other = b if mine is a else a
        try:
            with (
                httpx.Client(base_url=mine.url, timeout=30) as http,
                httpx.Client(base_url=other.url, timeout=30) as peer,
            ):
                sid = create_session(http, Name=f"client-{n}", LockDelay="0s")
                index = 0
                while acquired[n] < ROUNDS and time.monotonic() < deadline:
                    r = http.put(f"/v1/kv/{KEY}?acquire={sid}", content=f"{n}".encode())
                    assert r.status_code == 200, r.text
                    if r.json() is not True:
                        # Held: wait for the key to change, as Consul's lock helper does.
                        w = http.get(f"/v1/kv/{KEY}", params={"index": index, "wait": "2s"})
                        index = int(w.headers.get("X-Consul-Index", "0"))
                        continue
                    history.add("acquired", n)
                    acquired[n] += 1
                    # The other replica sees this client as the holder.
                    seen = peer.get(f"/v1/kv/{KEY}").json()[0]["Session"]
                    if seen != sid:
                        errors.append(f"client {n}: the other replica sees holder {seen}")
                    # A read-modify-write only a holder may do: lost updates mean two holders.
                    count = int(peer.get(f"/v1/kv/{COUNTER}?raw").content)
                    assert http.put(f"/v1/kv/{COUNTER}", content=b"%d" % (count + 1)).json()
                    history.add("releasing", n)
                    r = http.put(f"/v1/kv/{KEY}?release={sid}", content=b"")
                    assert r.json() is True, r.text
                http.put(f"/v1/session/destroy/{sid}")
        except BaseException as e:  # reported by the test thread
            errors.append(f"client {n}: {e!r}")

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + 30)
    assert not any(t.is_alive() for t in threads), "a client is still running"
    assert not errors, errors
    assert history.violations() == []
    assert acquired == [ROUNDS] * CLIENTS, acquired
    with httpx.Client(base_url=b.url, timeout=10) as http:
        assert int(http.get(f"/v1/kv/{COUNTER}?raw").content) == CLIENTS * ROUNDS
        final = http.get(f"/v1/kv/{KEY}").json()[0]
    assert final["Session"] is None
    assert final["LockIndex"] == CLIENTS * ROUNDS


def reaper_flags(replicas) -> list[str]:
    flags = []
    for p in replicas:
        stats = httpx.get(p.url + "/v1/agent/self", timeout=5).json()["Stats"]
        flags.append(stats["sessions"]["reaper"])
    return flags


def test_the_reaper_role_passes_on_when_its_replica_is_killed(replicas):
    # Exactly one reaper, once the maintenance rounds have run.
    wait_until(lambda: reaper_flags(replicas).count("true") == 1, timeout=10)
    flags = reaper_flags(replicas)
    holder = replicas[flags.index("true")]
    survivor = replicas[flags.index("false")]
    holder.kill()  # SIGKILL, master and worker: its store connections just end
    wait_until(lambda: reaper_flags([survivor]) == ["true"], timeout=5)
    # And it does the work: a 1 s session, never renewed, is gone after 2 x TTL.
    with httpx.Client(base_url=survivor.url, timeout=10) as http:
        sid = create_session(http, TTL="1s", LockDelay="0s")
        assert http.put(f"/v1/kv/reaped?acquire={sid}", content=b"x").json() is True
        started = time.monotonic()
        wait_until(lambda: http.get(f"/v1/session/info/{sid}").json() == [], timeout=10)
        assert time.monotonic() - started >= 1.5
        assert http.get("/v1/kv/reaped").json()[0]["Session"] is None


@pytest.fixture(params=["sqlite", "postgresql"])
def store_flags(request, tmp_path) -> list[str]:
    if request.param == "sqlite":
        return ["-data-dir", str(tmp_path / "data")]
    return ["-config", config(tmp_path), "-store", request.getfixturevalue("pg_url")]


def test_acknowledged_session_and_lock_survive_sigkill(store_flags):
    server = start_server(*store_flags, "-workers", "1", "-node", "n1")
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            sid = create_session(http, Name="durable")
            assert http.put(f"/v1/kv/held?acquire={sid}", content=b"v").json() is True
        server.kill()
    finally:
        server.stop()
    again = start_server(*store_flags, "-workers", "1", "-node", "n1")
    try:
        with httpx.Client(base_url=again.url, timeout=10) as http:
            assert [s["ID"] for s in http.get(f"/v1/session/info/{sid}").json()] == [sid]
            e = http.get("/v1/kv/held").json()[0]
            assert (e["Session"], e["LockIndex"]) == (sid, 1)
    finally:
        again.stop()
