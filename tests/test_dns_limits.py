"""DNS under attack (issue 9, items 4, 6, 7 and 8), on a real SQLite store and real sockets.

* unknown names: answered from an index, never by scanning the catalog (3,000 services);
* malformed names: FORMERR, no traceback, rate-limited log lines;
* amplification: a UDP reply carries at most ``dns_udp_answer_limit`` answers whatever the
  EDNS0 size, ANY over UDP is one RRset, TCP still gives everything;
* TCP starvation: idle connections from one client cannot take the slots of the others.

The whole-server scenario of item 4 (an unknown-name flood must not stall HTTP) runs against a
real ``trellis server`` in ``tests/test_integration_dns_flood.py``.
"""

from __future__ import annotations

import logging
import resource
import socket
import struct
import time

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from tests import test_dns
from tests.test_dns import closed_by_peer, core, frame, read_frame, reg, svc
from trellis.api.dns import answer
from trellis.api.store.base import Node, Registration, Service

db = test_dns.db
settings = test_dns.settings
serve = test_dns.serve
many = test_dns.many
web = test_dns.web


class CountingStore:
    """The real store, counting the reads of the whole catalog (``services()`` with no
    filter, ``nodes()``): what a flood of unknown names used to cost each."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.scans = 0

    def services(self, **kw):
        if not any(v is not None for v in kw.values()):
            self.scans += 1
        return self._inner.services(**kw)

    def nodes(self):
        self.scans += 1
        return self._inner.nodes()

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def catalog(db):
    """3,000 services on 30 nodes (one write per node)."""
    for n in range(30):
        node = f"node-{n}"
        db.register(
            Registration(
                node=Node(name=node, id="", address=f"10.3.{n}.1", datacenter="dc1"),
                services=tuple(
                    Service(node=node, id=f"svc-{n}-{i}", name=f"svc-{n}-{i}", port=1000 + i)
                    for i in range(100)
                ),
            )
        )
    return db


# -- item 4: unknown names ----------------------------------------------------------------------


def test_unknown_names_never_scan_the_catalog(catalog, settings):
    store = CountingStore(catalog)
    for i in range(50):
        assert core(store, settings, f"nope-{i}.service.trellis").header.rcode == RCODE.NXDOMAIN
        assert core(store, settings, f"NoPe-{i}.node.trellis").header.rcode == RCODE.NXDOMAIN
        assert core(store, settings, f"Nope-{i}.connect.trellis").header.rcode == RCODE.NXDOMAIN
    # The index is built once (the first query that needs it), not per query.
    assert store.scans <= 2, store.scans


def test_the_name_index_follows_the_catalog(catalog, settings):
    store = CountingStore(catalog)
    assert core(store, settings, "nope.service.trellis").header.rcode == RCODE.NXDOMAIN
    built = store.scans
    reg(catalog, "Mixed-Node", "10.4.0.1", svc("Mixed-Node", "Billing", port=7000))
    # Found in another case without a new scan: the index read the change from the feed.
    assert test_dns.addrs(core(store, settings, "BILLING.service.trellis")) == {"10.4.0.1"}
    assert test_dns.addrs(core(store, settings, "mixed-node.node.trellis")) == {"10.4.0.1"}
    catalog.deregister_service("Mixed-Node", "Billing")
    assert core(store, settings, "BILLING.service.trellis").header.rcode == RCODE.NXDOMAIN
    catalog.deregister_node("Mixed-Node")
    assert core(store, settings, "MIXED-NODE.node.trellis").header.rcode == RCODE.NXDOMAIN
    assert store.scans == built


def test_unknown_names_answer_about_as_fast_as_known_ones(catalog, settings):
    """Before: about 2,100 known-name queries/s but 22 unknown-name queries/s."""

    def rate(names: list[str]) -> float:
        packets = [DNSRecord.question(n).pack() for n in names]
        started = time.perf_counter()
        for p in packets:
            answer(catalog, settings, p)
        return len(packets) / (time.perf_counter() - started)

    answer(catalog, settings, DNSRecord.question("warm.service.trellis").pack())
    known = rate([f"svc-{i % 30}-{i % 100}.service.trellis" for i in range(200)])
    unknown = rate([f"Unknown-{i}.service.trellis" for i in range(200)])
    assert unknown > known / 3, (known, unknown)


# -- item 6: malformed names --------------------------------------------------------------------


def raw_query(labels: list[bytes], qtype: int = QTYPE.A) -> bytes:
    """A query packet written byte by byte: dnslib refuses to build these names."""
    name = b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1)


LONG_LABEL = [b"a" * 64, b"service", b"trellis"]
LONG_NAME = [b"a" * 63] * 4 + [b"service", b"trellis"]  # 4 x 64 + 17 bytes: over 255


@pytest.mark.parametrize("labels", [LONG_LABEL, LONG_NAME], ids=["64-byte label", "long name"])
def test_names_over_the_length_limits_are_formerr_without_a_traceback(db, settings, labels, caplog):
    caplog.set_level(logging.DEBUG, logger="trellis.dns")
    for _ in range(2000):
        reply = answer(db, settings, raw_query(labels))
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == RCODE.FORMERR
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # Rate-limited: 2,000 packets make a line or two, not 2,000.
    assert len([r for r in caplog.records if r.levelno >= logging.INFO]) <= 2


@pytest.mark.parametrize(
    "labels",
    [[b"we\x00b", b"service", b"trellis"], [b"v1", b"w\x01b", b"service", b"trellis"],
     [b"n\x7f1", b"node", b"trellis"], [b"we\x00b", b"connect", b"trellis"]],
    ids=["nul in a service", "control in a tagged service", "del in a node", "nul in connect"],
)  # fmt: skip
def test_control_characters_in_a_name_are_nxdomain_without_a_traceback(
    db, settings, labels, caplog
):
    # Legal on the wire, in no name the catalog holds: a NUL reached the store, which cannot
    # even look it up, and came back as SERVFAIL with a traceback.
    caplog.set_level(logging.DEBUG, logger="trellis.dns")
    reply = answer(db, settings, raw_query(labels))
    assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == RCODE.NXDOMAIN
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_server_answers_formerr_to_over_long_names(serve, web):
    running = serve()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for labels in (LONG_LABEL, LONG_NAME):
            s.sendto(raw_query(labels), ("127.0.0.1", running.port))
            reply, _ = s.recvfrom(4096)
            assert reply[3] & 0x0F == RCODE.FORMERR
    assert running.ask("web.service.trellis").header.rcode == RCODE.NOERROR


# -- item 7: amplification ----------------------------------------------------------------------


def edns_query(name: str, qtype: str) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    q.add_ar(EDNS0(udp_len=4096))
    return q


@pytest.mark.parametrize("qtype", ["A", "SRV", "ANY"])
def test_udp_replies_are_capped_whatever_the_edns_size(serve, many, qtype):
    running = serve()
    q = edns_query("web.service.trellis", qtype)
    raw = running.raw(q)
    r = DNSRecord.parse(raw)
    assert r.header.rcode == RCODE.NOERROR and len(r.rr) == 3
    assert r.header.tc == 0  # Consul's default: no TC for the answer limit
    assert len([rr for rr in r.ar if rr.rtype != QTYPE.OPT]) <= 3
    # Before: an SRV reply was 84 times the query, ANY 28 times.
    assert len(raw) <= 8 * len(q.pack()), (len(raw), len(q.pack()))
    full = running.ask("web.service.trellis", qtype, tcp=True)
    assert len(full.rr) == 60 and full.header.tc == 0


def test_enable_truncate_sets_tc_when_the_answer_limit_cuts(serve, settings, many):
    running = serve(cfg=settings.replace(dns_enable_truncate=True, dns_udp_answer_limit=5))
    r = running.ask("web.service.trellis")
    assert len(r.rr) == 5 and r.header.tc == 1


def test_a_record_limit_applies_to_both_transports(serve, settings, many):
    running = serve(cfg=settings.replace(dns_a_record_limit=2))
    assert len(running.ask("web.service.trellis").rr) == 2
    assert len(running.ask("web.service.trellis", tcp=True).rr) == 2
    # SRV is not an address record: only the UDP limit applies, and TCP gives everything.
    assert len(running.ask("web.service.trellis", "SRV", tcp=True).rr) == 60


# -- item 8: TCP starvation ---------------------------------------------------------------------


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        assert hard == resource.RLIM_INFINITY or hard >= need, f"RLIMIT_NOFILE hard {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_idle_tcp_connections_from_one_client_leave_the_others_served(serve, web):
    """600 idle connections from 127.0.0.2; before, they held every one of the 256 slots
    and 1 of 36 queries from another client was answered."""
    raise_nofile(4096)
    running = serve()
    addr = ("127.0.0.1", running.port)
    idle: list[socket.socket] = []
    try:
        for _ in range(600):
            s = socket.socket()
            idle.append(s)
            s.settimeout(2)
            s.bind(("127.0.0.2", 0))
            s.connect(addr)
        answered = 0
        q = DNSRecord.question("web.service.trellis")
        for _ in range(36):
            with socket.create_connection(addr, timeout=2) as c:
                try:
                    c.sendall(frame(q))
                    if read_frame(c).header.rcode == RCODE.NOERROR:
                        answered += 1
                except (OSError, EOFError):
                    pass
        assert answered == 36
    finally:
        for s in idle:
            s.close()


def test_a_connection_that_sends_nothing_is_closed_sooner_than_an_idle_one(serve, web):
    running = serve(tcp_first_query_timeout=0.3, tcp_idle_timeout=30)
    addr = ("127.0.0.1", running.port)
    with (
        socket.create_connection(addr, timeout=2) as silent,
        socket.create_connection(addr, timeout=2) as active,
    ):
        active.sendall(frame(DNSRecord.question("web.service.trellis")))
        assert read_frame(active).header.rcode == RCODE.NOERROR
        assert closed_by_peer(silent, within=3)
        # The one that asked is idle now, with the long timeout: still open.
        assert not closed_by_peer(active, within=0.6)
        active.sendall(frame(DNSRecord.question("web.service.trellis")))
        assert read_frame(active).header.rcode == RCODE.NOERROR


def test_tcp_connections_per_client_are_capped(serve, web):
    running = serve(max_tcp_conns_per_client=3, tcp_first_query_timeout=30)
    addr = ("127.0.0.1", running.port)
    q = DNSRecord.question("web.service.trellis")
    held = []
    try:
        for _ in range(3):
            s = socket.create_connection(addr, timeout=2)
            held.append(s)
            s.sendall(frame(q))
            assert read_frame(s).header.rcode == RCODE.NOERROR
        with socket.create_connection(addr, timeout=2) as extra:
            assert closed_by_peer(extra, within=2)
        # Another address is not affected.
        other = socket.socket()
        try:
            other.settimeout(2)
            other.bind(("127.0.0.2", 0))
            other.connect(addr)
            other.sendall(frame(q))
            assert read_frame(other).header.rcode == RCODE.NOERROR
        finally:
            other.close()
    finally:
        for s in held:
            s.close()
