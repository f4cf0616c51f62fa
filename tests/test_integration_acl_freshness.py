"""After an ACL or intention write is acknowledged, no request that starts later is decided by
the state before it, on any worker or replica (issue 9, item 1: a deleted token, or a policy cut
back, kept working on PostgreSQL for minutes).

Three deployments, each with other requests in flight while the writes happen:

* one ``trellis server`` with two gunicorn workers on one SQLite file;
* one ``trellis server`` with two workers on PostgreSQL;
* two ``trellis server`` replicas (one worker each) on one PostgreSQL database.

Every round writes through one worker or replica (taking turns), and as soon as the write is
acknowledged asks every worker and replica, on connections pinned to each: the old state must
be gone everywhere at once. Loader threads keep requests with the same token (or about the same
intention) in flight on every worker throughout, so that requests that missed a per-process
cache are reading the store while the write commits: the interleaving that left a stale entry
in the cache. Rounds are repeated (``ROUNDS``); before the fix these tests failed in most rounds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import child_pids, wait_until
from tests.test_integration_replicas import (
    Conn,
    pinned_connections,
    seal_config,
    start_server,
)

pytestmark = pytest.mark.integration

ROUNDS = 16
#: Connections per worker: one for the writes, one to check, the rest keep requests in flight.
LOADERS = 3
PER_WORKER = 2 + LOADERS
#: A loader stops after this many requests in one round, or this long (bounded load).
LOAD_MAX_REQUESTS = 2000
LOAD_MAX_SECONDS = 20.0

#: Policies on every token besides the one a round changes: a token with many policies takes
#: many store reads to resolve, which keeps the requests that missed the cache reading for a
#: while (each read yields to the other requests of the worker).
FILLER_POLICIES = 30
KV_WRITE = 'key_prefix "fresh/" { policy = "write" }'
KV_DENY = 'key_prefix "fresh/" { policy = "deny" }'


def call(
    c: Conn, method: str, path: str, *, token: str | None = None, body: object = None
) -> tuple[int, object]:
    """One request on a kept-alive (so pinned) connection, with a token and a JSON body."""
    headers = {"X-Consul-Token": token} if token else {}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    c.http.request(method, path, body=data, headers=headers)
    resp = c.http.getresponse()
    raw = resp.read()
    assert c.http.sock is not None, "the server closed a kept-alive connection"
    assert c.http.sock.getsockname()[1] == c.local_port, "no longer the same connection"
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, raw


class Side:
    """The connections pinned to one worker (or replica)."""

    def __init__(self, name: str, conns: list[Conn]) -> None:
        self.name = name
        self.writer, self.checker, *self.loaders = conns

    def close(self) -> None:
        for c in (self.writer, self.checker, *self.loaders):
            c.close()


def _config(tmp_path: Path) -> str:
    """ACLs on, default deny, and the CA seal key servers on one PostgreSQL must share."""
    path = seal_config(tmp_path)
    doc = json.loads(path.read_text())
    doc["acl"] = {"enabled": True, "default_policy": "deny"}
    path.write_text(json.dumps(doc))
    return str(path)


def _connections(url: str, n: int) -> list[Conn]:
    out = []
    for _ in range(n):
        c = Conn(url)
        assert c.request("GET", "/v1/status/leader")[0] == 200
        out.append(c)
    return out


def _workers_sides(url: str, pid: int) -> list[Side]:
    workers = wait_until(lambda: w if len(w := child_pids(pid)) == 2 else None)
    pools = pinned_connections(url, workers, PER_WORKER)
    return [Side(f"worker-{i}", pools[w]) for i, w in enumerate(workers)]


@pytest.fixture(params=["sqlite-2-workers", "postgresql-2-workers", "postgresql-2-replicas"])
def sides(request, tmp_path) -> Iterator[list[Side]]:
    config = _config(tmp_path)
    servers = []
    made: list[Side] = []
    try:
        if request.param == "sqlite-2-workers":
            s = start_server("-config", config, "-data-dir", str(tmp_path / "data"))
            servers.append(s)
            made = _workers_sides(s.url, s.pid)
        else:
            pg_url = request.getfixturevalue("pg_url")
            if request.param == "postgresql-2-workers":
                s = start_server("-config", config, "-store", pg_url, "-workers", "2")
                servers.append(s)
                made = _workers_sides(s.url, s.pid)
            else:
                for name in ("replica-a", "replica-b"):
                    servers.append(
                        start_server(
                            *("-config", config, "-store", pg_url),
                            *("-workers", "1", "-node", name),
                        )
                    )
                made = [Side(p.args[-1], _connections(p.url, PER_WORKER)) for p in servers]
        yield made
    finally:
        for side in made:
            side.close()
        for p in servers:
            p.stop()


def ok(result: tuple[int, object]) -> object:
    status, body = result
    assert status == 200, (status, body)
    return body


class Load:
    """Loader threads, each on its own pinned connection, sending one request in a loop."""

    def __init__(self, conns: list[Conn], path: str, token: str) -> None:
        self.stop = threading.Event()
        self.sent = 0
        self.errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(c, path, token), daemon=True) for c in conns
        ]

    def _run(self, c: Conn, path: str, token: str) -> None:
        deadline = time.monotonic() + LOAD_MAX_SECONDS
        try:
            for _ in range(LOAD_MAX_REQUESTS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                call(c, "GET", path, token=token)
                self.sent += 1
        except BaseException as e:  # reported by the test, not lost in a thread
            self.errors.append(e)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        # In flight on every loader before the round's writes start.
        wait_until(lambda: self.sent >= 2 * len(self._threads) or self.errors, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(LOAD_MAX_SECONDS + 5)
            assert not t.is_alive()
        assert not self.errors, self.errors


def _bootstrap(sides: list[Side]) -> str:
    body = ok(call(sides[0].writer, "PUT", "/v1/acl/bootstrap"))
    assert isinstance(body, dict)
    return body["SecretID"]


def test_a_deleted_token_or_a_policy_cut_back_stops_working_everywhere_at_once(sides):
    root = _bootstrap(sides)
    loaders = [c for s in sides for c in s.loaders]
    stale: list[str] = []
    ok(call(sides[0].writer, "PUT", "/v1/kv/fresh/k", token=root, body=b"v"))
    filler = []
    filler_rules = [f'key "filler/{i}" {{ policy = "read" }}' for i in range(FILLER_POLICIES)]
    for i, rules in enumerate(filler_rules):
        body = {"Name": f"filler-{i}", "Rules": rules}
        p = ok(call(sides[0].writer, "PUT", "/v1/acl/policy", token=root, body=body))
        assert isinstance(p, dict)
        filler.append({"ID": p["ID"]})
    for r in range(ROUNDS):
        via = sides[r % len(sides)].writer
        policy = ok(
            call(
                via,
                "PUT",
                "/v1/acl/policy",
                token=root,
                body={"Name": f"kv-{r}", "Rules": KV_WRITE},
            )
        )
        assert isinstance(policy, dict)
        refs = [{"ID": policy["ID"]}, *filler]
        token = ok(call(via, "PUT", "/v1/acl/token", token=root, body={"Policies": refs}))
        assert isinstance(token, dict)
        secret, accessor = token["SecretID"], token["AccessorID"]
        for s in sides:
            # Each worker knows the token (and has it cached) before the writes.
            ok(call(s.checker, "GET", "/v1/kv/fresh/k", token=secret))
        with Load(loaders, "/v1/kv/fresh/k", secret):
            # An ACL write (a cheap one: a filler policy's description) that empties every
            # cache, so that requests in flight miss it and read the token, policy by policy
            # before the fix, while the next write commits.
            body = {"Name": "filler-0", "Rules": filler_rules[0], "Description": f"round {r}"}
            ok(call(via, "PUT", f"/v1/acl/policy/{filler[0]['ID']}", token=root, body=body))
            if r % 2 == 0:
                what = "deleted token"
                ok(call(via, "DELETE", f"/v1/acl/token/{accessor}", token=root))
            else:
                what = "policy cut back to deny"
                ok(
                    call(
                        via,
                        "PUT",
                        f"/v1/acl/policy/{policy['ID']}",
                        token=root,
                        body={"Name": f"kv-{r}", "Rules": KV_DENY},
                    )
                )
            # Acknowledged: from now on, every worker refuses, at once and for good.
            for _ in range(3):
                for s in sides:
                    status, _ = call(s.checker, "GET", "/v1/kv/fresh/k", token=secret)
                    if status != 403:
                        stale.append(f"round {r}, {what}: {s.name} answered {status}")
        # Once the load has drained (no request left in flight), still refused.
        for s in sides:
            status, _ = call(s.checker, "GET", "/v1/kv/fresh/k", token=secret)
            if status != 403:
                stale.append(f"round {r}, {what}, after the load: {s.name} answered {status}")
    assert not stale, f"{len(stale)} stale answers:\n" + "\n".join(stale)


def test_an_intention_flipped_to_deny_is_denied_everywhere_at_once(sides):
    root = _bootstrap(sides)
    loaders = [c for s in sides for c in s.loaders]
    check = "/v1/connect/intentions/check?source=web&destination=db"
    roots = ok(call(sides[0].checker, "GET", "/v1/connect/ca/roots", token=root))
    assert isinstance(roots, dict)
    web = f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/web"
    stale: list[str] = []
    for r in range(ROUNDS):
        via = sides[r % len(sides)].writer
        put = "/v1/connect/intentions/exact?source=web&destination=db"
        ok(call(via, "PUT", put, token=root, body={"Action": "allow"}))
        for s in sides:
            # Each worker decides with the allow intention (and caches it) first. The allow
            # is a write too: a worker that still says no breaks the same rule.
            body = ok(call(s.checker, "GET", check, token=root))
            if body != {"Allowed": True}:
                stale.append(f"round {r}: {s.name} answered {body} after the allow")
                wait_until(lambda s=s: ok(call(s.checker, "GET", check, token=root))["Allowed"])
        with Load(loaders, check, root):
            # An intention write that empties every cache, so that requests in flight rebuild
            # it while the flip commits.
            ok(call(via, "PUT", put, token=root, body={"Action": "allow", "Description": str(r)}))
            ok(call(via, "PUT", put, token=root, body={"Action": "deny"}))
            for _ in range(3):
                for s in sides:
                    body = ok(call(s.checker, "GET", check, token=root))
                    if body != {"Allowed": False}:
                        stale.append(f"round {r}: {s.name} answered {body}")
                    decision = ok(
                        call(
                            s.checker,
                            "POST",
                            "/v1/agent/connect/authorize",
                            token=root,
                            body={"Target": "db", "ClientCertURI": web},
                        )
                    )
                    assert isinstance(decision, dict)
                    if decision["Authorized"] is not False:
                        stale.append(f"round {r}: {s.name} authorized: {decision}")
    assert not stale, f"{len(stale)} stale answers:\n" + "\n".join(stale)
