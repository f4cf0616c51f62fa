"""The agent's shared blocking reads (trellis.proxy.agent.shared.SharedReads).

A small fake server is injected as ``fetch``: it blocks a read with ``?index=`` as a Trellis
server does (until its index moves past the client's, or the wait ends), filters what it
answers by token, counts the reads it receives and those parked now, and can be taken down
and brought back (with a lower index, as a server restarted on an empty store). Everything
runs on trio's MockClock (``autojump_threshold=0``): minutes of waits take milliseconds.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import trio
from trio.testing import MockClock

from tests.http_stub import Reply, Seen
from trellis.api.errors import BadRequest
from trellis.proxy.agent.httpd import Request, Response, parse_target
from trellis.proxy.agent.localapi import LocalAPI, server_fetch
from trellis.proxy.agent.shared import Answer, SharedReads, Unreachable, key_of
from trellis.proxy.agent.upstream import Servers

TARGET = "/v1/health/connect/web?passing=1"
KEY = key_of("/v1/health/connect/web", {"passing": ["1"]}, "t1")
TOKEN = ((b"x-consul-token", b"t1"),)


class FakeServer:
    def __init__(self) -> None:
        self.index = 10
        self.value = "v10"
        self.up = True
        self.reads = 0
        self.parked = 0
        self.tokens: list[str] = []
        self.refuse: set[str] = set()
        self._changed = trio.Event()

    def set(self, index: int, value: str) -> None:
        self.index, self.value = index, value
        self._changed.set()
        self._changed = trio.Event()

    def go_down(self) -> None:
        self.up = False
        self._changed.set()  # a parked read's connection breaks
        self._changed = trio.Event()

    async def fetch(self, target: str, headers: tuple, timeout: float) -> Answer:
        self.reads += 1
        token = dict(headers).get(b"x-consul-token", b"").decode()
        self.tokens.append(token)
        if not self.up:
            raise Unreachable("connection refused")
        if token in self.refuse:
            return Answer(403, (), b'{"error":"Permission denied"}')
        q = parse_qs(urlsplit(target).query)
        if "index" in q:
            held = int(q["index"][0])
            wait = float(q["wait"][0].rstrip("s"))
            self.parked += 1
            try:
                with trio.move_on_after(wait):
                    while self.index <= held and self.up:
                        await self._changed.wait()
            finally:
                self.parked -= 1
            if not self.up:
                raise Unreachable("connection reset")
        body = json.dumps({"value": self.value, "token": token}).encode()
        return Answer(
            200,
            ((b"content-type", b"application/json"), (b"x-consul-index", str(self.index).encode())),
            body,
        )


def run(fn) -> None:
    trio.run(fn, clock=MockClock(autojump_threshold=0))


async def _settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def test_identical_blocking_reads_share_one_parked_query_and_all_see_the_change():
    async def main() -> None:
        srv = FakeServer()
        shared = SharedReads(srv.fetch)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            first = await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=300)
            assert first.index == 10
            got: list[Answer] = []

            async def client() -> None:
                got.append(await shared.read(KEY, TARGET, TOKEN, min_index=10, wait=300))

            for _ in range(10):
                n.start_soon(client)
            await _settle()
            assert srv.parked == 1 and not got
            reads = srv.reads
            srv.set(11, "v11")
            await _settle()
            assert len(got) == 10
            assert {a.index for a in got} == {11}
            assert all(json.loads(a.body)["value"] == "v11" for a in got)
            # The change cost one answer and the watch's next parked read, not ten.
            assert srv.reads == reads + 1 and srv.parked == 1
            n.cancel_scope.cancel()

    run(main)


def test_blocking_semantics_per_client_older_index_at_once_current_index_until_its_wait():
    async def main() -> None:
        srv = FakeServer()
        shared = SharedReads(srv.fetch)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=300)
            t0 = trio.current_time()
            old = await shared.read(KEY, TARGET, TOKEN, min_index=3, wait=300)
            assert old.index == 10 and trio.current_time() == t0
            same = await shared.read(KEY, TARGET, TOKEN, min_index=10, wait=7)
            assert same.index == 10
            assert trio.current_time() - t0 == 7  # its own wait, not the watch's
            n.cancel_scope.cancel()

    run(main)


def test_reads_with_different_tokens_do_not_share():
    async def main() -> None:
        srv = FakeServer()
        shared = SharedReads(srv.fetch)
        other = key_of("/v1/health/connect/web", {"passing": ["1"]}, "t2")
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            a = await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=1)
            b = await shared.read(
                other, TARGET, ((b"x-consul-token", b"t2"),), min_index=None, wait=1
            )
            assert json.loads(a.body)["token"] == "t1"
            assert json.loads(b.body)["token"] == "t2"
            assert shared.watching() == 2
            n.cancel_scope.cancel()

    run(main)


def test_news_for_a_client_that_did_not_wait_for_it_is_the_servers_answer_for_its_token():
    """A token revoked while the data did not change: the watch still holds its last answer,
    but a client asking with an older index (news for it) gets the server's 403, read for its
    token then, not the held answer. The roots (verify=False) are answered from the watch."""

    async def main() -> None:
        srv = FakeServer()
        shared = SharedReads(srv.fetch)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=1)
            await _settle()
            reads = srv.reads
            await trio.sleep(1)
            a = await shared.read(KEY, TARGET, TOKEN, min_index=3, wait=300)
            assert (a.status, a.index, srv.reads) == (200, 10, reads + 1)
            srv.refuse.add("t1")
            await trio.sleep(1)
            a = await shared.read(KEY, TARGET, TOKEN, min_index=3, wait=300)
            assert a.status == 403
            roots_key = ("/v1/connect/ca/roots", (), "")
            await shared.read(roots_key, "/r", (), min_index=None, wait=1, verify=False)
            await _settle()
            reads = srv.reads
            await trio.sleep(1)
            r = await shared.read(roots_key, "/r", (), min_index=3, wait=1, verify=False)
            assert r.index == 10 and srv.reads == reads
            n.cancel_scope.cancel()

    run(main)


def test_the_key_ignores_index_and_wait_and_keeps_the_rest_of_the_query():
    q = {"passing": ["1"], "index": ["5"], "wait": ["30s"]}
    assert key_of("/p", q, "t") == key_of("/p", {"passing": ["1"]}, "t")
    assert key_of("/p", {"passing": ["1"]}, "t") != key_of("/p", {"near": ["x"]}, "t")
    assert key_of("/p", {}, "t") != key_of("/p", {}, "u")


def test_an_idle_watch_ends_and_its_parked_query_with_it():
    async def main() -> None:
        srv = FakeServer()
        shared = SharedReads(srv.fetch, idle=60)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=1)
            await _settle()
            assert srv.parked == 1
            await trio.sleep(30)
            assert shared.watching() == 1  # not idle long enough yet
            await trio.sleep(60)
            await _settle()
            assert shared.watching() == 0 and srv.parked == 0
            n.cancel_scope.cancel()

    run(main)


def test_fail_static_the_held_answer_is_served_while_no_server_answers_then_resyncs():
    async def main() -> None:
        srv = FakeServer()
        shared = SharedReads(srv.fetch)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=1)
            await _settle()
            srv.go_down()
            await trio.sleep(5)
            # An older index: the held answer at once, marked as not from a server now.
            t0 = trio.current_time()
            a = await shared.read(KEY, TARGET, TOKEN, min_index=1, wait=300)
            assert trio.current_time() == t0
            assert a.status == 200 and a.index == 10
            headers = dict(a.headers)
            assert headers[b"x-consul-knownleader"] == b"false"
            assert int(headers[b"x-consul-lastcontact"]) >= 5000
            # The held index: blocks until its wait, then the held answer (no spinning).
            a = await shared.read(KEY, TARGET, TOKEN, min_index=10, wait=20)
            assert a.index == 10 and trio.current_time() - t0 == 20
            # A non-blocking read that could not be forwarded gets the held answer too.
            held = shared.held(KEY)
            assert held is not None and held.index == 10
            # The server comes back restarted: a lower index. The watch reads without an
            # index, so a client waiting on the old one gets the new state, and the marks go.
            got: list[Answer] = []

            async def waiter() -> None:
                got.append(await shared.read(KEY, TARGET, TOKEN, min_index=10, wait=300))

            n.start_soon(waiter)
            await _settle()
            srv.up = True
            srv.set(4, "after restart")
            with trio.fail_after(30):
                while not got:
                    await trio.sleep(0.1)
            assert got[0].index == 4
            assert json.loads(got[0].body)["value"] == "after restart"
            assert b"x-consul-knownleader" not in dict(got[0].headers)
            n.cancel_scope.cancel()

    run(main)


def test_a_first_read_no_server_answers_is_the_clients_failure_and_holds_nothing():
    async def main() -> None:
        srv = FakeServer()
        srv.up = False
        shared = SharedReads(srv.fetch)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            try:
                await shared.read(KEY, TARGET, TOKEN, min_index=5, wait=300)
                raise AssertionError("no Unreachable")
            except Unreachable:
                pass
            assert shared.watching() == 0 and shared.held(KEY) is None
            n.cancel_scope.cancel()

    run(main)


def test_a_refusal_ends_the_watch_and_reaches_every_waiting_client():
    async def main() -> None:
        srv = FakeServer()
        shared = SharedReads(srv.fetch)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=1)
            got: list[Answer] = []

            async def client() -> None:
                got.append(await shared.read(KEY, TARGET, TOKEN, min_index=10, wait=300))

            for _ in range(3):
                n.start_soon(client)
            await _settle()
            srv.refuse.add("t1")  # the token is revoked: the next read of the watch is a 403
            srv.set(11, "v11")
            await _settle()
            assert [a.status for a in got] == [403, 403, 403]
            assert shared.watching() == 0 and shared.held(KEY) is None
            n.cancel_scope.cancel()

    run(main)


def test_a_missing_key_is_held_and_blocked_on_until_it_is_written():
    """A K/V read of a key not written yet is a 404 with an index, on which Consul clients
    block until the key appears: the watch holds it instead of ending (which would make every
    client spin on 404s)."""

    async def main() -> None:
        srv = FakeServer()

        async def fetch(target: str, headers: tuple, timeout: float) -> Answer:
            a = await srv.fetch(target, headers, timeout)
            if srv.value == "absent":
                return Answer(404, a.headers, b"")
            return a

        srv.set(10, "absent")
        shared = SharedReads(fetch)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            first = await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=1)
            assert (first.status, first.index) == (404, 10)
            got: list[Answer] = []

            async def client() -> None:
                got.append(await shared.read(KEY, TARGET, TOKEN, min_index=10, wait=300))

            n.start_soon(client)
            await _settle()
            assert not got and shared.watching() == 1 and srv.parked == 1
            srv.set(11, "written")
            await _settle()
            assert (got[0].status, got[0].index) == (200, 11)
            n.cancel_scope.cancel()

    run(main)


def test_a_blocking_read_that_does_not_block_is_not_sent_again_at_once():
    """A server that answers a blocking read at once with the same index (draining, or
    holding its limit of one client's parked queries): the watch backs off instead of
    spinning on it."""

    async def main() -> None:
        srv = FakeServer()

        async def at_once(target: str, headers: tuple, timeout: float) -> Answer:
            srv.reads += 1
            if srv.reads > 1000:
                raise AssertionError("the watch spins on the server")
            await trio.sleep(0)
            return Answer(200, ((b"x-consul-index", b"10"),), b"same")

        shared = SharedReads(at_once, backoff=(0.2, 10.0))
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=1)

            async def client() -> None:
                await shared.read(KEY, TARGET, TOKEN, min_index=10, wait=60)

            n.start_soon(client)
            await trio.sleep(60)
            # Capped at one read per 5-15 s once backed off: not thousands.
            assert srv.reads < 20, srv.reads
            n.cancel_scope.cancel()

    run(main)


def test_a_bug_in_a_watch_is_its_clients_503_and_the_others_go_on():
    async def main() -> None:
        srv = FakeServer()

        async def buggy(target: str, headers: tuple, timeout: float) -> Answer:
            if "bad" in target:
                raise ValueError("a bug")
            return await srv.fetch(target, headers, timeout)

        shared = SharedReads(buggy)
        bad = key_of("/v1/health/connect/bad", {}, "t1")
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            try:
                await shared.read(bad, "/v1/health/connect/bad", TOKEN, min_index=None, wait=1)
                raise AssertionError("no Unreachable")
            except Unreachable as e:
                assert "ValueError" in str(e)
            ok = await shared.read(KEY, TARGET, TOKEN, min_index=None, wait=1)
            assert ok.status == 200
            n.cancel_scope.cancel()

    run(main)


# -- the local API's routes to the shared reads, against a scripted server -------------------


def _request(path: str, query: str = "", token: str = "") -> Request:
    target = path + ("?" + query if query else "")
    p, q = parse_target(target)
    headers = [(b"x-consul-token", token.encode())] if token else []
    return Request("GET", target, p, q, headers)


def test_the_local_api_answers_both_roots_paths_from_one_tokenless_watch(stub):
    roots = {"ActiveRootID": "r1", "TrustDomain": "td", "Roots": []}

    def route(req: Seen) -> Reply:
        delay = 2.0 if "index" in req.query else 0.0  # a blocking read parks a while
        r = stub.json(200, roots, **{"X-Consul-Index": "7", "X-Consul-KnownLeader": "true"})
        r.delay = delay
        return r

    stub.route = route

    async def main() -> None:
        agent = SimpleNamespace(servers=Servers([stub.url]), opts=SimpleNamespace(dev=False))
        shared = SharedReads(server_fetch(agent))
        api = LocalAPI(agent, on_leave=lambda: None, shared=shared)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            a = await api.handle(
                _request("/v1/agent/connect/ca/roots", "index=3&wait=1s", token="secret")
            )
            b = await api.handle(_request("/v1/connect/ca/roots", "index=3&wait=1s"))
            c = await api.handle(_request("/v1/connect/ca/roots", "pem=true"))
            n.cancel_scope.cancel()
        assert a.status == b.status == 200
        assert json.loads(a.body) == json.loads(b.body) == roots
        assert (b"x-consul-index", b"7") in a.headers
        assert c.stream is not None and c.close is not None  # ?pem is forwarded as it comes
        await c.close()
        await agent.servers.aclose()  # the kept connections

    trio.run(main)
    reads = [s for s in stub.seen if s.path == "/v1/connect/ca/roots" and "pem" not in s.query]
    assert reads, "no read of the roots"
    assert all("x-consul-token" not in s.headers for s in reads)
    assert not [s for s in stub.seen if s.path == "/v1/agent/connect/ca/roots"]
    # One first read, then the watch's blocking read: not one per client.
    assert [("index" in s.query) for s in reads] == [False, True][: len(reads)]


def test_a_non_blocking_roots_read_is_the_servers_current_answer(stub):
    # A rotation, then a plain read of the roots (trellis ca rotate; trellis ca roots): the
    # read must show the new root even though the node's watch has not seen it yet.
    current = {"ActiveRootID": "r1", "TrustDomain": "td", "Roots": []}

    def route(req: Seen) -> Reply:
        if "index" in req.query:  # the watch: parked, with what it first saw
            r = stub.json(200, {**current, "ActiveRootID": "r1"}, **{"X-Consul-Index": "7"})
            r.delay = 2.0
            return r
        return stub.json(200, current, **{"X-Consul-Index": "8"})

    stub.route = route

    async def main() -> None:
        agent = SimpleNamespace(servers=Servers([stub.url]), opts=SimpleNamespace(dev=False))
        shared = SharedReads(server_fetch(agent))
        api = LocalAPI(agent, on_leave=lambda: None, shared=shared)
        async with trio.open_nursery() as n:
            await n.start(shared.run)
            await api.handle(_request("/v1/connect/ca/roots", "index=1&wait=1s"))
            current["ActiveRootID"] = "r2"  # rotated on the server
            got = await api.handle(_request("/v1/connect/ca/roots"))
            n.cancel_scope.cancel()
        assert got.status == 200
        body = got.body if got.stream is None else b"".join([c async for c in got.stream])
        assert json.loads(body)["ActiveRootID"] == "r2"
        if got.close is not None:
            await got.close()
        await agent.servers.aclose()  # the kept connections

    trio.run(main)


def test_the_local_api_shares_blocking_reads_per_token_and_refuses_a_bad_index(stub):
    def route(req: Seen) -> Reply:
        r = stub.json(
            200, [{"who": req.headers.get("x-consul-token", "")}], **{"X-Consul-Index": "9"}
        )
        r.delay = 2.0 if "index" in req.query else 0.0
        return r

    stub.route = route

    async def main() -> None:
        agent = SimpleNamespace(servers=Servers([stub.url]), opts=SimpleNamespace(dev=False))
        shared = SharedReads(server_fetch(agent))
        api = LocalAPI(agent, on_leave=lambda: None, shared=shared)
        got: list[Response] = []
        async with trio.open_nursery() as n:
            await n.start(shared.run)

            async def client(token: str) -> None:
                req = _request("/v1/health/connect/db", "passing=1&index=4&wait=5s", token)
                got.append(await api.handle(req))

            for token in ("t1", "t1", "t1", "t2"):
                n.start_soon(client, token)
            with trio.fail_after(10):
                while len(got) < 4:
                    await trio.sleep(0.01)
            try:
                await api.handle(_request("/v1/health/connect/db", "index=x1"))
                raise AssertionError("no BadRequest")
            except BadRequest:
                pass
            n.cancel_scope.cancel()
        await agent.servers.aclose()  # the kept connections
        whos = sorted(json.loads(r.body)[0]["who"] for r in got)
        assert whos == ["t1", "t1", "t1", "t2"]

    trio.run(main)
    first_reads = [
        s for s in stub.seen if s.path == "/v1/health/connect/db" and "index" not in s.query
    ]
    # One first read per token, whatever the number of clients.
    assert sorted(s.headers["x-consul-token"] for s in first_reads) == ["t1", "t2"]
    assert all(s.query["passing"] == ["1"] for s in first_reads)
