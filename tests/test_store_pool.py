"""Unit tests of the store's connection pool (``trellis.api.store.sql.Pool``).

Connections are small fake objects (the pool only hands them out and closes them). Threads are
real. The last test runs the pool under gevent in a subprocess, the way gunicorn's gevent
worker runs it, and checks that taking and returning a free connection never lets another
greenlet run: that is what lets a thousand woken blocking queries share one read.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from trellis.api.errors import StoreUnavailable
from trellis.api.store.sql import Pool


class FakeConn:
    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Factory:
    def __init__(self) -> None:
        self.made: list[FakeConn] = []

    def __call__(self) -> FakeConn:
        c = FakeConn(len(self.made))
        self.made.append(c)
        return c


def test_reuses_the_most_recent_connection():
    f = Factory()
    pool = Pool(f, 2)
    a = pool.get()
    pool.put(a)
    assert pool.get() is a
    assert len(f.made) == 1


def test_opens_up_to_size_then_times_out_with_a_clear_error():
    f = Factory()
    pool = Pool(f, 2, timeout=0.2)
    a, b = pool.get(), pool.get()
    assert a is not b
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="no store connection became free"):
        pool.get()
    assert time.monotonic() - t0 >= 0.15
    assert len(f.made) == 2
    # The timed-out waiter left no trace: a put frees a slot for the next caller.
    pool.put(a)
    assert pool.get() is a


def test_a_waiter_gets_the_connection_handed_back():
    f = Factory()
    pool = Pool(f, 1, timeout=5)
    a = pool.get()
    got: list[FakeConn] = []
    t = threading.Thread(target=lambda: got.append(pool.get()))
    t.start()
    time.sleep(0.1)
    assert not got  # still waiting
    pool.put(a)
    t.join(5)
    assert got == [a]
    assert len(f.made) == 1


def test_waiters_are_served_in_arrival_order():
    pool = Pool(Factory(), 1, timeout=5)
    held = pool.get()
    served: list[int] = []

    def wait_turn(i: int) -> None:
        conn = pool.get()
        served.append(i)
        time.sleep(0.02)  # hold it a moment, so a later waiter could only jump the queue
        pool.put(conn)

    threads = []
    for i in range(3):
        t = threading.Thread(target=wait_turn, args=(i,))
        threads.append(t)
        t.start()
        time.sleep(0.05)  # let each one queue before the next
    pool.put(held)
    for t in threads:
        t.join(5)
    assert served == [0, 1, 2]
    assert pool.get() is held


def test_a_broken_connection_is_closed_and_its_slot_freed():
    f = Factory()
    pool = Pool(f, 1, timeout=0.2)
    a = pool.get()
    pool.put(a, broken=True)
    assert a.closed
    b = pool.get()
    assert b is not a and not b.closed
    assert len(f.made) == 2


def test_a_failed_connect_frees_its_slot():
    calls = {"n": 0}

    def flaky() -> FakeConn:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("refused")
        return FakeConn(calls["n"])

    pool = Pool(flaky, 1, timeout=0.2)
    with pytest.raises(OSError):
        pool.get()
    assert pool.get().n == 2  # the slot came back; no timeout


def test_close_closes_free_connections_now_and_held_ones_when_handed_back():
    f = Factory()
    pool = Pool(f, 3)
    a, b = pool.get(), pool.get()
    pool.put(a)
    pool.close()
    assert a.closed and not b.closed
    pool.put(b)
    assert b.closed
    with pytest.raises(StoreUnavailable, match="closed"):
        pool.get()


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import threading, gevent
    from trellis.api.store.sql import Pool

    class C:
        def close(self): pass

    pool = Pool(C, 4)
    ev = threading.Event()
    log = []

    def query(i):
        ev.wait(10)
        log.append(("start", i))
        conn = pool.get()
        pool.put(conn)
        log.append(("end", i))

    gs = [gevent.spawn(query, i) for i in range(200)]
    gevent.sleep(0.05)
    ev.set()
    gevent.joinall(gs, timeout=10)
    interleaved = sum(1 for a, b in zip(log[::2], log[1::2]) if a[1] != b[1] or b[0] != "end")
    print(len(log), interleaved)
    """
)


def test_under_gevent_a_free_connection_is_taken_and_returned_without_yielding():
    out = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    entries, interleaved = map(int, out.stdout.split())
    assert entries == 400
    assert interleaved == 0, f"{interleaved} of 200 woken greenlets were interleaved"


def test_a_waiter_killed_in_its_wait_loses_no_slot():
    """Under gevent, a greenlet killed while queued for a connection (the end of a graceful
    stop) must leave the queue: otherwise the next connection handed back goes to it, and is
    lost to every later caller."""
    script = textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import gevent
        from trellis.api.store.sql import Pool

        class C:
            def close(self): pass

        pool = Pool(C, 1, timeout=5)
        held = pool.get()
        waiting = gevent.spawn(pool.get)
        gevent.sleep(0.05)
        waiting.kill()                  # killed while queued
        pool.put(held)
        conn = gevent.spawn(pool.get).get(timeout=2)
        print("ok" if conn is held else "lost")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]
