"""The leaf profile: which certificates a peer may present, decided in one place.

Pure and free of ``cryptography``: ``leaf_profile`` takes plain facts (is it a CA, its key
usage, its URI SANs) and returns the peer's service identity or raises ``PeerRejected``. Two
readers feed it the same facts: ``trellis.proxy.x509.leaf_identity`` (``cryptography``
objects, used by the control plane and the tests) and ``der_leaf`` here (the sidecar's
verdict on a handshaken peer's DER leaf, ``trellis.proxy.tls``), so the rules cannot drift
apart. The chain itself is verified elsewhere (OpenSSL, or ``x509.verify_peer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trellis.proxy import der, spiffe


class PeerRejected(ValueError):
    """A peer's certificate is not acceptable; the connection must be refused."""


def leaf_profile(
    *, is_ca: bool, key_usage: frozenset[str] | None, uris: Sequence[str]
) -> spiffe.ServiceID:
    """The identity of a leaf with these facts; PeerRejected (the peer's fault) unless it is
    a leaf (cA false), has key usage with digitalSignature and without keyCertSign and
    cRLSign, and exactly one URI SAN that is a service identity. ``key_usage`` names the bits
    set (``der.KEY_USAGE_BITS``), None when the certificate has no KeyUsage extension."""
    if is_ca:
        raise PeerRejected("the peer presented a CA certificate, not a leaf")
    if key_usage is None:
        raise PeerRejected("the peer's certificate has no key usage")
    if (
        "key_cert_sign" in key_usage
        or "crl_sign" in key_usage
        or "digital_signature" not in key_usage
    ):
        raise PeerRejected("the peer's certificate has a CA's key usage")
    if len(uris) != 1:
        raise PeerRejected(f"the peer's certificate has {len(uris)} URI SANs, not exactly 1")
    try:
        return spiffe.parse_service(uris[0])
    except spiffe.SpiffeIDError as e:
        raise PeerRejected(f"the peer's URI SAN is not a service identity: {e}") from None


@dataclass(frozen=True)
class DERLeaf:
    identity: spiffe.ServiceID
    #: The AuthorityKeyIdentifier's keyIdentifier, hex; "" when there is none.
    issuer_key_id: str


def der_leaf(cert_der: bytes) -> DERLeaf:
    """Judge a DER leaf with ``leaf_profile``. ``der.DERError`` if it does not parse,
    PeerRejected if it breaks the profile: both the sender's fault."""
    cert = der.certificate(cert_der)
    exts = cert.extensions
    bc = exts.get(der.OID_BASIC_CONSTRAINTS)
    ku = exts.get(der.OID_KEY_USAGE)
    san = exts.get(der.OID_SUBJECT_ALT_NAME)
    # Decode everything before judging, so that a malformed extension is a parse error
    # whatever else the certificate holds, as it is with cryptography.
    is_ca = der.basic_constraints_ca(bc.value) if bc is not None else False
    usage = der.key_usage(ku.value) if ku is not None else None
    uris = der.subject_alt_names(san.value).uris if san is not None else ()
    aki = exts.get(der.OID_AUTHORITY_KEY_IDENTIFIER)
    issuer = der.authority_key_id(aki.value) if aki is not None else None
    identity = leaf_profile(is_ca=is_ca, key_usage=usage, uris=uris)
    return DERLeaf(identity, (issuer or b"").hex())
