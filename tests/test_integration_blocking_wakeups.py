"""Every blocking query sees every write at once, on every worker (no lost wake-up).

The symptom: ``trellis dev -workers 2`` and 50 sidecars following
``/v1/connect/intentions/match?by=destination&name=<svc>&index=N&wait=60s``. An intention
``fan-client => *`` deny is written and then deleted; now and then one sidecar kept the deny
for the whole ``wait`` (about a minute) while the other 49 saw the delete at once.

Here 50 followers do what a sidecar does, each on its own kept-alive connection, pinned half
to each worker: ask, take the answer, ask again at once with the answer's index. Each round
writes an intention that names every follower's service (destination ``*``), then deletes it,
alternating the worker that takes the write; after each write every follower must hold the new
state within ``WITHIN`` seconds. A follower whose re-poll was being read while the write
committed is where it went wrong: its answer carried the write's index but the state before
it, so its next query (at that index) found nothing new and waited out its ``wait``.
tests/test_api_blocking_snapshot.py forces that interleaving, at every point, for each
blocking read of the catalog, health, K/V and intentions.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support import TrellisProcess, wait_until, worker_pids
from tests.test_integration_replicas import Conn, pinned_connections

pytestmark = pytest.mark.integration

FOLLOWERS = 50
#: Write + delete each. Before the fix, 10 runs of 10 failed, at round 4 to 51 (most by 13).
ROUNDS = 100
WITHIN = 2.0  # seconds from a write's acknowledgement until every follower holds it
WAIT = "30s"  # the followers' ?wait=: far above WITHIN, so a lost wake-up cannot hide
MAX_SECONDS = 240.0  # the whole test, bounded


@pytest.fixture
def dev() -> Iterator[TrellisProcess]:
    p = TrellisProcess(
        ["dev", "-workers", "2", "-http-port", "0", "-dns-port", "-1", "-log-level", "warning"]
    )
    try:
        yield p.start()
    finally:
        p.stop()


class Follower:
    """One sidecar's blocking query loop on intentions/match, on a pinned connection."""

    def __init__(self, conn: Conn, name: str, stop: threading.Event) -> None:
        self.conn = conn
        self.name = name
        self.stop = stop
        self.index = 0
        self.denied: bool | None = None  # the state it holds; None before its first answer
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                path = (
                    f"/v1/connect/intentions/match?by=destination&name={self.name}"
                    f"&index={self.index}&wait={WAIT}"
                )
                status, headers, body = self.conn.json("GET", path)
                assert status == 200, (status, body)
                # Consul's rule for clients: an index that went backwards starts over.
                index = int(headers["X-Consul-Index"])
                self.index = index if index >= self.index else 0
                self.denied = any(i["Action"] == "deny" for i in body[self.name])
        except (OSError, http.client.HTTPException) as e:
            if not self.stop.is_set():
                self.error = e
        except BaseException as e:  # reported by the test, not lost in a thread
            self.error = e


def _put_deny(conn: Conn) -> None:
    body = json.dumps({"Action": "deny"}).encode()
    path = "/v1/connect/intentions/exact?source=fan-client&destination=*"
    status, _, data = conn.request("PUT", path, body)
    assert status == 200, data


def _delete(conn: Conn) -> None:
    path = "/v1/connect/intentions/exact?source=fan-client&destination=*"
    status, _, data = conn.request("DELETE", path)
    assert status == 200, data


def _index(conn: Conn) -> int:
    status, headers, _ = conn.request("GET", "/v1/connect/intentions")
    assert status == 200
    return int(headers["X-Consul-Index"])


def test_every_follower_sees_every_intention_write_at_once_on_both_workers(dev):
    started = time.monotonic()
    # The server's two workers and its own port: each connection is pinned to a worker, which
    # dev's node agent in front (on dev.url, a child of dev too) would hide.
    workers = wait_until(lambda: w if len(w := worker_pids(dev.pid)) == 2 else None)
    per_worker = FOLLOWERS // 2 + 1  # and one writer on each
    pools = pinned_connections(dev.server_url, workers, per_worker)
    writers = [pools[w][0] for w in workers]
    conns = [c for w in workers for c in pools[w][1:]]
    stop = threading.Event()
    followers = [Follower(c, f"fan-{i}", stop) for i, c in enumerate(conns)]
    try:
        for f in followers:
            f.thread.start()
        wait_until(lambda: all(f.denied is False for f in followers), timeout=20)
        for r in range(ROUNDS):
            assert time.monotonic() - started < MAX_SECONDS, f"out of time in round {r}"
            for want, write in ((True, _put_deny), (False, _delete)):
                write(writers[r % 2])
                acked = time.monotonic()

                def behind(want: bool = want) -> list[str]:
                    errors = [f"{f.name}: {f.error!r}" for f in followers if f.error]
                    assert not errors, errors
                    return [f.name for f in followers if f.denied is not want]

                try:
                    wait_until(lambda: not behind(), timeout=WITHIN, interval=0.005)
                except AssertionError:
                    raise AssertionError(
                        f"round {r}: {'deny' if want else 'delete'} not seen within {WITHIN}s"
                        f" by {behind()} (the others in {time.monotonic() - acked:.2f}s);"
                        f" they hold index {[f.index for f in followers if f.denied is not want]},"
                        f" the intentions are at {_index(writers[0])}"
                    ) from None
    finally:
        stop.set()
        for c in (*writers, *conns):
            if c.http.sock is not None:
                # Unblocks a follower waiting for its answer (close alone may not).
                c.http.sock.shutdown(socket.SHUT_RDWR)
            c.close()
        for f in followers:
            f.thread.join(5)
