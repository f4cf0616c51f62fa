"""TLS settings of the data plane: the contexts a sidecar, the agent and the SDK use, and how a
peer's certificate becomes a SPIFFE identity.

No sockets and no event loop: this module builds ``ssl.SSLContext`` objects and reads
certificates. The byte path (``trellis.proxy.reactor``) and the stream adapters
(``trellis.proxy.streams``) drive the contexts.

Theory of operation
-------------------
A context is built once per snapshot (about a millisecond each) and shared by every
connection that starts under that snapshot; a new snapshot (renewed leaf, new roots) brings new
contexts, so rotation never restarts a listener and a connection keeps the context it started
with.

Verification is split where it is cheapest and safest:

* OpenSSL verifies the chain (``CERT_REQUIRED``, against the roots of this trust domain only),
  on both sides: a server requires a client certificate, a client requires the server's.
* Hostname checking is off *because* the SPIFFE URI SAN check replaces it: mesh peers are
  named by identity, not by DNS, and their certificates carry no DNS names.
* Python then checks the leaf's profile and its one SPIFFE ID (``peer_identity``) with the
  same rules as everywhere else (``trellis.proxy.profile.leaf_profile``, which
  ``trellis.proxy.x509.leaf_identity`` also applies), reading the DER leaf with the small
  reader of ``trellis.proxy.der``, so a sidecar never imports ``cryptography`` (some 9 MB).
  Judging a DER leaf costs about 40 us (20 us with ``cryptography``'s Rust parser);
  ``getpeercert(binary_form=True)`` about 0.4 us, so the verdict is cached per distinct leaf
  (``PeerCache``): a busy peer pays for it once per snapshot.

The leaf's private key is handed to OpenSSL through an anonymous in-memory file
(``memfd_create``), never through a file on disk: ``SSLContext.load_cert_chain`` reads only
paths.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence

from trellis.proxy import der, profile
from trellis.proxy.snapshot import PeerVerdict

#: TLS 1.2 and 1.3 only (issue 10): older versions have no place in a new mesh.
MIN_VERSION = ssl.TLSVersion.TLSv1_2
#: Cached verdicts per context; a mesh has few distinct leaves per peer set.
PEER_CACHE_SIZE = 4096


class TLSConfigError(Exception):
    """The material given to build a context is unusable (a bad key or certificate): the
    caller's (the follower's) fault, never a peer's."""


def _load_chain(ctx: ssl.SSLContext, cert_pem: str, chain_pem: Sequence[str], key_pem: str) -> None:
    """Load leaf, intermediates and key into ``ctx`` without writing the key to disk."""
    fd = os.memfd_create("trellis-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, "".join([cert_pem, *chain_pem, key_pem]).encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"the leaf certificate or key is unusable: {e}") from None
    finally:
        os.close(fd)


def _base(purpose: int, roots_pem: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = MIN_VERSION
    # No hostname check: the peer is judged by its SPIFFE URI SAN (peer_identity), which is
    # stricter than a DNS name and the only name a mesh certificate carries.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not roots_pem:
        raise TLSConfigError("no trusted roots")
    try:
        ctx.load_verify_locations(cadata="".join(roots_pem))
    except ssl.SSLError as e:
        raise TLSConfigError(f"the trusted roots do not load: {e}") from None
    # Compression and renegotiation are off by default in OpenSSL 3; say so for TLS 1.2 too.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_context(
    *, cert_pem: str, chain_pem: Sequence[str], key_pem: str, roots_pem: Sequence[str]
) -> ssl.SSLContext:
    """The context of a public listener: present the leaf, require and verify the client's."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, roots_pem)
    # No TLS 1.3 session tickets: Trellis never resumes a session (a connection always proves
    # the current leaf), and OpenSSL's default two tickets cost two encryptions per handshake
    # here and some 17 KB per open connection in the client that keeps them (issue 10).
    ctx.num_tickets = 0
    _load_chain(ctx, cert_pem, chain_pem, key_pem)
    return ctx


def client_context(
    *, cert_pem: str, chain_pem: Sequence[str], key_pem: str, roots_pem: Sequence[str]
) -> ssl.SSLContext:
    """The context of an upstream connection: present the leaf, verify the server's."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, roots_pem)
    _load_chain(ctx, cert_pem, chain_pem, key_pem)
    return ctx


class PeerCache:
    """Verdicts on peer leaves, by their DER bytes. Belongs to one snapshot (one set of roots),
    so a verdict never outlives the trust it was given under."""

    __slots__ = ("_verdicts",)

    def __init__(self) -> None:
        self._verdicts: dict[bytes, PeerVerdict] = {}

    def verdict(self, der: bytes | None) -> PeerVerdict:
        if der is None:
            return PeerVerdict(None, "the peer presented no certificate")
        hit = self._verdicts.get(der)
        if hit is not None:
            return hit
        verdict = _judge(der)
        if len(self._verdicts) >= PEER_CACHE_SIZE:
            self._verdicts.clear()
        self._verdicts[der] = verdict
        return verdict


def _judge(cert_der: bytes) -> PeerVerdict:
    try:
        leaf = profile.der_leaf(cert_der)
    except der.DERError as e:
        return PeerVerdict(None, f"the peer's certificate does not parse: {e}")
    except profile.PeerRejected as e:
        return PeerVerdict(None, str(e))
    return PeerVerdict(leaf.identity, issuer_key_id=leaf.issuer_key_id)


def peer_identity(obj: ssl.SSLObject | ssl.SSLSocket, cache: PeerCache) -> PeerVerdict:
    """The verdict on the peer of a completed handshake (its chain already verified by
    OpenSSL against this context's roots)."""
    return cache.verdict(obj.getpeercert(binary_form=True))
