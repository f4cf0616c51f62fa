"""Intentions (``/v1/connect/intentions*``) and ``POST /v1/agent/connect/authorize``, in-process,
on SQLite and on PostgreSQL, every response checked against openapi.yaml.

Covers the ID-based API (Consul 1.2) and the name-based one (1.9+), match ordering, check,
the validation of names and bodies, blocking reads, the authorize decision with Consul's
reasons, and the typed client (``trellis.proxy.client``) over the same app.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests import api_fixtures
from tests.api_fixtures import assert_error, index_of, put_json
from tests.openapi_check import validate
from tests.test_api_blocking import PROMPT, assert_not_woken, assert_woken, block
from trellis.proxy.client import APIError, Client

client = api_fixtures.client
make_client = api_fixtures.make_client

BASE = "/v1/connect/intentions"
ALLOWED_BY_DEFAULT = "Default behavior configured by ACLs (allow)"


def create(client, source: str, destination: str, action: str = "allow", **extra) -> str:
    body = {"SourceName": source, "DestinationName": destination, "Action": action, **extra}
    r = client.post(BASE, json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert set(r.get_json()) == {"ID"}
    return r.get_json()["ID"]


def exact(source: str, destination: str) -> str:
    return f"{BASE}/exact?source={source}&destination={destination}"


def labels(intentions) -> list[str]:
    return [f"{i['SourceName']} => {i['DestinationName']} ({i['Action']})" for i in intentions]


def trust_domain(client) -> str:
    return client.get("/v1/connect/ca/roots").get_json()["TrustDomain"]


def uri(td: str, service: str, dc: str = "dc1", ns: str = "default") -> str:
    return f"spiffe://{td}/ns/{ns}/dc/{dc}/svc/{service}"


def authorize(client, target: str, cert_uri: str) -> dict:
    r = client.post(
        "/v1/agent/connect/authorize", json={"Target": target, "ClientCertURI": cert_uri}
    )
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


# -- the ID-based API ------------------------------------------------------------------------


def test_create_read_list_delete_by_id(client):
    iid = create(client, "web", "db", Description="web reads db", Meta={"team": "edge"})
    assert str(uuid.UUID(iid)) == iid
    r = client.get(f"{BASE}/{iid}")
    assert r.status_code == 200
    got = r.get_json()
    assert index_of(r) == got["ModifyIndex"]
    assert got["CreatedAt"] == got["UpdatedAt"]
    assert got["CreateIndex"] == got["ModifyIndex"] > 0
    assert {
        k: got[k] for k in got if k not in ("CreatedAt", "UpdatedAt", "CreateIndex", "ModifyIndex")
    } == {
        "ID": iid,
        "Description": "web reads db",
        "SourceNS": "default",
        "SourceName": "web",
        "DestinationNS": "default",
        "DestinationName": "db",
        "SourceType": "consul",
        "Action": "allow",
        "Meta": {"team": "edge"},
        "Precedence": 9,
    }
    assert client.get(BASE).get_json() == [got]

    r = client.delete(f"{BASE}/{iid}")
    assert (r.status_code, r.get_json()) == (200, True)
    assert_error(client.get(f"{BASE}/{iid}"), 404, "not_found")
    assert_error(client.delete(f"{BASE}/{iid}"), 404, "not_found")
    assert client.get(BASE).get_json() == []


def test_one_intention_per_pair(client):
    first = create(client, "web", "db")
    r = client.post(BASE, json={"SourceName": "web", "DestinationName": "db", "Action": "deny"})
    assert_error(r, 409, "conflict", "web => db")
    assert [i["ID"] for i in client.get(BASE).get_json()] == [first]
    assert client.get(f"{BASE}/{first}").get_json()["Action"] == "allow"
    # The same names the other way round are another pair.
    create(client, "db", "web")


def test_update_by_id(client):
    iid = create(client, "web", "db", Meta={"a": "1"})
    before = client.get(f"{BASE}/{iid}").get_json()
    time.sleep(0.002)  # so that UpdatedAt differs
    body = {"SourceName": "web", "DestinationName": "db", "Action": "deny", "Description": "x"}
    r = client.put(f"{BASE}/{iid}", json=body)
    assert (r.status_code, r.get_json()) == (200, True)
    after = client.get(f"{BASE}/{iid}").get_json()
    assert (after["ID"], after["Action"], after["Description"], after["Meta"]) == (
        iid,
        "deny",
        "x",
        {},  # a PUT replaces the whole intention: no Meta sent, none kept
    )
    assert after["CreatedAt"] == before["CreatedAt"]
    assert after["CreateIndex"] == before["CreateIndex"]
    assert after["UpdatedAt"] > before["UpdatedAt"]
    assert after["ModifyIndex"] > before["ModifyIndex"]


def test_update_by_id_may_change_the_pair_but_not_onto_another(client):
    iid = create(client, "web", "db")
    other = create(client, "api", "db", "deny")
    body = {"SourceName": "web", "DestinationName": "*", "Action": "allow"}
    assert client.put(f"{BASE}/{iid}", json=body).get_json() is True
    moved = client.get(f"{BASE}/{iid}").get_json()
    assert (moved["SourceName"], moved["DestinationName"], moved["Precedence"]) == ("web", "*", 6)
    assert client.get(exact("web", "db")).status_code == 404
    assert client.get(exact("web", "*")).get_json()["ID"] == iid

    clash = {"SourceName": "api", "DestinationName": "db", "Action": "allow"}
    assert_error(client.put(f"{BASE}/{iid}", json=clash), 409, "conflict")
    assert client.get(f"{BASE}/{iid}").get_json()["DestinationName"] == "*"
    assert client.get(f"{BASE}/{other}").get_json()["Action"] == "deny"
    # Writing an intention onto its own pair is no clash.
    same = {"SourceName": "api", "DestinationName": "db", "Action": "allow"}
    assert client.put(f"{BASE}/{other}", json=same).get_json() is True


def test_missing_and_malformed_ids(client):
    missing = str(uuid.uuid4())
    body = {"SourceName": "web", "DestinationName": "db", "Action": "allow"}
    assert_error(client.get(f"{BASE}/{missing}"), 404, "not_found")
    assert_error(client.put(f"{BASE}/{missing}", json=body), 404, "not_found")
    assert_error(client.delete(f"{BASE}/{missing}"), 404, "not_found")
    for bad in ("not-a-uuid", "1234", "%20"):
        assert_error(client.get(f"{BASE}/{bad}"), 400, "bad_request", "UUID")
        assert_error(client.put(f"{BASE}/{bad}", json=body), 400, "bad_request")
        assert_error(client.delete(f"{BASE}/{bad}"), 400, "bad_request")


# -- the name-based API ----------------------------------------------------------------------


def test_upsert_get_and_delete_by_name(client):
    r = put_json(client, exact("web", "db"), {"Action": "allow", "Description": "d"})
    assert (r.status_code, r.get_json()) == (200, True)
    got = client.get(exact("web", "db"))
    assert got.status_code == 200
    first = got.get_json()
    assert (first["SourceName"], first["DestinationName"], first["Action"]) == (
        "web",
        "db",
        "allow",
    )
    assert first["Description"] == "d"
    assert index_of(got) >= first["ModifyIndex"]

    # An upsert of an existing pair keeps its ID and creation; the names in a body are ignored.
    body = {"Action": "deny", "Meta": {"k": "v"}, "SourceName": "zzz", "DestinationName": "zzz"}
    assert put_json(client, exact("web", "db"), body).get_json() is True
    second = client.get(exact("web", "db")).get_json()
    assert (second["ID"], second["CreatedAt"], second["CreateIndex"]) == (
        first["ID"],
        first["CreatedAt"],
        first["CreateIndex"],
    )
    assert (second["Action"], second["Meta"], second["Description"]) == ("deny", {"k": "v"}, "")
    assert len(client.get(BASE).get_json()) == 1

    assert client.delete(exact("web", "db")).get_json() is True
    r = client.get(exact("web", "db"))
    assert_error(r, 404, "not_found")
    assert index_of(r) >= 1  # a client can block until the pair appears
    # Deleting a pair that has no intention is not an error (Consul answers true).
    r = client.delete(exact("web", "db"))
    assert (r.status_code, r.get_json()) == (200, True)


def test_the_exact_api_takes_star_literally(client):
    create(client, "*", "db", "deny")
    assert client.get(exact("*", "db")).get_json()["Precedence"] == 8
    assert client.get(exact("web", "db")).status_code == 404


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?source=web",
        "?destination=db",
        "?source=web*&destination=db",
        "?source=web&destination=*db",
    ],
)
def test_the_exact_api_needs_two_whole_names(client, query):
    url = f"{BASE}/exact{query}"
    assert_error(client.get(url), 400, "bad_request")
    assert_error(put_json(client, url, {"Action": "allow"}), 400, "bad_request")
    assert_error(client.delete(url), 400, "bad_request")
    assert_error(client.get(f"{BASE}/check{query}"), 400, "bad_request")


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        ("web*", "db"),
        ("*web", "db"),
        ("**", "db"),
        ("web", "d*b"),
        ("", "db"),
        ("web", "-db"),
        ("web", "a b"),
    ],
)
def test_wildcards_only_as_whole_names(client, source, destination):
    body = {"SourceName": source, "DestinationName": destination, "Action": "allow"}
    assert_error(client.post(BASE, json=body), 400, "bad_request")
    assert client.get(BASE).get_json() == []


def test_star_is_accepted_on_either_side(client):
    precedences = {}
    for s, d in (("*", "db"), ("web", "*"), ("*", "*")):
        iid = create(client, s, d)
        precedences[(s, d)] = client.get(f"{BASE}/{iid}").get_json()["Precedence"]
    assert precedences == {("*", "db"): 8, ("web", "*"): 6, ("*", "*"): 5}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]},
            "L7 Permissions are not supported",
        ),
        ({"Colour": "red"}, "Colour"),
        ({"Action": "ALLOW"}, "Action"),
        ({"Action": "maybe"}, "Action"),
        ({"Action": None}, "Action"),
        ({"SourceNS": "other"}, "SourceNS"),
        ({"DestinationPartition": "p1"}, "DestinationPartition"),
        ({"SourceType": "external-uri"}, "SourceType"),
        ({"Description": "x" * 513}, "Description"),
        ({"Description": 5}, "Description"),
        ({"SourceName": 5}, "SourceName"),
    ],
)
def test_bad_bodies_are_refused(client, extra, message):
    body = {"SourceName": "web", "DestinationName": "db", "Action": "allow", **extra}
    assert_error(client.post(BASE, json=body), 400, "bad_request", message)
    exact_body = {k: v for k, v in body.items() if k not in ("SourceName", "DestinationName")}
    if "SourceName" not in extra:
        assert_error(put_json(client, exact("web", "db"), exact_body), 400, "bad_request", message)
    assert client.get(BASE).get_json() == []


def test_every_problem_of_a_body_is_named_at_once(client):
    body = {"SourceName": "web*", "DestinationName": "db", "Action": "maybe", "Colour": 1}
    got = assert_error(client.post(BASE, json=body), 400, "bad_request")["error"]
    assert "SourceName: " in got
    assert "Action: must be allow or deny" in got
    assert "Colour: Unknown field." in got
    r = client.post("/v1/agent/connect/authorize", json={"Target": "*", "Colour": 1})
    got = assert_error(r, 400, "bad_request")["error"]
    assert "Target: must be a service name, not '*'" in got
    assert "ClientCertURI: Missing data for required field." in got
    assert "Colour: Unknown field." in got


def test_missing_action_and_non_object_bodies(client):
    assert_error(client.post(BASE, json={"SourceName": "web", "DestinationName": "db"}), 400)
    assert_error(put_json(client, exact("web", "db"), {}), 400)
    assert_error(client.post(BASE, data=b"[]", content_type="application/json"), 400)
    assert_error(client.post(BASE, data=b"{nope", content_type="application/json"), 400)
    assert_error(client.post(BASE, data=b"", content_type="application/json"), 400)


def test_meta_limits(client):
    ok_meta = {f"k{i}": "v" for i in range(64)}
    ok_meta["k0"] = "v" * 512
    ok_meta["x" * 128] = ok_meta.pop("k1")
    iid = create(client, "web", "db", Meta=ok_meta)
    assert client.get(f"{BASE}/{iid}").get_json()["Meta"] == ok_meta
    create(client, "web", "cache", Meta=None)  # null is no Meta
    for bad in (
        {f"k{i}": "v" for i in range(65)},
        {"x" * 129: "v"},
        {"k": "v" * 513},
        {"": "v"},
        {"k": 1},
        {"k": None},
        [],  # a falsy non-object used to pass as "no Meta" (fixed in api/views/intentions.py)
        "",
        ["k", "v"],
    ):
        body = {"SourceName": "api", "DestinationName": "db", "Action": "allow", "Meta": bad}
        assert_error(client.post(BASE, json=body), 400, "bad_request", "Meta")
    assert len(client.get(BASE).get_json()) == 2


def test_consul_go_client_bodies_are_accepted(client):
    """What ``api.Connect().IntentionCreate`` of Consul's Go client sends: every field, the
    read-only ones zero and ``Hash`` null (refused as unknown before; fixed)."""
    go_body = {
        "ID": "",
        "Description": "",
        "SourceNS": "",
        "SourceName": "web",
        "DestinationNS": "",
        "DestinationName": "db",
        "SourceType": "consul",
        "Action": "allow",
        "Meta": None,
        "Precedence": 0,
        "CreatedAt": "0001-01-01T00:00:00Z",
        "UpdatedAt": "0001-01-01T00:00:00Z",
        "Hash": None,
        "CreateIndex": 0,
        "ModifyIndex": 0,
    }
    r = client.post(BASE, json=go_body)
    assert r.status_code == 200, r.get_data(as_text=True)
    iid = r.get_json()["ID"]
    # ... and an intention read back can be written back (IntentionUpdate).
    read = client.get(f"{BASE}/{iid}").get_json()
    r = client.put(f"{BASE}/{iid}", json={**read, "Action": "deny", "Hash": "aGFzaA=="})
    assert r.status_code == 200, r.get_data(as_text=True)
    after = client.get(f"{BASE}/{iid}").get_json()
    assert (after["Action"], after["Precedence"], after["ID"]) == ("deny", 9, iid)


# -- match and check -----------------------------------------------------------------------


def seed_for_match(client) -> None:
    for s, d, a in [
        ("*", "*", "deny"),
        ("web", "*", "allow"),
        ("*", "db", "deny"),
        ("api", "db", "allow"),
        ("web", "db", "deny"),
        ("web", "cache", "allow"),
        ("other", "cache", "deny"),
    ]:
        create(client, s, d, a)


def test_match_is_in_evaluation_order(client):
    seed_for_match(client)
    r = client.get(f"{BASE}/match?by=destination&name=db&name=cache&name=nothing")
    assert r.status_code == 200
    got = r.get_json()
    assert set(got) == {"db", "cache", "nothing"}
    # Precedence descending; at equal precedence deny first (web before api, against the
    # names' order); then by names.
    assert labels(got["db"]) == [
        "web => db (deny)",
        "api => db (allow)",
        "* => db (deny)",
        "web => * (allow)",
        "* => * (deny)",
    ]
    assert labels(got["cache"]) == [
        "other => cache (deny)",
        "web => cache (allow)",
        "web => * (allow)",
        "* => * (deny)",
    ]
    assert labels(got["nothing"]) == ["web => * (allow)", "* => * (deny)"]
    assert all(i["Precedence"] for i in got["db"])  # full intentions, not summaries

    by_source = client.get(f"{BASE}/match?by=source&name=web").get_json()
    assert labels(by_source["web"]) == [
        "web => db (deny)",
        "web => cache (allow)",
        "* => db (deny)",
        "web => * (allow)",
        "* => * (deny)",
    ]
    star = client.get(f"{BASE}/match?by=destination&name=*").get_json()
    assert labels(star["*"]) == ["web => * (allow)", "* => * (deny)"]


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?by=destination",
        "?name=db",
        "?by=sideways&name=db",
        "?by=source&name=web*",
        "?by=source&name=web&name=a%20b",
    ],
)
def test_bad_match_queries(client, query):
    assert_error(client.get(f"{BASE}/match{query}"), 400, "bad_request")


def test_check_follows_precedence_and_the_default(client):
    def allowed(s, d):
        r = client.get(f"{BASE}/check?source={s}&destination={d}")
        assert r.status_code == 200
        return r.get_json()["Allowed"]

    # ACLs are off (the default, as in ``trellis dev``): no intention means allowed.
    assert allowed("web", "db") is True
    seed_for_match(client)
    assert allowed("web", "db") is False  # web => db deny (9)
    assert allowed("api", "db") is True  # api => db allow (9) beats * => db deny (8)
    assert allowed("other", "db") is False  # * => db deny (8)
    assert allowed("web", "queue") is True  # web => * allow (6) beats * => * deny (5)
    assert allowed("other", "queue") is False  # * => * deny (5)
    assert allowed("web", "cache") is True
    assert allowed("other", "cache") is False
    # A change is seen at once (the compiled set is rebuilt on the next decision).
    assert client.delete(exact("web", "db")).get_json() is True
    assert allowed("web", "db") is False  # now * => db deny decides
    assert put_json(client, exact("web", "db"), {"Action": "allow"}).get_json() is True
    assert allowed("web", "db") is True


# -- blocking --------------------------------------------------------------------------------


def test_blocking_list_is_woken_by_a_write(client):
    r = assert_woken(client, f"{BASE}?", lambda: create(client, "web", "db"))
    assert labels(r.get_json()) == ["web => db (allow)"]
    iid = r.get_json()[0]["ID"]
    body = {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    r = assert_woken(client, f"{BASE}?", lambda: client.put(f"{BASE}/{iid}", json=body))
    assert labels(r.get_json()) == ["web => db (deny)"]
    r = assert_woken(client, f"{BASE}?", lambda: client.delete(f"{BASE}/{iid}"))
    assert r.get_json() == []


def test_blocking_exact_wakes_for_its_destination_only(client):
    create(client, "web", "db")
    assert_not_woken(client, exact("web", "db"), lambda: create(client, "web", "cache"))
    assert_not_woken(client, exact("web", "db"), lambda: create(client, "db", "web"))
    r = assert_woken(
        client, exact("web", "db"), lambda: put_json(client, exact("web", "db"), {"Action": "deny"})
    )
    assert r.get_json()["Action"] == "deny"


def test_blocking_exact_waits_for_a_missing_pair_to_appear(client):
    missing = client.get(exact("web", "db"))
    assert missing.status_code == 404
    q = block(client, exact("web", "db") + f"&index={index_of(missing)}&wait=5s")
    t0 = time.monotonic()
    create(client, "web", "db", "deny")
    r = q.result()
    assert time.monotonic() - t0 < PROMPT
    assert r.status_code == 200
    assert r.get_json()["Action"] == "deny"


def test_blocking_match_is_woken_by_a_write(client):
    url = f"{BASE}/match?by=destination&name=db"
    r = assert_woken(client, url, lambda: create(client, "*", "db", "deny"))
    assert labels(r.get_json()["db"]) == ["* => db (deny)"]


# -- authorize -------------------------------------------------------------------------------


def test_authorize_with_and_without_intentions(client):
    td = trust_domain(client)
    web = uri(td, "web")
    assert authorize(client, "db", web) == {"Authorized": True, "Reason": ALLOWED_BY_DEFAULT}
    iid = create(client, "web", "db", "deny")
    assert authorize(client, "db", web) == {
        "Authorized": False,
        "Reason": "Matched intention: web => db (deny)",
    }
    body = {"SourceName": "web", "DestinationName": "db", "Action": "allow"}
    assert client.put(f"{BASE}/{iid}", json=body).get_json() is True
    assert authorize(client, "db", web) == {
        "Authorized": True,
        "Reason": "Matched intention: web => db (allow)",
    }
    create(client, "*", "db", "deny")
    assert authorize(client, "db", uri(td, "api")) == {
        "Authorized": False,
        "Reason": "Matched intention: * => db (deny)",
    }
    assert authorize(client, "db", web)["Authorized"] is True  # 9 beats 8
    assert authorize(client, "cache", uri(td, "api")) == {
        "Authorized": True,
        "Reason": ALLOWED_BY_DEFAULT,
    }


def test_authorize_refuses_foreign_and_malformed_identities(client):
    td = trust_domain(client)
    create(client, "*", "*", "allow")  # so that only the identity can deny
    for cert_uri in (
        uri("0a0a0a0a-0000-4000-8000-000000000000.trellis", "web"),  # another trust domain
        uri(td, "web", dc="dc2"),  # another datacenter
        uri(td, "web", ns="team-a"),  # another namespace
        f"spiffe://{td}/svc/web",  # not a service identity
        f"spiffe://{td}",  # the CA's identity
        "https://example.com/svc/web",
        "not a uri",
        f"spiffe://{td}/ns/default/dc/dc1/svc/../db",
    ):
        got = authorize(client, "db", cert_uri)
        assert got["Authorized"] is False, cert_uri
        assert got["Reason"], cert_uri
    assert authorize(client, "db", uri(td, "web"))["Authorized"] is True


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Target": "*", "ClientCertURI": "spiffe://x/ns/default/dc/dc1/svc/web"}, "Target"),
        ({"Target": "db*", "ClientCertURI": "spiffe://x/ns/default/dc/dc1/svc/web"}, "Target"),
        ({"Target": "", "ClientCertURI": "spiffe://x/ns/default/dc/dc1/svc/web"}, "Target"),
        ({"ClientCertURI": "spiffe://x/ns/default/dc/dc1/svc/web"}, "Target"),
        ({"Target": "db"}, "ClientCertURI"),
        ({"Target": "db", "ClientCertURI": ""}, "ClientCertURI"),
        ({"Target": "db", "ClientCertURI": 5}, "ClientCertURI"),
        (
            {"Target": "db", "ClientCertURI": "spiffe://x", "ClientCertSerial": 5},
            "ClientCertSerial",
        ),
        ({"Target": "db", "ClientCertURI": "spiffe://x", "Colour": "red"}, "Colour"),
    ],
)
def test_authorize_bad_requests(client, body, message):
    r = client.post("/v1/agent/connect/authorize", json=body)
    assert_error(r, 400, "bad_request", message)


# -- the typed client over the same app --------------------------------------------------------


class CheckedWSGI(httpx.WSGITransport):
    """The app as an httpx transport, every answer checked against openapi.yaml."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        body = resp.read()
        validate(
            request.method,
            request.url.path,
            request.url.query,
            resp.status_code,
            resp.headers,
            body,
            resp.headers.get("content-type"),
        )
        return resp


@pytest.fixture
def api(client):
    with Client("http://trellis", transport=CheckedWSGI(app=client.raw.application)) as c:
        yield c


def test_typed_client(api):
    iid = api.intention_create("web", "db", "deny", description="d", meta={"k": "v"})
    assert api.intention_get(iid)["Meta"] == {"k": "v"}
    assert api.intention_get(str(uuid.uuid4())) is None
    with pytest.raises(APIError) as e:
        api.intention_get("nope")
    assert e.value.status == 400
    with pytest.raises(APIError) as e:
        api.intention_create("web", "db")
    assert e.value.status == 409
    api.intention_update(iid, "web", "db", "allow")
    got = api.intention_get_exact("web", "db")
    assert (got.value["ID"], got.value["Action"], got.value["Meta"]) == (iid, "allow", {})
    assert got.index is not None and got.index >= got.value["ModifyIndex"]
    missing = api.intention_get_exact("x", "y")
    assert missing.value is None and missing.index is not None

    api.intention_upsert_exact("*", "db", "deny", meta={"a": "b"})
    listed = api.intentions_list()
    assert labels(listed.value) == ["web => db (allow)", "* => db (deny)"]
    matched = api.intention_match("destination", ["db", "web"])
    assert labels(matched.value["db"]) == ["web => db (allow)", "* => db (deny)"]
    assert matched.value["web"] == []
    assert labels(api.intention_match("source", "api").value["api"]) == ["* => db (deny)"]
    assert api.intention_check("web", "db") is True
    assert api.intention_check("api", "db") is False

    td = api.ca_roots().value["TrustDomain"]
    assert api.agent_authorize("db", uri(td, "api"), "0a:0b") == {
        "Authorized": False,
        "Reason": "Matched intention: * => db (deny)",
    }

    api.intention_delete(iid)
    with pytest.raises(APIError) as e:
        api.intention_delete(iid)
    assert e.value.status == 404
    api.intention_delete_exact("*", "db")
    api.intention_delete_exact("*", "db")  # nothing to delete is no error
    assert api.intentions_list().value == []
