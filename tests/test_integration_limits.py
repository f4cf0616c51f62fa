"""A real ``trellis server`` with two gunicorn workers (the default): the agent leaf endpoint
issues one leaf per service, not one per worker.

Which worker serves a connection is the kernel's choice; the tests find out from ``/proc`` and
keep each connection open, so it stays on that worker (``tests/test_integration_replicas.py``).
"""

from __future__ import annotations

import pytest

from tests.support import wait_until
from tests.test_integration_replicas import Conn, children, pinned_connections, start_server

pytestmark = pytest.mark.integration

LEAF = "/v1/agent/connect/ca/leaf/"


@pytest.fixture
def two_workers(tmp_path):
    """The server, its two workers' PIDs and three connections pinned to each."""
    server = start_server("-data-dir", str(tmp_path / "data"), "-workers", "2", "-node", "n1")
    pools: dict[int, list[Conn]] = {}
    try:

        def both() -> list[int] | None:
            w = children(server.pid)
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
