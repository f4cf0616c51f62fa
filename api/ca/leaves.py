"""Agent leaves: one certificate and key per service for the whole cluster, kept in the store.

Theory of operation
-------------------
``GET /v1/agent/connect/ca/leaf/<service>`` serves Consul clients that let the server make
their key (Consul's agent does the same on its node); sidecars and native apps use
``/v1/connect/ca/sign`` and keep their keys. Every server process must hand out the same leaf
for a service: two workers (or two replicas) that each minted their own would give one service
two keys, and a blocking client two series of indexes that mean nothing to each other. So the
leaf lives in the store, as the system document ``leaves/<service>``:

* the certificate and its chain (PEM), the root that signed it, and when to renew it (planned
  once, when it is minted, so every process renews it at the same moment);
* its private key, sealed with the CA seal key (``trellis.api.ca.secrets``) under the
  document's name, as the CA's own keys are;
* the document's modify index is the leaf's index (``X-Consul-Index``, ``ModifyIndex``).

``get`` hands out the stored leaf while it is usable: signed by the active root and not due
for renewal. Otherwise it mints one (a new key, a CSR, the CA's ordinary signing path, so the
CSR limits count it) and writes it with compare-and-set on the index it read. If another
process wrote first, its leaf is the one: this one reads and hands it out, and drops its own,
which nobody has seen. Within a process, a lock per service keeps the queries that one change
woke together from minting one leaf each.

No Flask here: the store, the CA manager and the sealer are given to it, and the caller
passes the ACL decision in (``may_sign``), as for any CSR.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization

from trellis.api.ca.manager import CAManager, CAUnavailable, SignedLeaf
from trellis.api.ca.secrets import Sealer
from trellis.api.feed import Watch
from trellis.api.store.base import Store
from trellis.proxy import renewal, spiffe
from trellis.proxy import x509 as px

DOC_PREFIX = "leaves/"
#: How many times ``get`` mints again after losing a compare-and-set to another process's
#: leaf that turned out unusable too (a rotation in between). Then it gives up with a 503.
ATTEMPTS = 3


def doc_name(service: str) -> str:
    return DOC_PREFIX + service


def leaf_watch(service: str, roots_doc: str) -> Watch:
    """What a blocking leaf query waits on: its leaf's document and the roots."""
    return Watch("system", exact=(roots_doc, doc_name(service)))


@dataclass(frozen=True)
class AgentLeaf:
    signed: SignedLeaf
    key_pem: str
    index: int  # the modify index of its document
    renew_at: float  # planned renewal, epoch seconds
    #: When it was minted (epoch seconds): its lifetime for renewal starts there, not at its
    #: backdated notBefore (``renewal.lifetime_start``). 0: unknown (a document written
    #: before it was recorded), taken as notBefore.
    issued_at: float = 0.0

    def renew_in(self, now: float) -> float:
        """Seconds from ``now`` until this leaf is due for renewal (0 when it is)."""
        not_before = self.signed.cert.not_valid_before_utc.timestamp()
        not_after = self.signed.cert.not_valid_after_utc.timestamp()
        start = renewal.lifetime_start(not_before, not_after, self.issued_at or not_before)
        return renewal.next_renewal(now, start, not_after, self.renew_at)


class AgentLeaves:
    """The agent endpoint's leaves, one per service in the cluster (see the module doc)."""

    def __init__(
        self,
        store: Store,
        ca: CAManager,
        sealer: Sealer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._ca = ca
        self._sealer = sealer
        self._clock = clock
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        #: Parsed documents by (name, index): a document is parsed (and its key unsealed)
        #: once per process, not on every request.
        self._parsed: dict[tuple[str, int], AgentLeaf] = {}

    def get(self, service: str, may_sign: Callable[[str], bool]) -> AgentLeaf:
        """The leaf of ``service``, minted if there is none usable. ``may_sign`` decides
        whether the caller may have it, as for a CSR. Errors: those of ``CAManager.sign_csr``
        (a 429 over the CSR limits, a 503 when the CA is down), StoreUnavailable."""
        name = doc_name(service)
        leaf = self._load(name)
        if leaf is not None and self._usable(leaf):
            return leaf
        with self._lock_for(service):
            for _ in range(ATTEMPTS):
                # Again under the lock: a query woken with this one may have minted it.
                leaf = self._load(name)
                if leaf is not None and self._usable(leaf):
                    return leaf
                minted = self._mint(service, may_sign)
                index = self._store.system_write(
                    {name: minted[0]}, expect={name: leaf.index if leaf is not None else 0}
                )
                if index is not None:
                    return self._remember(name, index, minted[1])
                # Another process wrote first: its leaf is the one, if it is usable.
        raise CAUnavailable(f"could not settle on a leaf for {service!r}; try again")

    # -- helpers ---------------------------------------------------------------------------------

    def _lock_for(self, service: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(service)
            if lock is None:
                if len(self._locks) > 4096:
                    self._locks.clear()  # a bound, not a cache: only contention is lost
                lock = self._locks[service] = threading.Lock()
            return lock

    def _usable(self, leaf: AgentLeaf) -> bool:
        active, _ = self._ca.roots_index()
        return leaf.signed.root_id == active and leaf.renew_in(self._clock()) > 0

    def _load(self, name: str) -> AgentLeaf | None:
        got = self._store.system_get(name)
        if got is None:
            return None
        doc, index = got
        hit = self._parsed.get((name, index))
        if hit is not None:
            return hit
        certs = px.load_certs(doc["CertPEM"])
        signed = SignedLeaf(
            cert=certs[0],
            chain=tuple(certs[1:]),
            identity=px.leaf_identity(certs[0]),
            root_id=doc["RootID"],
        )
        key_pem = self._sealer.open(name, doc["PrivateKey"]["Sealed"])
        leaf = AgentLeaf(signed, key_pem, index, doc["RenewAt"], doc.get("IssuedAt", 0.0))
        return self._remember(name, index, leaf)

    def _remember(self, name: str, index: int, leaf: AgentLeaf) -> AgentLeaf:
        if leaf.index != index:
            leaf = AgentLeaf(leaf.signed, leaf.key_pem, index, leaf.renew_at, leaf.issued_at)
        if len(self._parsed) > 4096:
            self._parsed.clear()
        self._parsed[(name, index)] = leaf
        return leaf

    def _mint(
        self, service: str, may_sign: Callable[[str], bool]
    ) -> tuple[dict[str, Any], AgentLeaf]:
        """A new key and leaf for ``service``: the document to write and the leaf (index 0
        until written)."""
        key_type, key_bits = self._ca.leaf_key_spec()
        key = px.generate_key(key_type, key_bits)
        ident = spiffe.service_id(self._ca.trust_domain, self._ca.datacenter, service)
        csr_pem = px.build_csr(key, ident).public_bytes(serialization.Encoding.PEM).decode()
        signed = self._ca.sign_csr(csr_pem, may_sign)
        key_pem = px.key_pem(key)
        not_after = signed.cert.not_valid_after_utc.timestamp()
        issued_at = renewal.lifetime_start(
            signed.cert.not_valid_before_utc.timestamp(), not_after, self._clock()
        )
        renew_at = renewal.plan(issued_at, not_after)
        doc = {
            "Service": service,
            "CertPEM": signed.cert_pem,
            "RootID": signed.root_id,
            "RenewAt": renew_at,
            "IssuedAt": issued_at,
            "PrivateKey": {"Sealed": self._sealer.seal(doc_name(service), key_pem)},
        }
        return doc, AgentLeaf(signed, key_pem, 0, renew_at, issued_at)
