"""Check-then-write races of registrations (issue 8, item 4), against a real ``trellis server``
with two workers, on SQLite and on PostgreSQL.

* A ``connect.sidecar_service`` registration without a port gets the lowest free port of
  21000-21255 on the node. The free ports used to be read in one transaction and the sidecar
  written in another, so registrations running together (in one worker, or in two) got the
  same port. They are now chosen inside the write's transaction.
* The ACL check that guards overwriting another service's instance (or check) by reusing its
  ID read what it would overwrite before the write's transaction; a registration landing in
  between was overwritten by a token without write on it. The check now runs inside the write.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import TrellisProcess

pytestmark = pytest.mark.integration

REGISTRATIONS = 50
NODE = "race-node"


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path: Path) -> Iterator[TrellisProcess]:
    """``trellis server`` with two workers on a fresh store of each kind."""
    args = ["server", "-http-port", "0", "-dns-port", "-1", "-log-level", "warning"]
    args += ["-workers", "2", "-node", NODE]
    if request.param == "sqlite":
        args += ["-data-dir", str(tmp_path / "data")]
    else:
        config = tmp_path / "seal.json"
        key = base64.b64encode(os.urandom(32)).decode()
        config.write_text(json.dumps({"connect": {"ca_seal_key": key}}))
        args += ["-store", request.getfixturevalue("pg_url"), "-config", str(config)]
    p = TrellisProcess(args)
    try:
        p.start()
        yield p
    finally:
        p.stop()


def _at_once(n: int, call: Callable[[int], Any]) -> list[Any]:
    """Run ``call(0..n-1)`` in n threads released together; their results, in order."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = call(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


def test_concurrent_sidecar_registrations_get_distinct_ports(server: TrellisProcess) -> None:
    def register(i: int) -> int:
        # A connection of its own each: the kernel spreads them over both workers.
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"Name": f"svc{i}", "Port": 9000 + i, "Connect": {"SidecarService": {}}}
            return c.put("/v1/agent/service/register", json=body).status_code

    assert _at_once(REGISTRATIONS, register) == [200] * REGISTRATIONS
    services = httpx.get(server.url + "/v1/agent/services", timeout=30).json()
    ports = sorted(s["Port"] for s in services.values() if s.get("Kind") == "connect-proxy")
    assert len(ports) == REGISTRATIONS
    assert len(set(ports)) == REGISTRATIONS, f"sidecar ports given twice: {ports}"
    assert ports == list(range(21000, 21000 + REGISTRATIONS))


OVERWRITE_ROUNDS = 40


@pytest.fixture(params=["sqlite", "postgresql"])
def acl_server(request, tmp_path: Path) -> Iterator[TrellisProcess]:
    """``trellis server`` with two workers and ACLs on (default deny)."""
    conf: dict[str, Any] = {"acl": {"enabled": True, "default_policy": "deny"}}
    args = ["server", "-http-port", "0", "-dns-port", "-1", "-log-level", "warning"]
    args += ["-workers", "2", "-node", NODE]
    if request.param == "sqlite":
        args += ["-data-dir", str(tmp_path / "data")]
    else:
        conf["connect"] = {"ca_seal_key": base64.b64encode(os.urandom(32)).decode()}
        args += ["-store", request.getfixturevalue("pg_url")]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(conf))
    p = TrellisProcess([*args, "-config", str(config)])
    try:
        p.start()
        yield p
    finally:
        p.stop()


def test_the_overwrite_check_cannot_be_raced(acl_server: TrellisProcess) -> None:
    """A token with write on ``web`` only and a management token register the same instance
    ID at once, as ``web`` and as ``db``. Whatever the order, ``db``'s registration is never
    overwritten by the ``web`` token: either ``web`` came first (and ``db`` replaced it, as
    management may), or the ``web`` token is refused. So the instance ends as ``db``."""
    url = acl_server.url
    mgmt = {"X-Consul-Token": httpx.put(url + "/v1/acl/bootstrap").json()["SecretID"]}
    rules = 'service "web" { policy = "write" }'
    r = httpx.put(url + "/v1/acl/policy", json={"Name": "web", "Rules": rules}, headers=mgmt)
    assert r.status_code == 200, r.text
    r = httpx.put(url + "/v1/acl/token", json={"Policies": [{"Name": "web"}]}, headers=mgmt)
    web = {"X-Consul-Token": r.json()["SecretID"]}
    outcomes: list[tuple[int, int]] = []
    for round_ in range(OVERWRITE_ROUNDS):
        sid = f"x{round_}"

        def register(i: int, sid: str = sid) -> int:
            name, headers = (("web", web), ("db", mgmt))[i]
            with httpx.Client(base_url=url, timeout=60, headers=headers) as c:
                body = {"ID": sid, "Name": name, "Port": 80}
                return c.put("/v1/agent/service/register", json=body).status_code

        statuses = _at_once(2, register)
        outcomes.append((statuses[0], statuses[1]))
        assert statuses[1] == 200 and statuses[0] in (200, 403), statuses
        final = httpx.get(f"{url}/v1/agent/service/{sid}", headers=mgmt, timeout=30).json()
        assert final["Service"] == "db", (
            f"round {round_}: the web token overwrote db's instance ({statuses})"
        )
    # Both orders happened at least once, or the race was not exercised.
    assert {a for a, _ in outcomes} == {200, 403}, outcomes
