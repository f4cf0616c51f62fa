"""A peer's certificate chain given as DER (leaf first), verified against the current roots.

``Service.authorize`` takes a live TLS connection (its chain verified by OpenSSL at the
handshake) or DER bytes. DER bytes may come from anywhere (an ASGI server's TLS extension, a
log, an attacker), so they are verified here in full: the chain to one of the current roots,
validity times and the leaf profile (``trellis.proxy.x509.verify_peer``, the rules the control
plane applies). That needs ``cryptography``, imported on the first such call only, so an app
that authorizes live connections never pays its some 9 MB.
"""

from __future__ import annotations

from collections.abc import Sequence

from trellis.proxy import der, tls
from trellis.proxy.snapshot import PeerVerdict


def verify(chain: Sequence[bytes], roots_pem: Sequence[str], peers: tls.PeerCache) -> PeerVerdict:
    """The verdict on ``chain`` (DER, leaf first) under ``roots_pem``; the reason says what is
    wrong with it (the sender's fault)."""
    if not chain:
        return PeerVerdict(None, "the peer presented no certificate")
    profile = peers.verdict(chain[0])
    if profile.identity is None:
        return profile
    from cryptography import x509 as cx

    from trellis.proxy import x509 as px

    try:
        certs = [cx.load_der_x509_certificate(c) for c in chain]
        roots = [
            cx.load_der_x509_certificate(r) for p in roots_pem for r in der.pem_certificates(p)
        ]
    except (ValueError, der.DERError) as e:
        return PeerVerdict(None, f"the peer's certificate does not parse: {e}")
    try:
        px.verify_peer(certs, {profile.identity.trust_domain: roots})
    except px.PeerRejected as e:
        return PeerVerdict(None, str(e))
    return profile
