"""Every acknowledged transaction is whole after a SIGKILL of the server, and no other one is
half there.

A real ``trellis server`` (two gunicorn workers on SQLite; PostgreSQL with ``-store``) takes a
stream of transactions from several clients, each transaction writing three keys, moving a
``pending`` marker (a set and a delete) and registering a service; the whole server is killed
mid-stream, restarted on the same store, and each transaction is checked: acknowledged ones
entirely present, the one in flight at the kill entirely present or entirely absent, none
beyond it present.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support import wait_until
from tests.test_integration_durability import start_server, store_flags  # noqa: F401

pytestmark = pytest.mark.integration

WRITERS = 4
#: Acknowledged transactions to collect before the kill (spread over the writers).
BEFORE_KILL = 120
NODE = "txn-node"


def b64(v: bytes) -> str:
    return base64.b64encode(v).decode()


def ops(n: int, i: int) -> list[dict]:
    value = b64(f"{n}.{i}".encode())
    body = [
        {"KV": {"Verb": "set", "Key": f"t{n}/{i:05d}/{part}", "Value": value}} for part in "abc"
    ]
    body.append({"KV": {"Verb": "set", "Key": f"pending/{n}/{i:05d}", "Value": value}})
    if i:
        body.append({"KV": {"Verb": "delete", "Key": f"pending/{n}/{i - 1:05d}"}})
    body.append(
        {"Service": {"Verb": "set", "Node": NODE, "Service": {"ID": f"t{n}-{i}", "Service": "txn"}}}
    )
    return body


@dataclass
class Writer:
    n: int
    url: str
    stop: threading.Event
    acked: int = -1  # the last acknowledged transaction
    sent: int = -1  # the last one sent (acked, or in flight at the kill)
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            i = 0
            while not self.stop.is_set():
                self.sent = i
                try:
                    r = http.put("/v1/txn", json=ops(self.n, i))
                except httpx.HTTPError:
                    return  # the kill: this one is in flight
                if r.status_code != 200 or r.json()["Errors"] is not None:
                    self.errors.append(f"txn {self.n}.{i}: {r.status_code} {r.text}")
                    return
                self.acked = i
                i += 1


def test_acknowledged_transactions_are_whole_after_sigkill(store_flags):  # noqa: F811
    server = start_server(store_flags)
    try:
        url = server.url
        r = httpx.put(
            url + "/v1/txn",
            json=[{"Node": {"Verb": "set", "Node": {"Node": NODE, "Address": "10.0.0.9"}}}],
        )
        assert r.status_code == 200, r.text
        stop = threading.Event()
        writers = [Writer(n, url, stop) for n in range(WRITERS)]
        threads = [threading.Thread(target=w.run, daemon=True) for w in writers]
        for t in threads:
            t.start()
        wait_until(lambda: sum(w.acked + 1 for w in writers) >= BEFORE_KILL, timeout=60)
        assert all(t.is_alive() for t in threads), [w.errors for w in writers]
        server.kill()  # SIGKILL to master and workers, mid-stream
        stop.set()
        for t in threads:
            t.join(15)
            assert not t.is_alive()
    finally:
        server.stop()
    for w in writers:
        assert not w.errors, w.errors

    server = start_server(store_flags)
    try:
        r = httpx.get(server.url + "/v1/kv/?recurse", timeout=30)
        assert r.status_code == 200, r.text
        keys = {e["Key"]: base64.b64decode(e["Value"] or "") for e in r.json()}
        r = httpx.get(server.url + "/v1/catalog/service/txn", timeout=30)
        assert r.status_code == 200, r.text
        services = {s["ServiceID"] for s in r.json()}
    finally:
        server.stop()

    for w in writers:
        n = w.n
        for i in range(w.sent + 2):
            parts = {
                f"t{n}/{i:05d}/{p}": keys.get(f"t{n}/{i:05d}/{p}") == f"{n}.{i}".encode()
                for p in "abc"
            }
            svc = f"t{n}-{i}" in services
            whole = all(parts.values()) and svc
            nothing = not any(parts.values()) and not svc
            assert whole or nothing, (n, i, parts, svc)
            if i <= w.acked:
                assert whole, f"acknowledged transaction {n}.{i} lost: {parts}, service {svc}"
            elif i > w.sent:
                assert nothing, f"transaction {n}.{i} was never sent but is stored"
        # The pending marker moved with its transactions: exactly the last stored one's.
        last = w.sent if f"t{n}/{w.sent:05d}/a" in keys else w.acked
        pending = sorted(k for k in keys if k.startswith(f"pending/{n}/"))
        assert pending == [f"pending/{n}/{last:05d}"], (n, pending, last)
    total = sum(w.acked + 1 for w in writers)
    print(f"{total} acknowledged transactions before SIGKILL, each whole after restart")


def test_plain_writes_beside_failing_transactions_are_kept(store_flags):  # noqa: F811
    """Requests of one gevent worker interleave while a transaction waits on the database:
    a plain write served meanwhile must not join the transaction (and be rolled back with it
    after its 200)."""
    server = start_server(store_flags)
    try:
        url = server.url
        stop = threading.Event()
        acked: list[str] = []
        errors: list[str] = []
        failing = [
            {"KV": {"Verb": "set", "Key": f"doomed/{i}", "Value": "eA=="}} for i in range(40)
        ]
        failing.append({"KV": {"Verb": "check-not-exists", "Key": "guard"}})

        def doom() -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                while not stop.is_set():
                    r = http.put("/v1/txn", json=failing)
                    if r.status_code != 409:
                        errors.append(f"txn: {r.status_code} {r.text}")

        def plain(n: int) -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                for i in range(60):
                    r = http.put(f"/v1/kv/plain/{n}/{i}", content=b"v")
                    if r.status_code != 200 or r.json() is not True:
                        errors.append(f"put: {r.status_code} {r.text}")
                        return
                    acked.append(f"plain/{n}/{i}")

        assert httpx.put(url + "/v1/kv/guard", content=b"g").json() is True
        doomers = [threading.Thread(target=doom, daemon=True) for _ in range(3)]
        writers = [threading.Thread(target=plain, args=(n,), daemon=True) for n in range(3)]
        for t in doomers + writers:
            t.start()
        for t in writers:
            t.join(60)
            assert not t.is_alive()
        stop.set()
        for t in doomers:
            t.join(15)
            assert not t.is_alive()
        assert not errors, errors[:3]
        r = httpx.get(url + "/v1/kv/plain/?keys", timeout=30)
        stored = set(r.json()) if r.status_code == 200 else set()
        lost = sorted(set(acked) - stored)
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
        assert httpx.get(url + "/v1/kv/doomed/?keys").status_code == 404
    finally:
        server.stop()
