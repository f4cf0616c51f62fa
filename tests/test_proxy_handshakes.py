"""The cap on TLS handshakes in flight (``trellis.proxy.reactor.Handshakes``).

Why the cap exists is a memory figure (a burst of handshakes leaves scattered blocks behind;
bench/proxy.py --only rss measures it). What is tested here is that the cap cannot hurt:
waiting connections start in order as slots come back, one that closes while waiting is
skipped, the count of slots never drifts, and a peer that stalls its handshake delays others
by the hold time, not by the handshake timeout.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import trio

from tests.mesh_support import MeshCA, snapshot
from tests.test_proxy_reactor import _pair, _run_with_reactor, _TLSClient
from trellis.proxy import reactor as rx


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Conn:
    """What ``Handshakes`` needs of a connection: ``slot``, ``closed``, ``begin_handshake``."""

    def __init__(self, name: str, started: list[str], on_begin=None) -> None:
        self.name = name
        self.slot = 0
        self.closed = False
        self.started = started
        self.on_begin = on_begin

    def begin_handshake(self) -> None:
        self.started.append(self.name)
        if self.on_begin is not None:
            self.on_begin(self)


def _end(h: rx.Handshakes, conn: _Conn) -> None:
    """What a connection does when its handshake ends (``Connection._release``)."""
    if conn.slot:
        conn.slot = 0
        h.give()


def test_slots_are_given_in_order_and_come_back():
    clock = _Clock()
    h = rx.Handshakes(limit=2, hold=1.0, clock=clock)
    started: list[str] = []
    a, b, c, d = (_Conn(n, started) for n in "abcd")
    assert h.take(a) and h.take(b)
    assert not h.take(c) and not h.take(d)
    assert h.active == 2 and started == []
    _end(h, b)
    assert started == ["c"] and c.slot and h.active == 2
    _end(h, a)
    assert started == ["c", "d"]
    _end(h, c)
    _end(h, d)
    assert h.active == 0 and not h.waiting


def test_a_connection_that_closed_while_waiting_is_skipped():
    clock = _Clock()
    h = rx.Handshakes(limit=1, hold=1.0, clock=clock)
    started: list[str] = []
    a, b, c = (_Conn(n, started) for n in "abc")
    assert h.take(a)
    assert not h.take(b) and not h.take(c)
    b.closed = True
    _end(h, a)
    assert started == ["c"] and not b.slot and h.active == 1


def test_a_newcomer_does_not_jump_the_queue():
    clock = _Clock()
    h = rx.Handshakes(limit=1, hold=1.0, clock=clock)
    started: list[str] = []
    a, b, c = (_Conn(n, started) for n in "abc")
    assert h.take(a)
    assert not h.take(b)
    a.slot = 0  # a gave its slot back without the reactor hearing yet...
    h.active -= 1
    assert not h.take(c)  # ...c still comes after b, who starts first
    assert started == ["b"]


def test_handshakes_that_end_at_once_hand_on_their_slots_without_recursion():
    clock = _Clock()
    h = rx.Handshakes(limit=1, hold=1.0, clock=clock)
    started: list[str] = []
    first = _Conn("first", started)
    assert h.take(first)
    failing = [_Conn(f"f{i}", started, on_begin=lambda c: _end(h, c)) for i in range(5000)]
    for conn in failing:
        assert not h.take(conn)
    _end(h, first)  # 5,000 handshakes fail as they start: a recursion would overflow
    assert len(started) == 5000 and h.active == 0 and not h.waiting


def test_a_slot_held_too_long_goes_to_the_next_and_is_not_given_back_twice():
    clock = _Clock()
    h = rx.Handshakes(limit=1, hold=1.0, clock=clock)
    started: list[str] = []
    stalled, b = _Conn("stalled", started), _Conn("b", started)
    assert h.take(stalled)
    assert not h.take(b)
    clock.now += 0.5
    h.grant(clock.now)
    assert started == []  # not yet
    clock.now += 0.6
    h.grant(clock.now)
    assert started == ["b"] and not stalled.slot and b.slot and h.active == 1
    _end(h, stalled)  # the stalled handshake ends later: its slot was taken back already
    assert h.active == 1
    _end(h, b)
    assert h.active == 0


def test_a_slot_taken_again_after_a_retry_is_not_taken_back_early():
    clock = _Clock()
    h = rx.Handshakes(limit=1, hold=1.0, clock=clock)
    started: list[str] = []
    a, b = _Conn("a", started), _Conn("b", started)
    assert h.take(a)
    clock.now += 0.9
    _end(h, a)  # a's first upstream failed: a retries with another instance
    assert h.take(a)
    assert not h.take(b)
    clock.now += 0.2  # 1.1 s after a's first slot, 0.2 s after its second
    h.grant(clock.now)
    assert a.slot and started == []


# -- through the reactor ---------------------------------------------------------------------


def _client_hello(ctx: ssl.SSLContext) -> bytes:
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out, server_side=False)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def test_a_peer_that_stalls_its_handshake_delays_others_by_the_hold_not_the_timeout():
    ca = MeshCA()
    server = snapshot(ca, "db", default_allow=True)
    client = snapshot(ca, "web", default_allow=True)

    def body(r: rx.Reactor) -> None:
        def setup() -> None:
            r.handshakes = rx.Handshakes(limit=1, hold=0.5)

        trio.from_thread.run_sync(setup)
        app = socket.socket()
        app.bind(("127.0.0.1", 0))
        app.listen(4)
        ended: list[str] = []
        conns: list[rx.Inbound] = []

        def inbound(sock: socket.socket) -> None:
            conns.append(
                rx.Inbound(
                    r,
                    sock,
                    server.tls.server,
                    server.tls.peers,
                    lambda conn, v: rx.Route(True, "", app.getsockname()),
                    rx.Timeouts(handshake=30.0),
                    lambda conn, reason: ended.append(reason),
                )
            )

        stall_out, stall_in = _pair()
        trio.from_thread.run_sync(inbound, stall_in)
        stall_out.sendall(_client_hello(client.tls.client))  # ...and never another byte
        deadline = time.monotonic() + 5
        while trio.from_thread.run_sync(lambda: conns[0].state) != "handshake":
            assert time.monotonic() < deadline, "the stalled handshake never started"
            time.sleep(0.01)

        good_out, good_in = _pair()
        trio.from_thread.run_sync(inbound, good_in)
        token = trio.from_thread.run_sync(trio.lowlevel.current_trio_token)
        stop = threading.Event()

        def sweeper() -> None:  # what the sidecar's sweep task does, every 0.25 s
            while not stop.wait(0.05):
                trio.from_thread.run_sync(lambda: r.sweep(time.monotonic()), trio_token=token)

        shaken: list[float] = []

        def good_client() -> None:
            _TLSClient(good_out, client.tls.client)
            shaken.append(time.monotonic())

        t0 = time.monotonic()
        threads = [threading.Thread(target=sweeper), threading.Thread(target=good_client)]
        for t in threads:
            t.start()
        try:
            # While the stalled peer holds the only slot, the good one waits...
            time.sleep(0.2)
            assert trio.from_thread.run_sync(lambda: conns[1].state) == "waiting"
            # ...and gets through once the slot is taken back, long before the timeout.
            threads[1].join(10)
            assert shaken, "the good client's handshake did not complete"
            took = shaken[0] - t0
            assert 0.3 < took < 3.0, took
            app.settimeout(5)
            got, _ = app.accept()
            got.close()
        finally:
            stop.set()
            for t in threads:
                t.join()
        trio.from_thread.run_sync(lambda: conns[0].close("test over"))
        trio.from_thread.run_sync(lambda: conns[1].close("test over"))
        assert trio.from_thread.run_sync(lambda: r.handshakes.active) == 0
        for s in (stall_out, good_out, app):
            s.close()

    _run_with_reactor(body)
