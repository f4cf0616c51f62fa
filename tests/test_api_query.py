"""Prepared queries through the HTTP API, on SQLite and on PostgreSQL (``store_url``).

Consul's semantics (agent/consul/prepared_query_endpoint.go, prepared_query/template.go):
create, read, update, delete; execute by ID, by name, or by a template's name prefix, with
tags (``!tag`` excludes), only passing, check IDs ignored, node and service meta, Connect;
one datacenter (``Failovers`` 0); the query's token filters its results; ``query`` ACL rules
by name prefix.
"""

from __future__ import annotations

from tests import api_fixtures
from tests.api_fixtures import InThread, assert_error, catalog_register, index_of
from tests.test_acl_api import DENY, bootstrap, create_token, tok

client = api_fixtures.client
make_client = api_fixtures.make_client


def create(c, body, **kw) -> str:
    r = c.post("/v1/query", json=body, **kw)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["ID"]


def execute(c, key: str, query: str = "", **kw) -> dict:
    r = c.get(f"/v1/query/{key}/execute{query}", **kw)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def ids(result: dict) -> list[str]:
    return sorted(e["Service"]["ID"] for e in result["Nodes"])


def instance(
    c, node: str, sid: str, *, tags=(), status="passing", meta=None, node_meta=None, headers=None
):
    body = {
        "Node": node,
        "Address": f"10.0.0.{len(node)}",
        "NodeMeta": node_meta or {},
        "Service": {
            "ID": sid,
            "Service": "db",
            "Tags": list(tags),
            "Port": 5432,
            "Meta": meta or {},
        },
        "Checks": [{"CheckID": f"{sid}-check", "Name": "c", "Status": status, "ServiceID": sid}],
    }
    r = c.put("/v1/catalog/register", json=body, headers=headers or {})
    assert r.status_code == 200, r.get_data(as_text=True)


def catalog(c, headers=None) -> None:
    """db-1 passing on n1 (rack a), db-2 warning on n2 (env prod), db-3 critical on n3."""
    instance(c, "n1", "db-1", tags=["primary", "v2"], node_meta={"rack": "a"}, headers=headers)
    instance(
        c,
        "n2",
        "db-2",
        tags=["replica", "v2"],
        status="warning",
        meta={"env": "prod"},
        headers=headers,
    )
    instance(c, "n3", "db-3", tags=["replica", "old"], status="critical", headers=headers)


# -- create, read, update, delete -------------------------------------------------------------


def test_crud_round_trip(client):
    qid = create(client, {"Name": "db", "Service": {"Service": "db"}, "DNS": {"TTL": "10s"}})
    r = client.get(f"/v1/query/{qid}")
    [q] = r.get_json()
    assert (q["ID"], q["Name"], q["Token"], q["Session"]) == (qid, "db", "", "")
    assert q["Service"]["Service"] == "db" and q["DNS"] == {"TTL": "10s"}
    assert q["Service"]["Failover"] == {"NearestN": 0, "Datacenters": None, "Targets": None}
    assert q["Template"] == {"Type": "", "Regexp": "", "RemoveEmptyTags": False}
    assert q["CreateIndex"] == q["ModifyIndex"] == index_of(r) > 0
    assert [x["ID"] for x in client.get("/v1/query").get_json()] == [qid]

    r = client.put(f"/v1/query/{qid}", json={"Name": "db2", "Service": {"Service": "db"}})
    assert r.status_code == 200 and r.get_json() is None
    [q2] = client.get(f"/v1/query/{qid}").get_json()
    assert q2["Name"] == "db2" and q2["CreateIndex"] == q["CreateIndex"]
    assert q2["ModifyIndex"] > q["ModifyIndex"] and q2["DNS"] == {"TTL": ""}

    assert client.delete(f"/v1/query/{qid}").status_code == 200
    assert_error(client.get(f"/v1/query/{qid}"), 404, contains="Query not found")
    assert_error(client.delete(f"/v1/query/{qid}"), 404)
    assert_error(client.put(f"/v1/query/{qid}", json={"Service": {"Service": "x"}}), 404)
    assert client.get("/v1/query").get_json() == []


def test_field_names_in_any_case_as_py_consul_sends_them(client):
    qid = create(
        client,
        {
            "name": "low",
            "service": {
                "service": "db",
                "onlypassing": True,
                "tags": ["v2"],
                "failover": {"nearestn": 2, "datacenters": ["dc2"]},
            },
            "dns": {"ttl": "5s"},
            "template": {"type": "name_prefix_match"},
        },
    )
    [q] = client.get(f"/v1/query/{qid}").get_json()
    assert q["Service"]["OnlyPassing"] is True and q["Service"]["Tags"] == ["v2"]
    assert q["Service"]["Failover"]["Datacenters"] == ["dc2"] and q["DNS"]["TTL"] == "5s"
    assert q["Template"]["Type"] == "name_prefix_match"


def test_bad_bodies_are_400s_and_store_nothing(client):
    qid = create(client, {"Name": "taken", "Service": {"Service": "db"}})
    for body, says in [
        ({"Name": "x"}, "Must provide a Service name"),
        ({"Service": {"Service": "db", "Colour": "red"}}, "Colour"),
        ({"Service": {"Service": "db"}, "DNS": {"TTL": "soon"}}, "DNS.TTL"),
        ({"Service": {"Service": "db"}, "Template": {"Type": "exact"}}, "Template.Type"),
        ({"Service": {"Service": "${nope}"}, "Template": {"Type": "name_prefix_match"}}, "nope"),
        (
            {
                "Service": {"Service": "db"},
                "Template": {"Type": "name_prefix_match", "Regexp": "(unclosed"},
            },
            "Template.Regexp",
        ),
        ({"Service": {"Service": "db", "Peer": "other"}}, "peering"),
        ({"Name": "taken", "Service": {"Service": "db"}}, "aliases an existing query name"),
        ({"Name": qid, "Service": {"Service": "db"}}, "aliases an existing query ID"),
        ({"Service": {"Service": "db"}, "Session": "no-such-session"}, "invalid session"),
        ({"Service": {"Service": "db"}, "Token": "<hidden>"}, "<hidden>"),
        ({"Service": {"Service": "db", "OnlyPassing": "yes"}}, "OnlyPassing"),
    ]:
        assert_error(client.post("/v1/query", json=body), 400, contains=says)
    assert_error(client.post("/v1/query", data=b"[1]", content_type="application/json"), 400)
    assert len(client.get("/v1/query").get_json()) == 1


def test_a_query_tied_to_a_session_ends_with_it(client):
    r = client.put("/v1/session/create", json={})
    sid = r.get_json()["ID"]
    qid = create(client, {"Name": "s", "Service": {"Service": "db"}, "Session": sid})
    assert client.get(f"/v1/query/{qid}").status_code == 200
    assert client.put(f"/v1/session/destroy/{sid}").status_code == 200
    assert_error(client.get(f"/v1/query/{qid}"), 404)
    assert_error(client.get("/v1/query/s/execute"), 404)
    # The name is free again.
    create(client, {"Name": "s", "Service": {"Service": "db"}})


def test_a_blocking_list_wakes_on_a_create(client):
    r = client.get("/v1/query")
    idx = index_of(r)
    call = InThread(lambda: client.get(f"/v1/query?index={idx}&wait=20s")).start()
    qid = create(client, {"Service": {"Service": "db"}})
    got = call.result()
    assert [q["ID"] for q in got.get_json()] == [qid] and index_of(got) > idx
    assert call.elapsed < 15


# -- execute ------------------------------------------------------------------------------------


def test_execute_filters_by_health_tags_and_meta(client):
    catalog(client)
    qid = create(client, {"Name": "db", "Service": {"Service": "db"}, "DNS": {"TTL": "7s"}})
    res = execute(client, qid)
    # Critical is never served; warning is, unless OnlyPassing.
    assert ids(res) == ["db-1", "db-2"]
    assert (res["Service"], res["DNS"], res["Datacenter"], res["Failovers"]) == (
        "db",
        {"TTL": "7s"},
        "dc1",
        0,
    )
    assert ids(execute(client, "db")) == ["db-1", "db-2"]  # by name too
    assert len(execute(client, "db", "?limit=1")["Nodes"]) == 1
    entry = next(e for e in res["Nodes"] if e["Service"]["ID"] == "db-1")
    assert entry["Node"]["Node"] == "n1" and [c["CheckID"] for c in entry["Checks"]] == [
        "db-1-check"
    ]

    def run(service: dict) -> list[str]:
        q = create(client, {"Service": {"Service": "db", **service}})
        try:
            return ids(execute(client, q))
        finally:
            client.delete(f"/v1/query/{q}")

    assert run({"OnlyPassing": True}) == ["db-1"]
    assert run({"Tags": ["V2"]}) == ["db-1", "db-2"]  # tags ignore case, as in Consul
    assert run({"Tags": ["v2", "!primary"]}) == ["db-2"]
    assert run({"Tags": ["!replica"]}) == ["db-1"]
    assert run({"IgnoreCheckIDs": ["db-3-check"]}) == ["db-1", "db-2", "db-3"]
    assert run({"NodeMeta": {"rack": "a"}}) == ["db-1"]
    assert run({"ServiceMeta": {"env": "prod"}}) == ["db-2"]
    # Trellis has one datacenter and no coordinates: failover and Near change nothing.
    assert run({"Failover": {"Datacenters": ["dc2"], "NearestN": 3}, "Near": "_agent"}) == [
        "db-1",
        "db-2",
    ]
    assert_error(client.get("/v1/query/nothing/execute"), 404, contains="Query not found")
    assert_error(client.get(f"/v1/query/{qid}/execute?dc=dc9"), 400)


def test_execute_connect_answers_the_sidecars(client):
    catalog(client)
    catalog_register(
        client,
        {
            "Node": "n1",
            "Address": "10.0.0.2",
            "Service": {
                "ID": "db-1-proxy",
                "Service": "db-sidecar-proxy",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Proxy": {"DestinationServiceName": "db", "DestinationServiceID": "db-1"},
            },
        },
    )
    qid = create(client, {"Service": {"Service": "db", "Connect": {"Enabled": True}}})
    assert ids(execute(client, qid)) == ["db-1-proxy"]
    plain = create(client, {"Service": {"Service": "db"}})
    assert ids(execute(client, plain, "?connect=true")) == ["db-1-proxy"]


def test_templates_render_for_the_name_asked(client):
    catalog(client)
    generic = create(
        client,
        {
            "Name": "",
            "Template": {"Type": "name_prefix_match"},
            "Service": {"Service": "${name.full}"},
        },
    )
    tagged = create(
        client,
        {
            "Name": "tag-",
            "Template": {"Type": "name_prefix_match"},
            "Service": {"Service": "db", "Tags": ["${name.suffix}", "!${name.prefix}x"]},
        },
    )
    rx = create(
        client,
        {
            "Name": "geo-",
            "Template": {
                "Type": "name_prefix_match",
                "Regexp": "^geo-([^-]+)-(.*)$",
                "RemoveEmptyTags": True,
            },
            "Service": {"Service": "${match(1)}", "Tags": ["${match(2)}", "${match(7)}"]},
        },
    )
    assert ids(execute(client, "db")) == ["db-1", "db-2"]  # the catch-all template
    assert execute(client, "web")["Nodes"] == []  # rendered as "web": nothing registered
    assert ids(execute(client, "tag-primary")) == ["db-1"]  # the longest prefix wins
    assert ids(execute(client, "geo-db-replica")) == ["db-2"]
    [q] = client.get(f"/v1/query/{rx}").get_json()
    assert q["Service"]["Service"] == "${match(1)}"  # stored as written
    explained = client.get("/v1/query/geo-db-replica/explain").get_json()["Query"]
    assert explained["ID"] == rx and explained["Service"]["Service"] == "db"
    assert explained["Service"]["Tags"] == ["replica"]  # the empty tag removed
    explained = client.get("/v1/query/tag-v2/explain").get_json()["Query"]
    assert explained["ID"] == tagged and explained["Service"]["Tags"] == ["v2", "!tag-x"]
    assert client.get(f"/v1/query/{generic}/explain").get_json()["Query"]["ID"] == generic


def test_dns_ttl_and_the_result_shape_with_no_instances(client):
    qid = create(client, {"Service": {"Service": "nothing"}})
    assert execute(client, qid) == {
        "Service": "nothing",
        "Nodes": [],
        "DNS": {"TTL": ""},
        "Datacenter": "dc1",
        "Failovers": 0,
    }


# -- ACLs -----------------------------------------------------------------------------------------


def test_query_acls(make_client):
    c = make_client(**DENY)
    root = bootstrap(c)["SecretID"]

    def token(rules: str) -> str:
        r = c.put(
            "/v1/acl/policy",
            json={"Name": f"p{abs(hash(rules))}", "Rules": rules},
            headers=tok(root),
        )
        assert r.status_code == 200, r.get_data(as_text=True)
        return create_token(c, root, [{"ID": r.get_json()["ID"]}])["SecretID"]

    catalog(c, tok(root))
    writer = token('query_prefix "db-" { policy = "write" }')
    reader = token('query_prefix "" { policy = "read" }')
    sees_db = token('service "db" { policy = "read" }\nnode_prefix "" { policy = "read" }')

    body = {"Name": "db-q", "Service": {"Service": "db"}}
    assert_error(c.post("/v1/query", json=body, headers=tok(reader)), 403, contains="query:write")
    assert_error(c.post("/v1/query", json={**body, "Name": "web"}, headers=tok(writer)), 403)
    qid = create(c, {**body, "Token": sees_db}, headers=tok(writer))
    # Reads show the token hidden, to everyone (Trellis keeps only its hash).
    [q] = c.get(f"/v1/query/{qid}", headers=tok(reader)).get_json()
    assert q["Token"] == "<hidden>"
    assert c.get(f"/v1/query/{qid}", headers=tok(root)).get_json()[0]["Token"] == "<hidden>"
    assert_error(c.get(f"/v1/query/{qid}", headers=tok(writer + "x")), 403)
    anon = c.get("/v1/query")
    assert anon.get_json() == [] and anon.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    assert_error(c.get(f"/v1/query/{qid}"), 403)
    assert_error(c.get("/v1/query/db-q/explain"), 403, contains="query:read")

    # Executing needs no query rule; the results are what the query's token may read.
    assert ids(execute(c, "db-q")) == ["db-1", "db-2"]
    # Sending back "<hidden>" keeps the token, for a token that manages ACLs only: with
    # query:write alone, the writer could re-aim a query that runs with a stronger token.
    assert_error(c.put(f"/v1/query/{qid}", json=q, headers=tok(writer)), 403, contains="acl:write")
    assert c.put(f"/v1/query/{qid}", json=q, headers=tok(root)).status_code == 200
    assert ids(execute(c, "db-q")) == ["db-1", "db-2"]
    # A new one replaces it.
    no_read = token('key_prefix "" { policy = "read" }')
    assert (
        c.put(f"/v1/query/{qid}", json={**body, "Token": no_read}, headers=tok(writer)).status_code
        == 200
    )
    r = c.get("/v1/query/db-q/execute")
    assert r.get_json()["Nodes"] == []
    assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    # Without a token of its own, the caller's decides.
    assert c.put(f"/v1/query/{qid}", json=body, headers=tok(writer)).status_code == 200
    assert execute(c, "db-q")["Nodes"] == []
    assert ids(execute(c, "db-q", headers=tok(sees_db))) == ["db-1", "db-2"]

    # Renaming needs write on the new name too; deleting on the name.
    assert_error(c.put(f"/v1/query/{qid}", json={**body, "Name": "web"}, headers=tok(writer)), 403)
    assert_error(c.delete(f"/v1/query/{qid}", headers=tok(reader)), 403)

    # An unnamed query is governed as the name "" (Consul exempts it from every rule: Trellis
    # does not, so that a token with no rights cannot fill the query limit everyone shares).
    unnamed_body = {"Service": {"Service": "db"}}
    assert_error(c.post("/v1/query", json=unnamed_body), 403, contains="query:write on ''")
    assert_error(c.post("/v1/query", json=unnamed_body, headers=tok(writer)), 403)
    unnamed = create(c, unnamed_body, headers=tok(root))
    assert_error(c.get(f"/v1/query/{unnamed}", headers=tok(writer)), 403)
    assert c.get(f"/v1/query/{unnamed}", headers=tok(reader)).status_code == 200
    assert [x["ID"] for x in c.get("/v1/query", headers=tok(writer)).get_json()] == [qid]
    assert {x["ID"] for x in c.get("/v1/query", headers=tok(reader)).get_json()} == {qid, unnamed}
    assert_error(c.delete(f"/v1/query/{unnamed}", headers=tok(reader)), 403)
    assert c.delete(f"/v1/query/{unnamed}", headers=tok(root)).status_code == 200
    assert c.delete(f"/v1/query/{qid}", headers=tok(writer)).status_code == 200


def test_a_query_token_that_names_no_token_is_refused_at_execute(make_client):
    c = make_client(**DENY)
    root = bootstrap(c)["SecretID"]
    gone = create_token(c, root, [])
    qid = create(c, {"Service": {"Service": "db"}, "Token": gone["SecretID"]}, headers=tok(root))
    assert c.delete(f"/v1/acl/token/{gone['AccessorID']}", headers=tok(root)).status_code == 200
    assert_error(c.get(f"/v1/query/{qid}/execute"), 403, contains="ACL not found")


def test_concurrent_creates_keep_every_query_and_names_unique(client):
    # Two writers race on the one document: compare-and-set keeps both, refuses a duplicate.
    calls = [
        InThread(
            lambda n=n: client.post(
                "/v1/query", json={"Name": f"q{n % 5}", "Service": {"Service": "db"}}
            )
        )
        for n in range(10)
    ]
    for call in calls:
        call.start()
    codes = sorted(call.result().status_code for call in calls)
    assert codes == [200] * 5 + [400] * 5
    names = sorted(q["Name"] for q in client.get("/v1/query").get_json())
    assert names == [f"q{n}" for n in range(5)]


def test_query_write_alone_cannot_re_aim_a_query_that_runs_with_a_stronger_token(make_client):
    c = make_client(**DENY)
    root = bootstrap(c)["SecretID"]
    catalog(c, tok(root))
    policy = c.put(
        "/v1/acl/policy",
        json={"Name": "web-team", "Rules": 'query_prefix "web-" { policy = "write" }'},
        headers=tok(root),
    ).get_json()
    team = create_token(c, root, [{"ID": policy["ID"]}])["SecretID"]
    # The operator's query runs with a token that reads everything, to serve web.
    qid = create(
        c, {"Name": "web-q", "Service": {"Service": "web"}, "Token": root}, headers=tok(root)
    )
    [q] = c.get(f"/v1/query/{qid}", headers=tok(team)).get_json()
    q["Service"]["Service"] = "db"
    r = c.put(f"/v1/query/{qid}", json=q, headers=tok(team))  # Token "<hidden>": keep it
    assert_error(r, 403, contains="acl:write")
    assert c.get(f"/v1/query/{qid}", headers=tok(team)).get_json()[0]["Service"]["Service"] == "web"
    assert execute(c, "web-q")["Nodes"] == []  # still web (none registered), not db
    # The team may replace the query with a token of its own (or none).
    q["Token"] = team
    assert c.put(f"/v1/query/{qid}", json=q, headers=tok(team)).status_code == 200
    assert execute(c, "web-q")["Nodes"] == []  # the team's token reads no db


def test_two_servers_on_one_store_see_each_others_queries_at_once(make_client):
    # Each process keeps the parsed queries; a write through another must still show at once.
    a, b = make_client(), make_client()
    catalog(a)
    assert_error(b.get("/v1/query/db/execute"), 404)
    qid = create(a, {"Name": "db", "Service": {"Service": "db", "OnlyPassing": True}})
    assert ids(execute(b, "db")) == ["db-1"]
    r = a.put(f"/v1/query/{qid}", json={"Name": "db", "Service": {"Service": "db"}})
    assert r.status_code == 200
    assert ids(execute(b, "db")) == ["db-1", "db-2"]
    assert a.delete(f"/v1/query/{qid}").status_code == 200
    assert_error(b.get("/v1/query/db/execute"), 404)


def test_a_query_is_at_most_16_kib(client):
    body = {"Service": {"Service": "db", "Tags": ["t" * 250] * 64, "NodeMeta": {}}}
    body["Service"]["ServiceMeta"] = {f"k{i}": "v" * 500 for i in range(40)}
    assert_error(client.post("/v1/query", json=body), 400, contains="at most 16384 bytes")
