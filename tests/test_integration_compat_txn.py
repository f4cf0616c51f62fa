"""py-consul's ``txn.put`` (unchanged) against a real ``trellis dev``: its payloads, its
handling of Consul's 200 and 409 answers."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from urllib.parse import urlsplit

import consul
import consul.exceptions
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def c(trellis_server) -> Iterator[consul.Consul]:
    client = consul.Consul(host="127.0.0.1", port=urlsplit(trellis_server.url).port)
    yield client
    client.http.session.close()  # or the server's graceful stop waits for the idle socket


def b64(v: bytes) -> str:
    return base64.b64encode(v).decode()


def test_txn_put_applies_all_or_nothing(c):
    out = c.txn.put(
        [
            {"KV": {"Verb": "set", "Key": "app/a", "Value": b64(b"1")}},
            {"KV": {"Verb": "set", "Key": "app/b", "Value": b64(b"2"), "Flags": 3}},
            {"KV": {"Verb": "get", "Key": "app/a"}},
        ]
    )
    assert out["Errors"] is None
    assert [r["KV"]["Key"] for r in out["Results"]] == ["app/a", "app/b", "app/a"]
    assert base64.b64decode(out["Results"][2]["KV"]["Value"]) == b"1"
    index, entry = c.kv.get("app/b")
    assert (entry["Value"], entry["Flags"]) == (b"2", 3)

    # A failed check: py-consul raises on the 409, carrying Consul's Errors; nothing written.
    with pytest.raises(
        consul.exceptions.ClientError, match=r"409.*OpIndex.*1.*current modify index"
    ):
        c.txn.put(
            [
                {"KV": {"Verb": "set", "Key": "app/c", "Value": b64(b"3")}},
                {"KV": {"Verb": "check-index", "Key": "app/a", "Index": 1}},
            ]
        )
    assert c.kv.get("app/c")[1] is None
    assert c.kv.get("app/b")[0] == index  # nothing moved

    # Node and service verbs, through the same call.
    out = c.txn.put(
        [
            {"Node": {"Verb": "set", "Node": {"Node": "edge-1", "Address": "10.1.0.1"}}},
            {
                "Service": {
                    "Verb": "set",
                    "Node": "edge-1",
                    "Service": {"ID": "gw", "Service": "gw"},
                }
            },
        ]
    )
    assert out["Results"][1]["Service"]["ID"] == "gw"
    _, nodes = c.catalog.service("gw")
    assert [n["Node"] for n in nodes] == ["edge-1"]
