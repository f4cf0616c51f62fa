"""An acknowledged write is durable: SIGKILL the whole server mid-stream, restart it on the same
store, and every K/V PUT that was answered ``200 true`` is there with its value.

Runs against both stores: SQLite in the data dir (two gunicorn workers sharing the file) and
PostgreSQL (``-store``). Writes that were in flight when the kill landed may or may not have
committed; the test allows either, and nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import TrellisProcess, wait_until

pytestmark = pytest.mark.integration

WRITERS = 4
#: Acknowledged writes to collect before the kill (spread over the writers).
BEFORE_KILL = 300


@pytest.fixture(params=["sqlite", "postgresql"])
def store_flags(request, tmp_path: Path) -> list[str]:
    if request.param == "sqlite":
        return ["-data-dir", str(tmp_path / "data")]
    # Servers on a shared store need a configured CA seal key (it has no flag).
    config = tmp_path / "trellis.json"
    key = base64.b64encode(os.urandom(32)).decode()
    config.write_text(json.dumps({"connect": {"ca_seal_key": key}}))
    return ["-config", str(config), "-store", request.getfixturevalue("pg_url")]


def start_server(store_flags: list[str]) -> TrellisProcess:
    p = TrellisProcess(
        [
            "server",
            *store_flags,
            *("-http-port", "0", "-dns-port", "-1", "-workers", "2"),
            *("-node", "durable", "-log-level", "warning"),
        ]
    )
    try:
        return p.start()
    except BaseException:
        p.stop()
        raise


@dataclass
class Writer:
    """One client thread: unique keys ``w<n>/<i>``, and one key ``over/<n>`` overwritten with
    ``i`` on every round (so the last acknowledged round must win)."""

    n: int
    url: str
    stop: threading.Event
    acked: dict[str, bytes] = field(default_factory=dict)
    over_acked: int = -1
    over_sent: int = -1
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            i = 0
            while not self.stop.is_set():
                key, value = f"w{self.n}/{i:06d}", f"value {self.n}.{i} ".encode() * 8
                if not self._put(http, key, value):
                    return
                self.acked[key] = value
                self.over_sent = i
                if not self._put(http, f"over/{self.n}", str(i).encode()):
                    return
                self.over_acked = i
                i += 1

    def _put(self, http: httpx.Client, key: str, value: bytes) -> bool:
        """True only for an acknowledged write; False once the server is gone."""
        try:
            r = http.put(f"/v1/kv/{key}", content=value)
        except httpx.HTTPError:
            return False  # the kill: this write is in flight, it may or may not be stored
        if r.status_code != 200 or r.json() is not True:
            self.errors.append(f"PUT {key}: {r.status_code} {r.text}")
            return False
        return True


def read_all(url: str) -> dict[str, tuple[bytes, int]]:
    r = httpx.get(url + "/v1/kv/?recurse", timeout=30)
    assert r.status_code == 200, r.text
    return {e["Key"]: (base64.b64decode(e["Value"] or ""), e["ModifyIndex"]) for e in r.json()}


def test_acknowledged_writes_survive_sigkill(store_flags):
    server = start_server(store_flags)
    try:
        url = server.url
        # A value written then overwritten, both acknowledged, before the stream starts.
        assert httpx.put(url + "/v1/kv/settled", content=b"first").json() is True
        assert httpx.put(url + "/v1/kv/settled", content=b"second").json() is True

        stop = threading.Event()
        writers = [Writer(n, url, stop) for n in range(WRITERS)]
        threads = [threading.Thread(target=w.run, daemon=True) for w in writers]
        for t in threads:
            t.start()
        wait_until(lambda: sum(len(w.acked) for w in writers) >= BEFORE_KILL, timeout=30)
        assert all(t.is_alive() for t in threads), "a writer stopped before the kill"
        server.kill()  # SIGKILL to master and workers, mid-stream
        stop.set()
        for t in threads:
            t.join(15)
            assert not t.is_alive()
    finally:
        server.stop()

    for w in writers:
        assert not w.errors, w.errors
    acked = {k: v for w in writers for k, v in w.acked.items()}
    assert len(acked) >= BEFORE_KILL

    server = start_server(store_flags)
    try:
        stored = read_all(server.url)
        missing = sorted(k for k in acked if k not in stored)
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        wrong = sorted(k for k, v in acked.items() if stored[k][0] != v)
        assert not wrong, f"{len(wrong)} acknowledged writes have another value: {wrong[:5]}"

        assert stored["settled"][0] == b"second"
        for w in writers:
            value = int(stored[f"over/{w.n}"][0])
            # The last acknowledged round, or the one that was in flight at the kill.
            assert w.over_acked <= value <= w.over_sent, (w.n, value, w.over_acked, w.over_sent)

        # The change index survived too: a new write is numbered after everything stored.
        top = max(index for _, index in stored.values())
        assert httpx.put(server.url + "/v1/kv/after", content=b"x").json() is True
        after = httpx.get(server.url + "/v1/kv/after").json()[0]["ModifyIndex"]
        assert after > top
        print(
            f"{len(acked)} acknowledged writes before SIGKILL, all present after restart "
            f"({len(stored)} keys stored)"
        )
    finally:
        server.stop()
