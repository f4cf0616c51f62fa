"""A SQLite write that waits for another process's write lock does not freeze a gevent worker.

Two gunicorn workers share the SQLite file. While one holds the write lock (a transaction, its
fsync), the other's next write must wait; SQLite's busy handler would wait in C, where gevent
cannot switch, and the whole worker (reads, parked queries, accepts) would stop with it. The
test holds the lock from a real second process for a second, writes through the store under
gevent, and counts how often another greenlet ran meanwhile.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
    """
)

WRITER = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import subprocess, sys, time, gevent
    from trellis.api.store import open_store

    url, path, holder = sys.argv[1], sys.argv[2], sys.argv[3]
    store = open_store(url)
    store.kv_put("warm", b"up")
    p = subprocess.Popen([sys.executable, "-c", holder, path, "1.0"], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    t = gevent.spawn(ticker)
    t0 = time.monotonic()
    store.kv_put("k", b"v")  # waits for the other process's lock
    waited = time.monotonic() - t0
    t.kill()
    p.wait(10)
    print(f"{waited:.3f} {sum(1 for x in ticks if x <= t0 + waited)}")
    assert store.kv_get("k").value == b"v"
    store.close()
    """
)


def test_a_write_waiting_for_the_lock_lets_the_worker_run(tmp_path):
    path = tmp_path / "trellis.db"
    out = subprocess.run(
        [sys.executable, "-c", WRITER, f"sqlite:///{path}", str(path), HOLDER],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    waited, ticks = out.stdout.split()
    assert float(waited) >= 0.5, "the write did not wait for the other process's lock"
    # About 100 ticks fit in the second; a frozen hub gives one or two.
    assert int(ticks) >= 20, f"only {ticks} ticks while the write waited {waited}s"
