"""py-consul (unchanged) against a real ``trellis dev``: prepared queries, coordinates and the
Raft configuration, and the query's ``.query.`` and PTR names over the server's real DNS port.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import consul
import consul.exceptions
import httpx
import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tests.support import TrellisProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def c(trellis_server) -> Iterator[consul.Consul]:
    client = consul.Consul(host="127.0.0.1", port=urlsplit(trellis_server.url).port)
    yield client
    client.http.session.close()  # an idle keep-alive would hold up the server's stop


def ask(p, name: str, qtype: str = "A") -> DNSRecord:
    assert p.dns_port is not None
    q = DNSRecord.question(name, qtype)
    return DNSRecord.parse(q.send("127.0.0.1", p.dns_port, timeout=2))


def test_prepared_query_round_trip(c, trellis_server):
    assert c.agent.service.register("web", service_id="web-1", address="127.0.0.2", port=80)
    assert c.agent.service.register(
        "web", service_id="web-2", address="127.0.0.3", port=81, tags=["old"]
    )
    # py-consul sends lower-case field names and always a name_prefix_match template.
    created = c.query.create("web", name="web-q", ttl="10s", tags=["!old"])
    qid = created["ID"]
    [q] = c.query.get(qid)
    assert (q["Name"], q["Service"]["Service"], q["DNS"]["TTL"]) == ("web-q", "web", "10s")
    assert [x["ID"] for x in c.query.list()] == [qid]

    result = c.query.execute("web-q")
    assert [n["Service"]["ID"] for n in result["Nodes"]] == ["web-1"]
    assert (result["Datacenter"], result["Failovers"], result["DNS"]) == ("dc1", 0, {"TTL": "10s"})
    assert c.query.execute(qid, limit=1)["Service"] == "web"
    assert c.query.explain("web-q")["Query"]["ID"] == qid

    # The same query over DNS, with its TTL.
    r = ask(trellis_server, "web-q.query.trellis.")
    assert r.header.rcode == RCODE.NOERROR
    assert [(str(rr.rdata), rr.ttl) for rr in r.rr] == [("127.0.0.2", 10)]
    r = ask(trellis_server, "web-q.query.trellis.", "SRV")
    assert [rr.rdata.port for rr in r.rr if rr.rtype == QTYPE.SRV] == [80]

    assert c.query.update(qid, "web", name="web-q", tags=["old"]) is True
    assert [n["Service"]["ID"] for n in c.query.execute("web-q")["Nodes"]] == ["web-2"]
    assert c.query.delete(qid) is True
    assert c.query.list() == []
    assert c.query.execute("web-q") is None  # a 404, which py-consul reads as None


def test_ptr_names_the_node(trellis_server):
    r = ask(trellis_server, "1.0.0.127.in-addr.arpa.", "PTR")
    assert r.header.rcode == RCODE.NOERROR
    assert [str(rr.rdata) for rr in r.rr] == ["test-node.node.dc1.trellis."]


def test_coordinates_and_raft_configuration(c):
    assert c.coordinate.datacenters() == [{"Datacenter": "dc1", "AreaID": "wan", "Coordinates": []}]
    index, nodes = c.coordinate.nodes()
    assert nodes == [] and int(index) >= 1
    assert c.coordinate.node("test-node")[1] is None  # no coordinates: Consul's 404
    coord = {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05}
    with pytest.raises(consul.exceptions.ConsulException, match="no network coordinates"):
        c.coordinate.update("test-node", coord)
    raft = c.operator.raft_config()
    [server] = raft["Servers"]
    assert (server["Node"], server["Leader"], server["Voter"]) == ("test-node", True, True)
    assert server["Address"] == c.status.leader()
    assert raft["Index"] >= 1


def test_dns_runs_a_query_with_its_own_token_under_acls(tmp_path):
    """A real ``trellis server`` with ACLs on (default deny): DNS carries no token, so a
    ``.query.`` name answers what the query's own token may read, and nothing without one."""
    config = tmp_path / "trellis.json"
    config.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    p = TrellisProcess(
        [
            "server",
            *("-config", str(config), "-data-dir", str(tmp_path / "data")),
            *("-http-port", "0", "-dns-port", "0", "-workers", "2", "-node", "n1"),
        ]
    ).start()
    try:
        url = p.url
        root = {"X-Consul-Token": httpx.put(f"{url}/v1/acl/bootstrap").json()["SecretID"]}

        def put(path: str, body: dict) -> dict:
            r = httpx.put(f"{url}{path}", json=body, headers=root)
            assert r.status_code == 200, r.text
            return r.json()

        put("/v1/agent/service/register", {"Name": "web", "Address": "10.1.2.3", "Port": 80})
        rules = 'service "web" { policy = "read" }\nnode_prefix "" { policy = "read" }'
        policy = put("/v1/acl/policy", {"Name": "web-read", "Rules": rules})
        reader = put("/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})["SecretID"]
        for name, token in (("open", ""), ("with-token", reader)):
            body = {"Name": name, "Service": {"Service": "web"}, "Token": token}
            r = httpx.post(f"{url}/v1/query", json=body, headers=root)
            assert r.status_code == 200, r.text
        assert ask(p, "open.query.trellis.").header.rcode == RCODE.NXDOMAIN
        r = ask(p, "with-token.query.trellis.")
        assert [str(rr.rdata) for rr in r.rr] == ["10.1.2.3"]
    finally:
        p.stop()
