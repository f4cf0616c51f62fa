"""The DNS interface, over real UDP and TCP sockets on 127.0.0.1, answered from a real SQLite store.

``answer()`` (the pure core) is exercised directly for packet-level cases; everything that
depends on transport (truncation over UDP, TCP framing, timeouts, the connection cap,
surviving garbage) goes through a running ``DNSServer``.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import threading
import time

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord

from trellis.api.dns import DNSServer, answer, bind_dns_sockets
from trellis.api.settings import Settings, validate
from trellis.api.store import open_store
from trellis.api.store.base import CRITICAL, PASSING, WARNING, Check, Node, Registration, Service

# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path):
    return validate(Settings(data_dir=str(tmp_path), node_name="n1"))


@pytest.fixture
def db(sqlite_url):
    s = open_store(sqlite_url)
    yield s
    s.close()


class Running:
    def __init__(self, server: DNSServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.port = server.address[1]

    def ask(self, name: str, qtype: str = "A", *, tcp: bool = False) -> DNSRecord:
        return DNSRecord.parse(self.raw(DNSRecord.question(name, qtype), tcp=tcp))

    def raw(self, q: DNSRecord, *, tcp: bool = False) -> bytes:
        return q.send("127.0.0.1", self.port, tcp=tcp, timeout=2)

    def stop(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@pytest.fixture
def serve(db, settings):
    """Start a DNS server (optionally with other settings or limits); stopped after the test."""
    running: list[Running] = []

    def start(store=None, cfg: Settings | None = None, **kw) -> Running:
        udp, tcp = bind_dns_sockets("127.0.0.1", 0)
        server = DNSServer(store or db, cfg or settings, udp, tcp, **kw)
        t = threading.Thread(target=server.serve_forever, name="test-dns")
        t.start()
        r = Running(server, t)
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop()
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("trellis-dns")]
    assert leftover == []


@pytest.fixture
def server(serve):
    return serve()


def reg(db, node: str, address: str, *services: Service, checks: tuple[Check, ...] = ()) -> None:
    db.register(
        Registration(
            node=Node(name=node, id="", address=address, datacenter="dc1"),
            services=services,
            checks=checks,
        )
    )


def svc(node: str, sid: str, name: str | None = None, **kw) -> Service:
    return Service(node=node, id=sid, name=name or sid, **kw)


def svc_check(node: str, sid: str, name: str, status: str) -> Check:
    return Check(
        node=node,
        check_id=f"service:{sid}",
        name=f"{sid} check",
        status=status,
        service_id=sid,
        service_name=name,
    )


def node_check(node: str, status: str) -> Check:
    return Check(node=node, check_id="serfHealth", name="node health", status=status)


def core(db, settings, name: str, qtype: str = "A", **kw) -> DNSRecord:
    return DNSRecord.parse(answer(db, settings, DNSRecord.question(name, qtype).pack(), **kw))


def addrs(r: DNSRecord) -> set[str]:
    return {str(rr.rdata) for rr in r.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)}


def srvs(r: DNSRecord) -> list:
    return [rr.rdata for rr in r.rr if rr.rtype == QTYPE.SRV]


def soa_of(r: DNSRecord):
    assert len(r.auth) == 1 and r.auth[0].rtype == QTYPE.SOA
    return r.auth[0]


def frame(q: DNSRecord) -> bytes:
    data = q.pack()
    return struct.pack("!H", len(data)) + data


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_frame(s: socket.socket) -> DNSRecord:
    (n,) = struct.unpack("!H", recv_exact(s, 2))
    return DNSRecord.parse(recv_exact(s, n))


def closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def web(db):
    """web on three nodes: passing, warning, critical; plus db on n1."""
    reg(
        db,
        "n1",
        "10.0.0.1",
        svc("n1", "web", port=80, tags=("v1", "Primary")),
        svc("n1", "db", port=5432),
        checks=(svc_check("n1", "web", "web", PASSING),),
    )
    reg(
        db,
        "n2",
        "10.0.0.2",
        svc("n2", "web", port=80, tags=("v2",)),
        checks=(svc_check("n2", "web", "web", WARNING),),
    )
    reg(
        db,
        "n3",
        "10.0.0.3",
        svc("n3", "web", port=80, tags=("v1",)),
        checks=(svc_check("n3", "web", "web", CRITICAL),),
    )


# -- services: health ---------------------------------------------------------------------------


def test_service_a_over_udp_and_tcp_serves_passing_and_warning_not_critical(server, web):
    for tcp in (False, True):
        r = server.ask("web.service.trellis.", tcp=tcp)
        assert r.header.rcode == RCODE.NOERROR
        assert r.header.aa == 1 and r.header.qr == 1 and r.header.tc == 0
        assert addrs(r) == {"10.0.0.1", "10.0.0.2"}
        assert all(rr.ttl == 0 and rr.rtype == QTYPE.A for rr in r.rr)


def test_health_changes_show_at_once(db, server, web):
    db.update_check("n3", "service:web", PASSING, None, now=time.time())
    assert addrs(server.ask("web.service.trellis")) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    db.update_check("n1", "service:web", CRITICAL, "down", now=time.time())
    assert addrs(server.ask("web.service.trellis")) == {"10.0.0.2", "10.0.0.3"}


def test_node_level_critical_check_removes_every_instance_on_the_node(db, settings, web):
    reg(db, "n2", "10.0.0.2", svc("n2", "db", port=5432), checks=(node_check("n2", CRITICAL),))
    assert addrs(core(db, settings, "web.service.trellis")) == {"10.0.0.1"}
    assert addrs(core(db, settings, "db.service.trellis")) == {"10.0.0.1"}
    # A node lookup does not filter on health (Consul neither).
    assert addrs(core(db, settings, "n2.node.trellis")) == {"10.0.0.2"}
    db.update_check("n2", "serfHealth", WARNING, None, now=time.time())
    assert addrs(core(db, settings, "db.service.trellis")) == {"10.0.0.1", "10.0.0.2"}


def test_all_critical_is_nodata_with_soa_not_nxdomain(db, settings):
    reg(db, "n1", "10.0.0.1", svc("n1", "api"), checks=(svc_check("n1", "api", "api", CRITICAL),))
    for qtype in ("A", "SRV"):
        r = core(db, settings, "api.service.trellis", qtype)
        assert r.header.rcode == RCODE.NOERROR
        assert r.rr == []
        soa = soa_of(r)
        assert soa.ttl == 0 and str(soa.rname) == "trellis."


def test_unknown_service_is_nxdomain_with_the_zone_soa(db, settings, web):
    r = core(db, settings, "nope.service.trellis")
    assert r.header.rcode == RCODE.NXDOMAIN
    assert r.header.aa == 1 and r.rr == []
    soa = soa_of(r)
    assert soa.ttl == 0
    assert str(soa.rdata.mname) == "ns.trellis."
    assert str(soa.rdata.rname) == "hostmaster.trellis."
    for name in (
        "trellis-ish.service.trellis",
        "web.services.trellis",
        "foo.trellis",
        "x.query.trellis",
    ):
        assert core(db, settings, name).header.rcode == RCODE.NXDOMAIN, name


# -- services: addresses ------------------------------------------------------------------------


def test_ipv4_ipv6_and_any(db, settings):
    reg(db, "n1", "10.0.0.1", svc("n1", "v4"), svc("n1", "dual"))
    reg(db, "n6", "fd00::6", svc("n6", "v6"), svc("n6", "dual"))
    r = core(db, settings, "v4.service.trellis", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and r.rr == [] and soa_of(r)
    r = core(db, settings, "v6.service.trellis", "AAAA")
    assert [(rr.rtype, str(rr.rdata)) for rr in r.rr] == [(QTYPE.AAAA, "fd00::6")]
    r = core(db, settings, "v6.service.trellis", "A")
    assert r.rr == [] and soa_of(r)
    assert addrs(core(db, settings, "dual.service.trellis", "A")) == {"10.0.0.1"}
    assert addrs(core(db, settings, "dual.service.trellis", "AAAA")) == {"fd00::6"}
    # ANY over TCP: every address record; over UDP one RRset, the A records (RFC 8482).
    r = core(db, settings, "dual.service.trellis", "ANY", max_udp=None)
    assert sorted((rr.rtype, str(rr.rdata)) for rr in r.rr) == [
        (QTYPE.A, "10.0.0.1"),
        (QTYPE.AAAA, "fd00::6"),
    ]
    r = core(db, settings, "dual.service.trellis", "ANY")
    assert [(rr.rtype, str(rr.rdata)) for rr in r.rr] == [(QTYPE.A, "10.0.0.1")]
    r = core(db, settings, "v6.service.trellis", "ANY")
    assert [(rr.rtype, str(rr.rdata)) for rr in r.rr] == [(QTYPE.AAAA, "fd00::6")]
    # Other types on a known name: NODATA.
    r = core(db, settings, "dual.service.trellis", "TXT")
    assert r.header.rcode == RCODE.NOERROR and r.rr == [] and soa_of(r)


def test_service_address_wins_and_hostnames_are_skipped_for_a(db, settings):
    reg(
        db,
        "n1",
        "10.0.0.1",
        svc("n1", "own", "web", address="192.168.1.5", port=8080),
        svc("n1", "named", "web", address="web.example.com", port=8081),
        svc("n1", "mapped", "web", address="::ffff:192.168.1.6", port=8082),
    )
    assert addrs(core(db, settings, "web.service.trellis")) == {"192.168.1.5", "192.168.1.6"}
    assert addrs(core(db, settings, "web.service.trellis", "AAAA")) == set()


def test_identical_addresses_are_one_record(db, settings):
    reg(db, "n1", "10.0.0.1", svc("n1", "a", "web", port=1), svc("n1", "b", "web", port=2))
    reg(db, "n2", "10.0.0.2", svc("n2", "c", "web", address="10.0.0.1", port=3))
    r = core(db, settings, "web.service.trellis")
    assert sorted(str(rr.rdata) for rr in r.rr) == ["10.0.0.1"]
    # SRV keeps one record per instance (the ports differ).
    assert sorted(s.port for s in srvs(core(db, settings, "web.service.trellis", "SRV"))) == [
        1,
        2,
        3,
    ]


def test_identical_srv_records_are_one_record(db, settings):
    # Two registrations of the same listener (same node address, same port).
    reg(db, "n1", "10.0.0.1", svc("n1", "a", "web", port=80), svc("n1", "b", "web", port=80))
    r = core(db, settings, "web.service.trellis", "SRV")
    assert [(s.port, str(s.target)) for s in srvs(r)] == [(80, "n1.node.dc1.trellis.")]
    assert len(r.ar) == 1


def test_answers_are_shuffled(db, settings):
    for i in range(6):
        reg(db, f"n{i}", f"10.0.0.{i + 1}", svc(f"n{i}", "web"))
    orders = set()
    for _ in range(40):
        r = core(db, settings, "web.service.trellis", max_udp=None)
        assert len(r.rr) == 6
        orders.add(tuple(str(rr.rdata) for rr in r.rr))
    assert len(orders) > 1


# -- SRV ----------------------------------------------------------------------------------------


def test_srv_records_weights_targets_and_additional_section(db, settings):
    weights = {"Passing": 10, "Warning": 3}
    reg(
        db,
        "n1",
        "10.0.0.1",
        svc("n1", "web", port=80, weights=weights),
        checks=(svc_check("n1", "web", "web", PASSING),),
    )
    reg(
        db,
        "n2",
        "10.0.0.2",
        svc("n2", "web", port=81, weights=weights),
        checks=(svc_check("n2", "web", "web", WARNING),),
    )
    reg(db, "n3", "10.0.0.3", svc("n3", "web", port=82, address="10.9.0.3", weights=weights))
    reg(db, "n4", "10.0.0.4", svc("n4", "web", port=83, address="web4.example.com."))
    reg(db, "n5", "fd00::5", svc("n5", "web", port=84))
    r = core(db, settings, "web.service.trellis", "SRV", max_udp=None)
    assert r.header.rcode == RCODE.NOERROR
    got = {s.port: (s.priority, s.weight, str(s.target)) for s in srvs(r)}
    assert got == {
        80: (1, 10, "n1.node.dc1.trellis."),
        81: (1, 3, "n2.node.dc1.trellis."),
        82: (1, 10, "0a090003.addr.dc1.trellis."),
        83: (1, 1, "web4.example.com."),
        84: (1, 1, "n5.node.dc1.trellis."),
    }
    extra = {(str(rr.rname), rr.rtype, str(rr.rdata)) for rr in r.ar}
    assert extra == {
        ("n1.node.dc1.trellis.", QTYPE.A, "10.0.0.1"),
        ("n2.node.dc1.trellis.", QTYPE.A, "10.0.0.2"),
        ("0a090003.addr.dc1.trellis.", QTYPE.A, "10.9.0.3"),
        ("n5.node.dc1.trellis.", QTYPE.AAAA, "fd00::5"),
    }
    assert all(rr.ttl == 0 for rr in r.rr + r.ar)
    # The targets we hand out resolve.
    assert addrs(core(db, settings, "0a090003.addr.dc1.trellis")) == {"10.9.0.3"}
    assert addrs(core(db, settings, "n1.node.dc1.trellis")) == {"10.0.0.1"}


def test_addr_names(db, settings):
    six = ipaddress.ip_address("fd00::1234").packed.hex()
    assert addrs(core(db, settings, "7f000001.addr.trellis")) == {"127.0.0.1"}
    assert addrs(core(db, settings, f"{six}.addr.dc1.trellis", "AAAA")) == {"fd00::1234"}
    r = core(db, settings, "7f000001.addr.trellis", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and r.rr == []
    for bad in ("zz000001.addr.trellis", "7f0001.addr.trellis", "7f000001.addr.dc9.trellis"):
        assert core(db, settings, bad).header.rcode == RCODE.NXDOMAIN, bad


# -- tags, RFC 2782, datacenters ----------------------------------------------------------------


def test_tag_filter(db, settings, web):
    assert addrs(core(db, settings, "v1.web.service.trellis")) == {"10.0.0.1"}  # n3 is critical
    assert addrs(core(db, settings, "v2.web.service.trellis")) == {"10.0.0.2"}
    assert addrs(core(db, settings, "primary.web.service.trellis")) == {"10.0.0.1"}
    assert [s.port for s in srvs(core(db, settings, "v2.web.service.trellis", "SRV"))] == [80]
    assert core(db, settings, "v3.web.service.trellis").header.rcode == RCODE.NXDOMAIN
    assert core(db, settings, "v1.db.service.trellis").header.rcode == RCODE.NXDOMAIN


def test_tag_of_only_critical_instances_is_nodata(db, settings):
    reg(db, "n1", "10.0.0.1", svc("n1", "web", tags=("old",)))
    reg(
        db,
        "n2",
        "10.0.0.2",
        svc("n2", "web", tags=("new",)),
        checks=(svc_check("n2", "web", "web", CRITICAL),),
    )
    r = core(db, settings, "new.web.service.trellis")
    assert r.header.rcode == RCODE.NOERROR and r.rr == [] and soa_of(r)


def test_rfc2782_names(db, settings, web):
    r = core(db, settings, "_web._tcp.service.trellis", "SRV")
    assert {str(s.target) for s in srvs(r)} == {"n1.node.dc1.trellis.", "n2.node.dc1.trellis."}
    assert str(r.rr[0].rname) == "_web._tcp.service.trellis."
    r = core(db, settings, "_web._TCP.service.trellis", "SRV")
    assert len(srvs(r)) == 2
    r = core(db, settings, "_web._v2.service.dc1.trellis", "SRV")
    assert {str(s.target) for s in srvs(r)} == {"n2.node.dc1.trellis."}
    assert core(db, settings, "_web._v9.service.trellis", "SRV").header.rcode == RCODE.NXDOMAIN
    assert core(db, settings, "_nope._tcp.service.trellis", "SRV").header.rcode == RCODE.NXDOMAIN


def test_datacenter_in_the_name(db, settings, web):
    assert addrs(core(db, settings, "web.service.dc1.trellis")) == {"10.0.0.1", "10.0.0.2"}
    assert addrs(core(db, settings, "web.service.DC1.trellis")) == {"10.0.0.1", "10.0.0.2"}
    assert addrs(core(db, settings, "n1.node.dc1.trellis")) == {"10.0.0.1"}
    for name in (
        "web.service.dc2.trellis",
        "n1.node.dc2.trellis",
        "web.connect.dc2.trellis",
        "web.service.dc1.extra.trellis",
    ):
        r = core(db, settings, name)
        assert r.header.rcode == RCODE.NXDOMAIN and soa_of(r), name
    other = settings.replace(datacenter="east-1")
    assert addrs(core(db, other, "web.service.east-1.trellis")) == {"10.0.0.1", "10.0.0.2"}
    assert core(db, other, "web.service.dc1.trellis").header.rcode == RCODE.NXDOMAIN
    r = core(db, other, "web.service.trellis", "SRV")
    assert {str(s.target) for s in srvs(r)} == {
        "n1.node.east-1.trellis.",
        "n2.node.east-1.trellis.",
    }


# -- connect ------------------------------------------------------------------------------------


def test_connect_names_serve_proxies_and_native_instances(db, settings, web):
    proxy = {"DestinationServiceName": "web", "LocalServicePort": 80}
    reg(
        db,
        "n1",
        "10.0.0.1",
        svc("n1", "web-sidecar-proxy", kind="connect-proxy", proxy=proxy, port=21000),
        checks=(svc_check("n1", "web-sidecar-proxy", "web-sidecar-proxy", PASSING),),
    )
    reg(
        db,
        "n2",
        "10.0.0.2",
        svc(
            "n2",
            "web-sidecar-proxy",
            kind="connect-proxy",
            proxy=proxy,
            port=21001,
            address="10.5.0.2",
        ),
        checks=(svc_check("n2", "web-sidecar-proxy", "web-sidecar-proxy", CRITICAL),),
    )
    reg(db, "n4", "10.0.0.4", svc("n4", "pay", port=9000, connect={"Native": True}))
    r = core(db, settings, "web.connect.trellis")
    assert addrs(r) == {"10.0.0.1"}  # the critical proxy is left out
    r = core(db, settings, "web.connect.dc1.trellis", "SRV")
    assert [(s.port, str(s.target)) for s in srvs(r)] == [(21000, "n1.node.dc1.trellis.")]
    assert addrs(core(db, settings, "pay.connect.trellis")) == {"10.0.0.4"}
    assert [s.port for s in srvs(core(db, settings, "pay.connect.trellis", "SRV"))] == [9000]
    # db has no proxy and is not native: no Connect-capable instance.
    assert core(db, settings, "db.connect.trellis").header.rcode == RCODE.NXDOMAIN
    # The plain service name still gives the service itself, not its proxies.
    assert {s.port for s in srvs(core(db, settings, "web.service.trellis", "SRV"))} == {80}
    db.update_check("n1", "service:web-sidecar-proxy", CRITICAL, None, now=time.time())
    r = core(db, settings, "web.connect.trellis")
    assert r.header.rcode == RCODE.NOERROR and r.rr == []


# -- nodes and the apex -------------------------------------------------------------------------


def test_node_names(db, settings):
    reg(db, "n1", "10.0.0.1")
    reg(db, "n6", "fd00::6")
    reg(db, "db.rack1", "10.0.0.7")
    reg(db, "hostnamed", "host.example.com")
    assert addrs(core(db, settings, "n1.node.trellis")) == {"10.0.0.1"}
    assert addrs(core(db, settings, "n1.node.dc1.trellis")) == {"10.0.0.1"}
    assert addrs(core(db, settings, "n6.node.trellis", "AAAA")) == {"fd00::6"}
    assert addrs(core(db, settings, "n6.node.trellis", "ANY")) == {"fd00::6"}
    assert addrs(core(db, settings, "db.rack1.node.trellis")) == {"10.0.0.7"}
    for name, qtype in (("n1.node.trellis", "AAAA"), ("n1.node.trellis", "SRV")):
        r = core(db, settings, name, qtype)
        assert r.header.rcode == RCODE.NOERROR and r.rr == [] and soa_of(r)
    r = core(db, settings, "hostnamed.node.trellis")
    assert r.header.rcode == RCODE.NOERROR and r.rr == []
    r = core(db, settings, "n9.node.trellis")
    assert r.header.rcode == RCODE.NXDOMAIN and soa_of(r)
    assert core(db, settings, "node.trellis").header.rcode == RCODE.NXDOMAIN


def test_apex_soa_ns_and_the_name_server(db, settings):
    r = core(db, settings, "trellis.", "SOA")
    assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1
    assert [(rr.rtype, str(rr.rdata.mname), str(rr.rdata.rname)) for rr in r.rr] == [
        (QTYPE.SOA, "ns.trellis.", "hostmaster.trellis.")
    ]
    r = core(db, settings, "TRELLIS.", "NS")
    assert [str(rr.rdata) for rr in r.rr] == ["ns.trellis."]
    assert [(str(rr.rname), str(rr.rdata)) for rr in r.ar] == [("ns.trellis.", "127.0.0.1")]
    assert addrs(core(db, settings, "ns.trellis")) == {"127.0.0.1"}
    r = core(db, settings, "trellis.", "ANY", max_udp=None)
    assert sorted(rr.rtype for rr in r.rr) == sorted([QTYPE.SOA, QTYPE.NS])
    r = core(db, settings, "trellis.", "ANY")  # over UDP, one RRset
    assert [rr.rtype for rr in r.rr] == [QTYPE.SOA]
    r = core(db, settings, "trellis.", "A")
    assert r.header.rcode == RCODE.NOERROR and r.rr == [] and soa_of(r)


def test_names_outside_the_domain_are_refused(db, settings, web):
    for name in ("example.com", "web.service.consul", "trellis.com", "xtrellis", "."):
        r = core(db, settings, name)
        assert r.header.rcode == RCODE.REFUSED, name
        assert r.header.aa == 0 and r.header.ra == 0 and r.rr == [] and r.auth == []


def test_names_are_case_insensitive(db, settings, web):
    reg(db, "Host-A", "10.0.0.8", svc("Host-A", "Billing", port=7000))
    assert addrs(core(db, settings, "WeB.SeRvIcE.TrElLiS.")) == {"10.0.0.1", "10.0.0.2"}
    assert addrs(core(db, settings, "V1.WEB.service.trellis")) == {"10.0.0.1"}
    assert addrs(core(db, settings, "billing.service.trellis")) == {"10.0.0.8"}
    assert addrs(core(db, settings, "BILLING.service.trellis")) == {"10.0.0.8"}
    assert addrs(core(db, settings, "host-a.node.trellis")) == {"10.0.0.8"}
    assert addrs(core(db, settings, "HOST-A.NODE.DC1.TRELLIS")) == {"10.0.0.8"}
    r = core(db, settings, "Web.Service.Trellis.", "SRV")
    # The answer keeps the question's spelling (resolvers using DNS 0x20 compare it).
    assert str(r.q.qname) == "Web.Service.Trellis." and str(r.rr[0].rname) == "Web.Service.Trellis."


def test_custom_domain(db, settings, serve, web):
    mesh = settings.replace(domain="Mesh.Example.")
    running = serve(cfg=mesh)
    r = running.ask("web.service.mesh.example")
    assert addrs(r) == {"10.0.0.1", "10.0.0.2"}
    r = running.ask("web.service.dc1.mesh.example", "SRV", tcp=True)
    assert {str(s.target) for s in srvs(r)} == {
        "n1.node.dc1.mesh.example.",
        "n2.node.dc1.mesh.example.",
    }
    r = running.ask("nope.service.mesh.example")
    assert r.header.rcode == RCODE.NXDOMAIN and str(soa_of(r).rname) == "mesh.example."
    assert str(soa_of(r).rdata.mname) == "ns.mesh.example."
    assert running.ask("mesh.example", "SOA").rr[0].rtype == QTYPE.SOA
    assert running.ask("web.service.trellis").header.rcode == RCODE.REFUSED
    assert running.ask("example").header.rcode == RCODE.REFUSED


# -- size limits --------------------------------------------------------------------------------


@pytest.fixture
def many(db):
    """60 healthy web instances, each with its own address."""
    reg(
        db,
        "big",
        "10.0.0.1",
        *(
            svc("big", f"web-{i}", "web", address=f"10.1.0.{i + 1}", port=8000 + i)
            for i in range(60)
        ),
    )


@pytest.fixture
def unlimited(serve, settings):
    """A server whose UDP answer count is not limited (an operator raised
    ``dns_config.udp_answer_limit``): what cuts a UDP reply is then its size alone."""
    return serve(cfg=settings.replace(dns_udp_answer_limit=1000))


def test_udp_truncates_and_tcp_gives_everything(unlimited, many):
    server = unlimited
    raw = server.raw(DNSRecord.question("web.service.trellis", "A"))
    assert len(raw) <= 512
    r = DNSRecord.parse(raw)
    assert r.header.tc == 1 and r.header.rcode == RCODE.NOERROR
    assert 0 < len(r.rr) < 60
    full = server.ask("web.service.trellis", "A", tcp=True)
    assert full.header.tc == 0
    assert addrs(full) == {f"10.1.0.{i + 1}" for i in range(60)}
    assert addrs(r) < addrs(full)


def test_truncated_srv_keeps_the_additional_records_of_kept_answers(unlimited, many):
    server = unlimited
    raw = server.raw(DNSRecord.question("web.service.trellis", "SRV"))
    assert len(raw) <= 512
    r = DNSRecord.parse(raw)
    assert r.header.tc == 1 and 0 < len(r.rr) < 60
    targets = {str(s.target) for s in srvs(r)}
    assert {str(rr.rname) for rr in r.ar} == targets
    full = server.ask("web.service.trellis", "SRV", tcp=True)
    assert len(srvs(full)) == 60 and len(full.ar) == 60 and full.header.tc == 0


def test_edns_payload_size(unlimited, many):
    server = unlimited

    def ask(udp_len: int) -> tuple[int, DNSRecord]:
        q = DNSRecord.question("web.service.trellis", "A")
        q.add_ar(EDNS0(udp_len=udp_len))
        raw = server.raw(q)
        return len(raw), DNSRecord.parse(raw)

    size, r = ask(4096)
    assert r.header.tc == 0 and len(r.rr) == 60 and size > 512
    opt = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
    assert len(opt) == 1 and opt[0].edns_len == 4096
    size, r700 = ask(700)
    assert size <= 700 and r700.header.tc == 1
    plain = server.ask("web.service.trellis")
    assert len(plain.rr) < len(r700.rr) < 60
    size, tiny = ask(100)  # below 512 means 512
    assert size <= 512 and tiny.header.tc == 1
    # Same budget as no EDNS, minus the room our own OPT record takes (one A record at most).
    assert len(plain.rr) - 1 <= len(tiny.rr) <= len(plain.rr)


def test_edns_payload_is_capped_at_4096_and_tcp_is_not(db, settings):
    settings = settings.replace(dns_udp_answer_limit=1000)
    reg(
        db,
        "big",
        "10.0.0.1",
        *(svc("big", f"w{i}", "web", address=f"10.2.{i // 250}.{i % 250 + 1}") for i in range(300)),
    )
    q = DNSRecord.question("web.service.trellis", "A")
    q.add_ar(EDNS0(udp_len=65000))
    raw = answer(db, settings, q.pack())
    r = DNSRecord.parse(raw)
    assert len(raw) <= 4096 and r.header.tc == 1 and len(r.rr) > 200
    raw = answer(db, settings, q.pack(), max_udp=None)
    r = DNSRecord.parse(raw)
    assert r.header.tc == 0 and len(r.rr) == 300


# -- malformed and unusual packets --------------------------------------------------------------


def test_answer_core_on_malformed_packets(db, settings):
    assert answer(db, settings, b"") == b""
    assert answer(db, settings, b"\x07") == b""
    r = DNSRecord.parse(answer(db, settings, b"\xbe\xef"))
    assert r.header.id == 0xBEEF and r.header.rcode == RCODE.FORMERR and r.header.qr == 1
    # A header that promises a question that is not there.
    r = DNSRecord.parse(answer(db, settings, b"\x12\x34\x01\x00\x00\x01" + bytes(6)))
    assert r.header.id == 0x1234 and r.header.rcode == RCODE.FORMERR and r.header.rd == 1
    # A compression pointer to itself.
    loop = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
    assert DNSRecord.parse(answer(db, settings, loop)).header.rcode == RCODE.FORMERR
    # Responses are never answered (no reflection loops).
    resp = DNSRecord.question("web.service.trellis").reply().pack()
    assert answer(db, settings, resp) == b""


def test_answer_core_never_raises_on_mutated_packets(db, settings, web):
    rng = random.Random(1234)
    seeds = [
        DNSRecord.question("web.service.trellis", "SRV").pack(),
        DNSRecord.question("_web._tcp.service.dc1.trellis", "A").pack(),
        DNSRecord.question("n1.node.trellis", "ANY").pack(),
    ]
    q = DNSRecord.question("trellis", "SOA")
    q.add_ar(EDNS0(udp_len=1232))
    seeds.append(q.pack())
    for i in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            if op < 0.5 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.75 and data:
                del data[rng.randrange(len(data)) :]
            else:
                data[rng.randrange(len(data) + 1) : 0] = rng.randbytes(rng.randint(1, 8))
        out = answer(db, settings, bytes(data), max_udp=512 if i % 2 else None)
        assert isinstance(out, bytes)
        if out:
            assert out[:2] == bytes(data[:2])
            assert out[2] & 0x80  # QR
            if i % 2:
                assert len(out) <= 4096


def test_opcodes_question_counts_classes_and_edns_versions(db, settings):
    q = DNSRecord.question("web.service.trellis")
    q.header.opcode = 2  # STATUS
    r = DNSRecord.parse(answer(db, settings, q.pack()))
    assert r.header.rcode == RCODE.NOTIMP and r.header.opcode == 2 and r.header.id == q.header.id
    two = DNSRecord(DNSHeader(id=7), questions=[DNSQuestion("a.trellis"), DNSQuestion("b.trellis")])
    assert DNSRecord.parse(answer(db, settings, two.pack())).header.rcode == RCODE.FORMERR
    none = DNSRecord(DNSHeader(id=8))
    assert DNSRecord.parse(answer(db, settings, none.pack())).header.rcode == RCODE.FORMERR
    q = DNSRecord.question("web.service.trellis")
    q.add_ar(EDNS0(udp_len=1232))
    q.add_ar(EDNS0(udp_len=1232))
    assert DNSRecord.parse(answer(db, settings, q.pack())).header.rcode == RCODE.FORMERR
    q = DNSRecord.question("trellis", "SOA")
    q.add_ar(EDNS0(udp_len=1232, version=1))
    r = DNSRecord.parse(answer(db, settings, q.pack()))
    opt = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
    assert r.rr == [] and len(opt) == 1 and opt[0].edns_rcode == 1  # BADVERS = 16
    q = DNSRecord.question("version.bind", "TXT", "CH")
    assert DNSRecord.parse(answer(db, settings, q.pack())).header.rcode == RCODE.REFUSED
    q = DNSRecord.question("trellis", "AXFR")
    assert DNSRecord.parse(answer(db, settings, q.pack(), max_udp=None)).header.rcode == (
        RCODE.NOTIMP
    )


def test_store_unavailable_is_servfail(sqlite_url, settings, caplog):
    broken = open_store(sqlite_url)
    reg(broken, "n1", "10.0.0.1", svc("n1", "web"))
    broken.close()
    caplog.set_level("WARNING", logger="trellis.dns")
    r = core(broken, settings, "web.service.trellis")
    assert r.header.rcode == RCODE.SERVFAIL and r.rr == []
    assert any(rec.name == "trellis.dns" for rec in caplog.records)
    # Names that need no store still answer.
    assert core(broken, settings, "example.com").header.rcode == RCODE.REFUSED
    assert core(broken, settings, "trellis", "SOA").header.rcode == RCODE.NOERROR


def test_garbage_over_udp_does_not_kill_the_server(server, web):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for junk in (b"", b"\x00", b"\xff" * 11, bytes(range(256)) * 4, b"\x00\x01" + b"\xff" * 40):
            s.sendto(junk, ("127.0.0.1", server.port))
        s.sendto(b"\xab\xcd\x01\x00\x00\x05garbage", ("127.0.0.1", server.port))
        # Every reply that comes back is a well-formed FORMERR for its packet's ID.
        ids = set()
        s.settimeout(0.5)
        while True:
            try:
                data, _ = s.recvfrom(4096)
            except TimeoutError:
                break
            r = DNSRecord.parse(data)
            assert r.header.rcode == RCODE.FORMERR
            ids.add(r.header.id)
        assert 0xABCD in ids
    assert addrs(server.ask("web.service.trellis")) == {"10.0.0.1", "10.0.0.2"}


# -- TCP ----------------------------------------------------------------------------------------


def test_several_queries_on_one_tcp_connection(server, web):
    qs = [
        DNSRecord.question("web.service.trellis", "A"),
        DNSRecord.question("web.service.trellis", "SRV"),
        DNSRecord.question("nope.service.trellis", "A"),
    ]
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(b"".join(frame(q) for q in qs))  # pipelined in one write
        replies = [read_frame(s) for _ in qs]
        assert [r.header.id for r in replies] == [q.header.id for q in qs]
        assert addrs(replies[0]) == {"10.0.0.1", "10.0.0.2"}
        assert len(srvs(replies[1])) == 2
        assert replies[2].header.rcode == RCODE.NXDOMAIN
        # A frame split across writes is reassembled.
        data = frame(DNSRecord.question("n1.node.trellis"))
        s.sendall(data[:1])
        time.sleep(0.05)
        s.sendall(data[1:7])
        time.sleep(0.05)
        s.sendall(data[7:])
        assert addrs(read_frame(s)) == {"10.0.0.1"}
        # Garbage inside a well-formed frame gets FORMERR; the connection stays usable.
        s.sendall(struct.pack("!H", 5) + b"\x01\x02zzz")
        r = read_frame(s)
        assert r.header.id == 0x0102 and r.header.rcode == RCODE.FORMERR
        assert addrs(read_frame_after(s, DNSRecord.question("db.service.trellis"))) == {"10.0.0.1"}


def read_frame_after(s: socket.socket, q: DNSRecord) -> DNSRecord:
    s.sendall(frame(q))
    return read_frame(s)


def test_tcp_idle_and_half_sent_frames_are_dropped(serve, web):
    running = serve(tcp_idle_timeout=0.3)
    with socket.create_connection(("127.0.0.1", running.port), timeout=2) as idle:
        assert closed_by_peer(idle, within=3)
    with socket.create_connection(("127.0.0.1", running.port), timeout=2) as half:
        half.sendall(struct.pack("!H", 100) + b"\x00" * 10)
        assert closed_by_peer(half, within=3)
    with socket.create_connection(("127.0.0.1", running.port), timeout=2) as lone:
        lone.sendall(b"\x00")  # half a length prefix
        assert closed_by_peer(lone, within=3)
    with socket.create_connection(("127.0.0.1", running.port), timeout=2) as active:
        # Within the timeout between queries, the connection stays.
        for _ in range(3):
            time.sleep(0.1)
            r = read_frame_after(active, DNSRecord.question("web.service.trellis"))
            assert r.header.rcode == RCODE.NOERROR
    assert running.ask("web.service.trellis", tcp=True).header.rcode == RCODE.NOERROR


def test_tcp_connection_cap(serve, web):
    running = serve(max_tcp_connections=2)
    addr = ("127.0.0.1", running.port)
    q = DNSRecord.question("web.service.trellis")
    with (
        socket.create_connection(addr, timeout=2) as a,
        socket.create_connection(addr, timeout=2) as b,
    ):
        assert read_frame_after(a, q).header.rcode == RCODE.NOERROR
        assert read_frame_after(b, q).header.rcode == RCODE.NOERROR
        with socket.create_connection(addr, timeout=2) as c:
            assert closed_by_peer(c, within=2)
        # UDP is not affected by busy TCP.
        assert running.ask("web.service.trellis").header.rcode == RCODE.NOERROR
        a.close()
        deadline = time.monotonic() + 3
        while True:
            with socket.create_connection(addr, timeout=2) as d:
                try:
                    if read_frame_after(d, q).header.rcode == RCODE.NOERROR:
                        break
                except (EOFError, ConnectionResetError):
                    pass
            assert time.monotonic() < deadline, "the freed slot was never reused"
            time.sleep(0.05)


# -- sockets and lifecycle ----------------------------------------------------------------------


def test_bind_port_zero_gives_one_port_for_both_protocols():
    udp, tcp = bind_dns_sockets("127.0.0.1", 0)
    with udp, tcp:
        assert udp.type == socket.SOCK_DGRAM and tcp.type == socket.SOCK_STREAM
        port = udp.getsockname()[1]
        assert port != 0 and tcp.getsockname() == ("127.0.0.1", port)
        # Busy on both: a clear error, and nothing left open.
        with pytest.raises(OSError, match=rf"DNS: cannot bind UDP 127\.0\.0\.1:{port}"):
            bind_dns_sockets("127.0.0.1", port)


def test_bind_reports_a_port_busy_for_tcp_only():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip("the UDP port happened to be taken too")
        with pytest.raises(OSError, match=rf"DNS: cannot bind TCP 127\.0\.0\.1:{port}"):
            bind_dns_sockets("127.0.0.1", port)


def test_close_is_prompt_and_serve_forever_returns(db, settings, web):
    udp, tcp = bind_dns_sockets("127.0.0.1", 0)
    server = DNSServer(db, settings, udp, tcp)
    t = threading.Thread(target=server.serve_forever)
    t.start()
    port = server.address[1]
    r = DNSRecord.parse(
        DNSRecord.question("web.service.trellis").send("127.0.0.1", port, timeout=2)
    )
    assert r.header.rcode == RCODE.NOERROR
    with socket.create_connection(("127.0.0.1", port), timeout=2) as idle:
        assert read_frame_after(idle, DNSRecord.question("n1.node.trellis")).rr
        started = time.monotonic()
        server.close()
        t.join(timeout=5)
        took = time.monotonic() - started
        assert not t.is_alive()
        assert took < 0.5, took
        assert closed_by_peer(idle, within=1)
    assert udp.fileno() == -1 and tcp.fileno() == -1
    assert [x for x in threading.enumerate() if x.name.startswith("trellis-dns")] == []
    server.close()  # twice is fine


def test_close_before_serving(db, settings):
    udp, tcp = bind_dns_sockets("127.0.0.1", 0)
    server = DNSServer(db, settings, udp, tcp)
    server.close()
    server.serve_forever()  # returns at once
    assert udp.fileno() == -1 and tcp.fileno() == -1


# -- ACLs: DNS answers under the anonymous token's rules ------------------------------------


def acl(text: str, *, default_allow: bool = False):
    from trellis.api.acl.rules import Authorizer, parse_rules

    authz = Authorizer([parse_rules(text)], default_allow=default_allow)
    return lambda: authz


def test_acls_hide_services_and_nodes_the_rules_do_not_let_read(db, settings):
    reg(db, "n1", "10.0.0.1", svc("n1", "web1", "web"), svc("n1", "db1", "db"))
    reg(db, "n2", "10.0.0.2", svc("n2", "web2", "web"))
    rules = acl('service "web" { policy = "read" }\nnode "n1" { policy = "read" }')
    r = core(db, settings, "web.service.trellis", authorizer=rules)
    assert r.header.rcode == RCODE.NOERROR and addrs(r) == {"10.0.0.1"}  # n2 hidden
    r = core(db, settings, "web.service.trellis", "SRV", authorizer=rules)
    assert len(r.rr) == 1
    assert core(db, settings, "db.service.trellis", authorizer=rules).header.rcode == (
        RCODE.NXDOMAIN
    )
    assert addrs(core(db, settings, "n1.node.trellis", authorizer=rules)) == {"10.0.0.1"}
    assert core(db, settings, "n2.node.trellis", authorizer=rules).header.rcode == RCODE.NXDOMAIN
    # A service whose every instance sits on a hidden node does not exist either.
    only_n2 = acl('service "web" { policy = "read" }\nnode "n2" { policy = "deny" }')
    r = core(db, settings, "web.service.trellis", authorizer=only_n2)
    assert addrs(r) == set() and r.header.rcode == RCODE.NXDOMAIN
    # Without an authorizer (ACLs off) everything answers.
    assert addrs(core(db, settings, "web.service.trellis")) == {"10.0.0.1", "10.0.0.2"}


def test_acl_default_allow_answers_unless_denied(db, settings):
    reg(db, "n1", "10.0.0.1", svc("n1", "web1", "web"), svc("n1", "db1", "db"))
    rules = acl('service "db" { policy = "deny" }', default_allow=True)
    assert addrs(core(db, settings, "web.service.trellis", authorizer=rules)) == {"10.0.0.1"}
    assert core(db, settings, "db.service.trellis", authorizer=rules).header.rcode == (
        RCODE.NXDOMAIN
    )


def test_the_server_asks_its_authorizer_on_every_query(db, settings, serve):
    reg(db, "n1", "10.0.0.1", svc("n1", "web1", "web"))
    allowed = {"now": False}
    open_rules = acl('service "web" { policy = "read" }\nnode "n1" { policy = "read" }')
    closed_rules = acl("")
    running = serve(authorizer=lambda: (open_rules if allowed["now"] else closed_rules)())
    assert running.ask("web.service.trellis").header.rcode == RCODE.NXDOMAIN
    allowed["now"] = True
    assert addrs(running.ask("web.service.trellis", tcp=True)) == {"10.0.0.1"}
