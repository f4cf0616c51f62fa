"""What a proxy knows of the control plane, as one immutable value. Pure.

The follower (``trellis.proxy.follower``) builds a new ``Snapshot`` whenever something it
follows changes (roots, its leaf, the intentions naming its service, the healthy instances of an
upstream, its registration) and swaps it in whole. A connection reads the snapshot current when
it is decided and makes no network call; a snapshot never changes under it.

``ConnTable`` is the proxy's table of open inbound connections and their peers, with no
sockets in it: when a new snapshot arrives, ``redecide`` says which of them the new intentions
deny, and ``untrusted`` which of them the new roots no longer vouch for; the sidecar closes
those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trellis.proxy import authz, spiffe
from trellis.proxy.config import ProxyConfig


@dataclass(frozen=True, slots=True)
class PeerVerdict:
    """What a peer's (chain-verified) leaf says: its identity, or why it is not acceptable.
    Made by ``trellis.proxy.tls.peer_identity``."""

    identity: spiffe.ServiceID | None
    reason: str = ""
    #: The leaf's authority key identifier (hex): which CA key signed it.
    issuer_key_id: str = ""


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to an inbound connection whose handshake completed: admitted or not, why,
    and the decision it rests on (None when the peer's certificate was refused before any
    intention was consulted)."""

    allowed: bool
    reason: str
    source: spiffe.ServiceID | None = None
    decision: authz.Decision | None = None


@dataclass(frozen=True)
class Leaf:
    """This proxy's certificate. The key it goes with never enters a snapshot's repr or any
    log: it lives in ``TLSMaterial`` (``repr=False``)."""

    cert_pem: str
    chain_pem: tuple[str, ...]
    not_before: float
    not_after: float
    serial: str
    #: Authority key identifier of the leaf (hex), to tell which root signed it.
    issuer_key_id: str = ""


@dataclass(frozen=True)
class Roots:
    """The trusted roots of this trust domain, with the intermediates (cross-signed roots)
    that may sign a leaf under them."""

    trust_domain: str
    active_id: str
    pems: tuple[str, ...]
    #: Subject key identifiers (hex) of every root and intermediate listed: a leaf whose
    #: issuer is not among them is no longer trusted.
    key_ids: frozenset[str]
    index: int = 0


@dataclass(frozen=True)
class Endpoint:
    """One healthy instance of an upstream: a sidecar (or Connect-native app) address."""

    address: str
    port: int
    service_id: str = ""
    node: str = ""

    @property
    def target(self) -> tuple[str, int]:
        return (self.address, self.port)


@dataclass(frozen=True)
class Snapshot:
    """One consistent view: identity, leaf, roots, intentions, upstream instances, config.

    ``tls`` holds what is built from the leaf and roots (the key, SSL contexts, the peer
    verdict cache); it is opaque here (any), so that this module stays pure.
    """

    identity: spiffe.ServiceID
    config: ProxyConfig
    leaf: Leaf | None = None
    roots: Roots | None = None
    intentions: authz.IntentionSet | None = None
    default_allow: bool = False
    endpoints: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    version: int = 0
    tls: Any = field(default=None, repr=False, compare=False)

    @property
    def ready_to_serve(self) -> bool:
        """A leaf, roots and the intentions: what the public listener needs to decide."""
        return self.leaf is not None and self.roots is not None and self.intentions is not None

    @property
    def ready_to_dial(self) -> bool:
        return self.leaf is not None and self.roots is not None

    def expired(self, now: float) -> bool:
        return self.leaf is None or now >= self.leaf.not_after

    def decide(self, source: spiffe.ServiceID) -> authz.Decision:
        """May ``source`` (a verified peer identity) connect to this proxy's service?"""
        # The one decision the server's /v1/agent/connect/authorize also makes (issue 8 item 2):
        # trust domain, datacenter and namespace first, then the intentions and the default.
        if self.intentions is None:
            # Fail closed: the public listener does not open before the intentions are known.
            return authz.DEFAULT_DENY
        me = self.identity
        return authz.authorize(
            source,
            me.service,
            trust_domain=me.trust_domain,
            datacenter=me.datacenter,
            intentions=self.intentions,
            default_allow=self.default_allow,
        )

    def admit(self, verdict: PeerVerdict) -> Admission:
        """May the peer of a completed inbound handshake reach this proxy's service? The
        public listener asks this before a byte goes to the app; so do the stream adapters
        and (later) the native SDK."""
        if verdict.identity is None:
            return Admission(False, verdict.reason)
        decision = self.decide(verdict.identity)
        return Admission(decision.allowed, decision.reason, verdict.identity, decision)

    def check_upstream(
        self, verdict: PeerVerdict, destination: str, datacenter: str = ""
    ) -> str | None:
        """None if the server of an upstream connection is exactly ``destination``; else
        why not. A server that is not the destination gets no byte (CVE-2021-32574)."""
        expected = self.expected_identity(destination, datacenter)
        if verdict.identity is None:
            return verdict.reason
        if verdict.identity != expected:
            return f"the server is {verdict.identity.uri}, expected {expected.uri}"
        return None

    def expected_identity(self, destination: str, datacenter: str = "") -> spiffe.ServiceID:
        """Whom an upstream connection to ``destination`` must reach (CVE-2021-32574)."""
        me = self.identity
        return spiffe.ServiceID(
            me.trust_domain, me.namespace, datacenter or me.datacenter, destination
        )


@dataclass
class _Entry:
    source: spiffe.ServiceID
    issuer_key_id: str


class ConnTable:
    """Open inbound connections by id, with their verified peer. No sockets, no clock."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def add(self, conn_id: int, source: spiffe.ServiceID, issuer_key_id: str = "") -> None:
        self._entries[conn_id] = _Entry(source, issuer_key_id)

    def remove(self, conn_id: int) -> None:
        self._entries.pop(conn_id, None)

    def __len__(self) -> int:
        return len(self._entries)

    def sources(self) -> dict[spiffe.ServiceID, int]:
        out: dict[spiffe.ServiceID, int] = {}
        for e in self._entries.values():
            out[e.source] = out.get(e.source, 0) + 1
        return out

    def redecide(
        self, decide: Callable[[spiffe.ServiceID], authz.Decision]
    ) -> list[tuple[int, authz.Decision]]:
        """The connections ``decide`` now denies, with the decision (one call per distinct
        source, however many connections it has)."""
        verdicts: dict[spiffe.ServiceID, authz.Decision] = {}
        denied = []
        for conn_id, e in self._entries.items():
            d = verdicts.get(e.source)
            if d is None:
                d = verdicts[e.source] = decide(e.source)
            if not d.allowed:
                denied.append((conn_id, d))
        return denied

    def untrusted(self, key_ids: Iterable[str]) -> list[int]:
        """The connections whose peer leaf was issued by none of ``key_ids`` (its root was
        removed from the trust bundle)."""
        trusted = frozenset(key_ids)
        return [
            conn_id
            for conn_id, e in self._entries.items()
            if e.issuer_key_id and e.issuer_key_id not in trusted
        ]
