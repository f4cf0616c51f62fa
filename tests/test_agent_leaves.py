"""The agent leaf endpoint (``/v1/agent/connect/ca/leaf/<service>``) with several server
processes on one store, in-process, on SQLite and on PostgreSQL.

Each ``make_client()`` is a whole server process's app (its own change feed, caches and
membership) on the test's store, as two gunicorn workers or two replicas are. The leaf of a
service must be one for all of them, its key sealed in the store, and a parked leaf query must
answer when the leaf falls due for renewal or the roots change, whichever process caused it.
"""

from __future__ import annotations

import json
import time

import pytest

from tests import api_fixtures
from tests.api_fixtures import InThread, index_of, parked, wait_until
from tests.ca_support import leaf_and_chain
from trellis.api.ca.secrets import SealError
from trellis.proxy import x509 as px

make_client = api_fixtures.make_client

LEAF = "/v1/agent/connect/ca/leaf/"


def ok(resp, status: int = 200):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    return resp


def services_of(c):
    return c.application.extensions["trellis"]


def block(c, url: str) -> InThread:
    q = InThread(lambda: c.get(url)).start()
    wait_until(lambda: parked(c) >= 1 or q.done(), timeout=10)
    assert not q.done(), f"{url} answered at once: {q.result().status_code}"
    return q


def test_one_leaf_per_service_for_every_server_process(make_client):
    a, b = make_client(), make_client()
    first = ok(a.get(LEAF + "web"))
    again = ok(b.get(LEAF + "web"))
    # The same certificate, key and index from the other process: it read what the first
    # minted instead of minting its own.
    assert again.get_json() == first.get_json()
    assert index_of(again) == index_of(first) == first.get_json()["ModifyIndex"]
    cert, _ = leaf_and_chain(first.get_json())
    assert px.load_key(first.get_json()["PrivateKeyPEM"]).public_key() == cert.public_key()


def test_processes_that_ask_at_once_agree_on_one_leaf(make_client):
    a, b = make_client(), make_client()
    # Both processes find no leaf and mint one each; the store's compare-and-set keeps one.
    qs = [InThread(lambda c=c: c.get(LEAF + "db")).start() for c in (a, b) * 4]
    answers = [ok(q.result()).get_json() for q in qs]
    assert len({(x["SerialNumber"], x["PrivateKeyPEM"], x["ModifyIndex"]) for x in answers}) == 1
    assert ok(a.get(LEAF + "db")).get_json() == answers[0]


def test_the_leaf_key_is_sealed_in_the_store(make_client):
    c = make_client()
    leaf = ok(c.get(LEAF + "web")).get_json()
    svc = services_of(c)
    doc, index = svc.store.system_get("leaves/web")
    assert index == leaf["ModifyIndex"]
    text = json.dumps(doc)
    assert "PRIVATE KEY" not in text and leaf["PrivateKeyPEM"] not in text
    sealed = doc["PrivateKey"]["Sealed"]
    assert svc.ca.sealer.open("leaves/web", sealed) == leaf["PrivateKeyPEM"]
    # Sealed under its document's name: copied under another service's, it does not open.
    with pytest.raises(SealError):
        svc.ca.sealer.open("leaves/db", sealed)


def test_a_parked_leaf_query_answers_when_the_leaf_falls_due(make_client):
    a, b = make_client(), make_client()
    ok(a.get(LEAF + "web"))
    # Bring the planned renewal to 0.7 s from now (the shortest leaf lives an hour; its
    # renewal comes after 36 minutes at the earliest).
    store = services_of(a).store
    doc, _ = store.system_get("leaves/web")
    doc["RenewAt"] = time.time() + 0.7
    assert store.system_write({"leaves/web": doc}) is not None
    before = ok(b.get(LEAF + "web"))
    index = index_of(before)
    q = block(b, f"{LEAF}web?index={index}&wait=20s")
    r = ok(q.result(timeout=20))
    # No write woke it: the query itself knew when its leaf would fall due.
    assert 0.5 <= q.elapsed < 5, q.elapsed
    assert index_of(r) > index
    renewed = r.get_json()
    assert renewed["SerialNumber"] != before.get_json()["SerialNumber"]
    assert renewed["PrivateKeyPEM"] != before.get_json()["PrivateKeyPEM"]
    # ...and it is the cluster's leaf now: the other process hands out the same.
    assert ok(a.get(LEAF + "web")).get_json() == renewed


def test_a_rotation_through_one_process_answers_leaf_queries_parked_on_another(make_client):
    a, b = make_client(), make_client()
    first = ok(b.get(LEAF + "web"))
    q = block(b, f"{LEAF}web?index={index_of(first)}&wait=20s")
    rotated = ok(a.post("/v1/connect/ca/rotate")).get_json()
    r = ok(q.result(timeout=20))
    new = r.get_json()
    assert new["RootID"] == rotated["ActiveRootID"] != first.get_json()["RootID"]
    assert index_of(r) > index_of(first)
    assert ok(a.get(LEAF + "web")).get_json() == new


def test_a_short_leaf_is_not_due_the_moment_it_is_minted(make_client):
    # A 3 s leaf backdated by a minute: counted from its notBefore, 60-90% (and the 90%
    # "renew at once" point) of its "63 s" lie before it was minted, so every read minted
    # another. Counted from when it was minted, it is due 1.8-2.7 s later. Only a server
    # told to accept leaves under an hour (connect.min_leaf_cert_ttl) can get there.
    c = make_client(ca_min_leaf_ttl="1s")
    ok(c.put("/v1/connect/ca/configuration", json={"Provider": "consul",
                                                   "Config": {"LeafCertTTL": "3s"}}))  # fmt: skip
    first = ok(c.get(LEAF + "web")).get_json()
    again = ok(c.get(LEAF + "web")).get_json()
    assert again["SerialNumber"] == first["SerialNumber"]
