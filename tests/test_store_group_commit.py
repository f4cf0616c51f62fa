"""Group commit (``SQLStore._group_write``), under gevent as the workers run it, on SQLite and
on PostgreSQL.

Each scenario runs in a subprocess with gevent's monkey patching, on a real SQLite file or a
real PostgreSQL database. The store there is a subclass that counts COMMITs (the only thing it
changes), so that the test can tell one batch from many.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import json, sys, gevent
    from trellis.api.store.errors import UnstorableValue
    from trellis.api.store.postgres import PostgresStore
    from trellis.api.store import SQLITE, store_kind
    from trellis.api.store.sqlite import SQLiteStore

    url = sys.argv[1]
    base = SQLiteStore if store_kind(url) == SQLITE else PostgresStore

    class Counting(base):
        commits = 0

        def _commit_batch(self, batch):
            type(self).commits += 1
            super()._commit_batch(batch)

    store = Counting(url.removeprefix("sqlite:///") if base is SQLiteStore else url)
    store.kv_put("warm", b"up")
    Counting.commits = 0
    out = {}
    """
)


def run(store_url: str, body: str) -> dict:
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\nstore.close()\n"
    r = subprocess.run(
        [sys.executable, "-c", script, store_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_writes_ready_together_share_one_commit(store_url):
    out = run(
        store_url,
        """
        gs = [gevent.spawn(store.kv_put, f"k{i}", b"v") for i in range(50)]
        gevent.joinall(gs, raise_error=True)
        out["commits"] = Counting.commits
        out["indexes"] = sorted(store.kv_get(f"k{i}").modify_index for i in range(50))
        """,
    )
    assert 1 <= out["commits"] <= 5, out
    # Each write still has its own index: one per write, none shared, none skipped.
    first = out["indexes"][0]
    assert out["indexes"] == list(range(first, first + 50))


@pytest.mark.parametrize("bad", [0, 5], ids=["first-of-the-batch", "a-later-one"])
def test_a_failing_write_fails_alone(store_url, bad):
    out = run(
        store_url,
        f"\n        BAD = {bad}\n"
        + """
        def put(i):
            key = "bad\\x00key" if i == BAD else f"k{i}"
            try:
                store.kv_put(key, b"v")
                return "ok"
            except UnstorableValue as e:
                return "bad: " + e.message

        gs = [gevent.spawn(put, i) for i in range(10)]
        gevent.joinall(gs)
        out["results"] = [g.value for g in gs]
        out["stored"] = sorted(e.key for e in store.kv_list("k"))
        out["commits"] = Counting.commits
        """,
    )
    assert out["results"][bad].startswith("bad: ") and "NUL" in out["results"][bad]
    assert [r for i, r in enumerate(out["results"]) if i != bad] == ["ok"] * 9
    assert out["stored"] == sorted(f"k{i}" for i in range(10) if i != bad)
    assert 1 <= out["commits"] <= 3


def test_check_and_set_in_one_batch_lets_exactly_one_win(store_url):
    out = run(
        store_url,
        """
        store.kv_put("lock", b"free")
        idx = store.kv_get("lock").modify_index
        gs = [gevent.spawn(store.kv_put, "lock", f"owner{i}".encode(), cas=idx) for i in range(8)]
        gevent.joinall(gs, raise_error=True)
        out["won"] = [g.value for g in gs]
        out["value"] = store.kv_get("lock").value.decode()
        """,
    )
    assert out["won"].count(True) == 1, out
    assert out["value"] == f"owner{out['won'].index(True)}"


def test_changes_of_a_batch_are_published_after_its_commit(store_url):
    out = run(
        store_url,
        """
        from trellis.api.feed import Watch
        pos = store.feed.position()
        gs = [gevent.spawn(store.kv_put, f"w{i}", b"v") for i in range(20)]
        gevent.joinall(gs, raise_error=True)
        out["woken"] = store.feed.wait(Watch("kv", prefixes=("w",)), pos, 0)
        out["published"] = store.feed.published_index
        out["current"] = store.current_index()
        """,
    )
    assert out["woken"] is True
    assert out["published"] == out["current"]


def test_a_writer_queued_behind_a_lost_transaction_reports_what_happened(tmp_path):
    """Real threads (as under the gthread worker), SQLite. The second body of a batch finds the
    whole transaction gone (SQLite rolls back by itself on SQLITE_FULL, IOERR or NOMEM; here its
    body issues the ROLLBACK) while another writer waits for the batch's lock. Whatever the
    schedule, each writer's answer must match what is on disk: acknowledged means stored, an
    error means not stored."""
    import threading
    import time

    from trellis.api.errors import StoreUnavailable
    from trellis.api.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "trellis.db"))
    said: dict[str, bool] = {}

    def leader() -> None:
        try:
            with store.write() as tx:
                tx.execute(
                    "INSERT INTO kv (key, value, flags, create_index, modify_index, lock_index)"
                    " VALUES ('k0', x'00', 0, 1, 1, 0)"
                )
                time.sleep(0.3)  # holds the batch while the others queue
            said["k0"] = True
        except StoreUnavailable:
            said["k0"] = False

    def broken() -> None:
        try:
            with store.write() as tx:
                tx.execute("ROLLBACK")  # the transaction is gone under everyone's feet
                raise OSError("disk full")
        except (OSError, StoreUnavailable):
            pass

    def queued() -> None:
        try:
            store.kv_put("k2", b"v")
            said["k2"] = True
        except StoreUnavailable:
            said["k2"] = False

    threads = []
    for target in (leader, broken, queued):
        t = threading.Thread(target=target)
        t.start()
        threads.append(t)
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert set(said) == {"k0", "k2"}
    stored = {k: store.kv_get(k) is not None for k in ("k0", "k2")}
    store.close()
    assert said == stored, f"reported {said}, stored {stored}"


def test_a_failing_change_log_trim_does_not_fail_the_write_that_triggered_it(tmp_path, caplog):
    """Every thousandth write trims the change log; the write is committed by then and must be
    acknowledged whatever the trim meets. The store is a subclass whose trim fails."""
    from tests.support import wait_until
    from trellis.api.errors import StoreUnavailable
    from trellis.api.store.sqlite import SQLiteStore

    class TrimFails(SQLiteStore):
        def _trim_changes(self) -> None:
            raise StoreUnavailable("the store is unavailable: database is locked")

    store = TrimFails(str(tmp_path / "trellis.db"))
    with caplog.at_level("WARNING", logger="trellis.store"):
        for i in range(1000):
            store.kv_put(f"k{i % 10}", str(i).encode())  # the 1000th triggers the trim
        wait_until(lambda: "trimming the change log failed" in caplog.text, timeout=10)
    assert store.kv_get("k9").value == b"999"
    store.close()
