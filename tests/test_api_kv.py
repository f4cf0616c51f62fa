"""``/v1/kv/<key>``: Consul's K/V API, in-process, on SQLite and on PostgreSQL.

What is checked is the wire contract of CONSUL-API.md ("/v1/kv/:key") with exact values:
bodies, status codes, ``X-Consul-Index``, and the raw-mode headers of CVE-2020-25864.
"""

from __future__ import annotations

import base64

import pytest

from tests import api_fixtures
from tests.api_fixtures import assert_error, current_index, index_of

# Fixtures, bound here so that pytest finds them in this module.
client = api_fixtures.client
make_client = api_fixtures.make_client
store_kind = api_fixtures.store_kind

U64_MAX = 2**64 - 1
KIB = 1024


def entry(key: str, value: bytes | None, index: int, *, create: int | None = None, flags=0):
    return {
        "LockIndex": 0,
        "Key": key,
        "Flags": flags,
        "Value": base64.b64encode(value).decode() if value else None,
        "Session": None,
        "CreateIndex": index if create is None else create,
        "ModifyIndex": index,
    }


def put(client, key: str, value: bytes = b"", query: str = ""):
    return client.put(f"/v1/kv/{key}" + (f"?{query}" if query else ""), data=value)


def put_ok(client, key: str, value: bytes = b"", query: str = "") -> int:
    """PUT that must succeed; returns the key's new ModifyIndex."""
    r = put(client, key, value, query)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() is True
    return client.get(f"/v1/kv/{key}").get_json()[0]["ModifyIndex"]


# -- put, get, delete --------------------------------------------------------------------------


def test_put_get_delete(client):
    catalog = index_of(client.get("/v1/catalog/services"))
    before = current_index(client)
    r = put(client, "app/config", b"hello")
    assert (r.status_code, r.mimetype, r.get_data()) == (200, "application/json", b"true")
    # A PUT is a write: it answers true, and bumps the global index by exactly one.
    idx = current_index(client)
    assert idx == before + 1

    r = client.get("/v1/kv/app/config")
    assert r.status_code == 200
    assert r.mimetype == "application/json"
    assert r.get_json() == [entry("app/config", b"hello", idx)]
    assert index_of(r) == idx
    assert r.headers["X-Consul-KnownLeader"] == "true"

    r = client.delete("/v1/kv/app/config")
    assert (r.status_code, r.get_json()) == (200, True)
    r = client.get("/v1/kv/app/config")
    assert_error(r, 404, "not_found", "app/config")
    # The index of a deleted key is that of its delete, so a watcher sees it move forward.
    assert index_of(r) == idx + 1
    # K/V writes leave the catalog's index alone (its watchers do not wake).
    assert index_of(client.get("/v1/catalog/services")) == catalog


def test_overwrite_keeps_create_index_and_moves_modify_index(client):
    first = put_ok(client, "k", b"v1")
    put_ok(client, "other", b"x")
    second = put_ok(client, "k", b"v2", "flags=7")
    assert second == first + 2
    r = client.get("/v1/kv/k")
    assert r.get_json() == [entry("k", b"v2", second, create=first, flags=7)]
    assert index_of(r) == second


def test_value_is_base64_of_the_exact_bytes(client):
    value = bytes(range(256))
    put_ok(client, "bin", value)
    got = client.get("/v1/kv/bin").get_json()[0]["Value"]
    assert got == base64.b64encode(value).decode()
    assert base64.b64decode(got) == value


def test_empty_value_is_null_as_in_consul(client):
    idx = put_ok(client, "folder/", b"")
    assert client.get("/v1/kv/folder/").get_json() == [entry("folder/", None, idx)]
    r = client.get("/v1/kv/folder/?raw")
    assert (r.status_code, r.get_data()) == (200, b"")


def test_missing_key_is_404_with_an_index(client):
    put_ok(client, "present", b"x")
    r = client.get("/v1/kv/absent")
    body = assert_error(r, 404, "not_found")
    assert body["error"] == "no key found at 'absent'"
    # Consul never reports index 0: a missing key carries the K/V table's index.
    assert index_of(r) == current_index(client)
    assert_error(client.get("/v1/kv/absent?raw"), 404)
    assert_error(client.get("/v1/kv/absent/?recurse"), 404)
    # Deleting what is not there is not an error.
    r = client.delete("/v1/kv/absent")
    assert (r.status_code, r.get_json()) == (200, True)


# -- recurse, keys, separator ------------------------------------------------------------------


@pytest.fixture
def tree(client):
    """a/1, a/2, a/b/3, ab (a sibling of a/, not under it) and z; returns their indexes."""
    idx = {}
    for k in ("a/1", "a/2", "a/b/3", "ab", "z"):
        idx[k] = put_ok(client, k, k.encode())
    return idx


def test_recurse_lists_the_prefix_with_its_max_index(client, tree):
    r = client.get("/v1/kv/a/?recurse")
    assert r.status_code == 200
    assert r.get_json() == [entry(k, k.encode(), tree[k]) for k in ("a/1", "a/2", "a/b/3")]
    # X-Consul-Index = max ModifyIndex under the prefix, not the global index (ab and z are
    # newer).
    assert index_of(r) == tree["a/b/3"]

    # Modifying the oldest key under the prefix makes it the max.
    newer = put_ok(client, "a/1", b"again")
    r = client.get("/v1/kv/a/?recurse")
    assert index_of(r) == newer
    assert [e["Key"] for e in r.get_json()] == ["a/1", "a/2", "a/b/3"]


def test_recurse_without_slash_is_a_plain_prefix(client, tree):
    r = client.get("/v1/kv/a?recurse")
    assert [e["Key"] for e in r.get_json()] == ["a/1", "a/2", "a/b/3", "ab"]
    assert index_of(r) == tree["ab"]
    r = client.get("/v1/kv/?recurse")
    assert [e["Key"] for e in r.get_json()] == ["a/1", "a/2", "a/b/3", "ab", "z"]
    assert index_of(r) == tree["z"]


def test_recurse_index_counts_deletes_under_the_prefix(client, tree):
    assert client.delete("/v1/kv/a/2").get_json() is True
    r = client.get("/v1/kv/a/?recurse")
    assert [e["Key"] for e in r.get_json()] == ["a/1", "a/b/3"]
    assert index_of(r) == current_index(client) > tree["z"]


def test_keys(client, tree):
    r = client.get("/v1/kv/a/?keys")
    assert (r.status_code, r.get_json()) == (200, ["a/1", "a/2", "a/b/3"])
    assert index_of(r) == tree["a/b/3"]
    r = client.get("/v1/kv/?keys")
    assert r.get_json() == ["a/1", "a/2", "a/b/3", "ab", "z"]
    r = client.get("/v1/kv/nothing/?keys")
    assert_error(r, 404, "not_found")
    assert index_of(r) == tree["z"]  # the K/V table's index


def test_keys_with_separator_folds_subtrees(client, tree):
    r = client.get("/v1/kv/a/?keys&separator=/")
    assert (r.status_code, r.get_json()) == (200, ["a/1", "a/2", "a/b/"])
    r = client.get("/v1/kv/?keys&separator=/")
    assert r.get_json() == ["a/", "ab", "z"]
    r = client.get("/v1/kv/a?keys&separator=/")
    assert r.get_json() == ["a/", "ab"]
    # Any string is a separator, not only "/".
    r = client.get("/v1/kv/?keys&separator=b")
    assert r.get_json() == ["a/1", "a/2", "a/b", "ab", "z"]


def test_delete_recurse_removes_the_subtree_only(client, tree):
    r = client.delete("/v1/kv/a/?recurse")
    assert (r.status_code, r.get_json()) == (200, True)
    assert client.get("/v1/kv/?keys").get_json() == ["ab", "z"]


# -- raw ---------------------------------------------------------------------------------------


RAW_VALUES = [
    b"plain text",
    b"<html><script>alert(document.cookie)</script></html>",
    b"<!DOCTYPE html><svg onload=alert(1)>",
    b'{"looks": "like json"}',
    b"\x00\xff binary",
]


def test_raw_is_octet_stream_and_nosniff(client, subtests):
    for n, value in enumerate(RAW_VALUES):
        with subtests.test(value=value):
            key = f"page{n}"
            idx = put_ok(client, key, value)
            r = client.get(f"/v1/kv/{key}?raw")
            assert r.status_code == 200
            assert r.get_data() == value
            # CVE-2020-25864: a browser must never render a raw value as HTML.
            assert r.headers["Content-Type"] == "application/octet-stream"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert index_of(r) == idx
            # raw=true is the same; raw with recurse is the JSON listing.
            assert client.get(f"/v1/kv/{key}?raw=true").get_data() == value
            r = client.get(f"/v1/kv/{key}?recurse&raw")
            assert r.mimetype == "application/json"
            assert r.get_json() == [entry(key, value, idx)]


# -- cas ---------------------------------------------------------------------------------------


def test_cas_zero_creates_only(client):
    r = put(client, "lock", b"first", "cas=0")
    assert (r.status_code, r.get_json()) == (200, True)
    idx = current_index(client)
    r = put(client, "lock", b"second", "cas=0")
    # A failed CAS is not an error: 200 with body false, and nothing written.
    assert (r.status_code, r.mimetype, r.get_data()) == (200, "application/json", b"false")
    assert current_index(client) == idx
    assert client.get("/v1/kv/lock?raw").get_data() == b"first"


def test_cas_with_the_modify_index(client):
    idx = put_ok(client, "c", b"v1")
    assert put(client, "c", b"stale", f"cas={idx - 1}").get_json() is False
    assert put(client, "c", b"future", f"cas={idx + 1}").get_json() is False
    assert client.get("/v1/kv/c?raw").get_data() == b"v1"
    assert put(client, "c", b"v2", f"cas={idx}").get_json() is True
    assert client.get("/v1/kv/c?raw").get_data() == b"v2"
    # The old index is now stale.
    assert put(client, "c", b"v3", f"cas={idx}").get_json() is False
    # cas=N on a missing key fails; only cas=0 creates.
    assert put(client, "missing", b"x", "cas=5").get_json() is False
    assert_error(client.get("/v1/kv/missing"), 404)


def test_delete_with_cas(client):
    idx = put_ok(client, "d", b"v")
    r = client.delete(f"/v1/kv/d?cas={idx + 1}")
    assert (r.status_code, r.get_json()) == (200, False)
    assert client.get("/v1/kv/d").status_code == 200
    assert client.delete("/v1/kv/d?cas=0").get_json() is False
    assert client.delete(f"/v1/kv/d?cas={idx}").get_json() is True
    assert client.get("/v1/kv/d").status_code == 404


def test_bad_cas_is_400(client, subtests):
    for cas in ["abc", "-1", "1.5", "", str(2**64), "\u0661"]:
        with subtests.test(cas=cas):
            assert_error(put(client, "x", b"v", f"cas={cas}"), 400, "bad_request", "cas")
            assert_error(client.delete(f"/v1/kv/x?cas={cas}"), 400, "bad_request", "cas")
    assert_error(client.get("/v1/kv/x"), 404)
    with subtests.test("cas with recurse"):
        assert_error(client.delete("/v1/kv/a/?recurse&cas=1"), 400, "bad_request")


# -- flags -------------------------------------------------------------------------------------


def test_flags_round_trip_over_the_whole_uint64_range(client, subtests):
    for flags in [0, 1, 42, 2**63 - 1, 2**63, U64_MAX]:
        with subtests.test(flags=flags):
            put_ok(client, f"f{flags}", b"v", f"flags={flags}")
            assert client.get(f"/v1/kv/f{flags}").get_json()[0]["Flags"] == flags
    # No flags on a later PUT means 0 again, as in Consul.
    put_ok(client, f"f{U64_MAX}", b"v")
    assert client.get(f"/v1/kv/f{U64_MAX}").get_json()[0]["Flags"] == 0


BAD_FLAGS = [
    str(U64_MAX + 1),
    "99999999999999999999999",
    "-1",
    "abc",
    "1e3",
    "0x10",
    "",
    "\uff11",  # FULLWIDTH DIGIT ONE: int() would read it as 1
    "\u00b2",  # SUPERSCRIPT TWO: isdigit() but int() refuses it (it was a 500)
]


def test_flags_out_of_range_or_not_a_number_is_400(client, subtests):
    for flags in BAD_FLAGS:
        with subtests.test(flags=flags):
            r = put(client, "f", b"v", f"flags={flags}")
            assert_error(r, 400, "bad_request", "flags")
    assert client.get("/v1/kv/f").status_code == 404


# -- size limit --------------------------------------------------------------------------------


def test_value_size_limit_default_512_kib(client):
    limit = 512 * KIB
    value = b"x" * limit
    assert put(client, "big", value).get_json() is True
    assert client.get("/v1/kv/big?raw").get_data() == value
    r = put(client, "big", value + b"y")
    body = assert_error(r, 413, "payload_too_large")
    assert body["error"] == f"Value exceeds {limit} byte limit"
    # The refused write changed nothing.
    assert client.get("/v1/kv/big?raw").get_data() == value


def test_value_size_limit_from_settings(make_client):
    client = make_client(kv_max_value_size=16)
    assert put(client, "small", b"0123456789abcdef").get_json() is True
    assert_error(put(client, "small2", b"0123456789abcdefg"), 413, contains="16 byte limit")
    assert client.get("/v1/kv/small2").status_code == 404


# -- bad keys ----------------------------------------------------------------------------------


BAD_KEYS = [
    pytest.param("..", id="dotdot"),
    pytest.param(".", id="dot"),
    pytest.param("a/../b", id="dotdot-segment"),
    pytest.param("a/./b", id="dot-segment"),
    pytest.param("a/..", id="trailing-dotdot"),
    pytest.param("a%01b", id="control-char"),
    pytest.param("a%0Ab", id="newline"),
    pytest.param("a%7Fb", id="del"),
    pytest.param("a%00b", id="nul"),
    pytest.param("k" * 1025, id="over-long"),
    pytest.param("\u00e9" * 513, id="over-long-in-bytes"),
    pytest.param("%FF%FE", id="invalid-utf8"),
]


DOT_SEGMENTS = {"dotdot", "dot", "dotdot-segment", "dot-segment", "trailing-dotdot"}


def test_bad_keys_are_400(client, subtests):
    for param in BAD_KEYS:
        (key,) = param.values
        for method in ("GET", "PUT", "DELETE"):
            with subtests.test(key=param.id, method=method):
                data = b"v" if method == "PUT" else None
                # tests.openapi_check matches the greedy {key} with ".+", which stops at a
                # newline, and so finds no route for this one: check it unvalidated.
                c = client.raw if "%0A" in key else client
                r = c.open(f"/v1/kv/{key}", method=method, data=data)
                if method == "GET" and param.id in DOT_SEGMENTS:
                    # As Consul (Go's ServeMux): a read of a path with a '.' or '..' segment
                    # is redirected to the clean path (test_api_request_rules.py).
                    assert r.status_code == 301, r.status_code
                    continue
                assert_error(r, 400, "bad_request")
    with subtests.test("empty key"):
        assert_error(client.put("/v1/kv/", data=b"v"), 400, "bad_request", "Missing key name")
        assert_error(client.delete("/v1/kv/"), 400, "bad_request", "Missing key name")
        assert_error(client.get("/v1/kv/"), 400, "bad_request", "Missing key name")
    # Nothing was written.
    assert client.get("/v1/kv/?keys").status_code == 404


def test_unusual_but_valid_keys(client):
    keys = [
        "a.b",
        "...",
        "a/.hidden",
        "v1.2/..x",
        "k" * 1024,  # exactly the limit
        "caf\u00e9",
        "\u65e5\u672c/\u8a9e",
        "rep\ufffdlaced",  # a real U+FFFD is kept apart from invalid UTF-8 (refused)
        "with space",
        # Not "a//b": /v1/kv/a//b is not that key, as in Consul (test_api_request_rules.py).
        "trailing/",
    ]
    for key in keys:
        put_ok(client, key, key.encode())
        assert client.get(f"/v1/kv/{key}?raw").get_data() == key.encode(), key
    # Listed in byte order on both stores.
    assert client.get("/v1/kv/?keys").get_json() == sorted(keys, key=str.encode)


# -- other datacenters and bad flags -----------------------------------------------------------


def test_dc_of_another_datacenter_is_400(client):
    put_ok(client, "k", b"v", "dc=dc1")
    assert client.get("/v1/kv/k?dc=dc1").status_code == 200
    assert_error(client.get("/v1/kv/k?dc=dc2"), 400, "bad_request", "dc2")
    assert_error(put(client, "k", b"w", "dc=dc2"), 400, "bad_request", "dc2")
    assert_error(client.delete("/v1/kv/k?dc=dc2"), 400, "bad_request", "dc2")
    assert client.get("/v1/kv/k?raw").get_data() == b"v"


def test_bad_boolean_flags_are_400(client, subtests):
    put_ok(client, "k", b"v")
    # recurse, keys and raw are set by their presence, as in Consul: a value that says false
    # is refused rather than read as set (tests/test_api_request_rules.py has the table).
    for query in ["recurse=false", "keys=0", "raw=False", "separator=" + "/" * 65]:
        with subtests.test(query=query):
            assert_error(client.get(f"/v1/kv/k?{query}"), 400, "bad_request")
    # The spellings Consul clients use are all accepted.
    for query in ["raw", "raw=", "raw=true", "raw=1", "raw=TRUE", "raw=None", "raw=yes please"]:
        with subtests.test(query=query):
            assert client.get(f"/v1/kv/k?{query}").get_data() == b"v"
