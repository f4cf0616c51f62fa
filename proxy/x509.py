"""X.509 policy for the mesh: what a CSR may ask, what a leaf and a CA look like, and how a
peer's certificate is judged. Pure: ``cryptography`` objects in, values or errors out; no I/O.

Both CA providers (built-in and Vault) run every CSR through ``check_csr`` before anything is
signed, and the built-in one builds certificates with ``build_leaf``/``build_ca``; the sidecar
and the native SDK judge peers with ``verify_peer``. Each rule is one of SPIFFE's X509-SVID
rules or a lesson of another mesh's CVE (see SECURITY.md):

* a CSR names exactly one URI SAN, a service identity in our trust domain (CVE-2022-40716:
  the identity is taken from there and nowhere else, and the CA signs only once the caller's
  ACLs allow that identity, a decision the caller makes on what ``check_csr`` returns); it may
  not ask to be a CA; its key is an allowed type and size; its signature verifies. The CA
  then *forces* the profile: whatever the CSR asks for, a leaf gets KU digitalSignature
  (critical), EKU serverAuth+clientAuth, cA=false, the one URI SAN (critical, since the
  subject is empty), and the CA's TTL.
* a peer's certificate chains to a root of *its own* trust domain (the bundle is chosen by the
  trust domain of the peer's SPIFFE ID), is a leaf (cA=false, no keyCertSign/cRLSign), has
  exactly one URI SAN that parses as a service identity; names are matched only against URI
  SANs, never DNS names, CNs or e-mail addresses (CVE-2022-21656).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from trellis.proxy import der, names, spiffe
from trellis.proxy.der import colon_hex as colon_hex  # re-exported: the server's callers
from trellis.proxy.der import serial_hex as serial_hex
from trellis.proxy.profile import PeerRejected as PeerRejected
from trellis.proxy.profile import leaf_profile

MAX_CSR_BYTES = 16 * 1024
EC_CURVES = {"secp256r1": 256, "secp384r1": 384, "secp521r1": 521}
RSA_BITS = (2048, 3072, 4096)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PolicyError(ValueError):
    """A CSR or certificate breaks the mesh's X.509 policy; the sender is at fault."""


# -- keys ------------------------------------------------------------------------------------


def key_description(key: object) -> tuple[str, int]:
    """``("ec", 256)`` or ``("rsa", 2048)``; PolicyError for anything else."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        bits = EC_CURVES.get(key.curve.name)
        if bits is None:
            raise PolicyError(f"EC curve {key.curve.name} is not allowed (P-256, P-384, P-521)")
        return "ec", bits
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size not in RSA_BITS:
            raise PolicyError(f"RSA-{key.key_size} is not allowed (2048, 3072 or 4096 bits)")
        return "rsa", key.key_size
    raise PolicyError(f"key type {type(key).__name__} is not allowed (EC or RSA)")


def generate_key(key_type: str = "ec", bits: int = 256) -> PrivateKey:
    if key_type == "ec":
        curve = {256: ec.SECP256R1(), 384: ec.SECP384R1(), 521: ec.SECP521R1()}.get(bits)
        if curve is None:
            raise PolicyError(f"EC keys are 256, 384 or 521 bits, not {bits}")
        return ec.generate_private_key(curve)
    if key_type == "rsa":
        if bits not in RSA_BITS:
            raise PolicyError(f"RSA keys are 2048, 3072 or 4096 bits, not {bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise PolicyError(f"key type must be ec or rsa, not {key_type!r}")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        bits = EC_CURVES[key.curve.name]
        if bits == 384:
            return hashes.SHA384()
        if bits == 521:
            return hashes.SHA512()
    return hashes.SHA256()


def key_id(public_key: PublicKey) -> bytes:
    """The subject key identifier (RFC 5280 method 1: SHA-1 of the public key bits)."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def new_serial() -> int:
    # 159 random bits: positive, at most 20 octets, unpredictable (RFC 5280, CA/B BR 7.1).
    return secrets.randbits(159) | (1 << 158)


# -- PEM -------------------------------------------------------------------------------------


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise PolicyError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    if data.count(b"-----BEGIN") != 1 or b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise PolicyError("expected exactly one PEM 'CERTIFICATE REQUEST' block")
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise PolicyError(f"CSR does not parse: {e}") from None


def load_certs(pem: str | bytes) -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise PolicyError(f"certificate PEM does not parse: {e}") from None
    return certs


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: PrivateKey, password: bytes | None = None) -> str:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    ).decode()


def load_key(pem: str | bytes, password: bytes | None = None) -> PrivateKey:
    data = pem.encode() if isinstance(pem, str) else pem
    key = serialization.load_pem_private_key(data, password=password)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PolicyError("only EC and RSA private keys are supported")
    return key


# -- CSRs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CSRInfo:
    """What a CSR may contribute to a leaf: the identity (already checked) and the key."""

    identity: spiffe.ServiceID
    public_key: PublicKey
    key_type: str
    key_bits: int


def _uri_sans(ext_source: x509.Extensions) -> list[str]:
    try:
        san = ext_source.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.value for n in san if isinstance(n, x509.UniformResourceIdentifier)]


def check_csr(
    csr: x509.CertificateSigningRequest,
    *,
    trust_domain: str,
    datacenter: str | None = None,
    allowed_key_types: Iterable[str] = ("ec", "rsa"),
) -> CSRInfo:
    """Check a CSR against the mesh's policy; return what the CA may use from it, the identity
    first. ``PolicyError`` with the reason if the CSR may not be signed at all (the sender's
    fault). Whether this caller may obtain ``identity`` (the ACL check, ``service:write``) is
    not decided here: the caller decides on the returned identity before anything is signed
    (``CAManager.sign_csr``), so this check takes no callback and raises nothing but its own
    error.
    """
    try:
        signature_ok = csr.is_signature_valid
    except Exception:  # an unsupported signature algorithm is a bad signature, for us
        signature_ok = False
    if not signature_ok:
        raise PolicyError("the CSR's signature does not verify")
    key = csr.public_key()
    key_type, key_bits = key_description(key)
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)  # key_description
    if key_type not in set(allowed_key_types):
        raise PolicyError(f"{key_type} keys are not allowed by the CA configuration")
    try:
        exts = csr.extensions
    except (ValueError, x509.DuplicateExtension) as e:
        raise PolicyError(f"the CSR's extensions do not parse: {e}") from None
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise PolicyError("a CSR may not ask for a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
        if ku.key_cert_sign or ku.crl_sign:
            raise PolicyError("a CSR may not ask for certificate or CRL signing")
    except x509.ExtensionNotFound:
        pass
    uris = _uri_sans(exts)
    if len(uris) != 1:
        raise PolicyError(f"a CSR must name exactly one URI SAN, it names {len(uris)}")
    try:
        identity = spiffe.parse_service(uris[0])
    except spiffe.SpiffeIDError as e:
        raise PolicyError(f"the URI SAN is not a service identity: {e}") from None
    if identity.trust_domain != trust_domain.lower():
        raise PolicyError(
            f"the URI SAN is in trust domain {identity.trust_domain!r}, not {trust_domain!r}"
        )
    if identity.namespace != spiffe.DEFAULT_NAMESPACE:
        raise PolicyError(f"namespace {identity.namespace!r} is not served here")
    if datacenter is not None and identity.datacenter != datacenter:
        raise PolicyError(f"the URI SAN names datacenter {identity.datacenter!r}")
    if not names.is_service_name(identity.service):
        # The catalog's rule: SPIFFE allows "-" or "web." as a path segment, no service has it.
        raise PolicyError(f"service name {identity.service!r} is not valid: {names.RULE}")
    return CSRInfo(identity, key, key_type, key_bits)


def build_csr(key: PrivateKey, identity: spiffe.ServiceID) -> x509.CertificateSigningRequest:
    """The CSR a sidecar or native app sends: empty subject, one critical URI SAN."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, _hash_for(key))
    )


# -- certificates ----------------------------------------------------------------------------


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)


def _authority_key_id(
    issuer: x509.Certificate | None, issuer_public: object
) -> x509.AuthorityKeyIdentifier:
    """The AKI of a certificate signed by ``issuer``: the issuer's own SKI when it has one.

    Fix (tests/test_x509.py): the AKI used to be recomputed from the issuer's public key
    (SHA-1, RFC 5280 method 1). An imported custom root whose SKI was made another way then
    got leaves whose AKI matched no issuer, and OpenSSL (``openssl verify``, Python's ssl)
    refused them: "unable to get local issuer certificate"."""
    if issuer is not None:
        try:
            ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            pass
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public)  # type: ignore[arg-type]


#: Leaves and CA certificates are back-dated a little to absorb clock skew between hosts.
BACKDATE = dt.timedelta(minutes=1)


def build_leaf(
    info: CSRInfo,
    *,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    ttl: dt.timedelta,
    now: dt.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """Sign a leaf with the profile forced, whatever the CSR asked for."""
    start = _now(now) - BACKDATE
    end = min(_now(now) + ttl, issuer.not_valid_after_utc)
    if end <= _now(now):
        raise PolicyError("the signing certificate has expired or is about to")
    # digitalSignature alone, for EC and RSA keys alike. TLS 1.3 (and TLS 1.2's ECDHE suites)
    # uses a leaf's key only to sign the handshake: the key exchange is ephemeral. Only TLS
    # 1.2's static exchanges use the certificate's key otherwise: keyAgreement for static
    # ECDH, keyEncipherment for RSA key transport, neither with forward secrecy, and the mesh
    # offers neither. X509-SVID: digitalSignature MUST, the other two MAY.
    ku = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(info.public_key)
        .serial_number(serial or new_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(info.identity.uri)]),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(info.public_key), critical=False)
        .add_extension(_authority_key_id(issuer, issuer.public_key()), critical=False)
        .sign(issuer_key, _hash_for(issuer_key))
    )


def build_ca(
    *,
    public_key: PublicKey,
    trust_domain: str,
    common_name: str,
    signer_key: PrivateKey,
    signer: x509.Certificate | None,
    ttl: dt.timedelta,
    now: dt.datetime | None = None,
    path_length: int | None = None,
    serial: int | None = None,
    subject: x509.Name | None = None,
    subject_key_id: x509.SubjectKeyIdentifier | None = None,
) -> x509.Certificate:
    """A CA certificate: self-signed when ``signer`` is None (a root), else signed by it (an
    intermediate, or a cross-signed root). Its one URI SAN is the trust domain's signing ID,
    with no path, as the X509-SVID spec asks of signing certificates.

    ``subject`` and ``subject_key_id`` (default: ``CN=<common_name>, O=Trellis`` and the SKI
    computed from the key) let ``cross_sign`` copy an existing root's name and SKI."""
    if subject is None:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis"),
            ]
        )
    start = _now(now) - BACKDATE
    end = _now(now) + ttl
    if signer is not None:
        end = min(end, signer.not_valid_after_utc)
    issuer_name = signer.subject if signer is not None else subject
    issuer_public = signer.public_key() if signer is not None else public_key
    ski = subject_key_id or x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = (
        _authority_key_id(signer, issuer_public)
        if signer is not None
        else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial or new_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(spiffe.signing_id(trust_domain)))]
            ),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .sign(signer_key, _hash_for(signer_key))
    )


def cross_sign(
    new_root: x509.Certificate,
    *,
    old_root: x509.Certificate,
    old_key: PrivateKey,
    trust_domain: str,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The new root's subject and key, vouched for by the old root: a peer that trusts only
    the old root can still build a path to a leaf issued under the new one."""
    cn = new_root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cn[0].value) if cn else "Trellis CA"
    # Fix (tests/test_x509.py): the cross-signed certificate must carry the new root's exact
    # subject and SKI, or leaves of the new root (issuer = that subject, AKI = that SKI) find
    # no path through it. Rebuilding "CN=<cn>, O=Trellis" broke rotation to an imported root
    # whose subject or SKI differs from what build_ca would have made.
    try:
        ski: x509.SubjectKeyIdentifier | None = new_root.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
    except x509.ExtensionNotFound:
        ski = None
    return build_ca(
        subject=new_root.subject,
        subject_key_id=ski,
        public_key=new_root.public_key(),  # type: ignore[arg-type]
        trust_domain=trust_domain,
        common_name=name,
        signer_key=old_key,
        signer=old_root,
        ttl=new_root.not_valid_after_utc - _now(now),
        now=now,
    )


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- peers -----------------------------------------------------------------------------------


def leaf_identity(cert: x509.Certificate) -> spiffe.ServiceID:
    """The service identity of a leaf, checking the leaf profile
    (``trellis.proxy.profile.leaf_profile``, the one place its rules live); PeerRejected
    otherwise."""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        usage: frozenset[str] | None = frozenset(
            # encipher_only and decipher_only raise unless key_agreement is set; the profile
            # does not look at them.
            name
            for name in der.KEY_USAGE_BITS[:7]
            if getattr(ku, name)
        )
    except x509.ExtensionNotFound:
        usage = None
    return leaf_profile(is_ca=is_ca, key_usage=usage, uris=_uri_sans(cert.extensions))


def verify_peer(
    chain: Sequence[x509.Certificate],
    bundles: Mapping[str, Sequence[x509.Certificate]],
    *,
    now: dt.datetime | None = None,
    expected_service: str | None = None,
    expected_identity: spiffe.ServiceID | None = None,
) -> spiffe.ServiceID:
    """Verify a peer's chain (leaf first) and return its identity.

    ``bundles`` maps a trust domain to its trusted roots; the chain must lead to a root of the
    trust domain named in the leaf's own SPIFFE ID. For outbound connections, the caller says
    whom it meant to reach (CVE-2021-32574): ``expected_identity``, the whole SPIFFE ID (trust
    domain, namespace, datacenter and service), is what a sidecar should pass: with bundles
    of several trust domains or datacenters, the service name alone would accept a "db" of
    another cluster or datacenter. ``expected_service`` checks the name only.
    """
    if not chain:
        raise PeerRejected("the peer presented no certificate")
    leaf, intermediates = chain[0], list(chain[1:])
    identity = leaf_identity(leaf)
    roots = bundles.get(identity.trust_domain)
    if not roots:
        raise PeerRejected(f"no trust bundle for trust domain {identity.trust_domain!r}")
    builder = PolicyBuilder().store(Store(list(roots)))
    if now is not None:
        builder = builder.time(now)
    try:
        builder.build_client_verifier().verify(leaf, intermediates)
    except VerificationError as e:
        raise PeerRejected(f"the peer's chain does not verify: {e}") from None
    if expected_service is not None and identity.service != expected_service:
        raise PeerRejected(f"the peer is {identity.service!r}, expected {expected_service!r}")
    if expected_identity is not None and identity != expected_identity:
        raise PeerRejected(f"the peer is {identity.uri}, expected {expected_identity.uri}")
    return identity
