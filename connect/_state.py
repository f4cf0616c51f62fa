"""What a ``Service`` knows right now, and the decisions made from it, with no thread, loop or
control plane: the follower's thread publishes snapshots into a ``Current``; the app's threads
and loops read from it. A snapshot is immutable and replaced whole (one reference assignment),
so a reader never sees half of one.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from trellis.connect import _chain
from trellis.proxy import authz, spiffe
from trellis.proxy.snapshot import Endpoint, PeerVerdict, Snapshot


class Handshaken(Protocol):
    """A TLS connection whose handshake finished: ``ssl.SSLSocket``, ``ssl.SSLObject``,
    ``trio.SSLStream`` (which forwards ``getpeercert``)."""

    def getpeercert(self, binary_form: bool) -> Any: ...


Peer = Handshaken | bytes | bytearray | Sequence[bytes]


class ConnectError(Exception):
    """A Connect call could not be made: the control plane refused this service (its token may
    not act as it: the operator's fault), no healthy instance of the destination answered with
    its identity, or the service was closed (the caller's). The message says which."""


class Current:
    """The latest snapshot, and a condition to wait for a better one."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.failure: str | None = None
        self.closed = False
        self._cond = threading.Condition()
        self._next: dict[str, int] = {}

    # -- written by the follower's thread ------------------------------------------------

    def publish(self, snap: Snapshot) -> None:
        with self._cond:
            self.snapshot = snap
            self._cond.notify_all()

    def fail(self, why: str) -> None:
        with self._cond:
            self.failure = why
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # -- read by the app -------------------------------------------------------------------

    def down(self) -> ConnectError:
        """Why the follower is not running: its failure if it had one, else closed."""
        return ConnectError(self.failure if self.failure is not None else "the service is closed")

    def wait_for(self, what: str, ok: object, timeout: float | None) -> Snapshot:
        """The current snapshot once ``ok(snapshot)`` is true; ConnectError if the follower
        failed or the service was closed, TimeoutError after ``timeout`` seconds."""
        assert callable(ok)
        with self._cond:
            done = self._cond.wait_for(
                lambda: (
                    self.failure is not None
                    or self.closed
                    or (self.snapshot is not None and ok(self.snapshot))
                ),
                timeout,
            )
            if self.failure is not None or self.closed:
                raise self.down()
            if not done or self.snapshot is None:
                raise TimeoutError(f"no {what} within {timeout:g} s")
            return self.snapshot

    def server_context(self) -> ssl.SSLContext | None:
        snap = self.snapshot
        if snap is None or snap.tls is None or snap.expired(time.time()):
            return None
        ctx: ssl.SSLContext = snap.tls.server
        return ctx

    def authorize(self, peer: Peer) -> authz.Decision:
        """The intention decision on ``peer`` under the current snapshot; see
        ``Service.authorize``."""
        return self.admit(peer)[0]

    def admit(self, peer: Peer) -> tuple[authz.Decision, spiffe.ServiceID | None]:
        """``authorize``'s decision and the peer's verified identity (None when its
        certificate was refused, or before the first snapshot), for the adapters that hand
        the identity to the app."""
        snap = self.snapshot
        if snap is None or snap.tls is None or snap.roots is None:
            return authz.DEFAULT_DENY, None
        if not isinstance(peer, bytes | bytearray | Sequence):
            try:
                cert = peer.getpeercert(binary_form=True)
            except (ValueError, OSError):  # no handshake yet, or the socket is closed
                cert = None
            verdict: PeerVerdict = snap.tls.peers.verdict(cert)
            issuer = verdict.issuer_key_id
            if verdict.identity is not None and issuer and issuer not in snap.roots.key_ids:
                # Verified at its handshake, by the roots of that moment; a root since removed
                # from the bundle no longer vouches for it (as the sidecar's ConnTable says).
                verdict = PeerVerdict(None, "the peer's root is no longer trusted")
        else:
            chain = [bytes(peer)] if isinstance(peer, bytes | bytearray) else list(peer)
            verdict = _chain.verify(chain, snap.roots.pems, snap.tls.peers)
        admission = snap.admit(verdict)
        if admission.decision is not None:
            return admission.decision, admission.source
        return authz.Decision.refused(authz.Outcome.INVALID_PEER, admission.reason), None

    def endpoints(self, name: str) -> tuple[Endpoint, ...]:
        """``name``'s healthy instances, rotated by one on each call (round-robin)."""
        snap = self.snapshot
        eps = tuple(snap.endpoints.get(name, ())) if snap is not None else ()
        if not eps:
            return eps
        with self._cond:
            start = self._next.get(name, 0) % len(eps)
            self._next[name] = start + 1
        return eps[start:] + eps[:start]


def check_server(snap: Snapshot, obj: Handshaken, name: str) -> None:
    """ConnectError unless the server of a finished handshake is exactly service ``name``
    of this trust domain and datacenter (CVE-2021-32574: a valid leaf of another service is
    not the destination)."""
    verdict = snap.tls.peers.verdict(obj.getpeercert(binary_form=True))
    wrong = snap.check_upstream(verdict, name)
    if wrong is not None:
        raise ConnectError(wrong)
