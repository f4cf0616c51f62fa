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
    from api.errors import BadRequest
    from api.store.postgres import PostgresStore
    from api.store.sqlite import SQLiteStore

    url = sys.argv[1]
    base = SQLiteStore if url.startswith("sqlite:") else PostgresStore

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
            except BadRequest as e:
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
        from api.feed import Watch
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
