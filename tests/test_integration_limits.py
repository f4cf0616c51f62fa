"""A real ``trellis server`` with two gunicorn workers (the default): the agent leaf endpoint
issues one leaf per service, not one per worker, and ``CSRMaxPerSecond`` holds for the server
as a whole, not for each worker.

Which worker serves a connection is the kernel's choice; the tests find out from ``/proc`` and
keep each connection open, so it stays on that worker (``tests/test_integration_replicas.py``).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.ca_support import service_csr
from tests.support import child_pids, wait_until
from tests.test_integration_replicas import Conn, pinned_connections, start_server

pytestmark = pytest.mark.integration

LEAF = "/v1/agent/connect/ca/leaf/"


@pytest.fixture
def two_workers(tmp_path):
    """The server, its two workers' PIDs and three connections pinned to each."""
    server = start_server("-data-dir", str(tmp_path / "data"), "-workers", "2", "-node", "n1")
    pools: dict[int, list[Conn]] = {}
    try:

        def both() -> list[int] | None:
            w = child_pids(server.pid)
            return w if len(w) == 2 else None

        workers = wait_until(both)
        pools = pinned_connections(server.url, workers, 3)
        yield server, workers, pools
    finally:
        for cs in pools.values():
            for c in cs:
                c.close()
        server.stop()


def test_one_leaf_per_service_whichever_worker_answers(two_workers):
    server, workers, pools = two_workers
    got = {}
    for w in workers:
        status, headers, body = pools[w][0].json("GET", LEAF + "web")
        assert status == 200, body
        got[w] = (body["SerialNumber"], body["PrivateKeyPEM"], int(headers["X-Consul-Index"]))
    # One certificate, one key, one index: the worker that asked second read the first's.
    assert len(set(got.values())) == 1, got
    assert "Traceback" not in server.output()


def server_processes(conn: Conn) -> int | None:
    """How many server processes this connection's worker counts (None: it does not say)."""
    status, _, me = conn.json("GET", "/v1/agent/self")
    assert status == 200
    value = me["Stats"].get("cluster", {}).get("server_processes")
    return None if value is None else int(value)


def test_the_csr_rate_holds_for_the_server_not_per_worker(two_workers):
    server, workers, pools = two_workers
    rate = 2
    r = httpx.put(
        server.url + "/v1/connect/ca/configuration",
        json={"Provider": "consul", "Config": {"CSRMaxPerSecond": rate}},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    # Both workers know there are two of them (each beats every 2 s).
    wait_until(lambda: all(server_processes(pools[w][0]) in (2, None) for w in workers), 20)
    td = httpx.get(server.url + "/v1/connect/ca/roots").json()["TrustDomain"]
    per_worker = 4
    csrs = {w: [service_csr(td, "web") for _ in range(per_worker)] for w in workers}
    signed: dict[int, int] = {w: 0 for w in workers}
    refused: dict[int, int] = {w: 0 for w in workers}
    start = threading.Barrier(len(workers))

    def burst(w: int) -> None:
        conns = pools[w]
        start.wait()
        for i, csr in enumerate(csrs[w]):
            body = json.dumps({"CSR": csr}).encode()
            status, _, _ = conns[1 + i % 2].request("POST", "/v1/connect/ca/sign", body)
            assert status in (200, 429), status
            if status == 200:
                signed[w] += 1
            else:
                refused[w] += 1

    threads = [threading.Thread(target=burst, args=(w,)) for w in workers]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    total = sum(signed.values())
    # The whole server: at most `rate` at once plus `rate` per second since. (Each worker
    # used to take the whole rate: twice the burst and twice the rate.)
    allowed = int(rate + rate * elapsed)
    assert total <= allowed, (signed, refused, f"{elapsed:.2f}s")
    # And each worker has its share: neither signs nothing.
    assert all(n >= 1 for n in signed.values()), signed
    assert "Traceback" not in server.output()
