"""``GET``/``PUT /v1/snapshot`` in-process, on real SQLite and real PostgreSQL, and across them.

Every response is checked against openapi.yaml (``ValidatingClient``). A refused archive must
change nothing: the whole store (every table, through ``Store.snapshot_dump``) and its index
are compared before and after.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import secrets
import tarfile
import time
from typing import Any

import pytest

from tests import api_fixtures
from tests.api_fixtures import InThread, assert_error, index_of, parked, put_json, register
from tests.ca_support import service_csr
from tests.openapi_check import ValidatingClient
from tests.support import wait_until
from trellis.api import snapshot as archive
from trellis.api.app import create_app
from trellis.api.settings import Settings, validate

make_client = api_fixtures.make_client
store_kind = api_fixtures.store_kind

#: A woken query must answer within this long of the restore (the restore itself included).
PROMPT = 2.0


def app_of(client) -> Any:
    return client.raw.application


def store_of(client):
    return app_of(client).extensions["trellis"].store


def everything(client) -> tuple:
    """The whole store and its index: what a refused restore must leave as it was."""
    st = store_of(client)
    return st.snapshot_dump(), st.current_index()


def populate(client, *, tag: str = "a") -> dict[str, Any]:
    """A bit of every kind of state, through the API."""
    register(
        client,
        {
            "Name": "web",
            "ID": f"web-{tag}",
            "Port": 8080,
            "Check": {"CheckID": f"web-ttl-{tag}", "Name": "ttl", "TTL": "30s"},
            "Connect": {"SidecarService": {}},
        },
    )
    assert client.put(f"/v1/kv/{tag}/cfg", data=b"\x00binary\xff").status_code == 200
    sess = put_json(client, "/v1/session/create", {"TTL": "60s", "Name": tag}).get_json()["ID"]
    assert client.put(f"/v1/kv/{tag}/lock?acquire={sess}", data=b"me").get_json() is True
    r = put_json(
        client,
        f"/v1/connect/intentions/exact?source=api-{tag}&destination=web",
        {"Action": "allow"},
    )
    assert r.status_code == 200
    return {"session": sess}


def view(client) -> dict[str, Any]:
    """What clients read, without indexes (a restore renumbers them)."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {
                k: strip(x)
                for k, x in v.items()
                if k not in ("CreateIndex", "ModifyIndex", "Index")
            }
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    out = {}
    for url in (
        "/v1/kv/?recurse",
        "/v1/catalog/services",
        "/v1/catalog/nodes",
        "/v1/health/service/web",
        "/v1/session/list",
        "/v1/connect/intentions",
        "/v1/connect/ca/roots",
        "/v1/connect/ca/configuration",
    ):
        r = client.get(url)
        out[url] = (r.status_code, strip(r.get_json()))
    return out


def save(client, headers: dict | None = None) -> bytes:
    r = client.get("/v1/snapshot", headers=headers or {})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "application/gzip"
    assert index_of(r) == store_of(client).current_index()
    return r.data


def restore(client, data: bytes, headers: dict | None = None):
    return client.put("/v1/snapshot", data=data, headers=headers or {})


# -- round trip ---------------------------------------------------------------------------------


def test_save_then_restore_brings_back_the_saved_state(make_client, store_kind):
    client = make_client()
    populate(client)
    want = view(client)
    data = save(client)
    got = archive.read_archive(data)
    m = got.manifest
    assert (m.store, m.index, m.version) == (store_kind, store_of(client).current_index(), 1)
    assert m.tables["kv"].rows == 2 and m.tables["sessions"].rows == 1
    assert "changes" not in m.tables and "members" not in m.tables
    # Two saves of one state are the same bytes, but for the time they were made.
    assert archive.read_archive(save(client)).rows == got.rows

    # Change everything, then restore.
    assert client.delete("/v1/kv/?recurse").status_code == 200
    assert client.put("/v1/agent/service/deregister/web-a").status_code == 200
    assert client.put("/v1/kv/new", data=b"1").status_code == 200
    assert (
        client.delete("/v1/connect/intentions/exact?source=api-a&destination=web").status_code
        == 200
    )
    rotated = client.post("/v1/connect/ca/rotate", json={})
    assert rotated.status_code == 200
    seen = max(
        index_of(client.get(u))
        for u in ("/v1/kv/new", "/v1/catalog/services", "/v1/connect/ca/roots")
    )
    r = restore(client, data)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.data == b""
    assert index_of(r) > seen
    assert view(client) == want
    # Every index a client reads now is above what it saw before.
    for url in (
        "/v1/kv/new",
        "/v1/kv/a/cfg",
        "/v1/catalog/services",
        "/v1/connect/ca/roots",
        "/v1/health/service/web",
        "/v1/connect/intentions",
    ):
        assert index_of(client.get(url)) > seen, url


def test_restore_wakes_parked_queries_in_every_process(make_client):
    """A query parked in another server process (another app on the same store, which learns
    of the restore through its follower) and one in the restoring process both wake at once,
    with an index above the one they held, also where the watched key is gone."""
    a = make_client()
    b = make_client()
    assert a.put("/v1/kv/watched", data=b"old").status_code == 200
    data = save(a)
    assert a.put("/v1/kv/watched", data=b"newer").status_code == 200
    assert a.put("/v1/kv/only-after", data=b"x").status_code == 200
    held = {
        u: index_of(a.get(u))
        for u in ("/v1/kv/watched", "/v1/kv/only-after", "/v1/catalog/services")
    }
    queries = []
    for client in (a, b):
        for url, idx in held.items():
            queries.append(
                (
                    url,
                    idx,
                    InThread(
                        lambda c=client, u=url, i=idx: c.get(f"{u}?index={i}&wait=30s")
                    ).start(),
                )
            )
    wait_until(lambda: parked(a) >= 3 and parked(b) >= 3, timeout=10)
    assert not any(q.done() for _, _, q in queries)
    t0 = time.monotonic()
    assert restore(a, data).status_code == 200
    for url, idx, q in queries:
        r = q.result(timeout=10)
        assert q.finished - t0 < PROMPT, (url, q.finished - t0)
        assert index_of(r) > idx, url
    assert a.get("/v1/kv/watched?raw").data == b"old"
    assert b.get("/v1/kv/only-after").status_code == 404


# -- refusals -----------------------------------------------------------------------------------


def _rebuild(data: bytes, *, manifest=None, state=None, extra=None) -> bytes:
    """The archive with its manifest or state replaced (as JSON / bytes), or a member added."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    if manifest is not None:
        members[archive.MANIFEST] = json.dumps(
            manifest(json.loads(members[archive.MANIFEST]))
        ).encode()
    if state is not None:
        members[archive.STATE] = state(members[archive.STATE])
    if extra is not None:
        members[extra] = b"x"
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def _resum(m: dict, state: bytes) -> dict:
    return {**m, "SHA256": archive.sha256(state)}


def _damaged_state(s: bytes) -> bytes:
    return s.replace(b"a/cfg", b"a/cfX", 1)


DAMAGE = {
    "truncated": lambda d: d[: len(d) // 2],
    "truncated-at-the-end": lambda d: d[:-4],
    "a-flipped-byte": lambda d: _flip(d, len(d) // 2),
    "wrong-checksum": lambda d: _rebuild(d, state=_damaged_state),
    "wrong-version": lambda d: _rebuild(d, manifest=lambda m: {**m, "Version": 2}),
    "not-a-snapshot-manifest": lambda d: _rebuild(d, manifest=lambda m: {"Format": "other"}),
    "counts-that-lie": lambda d: _rebuild(
        d,
        manifest=lambda m: {**m, "Tables": {**m["Tables"], "kv": {**m["Tables"]["kv"], "Rows": 9}}},
    ),
    "an-extra-member": lambda d: _rebuild(d, extra="../../etc/passwd"),
    "not-gzip": lambda d: b"this is not an archive",
    "gzip-but-not-tar": lambda d: gzip.compress(b"just text, no tar"),
    "json": lambda d: b'{"Format": "trellis-snapshot"}',
    "empty": lambda d: b"",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_bad_archive_is_refused_and_changes_nothing(make_client, damage):
    client = make_client()
    populate(client)
    data = save(client)
    assert client.put("/v1/kv/after-the-save", data=b"1").status_code == 200
    before = everything(client)
    r = restore(client, DAMAGE[damage](data))
    assert_error(r, 400, "bad_request", "snapshot refused, nothing changed")
    assert everything(client) == before


def test_rows_that_do_not_fit_are_refused_and_change_nothing(make_client):
    """A well-formed archive, checksum and all, whose rows the store refuses (a duplicate key):
    refused by the store inside the restore's transaction, which is rolled back."""
    client = make_client()
    populate(client)
    data = save(client)

    def dup(state: bytes) -> bytes:
        kv = [line for line in state.splitlines(keepends=True) if line.startswith(b'["kv"')]
        return state.replace(kv[0], kv[0] + kv[0], 1)

    def manifest(m: dict) -> dict:
        return m

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        state = dup(tar.extractfile(archive.STATE).read())
    bad = _rebuild(
        data,
        state=lambda s: state,
        manifest=lambda m: _resum(
            {
                **m,
                "Tables": {
                    **m["Tables"],
                    "kv": {**m["Tables"]["kv"], "Rows": m["Tables"]["kv"]["Rows"] + 1},
                },
            },
            state,
        ),
    )
    before = everything(client)
    r = restore(client, bad)
    assert_error(r, 400, "bad_request", "do not fit this store")
    assert everything(client) == before


# -- ACLs, the CA, the server's own node ----------------------------------------------------------


def test_acl_write_is_needed_and_restored_tokens_apply_at_once(make_client):
    client = make_client(acl_enabled=True, acl_default_policy="deny")
    root = {"X-Consul-Token": client.put("/v1/acl/bootstrap").get_json()["SecretID"]}
    pol = {"Name": "ops", "Rules": 'operator = "write"\nkey_prefix "" { policy = "write" }'}
    assert client.put("/v1/acl/policy", json=pol, headers=root).status_code == 200
    ops = client.put("/v1/acl/token", json={"Policies": [{"Name": "ops"}]}, headers=root)
    ops_h = {"X-Consul-Token": ops.get_json()["SecretID"]}
    for method in ("GET", "PUT"):
        r = client.open("/v1/snapshot", method=method, headers=ops_h, data=b"")
        assert_error(r, 403, "permission_denied", "acl:write")
        assert_error(client.open("/v1/snapshot", method=method), 403, "permission_denied")
    data = save(client, root)
    # A token made after the save works until the restore, and not a moment after.
    late = client.put("/v1/acl/token", json={"Policies": [{"Name": "ops"}]}, headers=root)
    late_h = {"X-Consul-Token": late.get_json()["SecretID"]}
    assert client.put("/v1/kv/x", data=b"1", headers=late_h).status_code == 200
    # One deleted after the save comes back.
    accessor = ops.get_json()["AccessorID"]
    assert client.delete(f"/v1/acl/token/{accessor}", headers=root).status_code == 200
    assert client.get("/v1/kv/x", headers=ops_h).status_code == 403
    assert restore(client, data, root).status_code == 200
    assert_error(client.put("/v1/kv/x", data=b"1", headers=late_h), 403, contains="ACL not found")
    assert client.put("/v1/kv/x", data=b"1", headers=ops_h).status_code == 200


def _app(tmp_path, name: str, store: str = "", **kw: Any) -> ValidatingClient:
    data = tmp_path / name
    data.mkdir()
    settings = validate(Settings(data_dir=str(data), node_name=name, store=store, **kw))
    return ValidatingClient(create_app(settings).test_client())


@pytest.fixture
def apps():
    made: list[ValidatingClient] = []
    yield made
    for c in made:
        app_of(c).extensions["trellis"].close()


def test_another_clusters_snapshot_brings_its_ca_and_trust_domain(tmp_path, apps, store_url):
    """The archive carries the cluster ID (the trust domain) with the CA whose roots name it:
    after the restore this server (on each store) signs leaves in that trust domain, with
    that root."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    a = _app(tmp_path, "server-a", ca_seal_key=key)
    b = _app(tmp_path, "server-b", store_url, ca_seal_key=key)
    apps += [a, b]
    roots_a = a.get("/v1/connect/ca/roots").get_json()
    assert b.get("/v1/connect/ca/roots").get_json()["TrustDomain"] != roots_a["TrustDomain"]
    assert restore(b, save(a)).status_code == 200
    roots_b = b.get("/v1/connect/ca/roots").get_json()
    assert (roots_b["TrustDomain"], roots_b["ActiveRootID"]) == (
        roots_a["TrustDomain"],
        roots_a["ActiveRootID"],
    )
    assert app_of(b).extensions["trellis"].ca.trust_domain == roots_a["TrustDomain"]
    r = b.post("/v1/connect/ca/sign", json={"CSR": service_csr(roots_a["TrustDomain"], "web")})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["RootID"] == roots_a["ActiveRootID"]
    # This server's own node is back in the catalog beside the archive's.
    nodes = {n["Node"] for n in b.get("/v1/catalog/nodes").get_json()}
    assert nodes == {"server-a", "server-b"}


def test_an_archive_sealed_with_another_key_is_refused(tmp_path, apps, store_url):
    a = _app(tmp_path, "server-a", ca_seal_key=base64.b64encode(secrets.token_bytes(32)).decode())
    b = _app(
        tmp_path,
        "server-b",
        store_url,
        ca_seal_key=base64.b64encode(secrets.token_bytes(32)).decode(),
    )
    apps += [a, b]
    before = everything(b)
    assert_error(restore(b, save(a)), 400, "bad_request", "another CA seal key")
    assert everything(b) == before


@pytest.mark.parametrize("direction", ["sqlite-to-postgresql", "postgresql-to-sqlite"])
def test_a_snapshot_moves_between_sqlite_and_postgresql(tmp_path, apps, pg_url, direction):
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    stores = ("", pg_url) if direction == "sqlite-to-postgresql" else (pg_url, "")
    src = _app(tmp_path, "src", stores[0], ca_seal_key=key)
    dst = _app(tmp_path, "dst", stores[1], ca_seal_key=key)
    apps += [src, dst]
    populate(src)
    populate(dst, tag="other")
    data = save(src)
    want = view(src)
    assert restore(dst, data).status_code == 200
    got = view(dst)
    # The destination's own node is registered again beside the source's.
    nodes = got.pop("/v1/catalog/nodes")
    want_nodes = want.pop("/v1/catalog/nodes")
    assert {n["Node"] for n in nodes[1]} == {n["Node"] for n in want_nodes[1]} | {"dst"}
    assert got == want
    # Saved again on the destination: the same rows.
    again = archive.read_archive(save(dst))
    first = archive.read_archive(data)
    assert again.manifest.store != first.manifest.store
    assert set(again.rows) == set(first.rows)
    assert again.rows["kv"] != [] and len(again.rows["kv"]) == len(first.rows["kv"])
