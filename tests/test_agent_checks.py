"""The agent's check runner (trellis.proxy.agent.checks.Runner).

Scheduling, reporting, TTLs and deregistration run on trio's MockClock with small injected
probers (``autojump_threshold=0``: virtual time jumps to the next timer as soon as every task
waits, so minutes of checks take milliseconds and nothing depends on the machine's speed). The
default probers run against real things on 127.0.0.1 port 0: an HTTP(S) server, a TCP listener,
child processes, a ``trellis dev`` server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import random
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from trio.testing import MockClock

from tests.http_stub import Reply, StubServer
from tests.support import alive, wait_until
from trellis.proxy.agent import checkrules as rules
from trellis.proxy.agent.checks import (
    CatalogAliasSource,
    CheckRefused,
    H11Prober,
    HTTPAnswer,
    ProbeFailed,
    ProcessRunner,
    Runner,
)
from trellis.proxy.agent.ports import CRITICAL, PASSING, WARNING, CheckDef, CheckResult
from trellis.proxy.client import Client

# -- small injected things ----------------------------------------------------------------------


def mock_run(fn, *args):
    return trio.run(fn, *args, clock=MockClock(autojump_threshold=0))


class Fixed(random.Random):
    """Jitter that always draws ``u``: a check's first run at ``u`` of its interval."""

    def __init__(self, u: float = 0.0) -> None:
        super().__init__(0)
        self.u = u

    def random(self) -> float:
        return self.u


class Seen:
    """on_change and on_deregister, recorded with the (virtual) time of each call."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, str, CheckResult]] = []
        self.deregistered: list[tuple[float, str]] = []

    def on_change(self, check_id: str, result: CheckResult) -> None:
        self.changes.append((trio.current_time(), check_id, result))

    def on_deregister(self, service_id: str) -> None:
        self.deregistered.append((trio.current_time(), service_id))

    def of(self, check_id: str) -> list[tuple[float, CheckResult]]:
        return [(t, r) for t, c, r in self.changes if c == check_id]


class FakeHTTP:
    """An HTTPProber whose answers the test sets per URL: an HTTPAnswer, a ProbeFailed, or a
    function of the time; ``delay`` makes a probe take that long."""

    def __init__(self) -> None:
        self.answers: dict[str, object] = {}
        self.delay: dict[str, float] = {}
        self.calls: list[tuple[float, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def request(self, method, url, headers, *, verify):
        self.calls.append((trio.current_time(), url))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(self.delay.get(url, 0.0))
            answer = self.answers.get(url, HTTPAnswer(200, "OK", b"ok"))
            if callable(answer):
                answer = answer()
            if isinstance(answer, Exception):
                raise answer
            return answer
        finally:
            self.in_flight -= 1

    def times(self, url: str) -> list[float]:
        return [t for t, u in self.calls if u == url]


def http(check_id: str, url: str | None = None, **kw) -> CheckDef:
    kw.setdefault("interval", 10.0)
    kw.setdefault("timeout", 5.0)
    return CheckDef(check_id, check_id, kind="http", http=url or f"http://app/{check_id}", **kw)


def runner(seen: Seen, **kw) -> Runner:
    kw.setdefault("rng", Fixed(0.0))
    return Runner(on_change=seen.on_change, on_deregister=seen.on_deregister, **kw)


async def running(r: Runner, seconds: float) -> None:
    """Run ``r`` for ``seconds`` of (virtual) time."""
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


# -- scheduling -----------------------------------------------------------------------------------


def test_first_runs_are_spread_over_one_interval_and_none_runs_more_often_than_every_second():
    fake = FakeHTTP()
    seen = Seen()

    async def main():
        r = runner(seen, http=fake, rng=random.Random(7))
        r.update(
            {f"c{i}": http(f"c{i}") for i in range(100)} | {"fast": http("fast", interval=0.1)}
        )
        await running(r, 60)

    mock_run(main)
    firsts = [fake.times(f"http://app/c{i}")[0] for i in range(100)]
    assert all(0 <= t < 10 for t in firsts)
    # Spread: no tenth of the interval holds more than a quarter of the fleet.
    buckets = [sum(1 for t in firsts if k <= t < k + 1) for k in range(10)]
    assert max(buckets) <= 25, buckets
    fast = fake.times("http://app/fast")
    gaps = [b - a for a, b in itertools.pairwise(fast)]
    assert len(fast) >= 50 and min(gaps) >= 1.0 - 1e-9


def test_probes_in_flight_are_bounded():
    fake = FakeHTTP()
    seen = Seen()

    async def main():
        r = runner(seen, http=fake, max_probes=10)
        checks = {f"c{i}": http(f"c{i}") for i in range(50)}
        for c in checks.values():
            fake.delay[c.http] = 3.0
        r.update(checks)
        await running(r, 30)

    mock_run(main)
    assert fake.most_in_flight == 10
    assert len(seen.changes) == 50  # every check ran, each in its turn


def test_a_probe_past_its_timeout_is_critical_at_the_timeout():
    fake = FakeHTTP()
    fake.delay["http://app/slow"] = 60.0
    seen = Seen()

    async def main():
        r = runner(seen, http=fake)
        r.update({"slow": http("slow", timeout=2.0, status=PASSING)})
        await running(r, 5)

    mock_run(main)
    assert seen.of("slow") == [
        (2.0, CheckResult(CRITICAL, "HTTP GET http://app/slow: timed out after 2s"))
    ]


# -- what goes out ----------------------------------------------------------------------------


def test_stable_results_send_nothing_after_the_first_and_a_status_change_goes_at_once():
    fake = FakeHTTP()
    seen = Seen()

    async def main():
        r = runner(seen, http=fake, rng=Fixed(0.05))
        r.update({"web": http("web", url="http://app/")})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            await trio.sleep(95)  # ten rounds (t = 0.5, 10.5, ... 90.5), all alike
            assert r.results()["web"] == CheckResult(
                PASSING, "HTTP GET http://app/: 200 OK Output: ok"
            )
            assert len(seen.changes) == 1
            fake.answers["http://app/"] = HTTPAnswer(500, "Internal Server Error", b"")
            await trio.sleep(10)
            nursery.cancel_scope.cancel()

    mock_run(main)
    assert [(round(t, 1), r.status) for t, _, r in seen.changes] == [
        (0.5, PASSING),
        (100.5, CRITICAL),
    ]
    assert len(fake.calls) == 11


def test_output_that_changes_on_every_probe_is_sent_at_most_once_per_output_interval():
    fake = FakeHTTP()
    fake.answers["http://app/"] = lambda: HTTPAnswer(
        200, "OK", f"t={trio.current_time():g}".encode()
    )
    seen = Seen()

    async def main():
        r = runner(seen, http=fake, output_every=300.0)
        r.update({"web": http("web", url="http://app/", interval=7.0)})
        await running(r, 1000)

    mock_run(main)
    sent = seen.of("web")
    # 143 probes (every 7 s); sends: the first (a status change), then every 300 s the newest
    # output (of the probe at 294, 595, 896).
    assert len(fake.calls) == 143
    assert [t for t, _ in sent] == [0.0, 300.0, 600.0, 900.0]
    assert [r.output.rsplit(" ", 1)[1] for _, r in sent] == ["t=0", "t=294", "t=595", "t=896"]


def test_a_changed_definition_does_not_send_a_held_back_output_early():
    fake = FakeHTTP()
    fake.answers["http://app/"] = lambda: HTTPAnswer(200, "OK", b"t=%g" % trio.current_time())
    seen = Seen()

    async def main():
        r = runner(seen, http=fake, output_every=300.0)
        r.update({"web": http("web", url="http://app/", interval=7.0)})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            await trio.sleep(100)
            r.update({"web": http("web", url="http://app/", interval=9.0)})
            await trio.sleep(250)
            nursery.cancel_scope.cancel()

    mock_run(main)
    assert [t for t, _ in seen.of("web")] == [0.0, 300.0]


def test_a_status_change_inside_the_output_interval_goes_at_once():
    fake = FakeHTTP()
    fake.answers["http://app/"] = lambda: HTTPAnswer(
        200 if trio.current_time() < 55 else 503, "X", f"t={trio.current_time():g}".encode()
    )
    seen = Seen()

    async def main():
        r = runner(seen, http=fake, output_every=300.0)
        r.update({"web": http("web", url="http://app/")})
        await running(r, 100)

    mock_run(main)
    assert [(t, r.status) for t, r in seen.of("web")] == [(0.0, PASSING), (60.0, CRITICAL)]


def test_a_failing_on_change_is_logged_and_the_checks_go_on(caplog):
    fake = FakeHTTP()
    calls: list[str] = []

    def on_change(check_id, result):
        calls.append(check_id)
        raise RuntimeError("the agent's bug")

    async def main():
        r = Runner(on_change=on_change, on_deregister=print, http=fake, rng=Fixed(0.0))
        r.update({"a": http("a"), "b": http("b", interval=1.0)})
        fake.answers["http://app/b"] = lambda: HTTPAnswer(200, "OK", b"%g" % trio.current_time())
        await running(r, 29.5)

    mock_run(main)
    assert sorted(calls) == ["a", "b"]  # their first results (then b's output waits 300 s)
    assert len(fake.times("http://app/b")) == 30  # probing went on
    assert "on_change failed" in caplog.text


def test_a_prober_that_breaks_fails_its_check_and_not_the_others(caplog):
    class Buggy:
        async def connect(self, host, port):
            raise KeyError("a bug")

    seen = Seen()

    async def main():
        r = runner(seen, http=FakeHTTP(), tcp=Buggy())
        r.update({"t": CheckDef("t", "t", kind="tcp", tcp="h:1"), "h": http("h")})
        await running(r, 25)

    mock_run(main)
    assert seen.of("t") == [
        (0.0, CheckResult(CRITICAL, "the agent could not run this check: 'a bug'"))
    ]
    assert [r.status for _, r in seen.of("h")] == [PASSING]
    assert "the probe failed" in caplog.text


# -- TTL ------------------------------------------------------------------------------------------


def test_ttl_checks_expire_unless_updated_in_time():
    seen = Seen()

    async def main():
        r = runner(seen)
        r.update({"t": CheckDef("t", "t", kind="ttl", ttl=30.0), "h": http("h")})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            assert r.ttl_update("t", PASSING, "fine") is True
            await trio.sleep(20)
            assert r.ttl_update("t", PASSING, "fine") is True  # the TTL starts again: until 50
            await trio.sleep(40)
            assert r.results()["t"] == CheckResult(CRITICAL, "TTL expired (last output: fine)")
            assert r.ttl_update("t", WARNING, "x" * 5000)
            assert r.ttl_update("h", PASSING, "") is False  # not a TTL check
            assert r.ttl_update("nope", PASSING, "") is False
            with pytest.raises(ValueError, match="status must be one of"):
                r.ttl_update("t", "ok", "")
            nursery.cancel_scope.cancel()

    mock_run(main)
    assert [(t, r.status, r.output[:20]) for t, r in seen.of("t")] == [
        (0.0, PASSING, "fine"),
        (50.0, CRITICAL, "TTL expired (last ou"),
        (60.0, WARNING, "x" * 20),
    ]
    assert len(seen.of("t")[-1][1].output) == rules.OUTPUT_LIMIT


def test_a_ttl_check_never_updated_expires_after_its_ttl_from_registration():
    seen = Seen()

    async def main():
        r = runner(seen)
        r.update({"t": CheckDef("t", "t", kind="ttl", ttl=15.0, status=PASSING)})
        await running(r, 20)

    mock_run(main)
    assert seen.of("t") == [(15.0, CheckResult(CRITICAL, "TTL expired"))]


# -- deregister_critical_after ------------------------------------------------------------------


def test_a_service_critical_for_its_deregister_time_is_deregistered_once():
    fake = FakeHTTP()
    fake.answers["http://app/a"] = HTTPAnswer(500, "Error", b"")
    fake.answers["http://app/b"] = HTTPAnswer(500, "Error", b"")
    fake.answers["http://app/node"] = HTTPAnswer(500, "Error", b"")
    seen = Seen()

    async def main():
        r = runner(seen, http=fake)
        r.update(
            {
                # Two checks of one service: one deregistration, at the first one's time.
                "a": http("a", service_id="web", deregister_critical_after=60.0),
                "b": http("b", service_id="web", deregister_critical_after=90.0),
                # A node check never deregisters anything.
                "node": http("node", deregister_critical_after=1.0),
            }
        )
        await running(r, 400)

    mock_run(main)
    # Checks start critical, so the time runs from their registration (t = 0).
    assert seen.deregistered == [(60.0, "web")]


def test_a_service_that_recovers_starts_its_deregister_time_again():
    fake = FakeHTTP()
    fake.answers["http://app/a"] = lambda: HTTPAnswer(
        200 if 40 <= trio.current_time() < 100 else 500, "X", b""
    )
    seen = Seen()

    async def main():
        r = runner(seen, http=fake)
        r.update({"a": http("a", service_id="web", deregister_critical_after=90.0)})
        await running(r, 300)

    mock_run(main)
    # Critical 0-40 (not long enough), passing 40-100, critical again from 100: gone at 190.
    assert seen.deregistered == [(190.0, "web")]


def test_a_service_deregistered_and_removed_can_come_back_and_be_deregistered_again():
    fake = FakeHTTP()
    fake.answers["http://app/a"] = HTTPAnswer(500, "Error", b"")
    seen = Seen()
    check = http("a", service_id="web", deregister_critical_after=30.0)

    async def main():
        r = runner(seen, http=fake)
        r.update({"a": check})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            await trio.sleep(40)
            r.update({})  # what the agent does when it deregisters the service
            await trio.sleep(10)
            r.update({"a": check})  # registered again at t = 50
            await trio.sleep(100)
            nursery.cancel_scope.cancel()

    mock_run(main)
    assert seen.deregistered == [(30.0, "web"), (80.0, "web")]


# -- update ---------------------------------------------------------------------------------------


def test_a_changed_check_restarts_keeps_its_result_and_drops_the_old_probe():
    fake = FakeHTTP()
    fake.answers["http://app/old"] = HTTPAnswer(500, "Error", b"")
    seen = Seen()

    async def main():
        r = runner(seen, http=fake)
        r.update({"c": http("c", url="http://app/new")})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            await trio.sleep(1)
            assert r.results()["c"].status == PASSING
            fake.delay["http://app/old"] = 5.0
            r.update({"c": http("c", url="http://app/old", timeout=10.0)})
            await trio.sleep(1)  # the old URL's probe is in flight
            r.update({"c": http("c", url="http://app/new", interval=20.0)})
            assert r.results()["c"].status == PASSING  # same kind: the result is kept
            await trio.sleep(30)
            nursery.cancel_scope.cancel()

    mock_run(main)
    # The probe of /old (500) never lands: the definition changed under it.
    assert [r.status for _, r in seen.of("c")] == [PASSING]
    assert fake.times("http://app/new") == [0.0, 2.0, 22.0]


def test_a_check_that_changes_kind_starts_over_and_a_removed_one_stops():
    fake = FakeHTTP()
    seen = Seen()

    async def main():
        r = runner(seen, http=fake)
        r.update({"c": http("c"), "gone": http("gone")})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            await trio.sleep(1)
            r.update({"c": CheckDef("c", "c", kind="ttl", ttl=100.0)})
            assert dict(r.results()) == {"c": CheckResult(CRITICAL, "")}
            await trio.sleep(50)
            nursery.cancel_scope.cancel()

    mock_run(main)
    assert [(t, r.status) for t, r in seen.of("c")] == [(0.0, PASSING), (1.0, CRITICAL)]
    assert fake.times("http://app/gone") == [0.0]


def test_script_checks_are_refused_unless_enabled_and_the_rest_applied():
    seen = Seen()
    script = CheckDef("s", "s", kind="script", args=("true",))

    async def main():
        r = runner(seen, http=FakeHTTP())
        r.update({"s": http("s")})
        with pytest.raises(CheckRefused) as refused:
            r.update({"s": script, "s2": script, "h": http("h"), "bad": http("bad", url="ftp://x")})
        e = refused.value
        assert (e.check_id, set(e.refused)) == ("bad", {"bad", "s", "s2"})
        assert "script checks are disabled" in e.refused["s"]
        assert "script checks are disabled" in str(e) and "'s2'" in str(e)
        assert set(r.results()) == {"h"}  # and the earlier "s" no longer runs
        enabled = runner(seen, enable_script_checks=True)
        enabled.update({"s": script})
        assert set(enabled.results()) == {"s"}

    mock_run(main)


# -- alias ----------------------------------------------------------------------------------------


class FakeCatalog:
    """An AliasSource over a dict of service ID -> checks, with blocking reads by index."""

    def __init__(self) -> None:
        self.services: dict[str, list[rules.AliasCheck]] = {}
        self.index = 1
        self.changed = trio.Event()
        self.reads = 0

    def set(self, service_id: str, *statuses: str) -> None:
        self.services[service_id] = [
            rules.AliasCheck(f"{service_id}-{i}", f"check {i}", s, f"out {i}", service_id)
            for i, s in enumerate(statuses)
        ]
        self.index += 1
        self.changed.set()
        self.changed = trio.Event()

    async def watch(self, node, service_id, index):
        self.reads += 1
        if index is not None and index >= self.index:
            with trio.move_on_after(60):
                await self.changed.wait()
        return self.services.get(service_id), self.index


def test_an_alias_check_follows_the_aliased_service():
    catalog = FakeCatalog()
    seen = Seen()

    async def main():
        r = runner(seen, alias=catalog)
        r.update({"al": CheckDef("al", "al", kind="alias", alias_service="web")})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            await trio.sleep(1)
            catalog.set("web", PASSING, PASSING)
            await trio.sleep(1)
            catalog.set("web", PASSING, WARNING)
            await trio.sleep(1)
            catalog.set("web", CRITICAL, WARNING)
            await trio.sleep(600)  # nothing changes: a few blocking reads, no sends
            nursery.cancel_scope.cancel()

    mock_run(main)
    assert [(t, r.status, r.output) for t, r in seen.of("al")] == [
        (0.0, CRITICAL, "Service 'web' not found"),
        (1.0, PASSING, "All checks passing."),
        (2.0, WARNING, "Aliased check 'check 1' warning: out 1"),
        (3.0, CRITICAL, "Aliased check 'check 0' critical: out 0"),
    ]
    assert catalog.reads <= 4 + 600 / 60 + 1


def test_an_alias_of_a_service_not_registered_is_critical_and_a_failing_source_keeps_the_last():
    class Broken:
        async def watch(self, node, service_id, index):
            await trio.sleep(0)
            raise ProbeFailed("servers unreachable")

    seen = Seen()

    async def main():
        r = runner(seen, alias=FakeCatalog())
        r.update({"al": CheckDef("al", "al", kind="alias", alias_service="nope", status=PASSING)})
        await running(r, 5)
        broken = runner(seen, alias=Broken())
        broken.update({"b": CheckDef("b", "b", kind="alias", alias_service="x", status=PASSING)})
        await running(broken, 100)
        assert broken.results()["b"] == CheckResult(PASSING, "")

    mock_run(main)
    assert seen.of("al") == [(0.0, CheckResult(CRITICAL, "Service 'nope' not found"))]
    assert seen.of("b") == []


# -- the default probers, against real servers --------------------------------------------------


def probe(check: CheckDef, **kw) -> CheckResult:
    r = Runner(on_change=print, on_deregister=print, **kw)

    async def main():
        return await r.probe(check)

    return trio.run(main)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, PASSING), (204, PASSING), (429, WARNING), (500, CRITICAL), (404, CRITICAL)],
)
def test_http_checks_against_a_real_server(stub, status, expected):
    stub.route = lambda req: Reply(status, b"  body of the answer\n" if status != 204 else b"")
    result = probe(http("h", url=stub.url + "/health"))
    assert result.status == expected
    line = f"HTTP GET {stub.url}/health: {status} "
    assert result.output.startswith(line)
    if status != 204:
        assert result.output.endswith(" Output: body of the answer")


class Stalling:
    """An HTTP server on 127.0.0.1:0 that announces a 1 MB body, sends 8 KiB of it and then
    sends nothing more until the client hangs up (``hung_up`` is set then)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.hung_up = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                while b"\r\n\r\n" not in conn.recv(65536):
                    pass
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"y" * 8192)
                conn.settimeout(30)
                while conn.recv(65536):
                    pass
            except OSError:
                pass  # a reset is a hang-up too
            self.hung_up.set()

    def close(self) -> None:
        self.listener.close()
        self._thread.join(10)


def test_an_http_check_reads_4_kib_of_the_body_and_hangs_up():
    server = Stalling()
    try:
        t0 = time.monotonic()
        result = probe(http("h", url=server.url + "/", timeout=20.0))
        assert time.monotonic() - t0 < 10  # it did not wait for the rest of the body
        assert result.output == f"HTTP GET {server.url}/: 200 OK Output: " + "y" * 4096
        assert server.hung_up.wait(10)
    finally:
        server.close()


def test_http_checks_send_their_method_and_headers(stub):
    stub.route = lambda req: Reply(200, b"fine")
    check = http("h", url=stub.url + "/x?a=1", method="put", header={"X-Probe": ("one",)})
    result = probe(check)
    assert result.output == f"HTTP PUT {stub.url}/x?a=1: 200 OK Output: fine"
    (req,) = stub.seen
    assert (req.method, req.path, req.query) == ("PUT", "/x", {"a": ["1"]})
    assert req.headers["x-probe"] == "one"
    assert req.headers["user-agent"] == "Trellis Health Check"
    assert req.headers["content-length"] == "0"
    own = http("h", url=stub.url + "/", header={"User-Agent": ("mine",), "Host": ("app.test",)})
    probe(own)
    assert stub.seen[-1].headers["user-agent"] == "mine"
    assert stub.seen[-1].headers["host"] == "app.test"
    # Credentials in the URL become basic authentication, as in a browser.
    port = stub.url.rsplit(":", 1)[1]
    probe(http("h", url=f"http://us%40er:p%3Ass@127.0.0.1:{port}/"))
    assert stub.seen[-1].headers["authorization"] == "Basic dXNAZXI6cDpzcw=="  # us@er:p:ss
    # A header that cannot be sent is the check's failure, not the agent's.
    bad = probe(http("h", url=stub.url + "/", header={"X-Name": ("Zoë",)}))
    assert bad.status == CRITICAL and "cannot send this request" in bad.output
    injected = probe(http("h", url=stub.url + "/", header={"X-A": ("a\r\nX-B: b",)}))
    assert injected.status == CRITICAL
    assert all("x-b" not in seen.headers for seen in stub.seen)


def test_an_http_check_with_no_answer_in_time_or_at_all_is_critical(stub, dead_url):
    stub.route = lambda req: Reply(200, b"late", delay=3.0)
    t0 = time.monotonic()
    result = probe(http("h", url=stub.url + "/", timeout=0.5))
    assert time.monotonic() - t0 < 2.5
    assert result == CheckResult(CRITICAL, f"HTTP GET {stub.url}/: timed out after 0.5s")
    refused = probe(http("h", url=dead_url + "/"))
    assert refused.status == CRITICAL and "Connection refused" in refused.output


def test_redirects_are_followed_within_the_origin_only(stub):
    other = StubServer()
    try:
        other.route = lambda req: Reply(200, b"the other host")
        routes = {
            "/moved": Reply(302, b"", {"Location": "/here"}),
            "/here": Reply(200, b"arrived"),
            "/away": Reply(302, b"", {"Location": other.url + "/"}),
            "/loop": Reply(307, b"", {"Location": "/loop"}),
        }
        stub.route = lambda req: routes[req.path]
        moved = probe(http("h", url=stub.url + "/moved"))
        assert moved == CheckResult(PASSING, f"HTTP GET {stub.url}/moved: 200 OK Output: arrived")
        away = probe(http("h", url=stub.url + "/away"))
        assert away.status == CRITICAL
        assert "302 Found" in away.output and "another origin not followed" in away.output
        assert other.seen == []
        before = len(stub.seen)
        loop = probe(http("h", url=stub.url + "/loop"))
        assert loop.status == CRITICAL and "stopped after 10 redirects" in loop.output
        assert len(stub.seen) - before == 11
    finally:
        other.close()


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1, and a client context that
    trusts exactly that certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


def test_https_checks_verify_the_certificate_unless_told_to_skip_it(tmp_path):
    server_ctx, trusting = _self_signed(tmp_path)
    server = StubServer(tls=server_ctx)
    try:
        server.route = lambda req: Reply(200, b"secure")
        url = server.url + "/"
        assert url.startswith("https://127.0.0.1:")
        refused = probe(http("h", url=url))
        assert refused.status == CRITICAL
        assert "certificate verify failed" in refused.output
        skipped = probe(http("h", url=url, tls_skip_verify=True))
        assert skipped == CheckResult(PASSING, f"HTTP GET {url}: 200 OK Output: secure")
        # Verification is on, not broken: a prober that trusts the certificate passes, and
        # still checks the name (the certificate is for 127.0.0.1, not localhost).
        trusted = H11Prober(verify=trusting)
        assert probe(http("h", url=url), http=trusted).status == PASSING
        port = url.rsplit(":", 1)[1]
        wrong_name = probe(http("h", url=f"https://localhost:{port}"), http=trusted)
        assert wrong_name.status == CRITICAL
        assert "certificate verify failed" in wrong_name.output or "match" in wrong_name.output
    finally:
        server.close()


def test_tcp_checks_pass_while_the_listener_accepts_and_fail_once_it_is_closed():
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    check = CheckDef("t", "t", kind="tcp", tcp=address, interval=1.0, timeout=2.0)
    seen = Seen()

    async def main():
        r = runner(seen)
        r.update({"t": check})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            with trio.fail_after(10):
                while not seen.of("t"):
                    await trio.sleep(0.05)
                listener.close()
                while len(seen.of("t")) < 2:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        listener.close()
    (_, up), (_, down) = seen.of("t")
    assert up == CheckResult(PASSING, f"TCP connect {address}: Success")
    assert down.status == CRITICAL and "Connection refused" in down.output


def script(*args: str, timeout: float = 5.0) -> CheckDef:
    return CheckDef("s", "s", kind="script", args=args, timeout=timeout)


def sh(code: str, timeout: float = 5.0) -> CheckDef:
    return script("/bin/sh", "-c", code, timeout=timeout)


@pytest.mark.parametrize(("code", "status"), [(0, PASSING), (1, WARNING), (2, CRITICAL)])
def test_script_exit_codes(code, status):
    result = probe(sh(f"echo out; echo err >&2; exit {code}"), enable_script_checks=True)
    assert result == CheckResult(status, "out\nerr")


def test_a_script_keeps_the_first_4_kib_of_its_output_and_a_missing_program_is_critical():
    big = probe(sh("yes x | head -c 100000; exit 0"), enable_script_checks=True)
    assert big.status == PASSING and big.output == ("x\n" * 2048).strip()
    missing = probe(script("/nonexistent/check"), enable_script_checks=True)
    assert missing.status == CRITICAL and "cannot run '/nonexistent/check'" in missing.output


def _dead(pid: int) -> bool:
    return not alive(pid)  # killed (a zombie waits for its new parent to reap it)


def test_a_script_past_its_timeout_is_killed_with_everything_it_started(tmp_path):
    pids = tmp_path / "pids"
    code = f"sleep 300 & echo $! > {pids}; echo started; sleep 300"
    t0 = time.monotonic()
    result = probe(sh(code, timeout=1.0), enable_script_checks=True)
    assert time.monotonic() - t0 < 4
    assert result == CheckResult(CRITICAL, "Timed out (1s) running check; killed\nstarted")
    child = int(pids.read_text())
    wait_until(lambda: _dead(child), timeout=5)


def test_what_a_script_leaves_running_when_it_exits_is_killed(tmp_path):
    pids = tmp_path / "pids"
    code = f"(sleep 300 >/dev/null 2>&1 &  echo $! > {pids}); echo done"
    result = probe(sh(code), enable_script_checks=True)
    assert result == CheckResult(PASSING, "done")
    wait_until(lambda: _dead(int(pids.read_text())), timeout=5)


def test_a_script_running_when_its_check_is_removed_is_killed(tmp_path):
    pids = tmp_path / "pids"
    check = sh(f"echo $$ > {pids}; sleep 300", timeout=600)
    check = CheckDef("s", "s", kind="script", args=check.args, timeout=600, interval=600)
    seen = Seen()

    async def main():
        r = runner(seen, enable_script_checks=True)
        r.update({"s": check})
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            with trio.fail_after(10):
                while not pids.exists() or not pids.read_text().strip():
                    await trio.sleep(0.05)
            r.update({})
            nursery.cancel_scope.cancel()

    trio.run(main)
    wait_until(lambda: _dead(int(pids.read_text())), timeout=5)
    assert seen.changes == []


def test_the_default_process_runner_runs_python_too():
    async def main():
        return await ProcessRunner().run(
            [sys.executable, "-c", "print('py'); raise SystemExit(3)"], 10
        )

    outcome = trio.run(main)
    assert (outcome.code, outcome.output, outcome.timed_out) == (3, b"py\n", False)


# -- a fleet --------------------------------------------------------------------------------------


def test_200_stable_http_checks_send_nothing_after_their_first_round(stub):
    stub.route = lambda req: Reply(200, b"ok " + req.path.encode())
    seen = Seen()
    checks = {
        f"c{i}": http(f"c{i}", url=f"{stub.url}/app/{i}", interval=1.0, timeout=5.0)
        for i in range(200)
    }

    async def main():
        r = runner(seen, rng=random.Random(3))
        r.update(checks)
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            with trio.fail_after(30):
                while len(seen.changes) < 200:
                    await trio.sleep(0.05)
                first_round = len(stub.seen)
                # Every check probes at least twice more, with the same answer.
                while len(stub.seen) < first_round + 400:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
            return r.results()

    results = trio.run(main)
    assert len(seen.changes) == 200
    assert {c for _, c, _ in seen.changes} == set(checks)
    assert all(r.status == PASSING for r in results.values())


# -- the default alias source, against a real server --------------------------------------------


def test_the_catalog_alias_source_follows_a_service_on_a_real_server(trellis_server, api):
    api.agent_service_register(
        {"Name": "web", "Port": 8080, "Check": {"CheckID": "web-ttl", "TTL": "600s"}}
    )
    api.request("PUT", "/v1/agent/check/pass/web-ttl")
    seen = Seen()

    async def main():
        with Client(trellis_server.url, timeout=10) as client:
            source = CatalogAliasSource(client, node="test-node", wait=30)
            r = runner(seen, alias=source)
            r.update(
                {
                    "al": CheckDef("al", "al", kind="alias", alias_service="web"),
                    "none": CheckDef("none", "none", kind="alias", alias_service="nope"),
                }
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(r.run)
                with trio.fail_after(20):
                    while not seen.of("al"):
                        await trio.sleep(0.05)
                    await trio.to_thread.run_sync(
                        lambda: api.request("PUT", "/v1/agent/check/fail/web-ttl?note=down")
                    )
                    while len(seen.of("al")) < 2:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            return r.results()

    results = trio.run(main)
    (_, up), (_, down) = seen.of("al")
    assert up == CheckResult(PASSING, "All checks passing.")
    assert down.status == CRITICAL and "down" in down.output
    assert results["none"] == CheckResult(CRITICAL, "Service 'nope' not found")
