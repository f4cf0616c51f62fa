"""DNS: ``<query>.query.<domain>`` (prepared queries) and PTR reverse lookups, on both stores.

A real DNS server on real sockets (``serve`` from tests/test_dns.py) answers dnslib's client
for the wire tests; the ACL cases call ``answer()`` with small injected authorizers.
"""

from __future__ import annotations

import ipaddress
import uuid

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tests.test_dns import addrs, core, reg, serve, server, settings, srvs, svc, svc_check
from trellis.api import queries
from trellis.api.acl.cache import hash_secret
from trellis.api.acl.rules import Authorizer, parse_rules
from trellis.api.dns import name_index
from trellis.api.errors import PermissionDenied
from trellis.api.store import open_store
from trellis.api.store.base import CRITICAL, PASSING, WARNING, Node, Registration

__all__ = ["serve", "server", "settings"]  # fixtures, bound here so that pytest finds them


@pytest.fixture
def db(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def put_query(db, body: dict) -> str:
    """Store a prepared query as POST /v1/query does (its parsing, its stored form)."""
    doc, token = queries.parse_query(body, query_id=str(uuid.uuid4()))
    doc["TokenHash"] = hash_secret(token) if token else ""
    docs, index = queries.stored(db)
    assert db.system_write({queries.DOC: {"Queries": [*docs, doc]}}, expect={queries.DOC: index})
    return doc["ID"]


@pytest.fixture
def web(db):
    """web on n1 (passing, tag v1), n2 (warning, v2), n3 (critical); db on n1 at its own
    address 10.9.9.9; n6 has an IPv6 address."""
    reg(
        db,
        "n1",
        "10.0.0.1",
        svc("n1", "web", port=80, tags=("v1",)),
        svc("n1", "db", port=5432, address="10.9.9.9"),
        checks=(svc_check("n1", "web", "web", PASSING),),
    )
    reg(
        db,
        "n2",
        "10.0.0.2",
        svc("n2", "web", port=81, tags=("v2",)),
        checks=(svc_check("n2", "web", "web", WARNING),),
    )
    reg(
        db,
        "n3",
        "10.0.0.3",
        svc("n3", "web", port=80),
        checks=(svc_check("n3", "web", "web", CRITICAL),),
    )
    reg(db, "n6", "2001:db8::6")


def ttls(r: DNSRecord) -> set[int]:
    return {rr.ttl for rr in [*r.rr, *r.ar] if rr.rtype != QTYPE.OPT}


# -- <query>.query ---------------------------------------------------------------------------------


def test_a_query_answers_a_and_srv_with_its_ttl_over_udp_and_tcp(server, db, web):
    qid = put_query(db, {"Name": "front", "Service": {"Service": "web"}, "DNS": {"TTL": "30s"}})
    for tcp in (False, True):
        for name in ("front.query.trellis.", f"{qid}.query.trellis.", "front.query.dc1.trellis."):
            r = server.ask(name, tcp=tcp)
            assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1, name
            assert addrs(r) == {"10.0.0.1", "10.0.0.2"}  # critical n3 left out
            assert ttls(r) == {30}
        r = server.ask("front.query.trellis.", "SRV", tcp=tcp)
        assert sorted(s.port for s in srvs(r)) == [80, 81]
        assert {str(s.target) for s in srvs(r)} == {
            "n1.node.dc1.trellis.",
            "n2.node.dc1.trellis.",
        }
        glue = {str(rr.rdata) for rr in r.ar if rr.rtype == QTYPE.A}
        assert glue == {"10.0.0.1", "10.0.0.2"} and ttls(r) == {30}  # the glue too


def test_a_query_s_conditions_and_templates_apply(server, db, web):
    put_query(db, {"Name": "healthy", "Service": {"Service": "web", "OnlyPassing": True}})
    put_query(db, {"Name": "not-v1", "Service": {"Service": "web", "Tags": ["!v1"]}})
    put_query(
        db,
        {
            "Name": "svc-",
            "Template": {"Type": "name_prefix_match"},
            "Service": {"Service": "${name.suffix}"},
        },
    )
    assert addrs(server.ask("healthy.query.trellis.")) == {"10.0.0.1"}
    assert addrs(server.ask("not-v1.query.trellis.")) == {"10.0.0.2"}
    assert addrs(server.ask("svc-web.query.trellis.")) == {"10.0.0.1", "10.0.0.2"}
    assert addrs(server.ask("svc-db.query.trellis.")) == {"10.9.9.9"}
    # No TTL on the query: the server's (0, Consul's default).
    assert ttls(server.ask("healthy.query.trellis.")) == {0}


def test_unknown_queries_empty_results_and_other_datacenters_are_nxdomain(db, settings, web):
    put_query(db, {"Name": "gone", "Service": {"Service": "nothing"}})
    for name in (
        "nope.query.trellis.",
        "gone.query.trellis.",  # no instance: NXDOMAIN, as Consul
        "front.query.dc9.trellis.",
        "query.trellis.",
    ):
        r = core(db, settings, name)
        assert r.header.rcode == RCODE.NXDOMAIN, name
        assert r.auth and r.auth[0].rtype == QTYPE.SOA
    put_query(db, {"Name": "front", "Service": {"Service": "web"}})
    r = core(db, settings, "front.query.trellis.", "TXT")
    assert r.header.rcode == RCODE.NOERROR and r.rr == []  # NODATA


def test_a_query_with_a_token_answers_under_its_token(db, settings, web):
    anonymous = Authorizer([], default_allow=False)  # DNS's rules: nothing
    reader = Authorizer(
        [parse_rules('service "web" { policy = "read" }\nnode_prefix "" { policy = "read" }')],
        default_allow=False,
    )
    secret = str(uuid.uuid4())

    def by_hash(h: str) -> Authorizer:
        if h != hash_secret(secret):
            raise PermissionDenied("ACL not found")
        return reader

    kw = {"authorizer": lambda: anonymous, "query_authorizer": by_hash}
    put_query(db, {"Name": "plain", "Service": {"Service": "web"}})
    put_query(db, {"Name": "tokened", "Service": {"Service": "web"}, "Token": secret})
    put_query(db, {"Name": "stale", "Service": {"Service": "web"}, "Token": "no-such-token"})
    assert core(db, settings, "plain.query.trellis.", **kw).header.rcode == RCODE.NXDOMAIN
    r = core(db, settings, "tokened.query.trellis.", **kw)
    assert addrs(r) == {"10.0.0.1", "10.0.0.2"}
    assert core(db, settings, "stale.query.trellis.", **kw).header.rcode == RCODE.SERVFAIL


# -- PTR ------------------------------------------------------------------------------------------


def reverse(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer + "."


def ptrs(r: DNSRecord) -> list[str]:
    return sorted(str(rr.rdata) for rr in r.rr if rr.rtype == QTYPE.PTR)


def test_ptr_answers_nodes_then_services_over_udp_and_tcp(server, db, web):
    for tcp in (False, True):
        r = server.ask(reverse("10.0.0.1"), "PTR", tcp=tcp)
        assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1
        assert ptrs(r) == ["n1.node.dc1.trellis."]
        r = server.ask(reverse("10.9.9.9"), "PTR", tcp=tcp)
        assert ptrs(r) == ["db.service.dc1.trellis."]
        r = server.ask(reverse("2001:db8::6"), "PTR", tcp=tcp)
        assert ptrs(r) == ["n6.node.dc1.trellis."]
    # The name a PTR gives resolves back to the address.
    assert addrs(server.ask("n1.node.dc1.trellis.")) == {"10.0.0.1"}


def test_ptr_for_an_unknown_address_is_nxdomain_and_partial_names_are_refused(db, settings, web):
    r = core(db, settings, reverse("10.0.0.99"), "PTR")
    assert r.header.rcode == RCODE.NXDOMAIN and r.auth[0].rtype == QTYPE.SOA
    r = core(db, settings, reverse("10.0.0.1"), "A")
    assert r.header.rcode == RCODE.NOERROR and r.rr == []  # the name exists: NODATA
    for name in ("0.10.in-addr.arpa.", "in-addr.arpa.", "x.0.0.10.in-addr.arpa.", "6.ip6.arpa."):
        assert core(db, settings, name, "PTR").header.rcode == RCODE.REFUSED, name


def test_ptr_follows_catalog_changes_without_scanning_it(db, settings, web):
    assert ptrs(core(db, settings, reverse("10.0.0.2"), "PTR")) == ["n2.node.dc1.trellis."]
    scans = name_index(db).scans
    for i in range(20):
        db.register(
            Registration(node=Node(name="n2", id="", address=f"10.0.1.{i}", datacenter="dc1"))
        )
        r = core(db, settings, reverse(f"10.0.1.{i}"), "PTR")
        assert ptrs(r) == ["n2.node.dc1.trellis."], i
    assert core(db, settings, reverse("10.0.0.2"), "PTR").header.rcode == RCODE.NXDOMAIN
    db.deregister_service("n1", "db")
    assert core(db, settings, reverse("10.9.9.9"), "PTR").header.rcode == RCODE.NXDOMAIN
    assert name_index(db).scans == scans  # followed the feed; never read the whole catalog


def test_ptr_hides_what_the_rules_hide(db, settings, web):
    nothing = Authorizer([], default_allow=False)
    nodes_only = Authorizer([parse_rules('node "n1" { policy = "read" }')], default_allow=False)
    r = core(db, settings, reverse("10.0.0.1"), "PTR", authorizer=lambda: nothing)
    assert r.header.rcode == RCODE.NXDOMAIN
    r = core(db, settings, reverse("10.0.0.1"), "PTR", authorizer=lambda: nodes_only)
    assert ptrs(r) == ["n1.node.dc1.trellis."]
    # db's address: a service, which needs service:read too.
    r = core(db, settings, reverse("10.9.9.9"), "PTR", authorizer=lambda: nodes_only)
    assert r.header.rcode == RCODE.NXDOMAIN
