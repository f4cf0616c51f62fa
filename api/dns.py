"""The DNS interface: Consul's naming scheme, answered from the store, over UDP and TCP.

Theory of operation
-------------------
``answer()`` is the whole protocol: one query packet in, one reply packet out, no I/O besides
store reads, and it never raises. It parses the packet with dnslib, checks the envelope (a
query, opcode QUERY, one question, at most one EDNS0 OPT record), then resolves the name:

* names outside our domain are REFUSED: we are authoritative for one zone and never recurse;
  but for full reverse names under ``in-addr.arpa`` and ``ip6.arpa`` (PTR, as Consul answers
  them): the nodes with that address (``<node>.node.<dc>.<domain>``), else the services
  registered with it as their own (``<service>.service.<dc>.<domain>``), found through the
  ``NameIndex``'s addresses (no catalog scan per query);
* under the domain, the *rightmost* label among ``service``, ``connect``, ``node``, ``addr``
  and ``query`` says what is asked (so a dotted node name such as ``db.rack1.node.trellis.``
  still parses, as in Consul); the single optional label after it is the datacenter, and any
  datacenter other than ours is NXDOMAIN because this control plane only knows its own;
* ``<svc>.service``, ``<tag>.<svc>.service``, ``_<svc>._<tag>.service`` (``_tcp`` = no tag)
  and ``<svc>.connect`` go through ``trellis.api.health.service_instances`` with
  ``include_critical=False``, so DNS serves exactly the instances the HTTP health API calls
  not critical (warning is healthy, a critical node-level check removes every instance on
  that node);
* ``<node>.node`` gives the node's address whatever its health, as Consul does;
* ``<query>.query`` runs a prepared query (by ID, name, or a template's name prefix) as
  ``/v1/query/<query>/execute`` does (``trellis.api.queries``), under the query's own token
  if it has one, with the query's ``DNS.TTL`` on its records; no result is NXDOMAIN;
* ``<hex-ip>.addr`` decodes the address; we emit such names as SRV targets for services that
  have an address of their own (the node name would give the wrong address).

Existence and health are separate questions, so the answer distinguishes NXDOMAIN (no such
service, tag, node: "this name does not exist") from NODATA (the name exists but has no
record of the asked type, e.g. every instance is critical, or AAAA for an IPv4-only service).
Both carry the zone's SOA in the authority section so that resolvers can cache the negative
answer (for 0 seconds: every TTL is 0, Consul's default, because health changes at once).

ANY is answered like A plus AAAA for services and nodes, never with SRV (RFC 8482 lets a
server answer ANY with a subset, and address records are what ANY users want); at the apex it
gives the SOA and NS records. Other types on a name that exists get NODATA.

Names are matched case-insensitively: the domain, the ``service``/``node`` keywords, the
datacenter and tags by folding, and service and node names by trying the name as asked, then
in lower case, then the other spellings that ``NameIndex`` holds for its case fold. The index
is kept current from the change feed (one indexed read per name a change touched), so a name
that exists in no case costs a few indexed reads, never a scan of the catalog: a flood of
unknown names once cost a scan each and stalled the worker's HTTP requests with it. (Two
services whose names differ only in case are one name in DNS; the first spelling found wins.)

A name the wire allows but DNS does not (a label over 63 bytes, a name over 255) is FORMERR.

Over UDP a reply carries at most ``dns_udp_answer_limit`` answers (Consul's
``udp_answer_limit``, default 3, whatever EDNS0 payload size the client advertises), so that
a small spoofed query cannot make us send a large reply to its victim; TC is set on such a
reply only with ``dns_enable_truncate``, as in Consul. ANY over UDP gets one RRset (RFC 8482:
the A records if there are any). A reply that still does not fit 512 bytes, or the EDNS0
payload size the client advertised (clamped to 512..4096), keeps as many answers as fit (with
their additional records) and sets TC, and the client retries over TCP, where nothing is cut
but ``dns_a_record_limit`` (where the limit is the 65535 bytes of the frame).

``DNSServer`` is only transport. It uses blocking sockets and ``threading`` so that, under
gunicorn's gevent worker, monkey-patching makes the same code cooperative. Because gevent
refuses two greenlets waiting on one socket, UDP has a single reader that hands datagrams to a
few worker threads (store reads may be slow; one slow read must not stall every query), and
replies are sent under a lock. Under gevent the threads are greenlets of the worker that also
serves HTTP, so DNS must never hold the hub for long: the reader hands on one datagram at a
time and waits (instead of reading and dropping) when the queue is full, letting the kernel
drop the excess, and every worker yields after each reply. TCP has one acceptor and one thread
per connection, capped in all and per client address; a connection must send its first query
within ``dns_tcp_first_query_timeout`` (2 s) and may then idle ``dns_tcp_idle_timeout``
between queries, so idle connections from one client cannot take every slot.
``close()`` wakes the blocked calls (an empty datagram to our own UDP socket, ``shutdown()``
of the listener and of every connection; the UDP and listening sockets also time out every
second, as a backstop), joins every thread, and only then closes the sockets, so no thread
ever touches a closed (and possibly reused) file descriptor.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import queue
import random
import re
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dnslib import (  # type: ignore[import-untyped]
    AAAA,
    CLASS,
    EDNS0,
    NS,
    OPCODE,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from trellis.api import queries
from trellis.api.acl.rules import Authorizer
from trellis.api.errors import StoreUnavailable, TrellisError
from trellis.api.health import Instance, service_instances
from trellis.api.peers import client_key
from trellis.api.settings import Settings
from trellis.api.store.base import WARNING, Node, Service, Store

log = logging.getLogger("trellis.dns")

#: Every record's TTL (Consul's default): health changes must be seen at once.
TTL = 0
#: The UDP payload size we advertise in EDNS0 and the most we honour from a client.
EDNS_MAX_UDP = 4096
#: A plain DNS UDP message (RFC 1035).
CLASSIC_UDP = 512
#: A TCP frame's length is two bytes.
TCP_MAX = 65535
#: RFC 6891 extended RCODE BADVERS (16): the upper 8 bits go into the OPT record.
_BADVERS_EXT = 16 >> 4

_KINDS = ("service", "connect", "node", "addr", "query")
#: The reverse-lookup zones (RFC 1035 3.5, RFC 3596 2.5), their labels right to left.
_IN_ADDR = (b"arpa", b"in-addr")
_IP6 = (b"arpa", b"ip6")
_ANY = QTYPE.ANY
#: QCLASS ANY (dnslib names it "*").
_CLASS_ANY = 255
#: RFC 1035 2.3.4: a label is at most 63 bytes, a name at most 255 on the wire.
MAX_LABEL = 63
MAX_NAME = 255
#: At most one log line per this many seconds for each kind of bad packet or failure.
LOG_INTERVAL = 10.0

# Load balancing only; not a security decision, so the ordinary generator is right.
_shuffle = random.Random().shuffle  # noqa: S311


# -- name helpers -------------------------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``text`` holds if it is an IP literal, else None (it is a hostname)."""
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # ::ffff:10.0.0.1 is an IPv4 host written the IPv6 way; clients want the A record.
        return ip.ipv4_mapped
    return ip


def _name(*parts: str | bytes) -> DNSLabel | None:
    """A wire name from text parts (each split on dots) or raw labels; None if not encodable.

    Labels are UTF-8 bytes, not IDNA: a name we hand out is then the exact bytes a client
    asks back, and ``_labels`` decodes them the same way.
    """
    labels: list[bytes] = []
    for p in parts:
        if isinstance(p, bytes):
            labels.append(p)
        else:
            labels.extend(x.encode("utf-8") for x in p.strip(".").split(".") if x)
    if any(not 0 < len(x) <= 63 for x in labels) or len(b".".join(labels)) > 253:
        return None
    return DNSLabel(labels)


def _rr(name: DNSLabel, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> RR:
    if ip.version == 4:
        return RR(name, QTYPE.A, ttl=TTL, rdata=A(str(ip)))
    return RR(name, QTYPE.AAAA, ttl=TTL, rdata=AAAA(tuple(ip.packed)))


def _wants(qtype: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if qtype == _ANY:
        return True
    return bool(qtype == (QTYPE.A if ip.version == 4 else QTYPE.AAAA))


# -- the reply being built ----------------------------------------------------------------------


@dataclass
class _Result:
    rcode: int = RCODE.NOERROR
    #: Each answer with the additional records that belong to it (kept or dropped together).
    answers: list[tuple[RR, list[RR]]] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    authoritative: bool = True


class _Zone:
    """Name building for one query: the domain, the datacenter, the SOA."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.domain = settings.domain_fqdn
        self.dc = settings.datacenter
        self.origin = DNSLabel(self.domain)

    def soa(self) -> RR:
        serial = int(time.time()) & 0xFFFFFFFF
        return RR(
            self.origin,
            QTYPE.SOA,
            ttl=TTL,
            rdata=SOA(
                DNSLabel("ns." + self.domain),
                DNSLabel("hostmaster." + self.domain),
                (serial, 3600, 600, 86400, TTL),
            ),
        )

    def nxdomain(self) -> _Result:
        return _Result(RCODE.NXDOMAIN, authority=[self.soa()])

    def nodata(self) -> _Result:
        return _Result(RCODE.NOERROR, authority=[self.soa()])

    def answers(self, rrs: list[tuple[RR, list[RR]]]) -> _Result:
        if not rrs:
            return self.nodata()
        return _Result(RCODE.NOERROR, answers=rrs)

    def node_target(self, node: str) -> DNSLabel | None:
        return _name(node, "node", self.dc, self.domain)

    def addr_target(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> DNSLabel | None:
        return _name(ip.packed.hex(), "addr", self.dc, self.domain)


# -- the core -----------------------------------------------------------------------------------


def answer(
    store: Store,
    settings: Settings,
    query: bytes,
    *,
    max_udp: int | None = 512,
    authorizer: Callable[[], Authorizer | None] | None = None,
    query_authorizer: Callable[[str], Authorizer] | None = None,
) -> bytes:
    """Parse one DNS query packet and return the reply packet (b"" = send nothing).

    ``max_udp`` is the reply size limit for a client without EDNS0 (UDP); None means TCP,
    where only the 65535-byte frame limits. ``authorizer`` gives the ACL rules DNS answers
    under (with ACLs on: the anonymous token's, as Consul's DNS uses the agent's default
    token): a service needs ``service:read`` and each instance ``node:read`` on its node, a
    node ``node:read``; what the rules hide does not exist (NXDOMAIN). A prepared query
    with a token of its own answers under that token's rules instead: ``query_authorizer``
    gives them from the token's hash (None: ACLs are off). Never raises.
    """
    try:
        return bytes(_answer(store, settings, bytes(query), max_udp, authorizer, query_authorizer))
    except Exception:
        # A bug here must cost one query, not the server, nor the log: one traceback per
        # interval, however many packets trigger it.
        _throttled(logging.ERROR, "unexpected", "dns: unexpected error answering a query", exc=True)
        return _raw_reply(query, RCODE.SERVFAIL)


class _Throttle:
    """At most one log line per ``LOG_INTERVAL`` for each kind of event, with the count of
    those left out since the last line, so that a flood of bad packets cannot flood the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, level: int, kind: str, msg: str, *args: object, exc: bool = False) -> None:
        if not log.isEnabledFor(level):
            return
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < LOG_INTERVAL:
                self._skipped[kind] = self._skipped.get(kind, 0) + 1
                return
            self._last[kind] = now
            skipped = self._skipped.pop(kind, 0)
        if skipped:
            msg += f" (and {skipped} more like it in the last {LOG_INTERVAL:g}s)"
        log.log(level, msg, *args, exc_info=exc)


_throttled = _Throttle()


def _raw_reply(query: bytes, rcode: int) -> bytes:
    """A header-only reply built from raw bytes, for packets dnslib cannot parse."""
    if len(query) < 2:
        return b""  # not even an ID: nothing a client could match a reply to
    flags = query[2] if len(query) > 2 else 0
    if flags & 0x80:
        return b""  # a response, never answer one (reflection loops)
    opcode_rd = flags & 0x79  # opcode bits and RD, echoed as RFC 1035 asks
    return bytes(query[:2]) + bytes([0x80 | opcode_rd, rcode & 0x0F]) + bytes(8)


def _answer(
    store: Store,
    settings: Settings,
    query: bytes,
    max_udp: int | None,
    authorizer: Callable[[], Authorizer | None] | None,
    query_authorizer: Callable[[str], Authorizer] | None = None,
) -> bytes:
    if len(query) < 12 or query[2] & 0x80:
        return _raw_reply(query, RCODE.FORMERR)
    try:
        req = DNSRecord.parse(query)
    except Exception as e:  # dnslib raises DNSError, BufferError and friends on junk
        log.debug("dns: malformed packet (%d bytes): %s", len(query), e)
        return _raw_reply(query, RCODE.FORMERR)

    h = req.header
    if req.questions and not _encodable(req.questions[0].qname):
        # dnslib reads a 64-byte label (or a 300-byte name) off the wire but cannot write it
        # back; it is malformed, and the client's fault.
        _throttled(logging.INFO, "long-name", "dns: FORMERR for a name over DNS's length limits")
        return _raw_reply(query, RCODE.FORMERR)

    def header(rcode: int, *, aa: bool = False, tc: bool = False) -> DNSHeader:
        # RA stays 0: we never recurse. RD is echoed, as RFC 1035 asks.
        return DNSHeader(
            id=h.id, bitmap=0, qr=1, opcode=h.opcode, aa=int(aa), tc=int(tc), rd=h.rd, rcode=rcode
        )

    questions = req.questions if len(req.questions) == 1 else []
    if h.opcode != OPCODE.QUERY:
        return bytes(DNSRecord(header(RCODE.NOTIMP), questions=questions).pack())
    if len(req.questions) != 1:
        return bytes(DNSRecord(header(RCODE.FORMERR)).pack())
    opts = [rr for rr in req.ar if rr.rtype == QTYPE.OPT]
    if len(opts) > 1:
        return bytes(DNSRecord(header(RCODE.FORMERR), questions=questions).pack())
    opt = None
    limit = TCP_MAX if max_udp is None else max_udp
    if opts:
        if opts[0].edns_ver != 0:
            bad = DNSRecord(header(RCODE.NOERROR), questions=questions)
            bad.add_ar(EDNS0(udp_len=EDNS_MAX_UDP, ext_rcode=_BADVERS_EXT))
            return bytes(bad.pack())
        opt = EDNS0(udp_len=EDNS_MAX_UDP)
        if max_udp is not None:
            # Below 512 means 512 (RFC 6891 6.2.5); above 4096 we do not trust the path.
            limit = max(max_udp, min(max(opts[0].edns_len, CLASSIC_UDP), EDNS_MAX_UDP))

    q = req.questions[0]
    if q.qclass not in (CLASS.IN, _CLASS_ANY):
        return _pack(header, q, _Result(RCODE.REFUSED, authoritative=False), opt, limit)
    if q.qtype in (QTYPE.AXFR, QTYPE.IXFR):
        return _pack(header, q, _Result(RCODE.NOTIMP, authoritative=False), opt, limit)

    try:
        authz = authorizer() if authorizer is not None else None
        result = _resolve(store, _Zone(settings), q, authz, query_authorizer)
    except StoreUnavailable as e:
        log.warning("dns: store unavailable answering %s: %s", q.qname, e)
        result = _Result(RCODE.SERVFAIL, authoritative=False)
    if log.isEnabledFor(logging.DEBUG):  # the arguments cost more than the check
        log.debug(
            "dns: %s %s -> %s (%d answers)",
            q.qname,
            QTYPE.get(q.qtype),
            RCODE.get(result.rcode),
            len(result.answers),
        )
    cut = _limit_answers(result, q.qtype, settings, udp=max_udp is not None)
    return _pack(header, q, result, opt, limit, cut=cut and settings.dns_enable_truncate)


def _encodable(name: DNSLabel) -> bool:
    labels = name.label
    if any(len(x) > MAX_LABEL for x in labels):
        return False
    return sum(len(x) + 1 for x in labels) + 1 <= MAX_NAME


def _limit_answers(result: _Result, qtype: int, settings: Settings, *, udp: bool) -> bool:
    """Apply the answer limits to ``result`` in place; whether answers were dropped.

    ``dns_a_record_limit`` caps address answers on both transports. Over UDP, ANY keeps one
    RRset (RFC 8482: the A records if there are any) and every reply at most
    ``dns_udp_answer_limit`` answers: an amplification attack sends small spoofed UDP queries
    and wants large replies sent to its victim. The answers were shuffled, so the cut keeps a
    random subset, as Consul's does.
    """
    answers = result.answers
    before = len(answers)
    a_limit = settings.dns_a_record_limit
    if a_limit and qtype in (QTYPE.A, QTYPE.AAAA, _ANY):
        answers = answers[:a_limit]
    if udp:
        if qtype == _ANY and answers:
            types = {rr.rtype for rr, _ in answers}
            keep = QTYPE.A if QTYPE.A in types else answers[0][0].rtype
            answers = [(rr, extra) for rr, extra in answers if rr.rtype == keep]
        answers = answers[: settings.dns_udp_answer_limit]
    result.answers = answers
    return len(answers) < before


def _pack(
    header: Callable[..., DNSHeader],
    q: DNSQuestion,
    result: _Result,
    opt: RR | None,
    limit: int,
    *,
    cut: bool = False,
) -> bytes:
    """The reply, truncated to ``limit`` bytes if needed (TC set when answers were dropped
    for size, or ``cut``: the answer limit dropped some and the operator wants TC for it)."""

    def build(k: int, tc: bool) -> bytes:
        rec = DNSRecord(header(result.rcode, aa=result.authoritative, tc=tc), q=q)
        seen: set[tuple[str, int, str]] = set()
        for rr, extra in result.answers[:k]:
            rec.add_answer(rr)
            for x in extra:
                key = (str(x.rname).lower(), x.rtype, str(x.rdata))
                if key not in seen:
                    seen.add(key)
                    rec.add_ar(x)
        for rr in result.authority:
            rec.add_auth(rr)
        if opt is not None:
            rec.add_ar(opt)
        return bytes(rec.pack())

    n = len(result.answers)
    full = build(n, cut)
    if len(full) <= limit:
        return full
    # Binary search for the most answers that fit; each try re-packs (names compress
    # differently as records go), which is exact and cheap next to a store read.
    lo, hi, best = 0, n - 1, b""
    while lo <= hi:
        mid = (lo + hi) // 2
        data = build(mid, True)
        if len(data) <= limit:
            best, lo = data, mid + 1
        else:
            hi = mid - 1
    if best:
        return best
    bare = DNSRecord(header(result.rcode, aa=result.authoritative, tc=True), q=q)
    return bytes(bare.pack())


def _labels(qname: DNSLabel, zone: _Zone) -> list[str] | None:
    """The labels of ``qname`` left of our domain, or None if the name is not in our zone."""
    if len(qname.label) < len(zone.origin.label) or not qname.matchSuffix(zone.origin):
        return None
    raw = qname.label[: len(qname.label) - len(zone.origin.label)]
    # dnslib only parses names whose labels are UTF-8; "replace" keeps this total anyway, and
    # a replaced label matches no stored name.
    return [x.decode("utf-8", "replace") for x in raw]


#: Control characters: legal in a DNS label on the wire, in no name Trellis holds.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _resolve(
    store: Store,
    zone: _Zone,
    q: DNSQuestion,
    authz: Authorizer | None,
    query_authorizer: Callable[[str], Authorizer] | None = None,
) -> _Result:
    qname, qtype = q.qname, q.qtype
    labels = _labels(qname, zone)
    if labels is None:
        reverse = _reverse_ip(qname)
        if reverse is not None:
            return _ptr_lookup(store, zone, qname, qtype, reverse, authz)
        return _Result(RCODE.REFUSED, authoritative=False)
    if any("." in x or "\ufffd" in x or _CONTROL.search(x) for x in labels):
        # A label with a dot in it (legal on the wire) would alias a dotted name, and one
        # that is not UTF-8, or holds a control character (a NUL, which no store can even
        # look up), matches nothing we hold: the name does not exist.
        return zone.nxdomain()
    if not labels:
        return _apex(zone, qname, qtype)
    low = [x.lower() for x in labels]
    if low == ["ns"]:
        return _ns_host(zone, qname, qtype)
    kind_at = next((i for i in range(len(low) - 1, -1, -1) if low[i] in _KINDS), None)
    if kind_at is None:
        return zone.nxdomain()
    kind, parts, suffix = low[kind_at], labels[:kind_at], low[kind_at + 1 :]
    if len(suffix) > 1 or (suffix and suffix[0] != zone.dc.lower()):
        return zone.nxdomain()
    if not parts:
        return zone.nxdomain()
    if kind == "node":
        return _node_lookup(store, zone, qname, qtype, ".".join(parts), authz)
    if kind == "addr":
        return _addr_lookup(zone, qname, qtype, parts)
    if kind == "query":
        return _query_lookup(store, zone, qname, qtype, ".".join(parts), authz, query_authorizer)
    if kind == "connect":
        if len(parts) != 1:
            return zone.nxdomain()
        return _service_lookup(store, zone, qname, qtype, parts[0], None, authz, connect=True)
    # service
    if len(parts) == 2 and parts[0].startswith("_") and parts[1].startswith("_"):
        # RFC 2782: _<service>._<tag>; _tcp is the protocol, not a tag filter.
        svc, proto = parts[0][1:], parts[1][1:]
        tag: str | None = None if proto.lower() == "tcp" else proto
    else:
        svc = parts[-1]
        # Tags may contain dots (Consul joins the leading labels back).
        tag = ".".join(parts[:-1]) or None
    if not svc or tag == "":
        return zone.nxdomain()
    return _service_lookup(store, zone, qname, qtype, svc, tag, authz, connect=False)


def _apex(zone: _Zone, qname: DNSLabel, qtype: int) -> _Result:
    soa = zone.soa()
    ns = RR(qname, QTYPE.NS, ttl=TTL, rdata=NS(DNSLabel("ns." + zone.domain)))
    glue = _ns_records(zone, DNSLabel("ns." + zone.domain), _ANY)
    if qtype == QTYPE.SOA:
        return _Result(answers=[(soa, [])])
    if qtype == QTYPE.NS:
        return _Result(answers=[(ns, glue)])
    if qtype == _ANY:
        return _Result(answers=[(soa, []), (ns, glue)])
    return zone.nodata()


def _ns_records(zone: _Zone, name: DNSLabel, qtype: int) -> list[RR]:
    # The name server is this node; node_address is what it advertises to the cluster.
    ip = _ip(zone.settings.node_address)
    return [_rr(name, ip)] if ip is not None and _wants(qtype, ip) else []


def _ns_host(zone: _Zone, qname: DNSLabel, qtype: int) -> _Result:
    return zone.answers([(rr, []) for rr in _ns_records(zone, qname, qtype)])


def _find_node(store: Store, name: str) -> Node | None:
    node = store.node(name)
    if node is None and name.lower() != name:
        node = store.node(name.lower())
    if node is None:
        for other in sorted(name_index(store).nodes(name) - {name, name.lower()}):
            node = store.node(other)
            if node is not None:
                break
    return node


def _node_lookup(
    store: Store, zone: _Zone, qname: DNSLabel, qtype: int, name: str, authz: Authorizer | None
) -> _Result:
    node = _find_node(store, name)
    if node is None or (authz is not None and not authz.node_read(node.name)):
        return zone.nxdomain()
    ip = _ip(node.address)
    if ip is None or not _wants(qtype, ip):
        return zone.nodata()
    return zone.answers([(_rr(qname, ip), [])])


def _addr_lookup(zone: _Zone, qname: DNSLabel, qtype: int, parts: list[str]) -> _Result:
    if len(parts) != 1 or len(parts[0]) not in (8, 32):
        return zone.nxdomain()
    try:
        raw = bytes.fromhex(parts[0])
    except ValueError:
        return zone.nxdomain()
    ip = ipaddress.ip_address(raw)
    if not _wants(qtype, ip):
        return zone.nodata()
    return zone.answers([(_rr(qname, ip), [])])


def _with_tag(insts: Iterable[Instance], tag: str | None) -> list[Instance]:
    if tag is None:
        return list(insts)
    # Consul compares DNS tags ignoring case; service_instances' tags= filter is exact.
    t = tag.casefold()
    return [i for i in insts if any(x.casefold() == t for x in i.service.tags)]


def _candidate_names(store: Store, name: str, connect: bool) -> Iterable[str]:
    yield name
    if name.lower() != name:
        yield name.lower()
    yield from sorted(name_index(store).services(name, connect=connect) - {name, name.lower()})


class NameIndex:
    """The catalog's service names, proxy destinations and node names by case fold, and node
    and service names by address (for reverse lookups).

    DNS names are case-insensitive and the store's are not: ``WEB.service`` must find the
    service registered as ``Web``. Scanning the catalog for that on every name not found
    as asked let a flood of unknown names stall the worker. Instead this index is built from
    the store once (the only scan; again only if the change feed has lost history since its
    last use) and then follows the feed: before each use it re-reads, by indexed lookups,
    just the names that the catalog changes published since touched. Like a blocking query it
    takes the feed position before it reads, so no change is missed; it may lag another
    process's write by the follower's delay, as everything in this process does.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pos: int | None = None
        self._names: dict[str, set[str]] = {}
        self._destinations: dict[str, set[str]] = {}
        self._nodes: dict[str, set[str]] = {}
        # For reverse lookups: node and service names by address, and each one's addresses.
        self._node_addr: dict[str, str] = {}
        self._svc_addrs: dict[str, set[str]] = {}
        self._at_nodes: dict[str, set[str]] = {}
        self._at_svcs: dict[str, set[str]] = {}
        #: How many times the whole catalog was read (for tests and metrics).
        self.scans = 0

    def services(self, name: str, *, connect: bool = False) -> set[str]:
        """The stored spellings of service ``name`` (and, with ``connect``, of proxy
        destinations) equal to it ignoring case."""
        self._refresh()
        folded = name.casefold()
        found = set(self._names.get(folded, ()))
        if connect:
            found |= self._destinations.get(folded, set())
        return found

    def nodes(self, name: str) -> set[str]:
        self._refresh()
        return set(self._nodes.get(name.casefold(), ()))

    def nodes_at(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> set[str]:
        """The nodes whose address is ``ip``."""
        self._refresh()
        return set(self._at_nodes.get(str(ip), ()))

    def services_at(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> set[str]:
        """The services with an instance registered with ``ip`` as its own address."""
        self._refresh()
        return set(self._at_svcs.get(str(ip), ()))

    def _file_node_addr(self, name: str, node: Node | None) -> None:
        old = self._node_addr.pop(name, None)
        if old is not None:
            _file(self._at_nodes, old, False, name)
        ip = _ip(node.address) if node is not None else None
        if ip is not None:
            self._node_addr[name] = str(ip)
            _file(self._at_nodes, str(ip), True, name)

    def _file_svc_addrs(self, name: str, services: Iterable[Service]) -> None:
        for old in self._svc_addrs.pop(name, set()):
            _file(self._at_svcs, old, False, name)
        ips = {str(ip) for ip in (_ip(s.address) for s in services) if ip is not None}
        if ips:
            self._svc_addrs[name] = ips
            for ip in ips:
                _file(self._at_svcs, ip, True, name)

    def _refresh(self) -> None:
        feed = self._store.feed
        with self._lock:
            pos = feed.position()
            if pos == self._pos:
                return
            changes = None if self._pos is None else feed.changes_after(self._pos)
            if changes is None:
                self._rebuild()
            else:
                services: set[str] = set()
                nodes: set[str] = set()
                for c in changes:
                    if c.topic == "catalog":
                        kind, _, key = c.key.partition("/")
                        if kind == "svc":
                            services.add(key)
                        elif kind == "node":
                            nodes.add(key)
                for key in services:
                    found = self._store.services(name=key)
                    _file(self._names, key, bool(found))
                    _file(self._destinations, key, bool(self._store.services(destination=key)))
                    self._file_svc_addrs(key, found)
                for key in nodes:
                    node = self._store.node(key)
                    _file(self._nodes, key, node is not None)
                    self._file_node_addr(key, node)
            self._pos = pos

    def _rebuild(self) -> None:
        self.scans += 1
        names: dict[str, set[str]] = {}
        destinations: dict[str, set[str]] = {}
        nodes: dict[str, set[str]] = {}
        by_name: dict[str, list[Service]] = {}
        all_services = self._store.services()
        all_nodes = self._store.nodes()
        for svc in all_services:
            _file(names, svc.name, True)
            by_name.setdefault(svc.name, []).append(svc)
            if svc.destination:
                _file(destinations, svc.destination, True)
        for node in all_nodes:
            _file(nodes, node.name, True)
        self._names, self._destinations, self._nodes = names, destinations, nodes
        self._node_addr, self._svc_addrs, self._at_nodes, self._at_svcs = {}, {}, {}, {}
        for node in all_nodes:
            self._file_node_addr(node.name, node)
        for name, found in by_name.items():
            self._file_svc_addrs(name, found)


def _file(index: dict[str, set[str]], name: str, present: bool, value: str | None = None) -> None:
    """File ``value`` (default: ``name`` itself) under ``name``'s case fold, or take it out."""
    folded = name.casefold()
    value = name if value is None else value
    if present:
        index.setdefault(folded, set()).add(value)
        return
    spellings = index.get(folded)
    if spellings is not None:
        spellings.discard(value)
        if not spellings:
            del index[folded]


_indexes: weakref.WeakKeyDictionary[Any, NameIndex] = weakref.WeakKeyDictionary()
_indexes_lock = threading.Lock()


def name_index(store: Store) -> NameIndex:
    """The one ``NameIndex`` of ``store`` (made at first use, gone with the store)."""
    with _indexes_lock:
        index = _indexes.get(store)
        if index is None:
            index = _indexes[store] = NameIndex(store)
        return index


def _instances(
    store: Store, name: str, tag: str | None, authz: Authorizer | None, *, connect: bool
) -> tuple[bool, list[Instance]]:
    """(whether the name exists for these ACLs, its healthy instances they may see)."""

    def visible(insts: Iterable[Instance]) -> list[Instance]:
        insts = _with_tag(insts, tag)
        if authz is None:
            return insts
        return [i for i in insts if authz.node_read(i.node.name)]

    for candidate in _candidate_names(store, name, connect):
        if authz is not None and not authz.service_read(candidate):
            continue  # hidden by the ACLs: as if it did not exist
        healthy = visible(
            service_instances(store, candidate, connect=connect, include_critical=False)
        )
        if healthy:
            return True, healthy
        # No healthy instance: NODATA if it has instances at all, else try the next spelling.
        if visible(service_instances(store, candidate, connect=connect)):
            return True, []
    return False, []


def _weight(inst: Instance) -> int:
    w = inst.service.weights or {}
    key = "Warning" if inst.status == WARNING else "Passing"
    try:
        return max(0, min(65535, int(w.get(key, 1))))
    except (TypeError, ValueError):
        return 1


def _service_lookup(
    store: Store,
    zone: _Zone,
    qname: DNSLabel,
    qtype: int,
    name: str,
    tag: str | None,
    authz: Authorizer | None,
    *,
    connect: bool,
) -> _Result:
    exists, insts = _instances(store, name, tag, authz, connect=connect)
    if not exists:
        return zone.nxdomain()
    if qtype == QTYPE.SRV:
        return zone.answers(_srv_records(zone, qname, insts))
    if qtype not in (QTYPE.A, QTYPE.AAAA, _ANY):
        return zone.nodata()
    return zone.answers(_address_records(qname, qtype, insts))


def _address_records(
    qname: DNSLabel, qtype: int, insts: Sequence[Instance]
) -> list[tuple[RR, list[RR]]]:
    seen: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    out: list[tuple[RR, list[RR]]] = []
    for inst in insts:
        ip = _ip(inst.service.address or inst.node.address)
        # Hostname addresses cannot go in A/AAAA (Consul would CNAME; we only serve SRV).
        if ip is None or ip in seen or not _wants(qtype, ip):
            continue
        seen.add(ip)
        out.append((_rr(qname, ip), []))
    _shuffle(out)
    return out


def _srv_records(
    zone: _Zone, qname: DNSLabel, insts: Sequence[Instance]
) -> list[tuple[RR, list[RR]]]:
    out: list[tuple[RR, list[RR]]] = []
    seen: set[tuple[str, int]] = set()
    for inst in insts:
        svc = inst.service
        addr = svc.address or inst.node.address
        ip = _ip(addr)
        extra: list[RR] = []
        if ip is None:
            # A hostname is its own target; the client resolves it wherever it lives.
            target = _name(addr) if addr else None
        elif svc.address and ip != _ip(inst.node.address):
            # The service listens elsewhere than its node: the node's name would resolve to
            # the wrong address, so name the address itself (Consul's <hex>.addr form).
            target = zone.addr_target(ip)
        else:
            target = zone.node_target(inst.node.name)
        if target is None:
            log.debug("dns: %s/%s has no encodable SRV target", inst.node.name, svc.id)
            continue
        key = (str(target).lower(), svc.port)
        if key in seen:
            continue  # identical SRV records are one record (RFC 2181 5)
        seen.add(key)
        if ip is not None:
            extra.append(_rr(target, ip))
        rdata = SRV(priority=1, weight=_weight(inst), port=svc.port, target=target)
        out.append((RR(qname, QTYPE.SRV, ttl=TTL, rdata=rdata), extra))
    _shuffle(out)
    return out


def _query_lookup(
    store: Store,
    zone: _Zone,
    qname: DNSLabel,
    qtype: int,
    name: str,
    authz: Authorizer | None,
    query_authorizer: Callable[[str], Authorizer] | None,
) -> _Result:
    """``<query>.query``: a prepared query by ID or name (or a template's name prefix), run as
    ``/v1/query/<query>/execute`` runs it; its ``DNS.TTL`` is every record's TTL. No instance
    is NXDOMAIN, as in Consul."""
    docs, _ = queries.stored(store)
    doc = queries.resolve(docs, name)
    if doc is None and name.lower() != name:
        doc = queries.resolve(docs, name.lower())  # resolvers may vary the case (0x20)
    if doc is None:
        return zone.nxdomain()
    if doc.get("TokenHash") and query_authorizer is not None:
        try:
            authz = query_authorizer(doc["TokenHash"])
        except TrellisError:
            # The query's token is gone: as the HTTP execute's 403, a failure, not a name.
            return _Result(RCODE.SERVFAIL, authoritative=False)
    insts = queries.select(store, doc)
    if authz is not None:
        insts = [
            i for i in insts if authz.service_read(i.service.name) and authz.node_read(i.node.name)
        ]
    if not insts:
        return zone.nxdomain()
    if qtype == QTYPE.SRV:
        records = _srv_records(zone, qname, insts)
    elif qtype in (QTYPE.A, QTYPE.AAAA, _ANY):
        records = _address_records(qname, qtype, insts)
    else:
        return zone.nodata()
    ttl = queries.ttl_seconds(doc)
    if ttl is not None:
        for rr, extra in records:
            rr.ttl = ttl
            for x in extra:
                x.ttl = ttl
    return zone.answers(records)


def _reverse_ip(qname: DNSLabel) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a full reverse name (``4.3.2.1.in-addr.arpa``, 32 nibbles under
    ``ip6.arpa``) stands for; None for any other name (a partial one included)."""
    labels = [x.lower() for x in reversed(qname.label)]
    try:
        if tuple(labels[:2]) == _IN_ADDR and len(labels) == 6:
            octets = [x.decode("ascii") for x in labels[2:]]
            if all(o.isdigit() and len(o) <= 3 for o in octets):
                return ipaddress.IPv4Address(".".join(octets))
        if tuple(labels[:2]) == _IP6 and len(labels) == 34:
            nibbles = [x.decode("ascii") for x in labels[2:]]
            if all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
                return ipaddress.IPv6Address(bytes.fromhex("".join(nibbles)))
    except (UnicodeDecodeError, ValueError):
        return None
    return None


def _ptr_lookup(
    store: Store,
    zone: _Zone,
    qname: DNSLabel,
    qtype: int,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    authz: Authorizer | None,
) -> _Result:
    """A reverse lookup, as Consul's: the nodes with this address
    (``<node>.node.<dc>.<domain>``), else the services registered with it as their own
    address (``<service>.service.<dc>.<domain>``); NXDOMAIN for an address we do not hold.
    The addresses come from the ``NameIndex`` (no catalog scan per query)."""
    index = name_index(store)
    targets: list[DNSLabel | None] = []
    for name in sorted(index.nodes_at(ip)):
        if authz is None or authz.node_read(name):
            targets.append(zone.node_target(name))
    if not targets:
        for name in sorted(index.services_at(ip)):
            if authz is not None and not authz.service_read(name):
                continue
            nodes = {s.node for s in store.services(name=name) if _ip(s.address) == ip}
            if authz is None or any(authz.node_read(n) for n in nodes):
                targets.append(_name(name, "service", zone.dc, zone.domain))
    found = [t for t in targets if t is not None]
    if not found:
        return zone.nxdomain()
    if qtype not in (QTYPE.PTR, _ANY):
        return zone.nodata()
    return zone.answers([(RR(qname, QTYPE.PTR, ttl=TTL, rdata=PTR(t)), []) for t in found])


# -- sockets ------------------------------------------------------------------------------------


def bind_dns_sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """Bind a UDP and a listening TCP socket on ``host:port``.

    ``port`` 0 picks a port free for both protocols: the kernel picks a free UDP port, and
    if that number is taken for TCP we try again (a few times).
    """
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise OSError(e.errno, f"DNS: cannot resolve bind address {host!r}: {e}") from e
    family, _, _, _, sockaddr = infos[0]

    def addr(p: int) -> tuple[Any, ...]:
        return (sockaddr[0], p, *sockaddr[2:])

    tries = 20 if port == 0 else 1
    for _ in range(tries):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            udp.bind(addr(port))
        except OSError as e:
            udp.close()
            raise OSError(e.errno, f"DNS: cannot bind UDP {host}:{port} ({e.strerror or e})") from e
        actual = udp.getsockname()[1]
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Restarts must not wait out TIME_WAIT; Linux still refuses a second listener.
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(addr(actual))
            tcp.listen(128)
        except OSError as e:
            tcp.close()
            udp.close()
            if port == 0 and e.errno == errno.EADDRINUSE:
                continue
            raise OSError(
                e.errno, f"DNS: cannot bind TCP {host}:{actual} ({e.strerror or e})"
            ) from e
        return udp, tcp
    raise OSError(
        errno.EADDRINUSE, f"DNS: found no port on {host} free for both UDP and TCP ({tries} tries)"
    )


class DNSServer:
    """Serves ``answer()`` on a bound UDP socket and a listening TCP socket (it owns both)."""

    #: How long a UDP/listening socket call blocks before looking at the stop flag again.
    poll_interval = 1.0

    def __init__(
        self,
        store: Store,
        settings: Settings,
        udp_sock: socket.socket,
        tcp_sock: socket.socket,
        *,
        tcp_idle_timeout: float | None = None,
        tcp_first_query_timeout: float | None = None,
        max_tcp_connections: int = 256,
        max_tcp_conns_per_client: int | None = None,
        udp_workers: int = 8,
        udp_queue: int = 1024,
        authorizer: Callable[[], Authorizer | None] | None = None,
        query_authorizer: Callable[[str], Authorizer] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.authorizer = authorizer
        self.query_authorizer = query_authorizer
        self._udp = udp_sock
        self._tcp = tcp_sock
        # Keyword arguments override the settings (tests use short timeouts and small caps).
        self.tcp_idle_timeout = (
            settings.dns_tcp_idle_timeout if tcp_idle_timeout is None else tcp_idle_timeout
        )
        self.tcp_first_query_timeout = (
            settings.dns_tcp_first_query_timeout
            if tcp_first_query_timeout is None
            else tcp_first_query_timeout
        )
        self.max_tcp_connections = max_tcp_connections
        self.max_tcp_conns_per_client = (
            settings.dns_tcp_max_conns_per_client
            if max_tcp_conns_per_client is None
            else max_tcp_conns_per_client
        )
        self._per_client: dict[str, int] = {}
        self._udp_workers = max(1, udp_workers)
        self._queue: queue.Queue[tuple[bytes, Any] | None] = queue.Queue(maxsize=udp_queue)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._serving = False
        self._closed = False
        self._slots = threading.BoundedSemaphore(max_tcp_connections)
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._last_warning = 0.0

    @property
    def address(self) -> tuple[Any, ...]:
        """Where the server listens (host, port), for logs and tests."""
        return tuple(self._udp.getsockname())

    # -- lifecycle ---------------------------------------------------------------------------

    def serve_forever(self) -> None:
        with self._lock:
            if self._serving or self._stop.is_set():
                return
            self._serving = True
        for s in (self._udp, self._tcp):
            s.settimeout(self.poll_interval)
        reader = threading.Thread(target=self._udp_reader, name="trellis-dns-udp", daemon=True)
        acceptor = threading.Thread(target=self._tcp_acceptor, name="trellis-dns-tcp", daemon=True)
        workers = [
            threading.Thread(target=self._udp_worker, name=f"trellis-dns-udp-{i}", daemon=True)
            for i in range(self._udp_workers)
        ]
        started: list[threading.Thread] = []
        try:
            for t in (reader, acceptor, *workers):
                t.start()
                started.append(t)
            log.info("dns: serving %s on UDP and TCP", self.address)
            self._stop.wait()
        finally:
            self._stop.set()
            self._wake()
            for t in (reader, acceptor):
                if t in started:
                    t.join(timeout=5)
            # The reader is gone, nobody else puts: one sentinel per worker ends them all.
            for t in workers:
                if t in started:
                    try:
                        self._queue.put(None, timeout=5)
                    except queue.Full:
                        break
            for t in workers:
                if t in started:
                    t.join(timeout=5)
            with self._lock:
                conns = list(self._conns.values())
            for t in conns:
                t.join(timeout=5)
            self._close_sockets()
            self._done.set()
            log.info("dns: stopped")

    def close(self) -> None:
        """Stop serving; returns once every thread has finished (serve_forever returns too)."""
        self._stop.set()
        self._wake()
        with self._lock:
            serving = self._serving
        if serving:
            self._done.wait(timeout=10)
        else:
            self._close_sockets()

    def _wake(self) -> None:
        # A UDP reader waiting in poll() (what a socket timeout means) is not woken by
        # shutdown() on Linux, but an empty datagram to ourselves always wakes it.
        try:
            host, port, *rest = self._udp.getsockname()
            if host in ("0.0.0.0", "::"):  # noqa: S104 - we only compare, and send to loopback
                host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
            self._udp.sendto(b"", (host, port, *rest))
        except OSError:
            pass  # already shut down or closed
        # The listening sockets are shared with the master and every other worker (they were
        # bound before the fork): shutdown() on them would stop DNS in every process. Wake our
        # accept() with a connection to ourselves instead (if another worker takes it, it
        # closes it; ours wakes at its next timeout), and shut down only our own connections.
        try:
            host, port, *rest = self._tcp.getsockname()
            if host in ("0.0.0.0", "::"):  # noqa: S104 - we only compare, and dial loopback
                host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as poke:
                poke.settimeout(0.5)
                poke.connect((host, port, *rest))
        except OSError:
            pass  # closed already, or the backlog is full: the accept timeout will do
        with self._lock:
            socks = list(self._conns)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _close_sockets(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._udp.close()
        self._tcp.close()

    def _warn(self, msg: str, *args: object) -> None:
        # Rate-limited: a flood must not also flood the log.
        now = time.monotonic()
        if now - self._last_warning >= 10:
            self._last_warning = now
            log.warning(msg, *args)

    # -- UDP ---------------------------------------------------------------------------------

    def _udp_reader(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    break
                self._warn("dns: UDP receive failed: %s", e)
                self._stop.wait(0.05)  # e.g. ENOBUFS: do not spin
                continue
            if self._stop.is_set():
                break
            # When the workers are behind, wait for room rather than read and drop: the kernel
            # drops the excess at no cost to us, while reading datagrams only to drop them
            # would keep this greenlet running and starve the worker's HTTP requests.
            while not self._stop.is_set():
                try:
                    self._queue.put((data, peer), timeout=self.poll_interval)
                    break
                except queue.Full:
                    self._warn("dns: UDP queries arrive faster than they are answered")
            # A socket with data waiting returns at once without yielding: let the worker's
            # other greenlets run between datagrams.
            time.sleep(0)

    def _udp_worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._stop.is_set():
                continue  # draining to our sentinel
            data, peer = item
            reply = answer(
                self.store,
                self.settings,
                data,
                max_udp=CLASSIC_UDP,
                authorizer=self.authorizer,
                query_authorizer=self.query_authorizer,
            )
            if reply:
                try:
                    with self._send_lock:
                        self._udp.sendto(reply, peer)
                except OSError as e:
                    log.debug("dns: UDP reply to %s failed: %s", peer, e)
            # Under gevent, answering is pure CPU between store reads (and SQLite reads do
            # not yield): give the worker's HTTP requests their turn after each reply.
            time.sleep(0)

    # -- TCP ---------------------------------------------------------------------------------

    def _tcp_acceptor(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    break
                self._warn("dns: TCP accept failed: %s", e)  # e.g. EMFILE
                self._stop.wait(0.05)
                continue
            if self._stop.is_set():
                conn.close()
                continue
            key = client_key(peer)
            cap = self.max_tcp_conns_per_client
            with self._lock:
                held = self._per_client.get(key, 0)
                over = bool(cap) and held >= cap
                if not over:
                    self._per_client[key] = held + 1
            if over:
                _throttled(
                    logging.WARNING,
                    "tcp-per-client",
                    "dns: refusing TCP connections from %s over the per-client cap (%d)",
                    key,
                    cap,
                )
                conn.close()
                continue
            if not self._slots.acquire(blocking=False):
                self._warn("dns: %d TCP connections open, refusing more", self.max_tcp_connections)
                self._release_client(key)
                conn.close()
                continue
            t = threading.Thread(
                target=self._tcp_conn,
                args=(conn, peer, key),
                name="trellis-dns-conn",
                daemon=True,
            )
            with self._lock:
                self._conns[conn] = t
            try:
                t.start()
            except RuntimeError as e:  # cannot start a thread: shed this connection
                self._warn("dns: cannot serve a TCP connection: %s", e)
                with self._lock:
                    self._conns.pop(conn, None)
                conn.close()
                self._slots.release()
                self._release_client(key)

    def _release_client(self, key: str) -> None:
        with self._lock:
            left = self._per_client.get(key, 1) - 1
            if left > 0:
                self._per_client[key] = left
            else:
                self._per_client.pop(key, None)

    def _recv_exact(self, conn: socket.socket, n: int, timeout: float) -> bytes | None:
        """``n`` bytes within ``timeout``, or None (peer gone, timed out, stopping)."""
        deadline = time.monotonic() + timeout
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                return None
            conn.settimeout(left)
            try:
                chunk = conn.recv(n - len(buf))
            except (TimeoutError, OSError):
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _tcp_conn(self, conn: socket.socket, peer: Any, key: str) -> None:
        # A connection that has sent nothing yet gets the short timeout: holding many such
        # connections open is how a client would take every slot from the others.
        wait = self.tcp_first_query_timeout
        try:
            # RFC 7766: several queries per connection, one frame each, answered in order.
            while not self._stop.is_set():
                head = self._recv_exact(conn, 2, wait)
                if head is None:
                    break
                wait = self.tcp_idle_timeout
                (length,) = struct.unpack("!H", head)
                data = self._recv_exact(conn, length, wait) if length else None
                if data is None:
                    break  # a zero-length or half-sent frame ends the connection
                reply = answer(
                    self.store,
                    self.settings,
                    data,
                    max_udp=None,
                    authorizer=self.authorizer,
                    query_authorizer=self.query_authorizer,
                )
                if not reply:
                    break
                conn.settimeout(self.tcp_idle_timeout)  # a client that never reads
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError as e:
            log.debug("dns: TCP connection from %s: %s", peer, e)
        except Exception:
            log.exception("dns: TCP connection from %s failed", peer)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()
            self._slots.release()
            self._release_client(key)
