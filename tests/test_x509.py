"""Table and property tests of proxy/x509.py: the CSR policy, the forced leaf and CA profiles,
peer verification and root rotation (SECURITY.md 1.2, 1.3 and the CVE table).

Certificates are checked twice where it matters: with ``cryptography``'s verifier (through
``verify_peer``) and with ``openssl verify``, the path builder Python's ``ssl`` module uses.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import pathlib
import re
import subprocess
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from trellis.proxy import spiffe
from trellis.proxy import x509 as px
from trellis.proxy.x509 import CSRInfo, PeerRejected, PolicyError

NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
TD = "c0ffee00-0000-4000-8000-000000000001.trellis"
TD_B = "c0ffee00-0000-4000-8000-00000000000b.trellis"
DC = "dc1"
TTL = dt.timedelta(hours=72)
DAY = dt.timedelta(days=1)
YEAR = dt.timedelta(days=365)

# Keys are slow to make: a few, once, reused everywhere.
EC = [ec.generate_private_key(ec.SECP256R1()) for _ in range(8)]
EC384 = ec.generate_private_key(ec.SECP384R1())
EC521 = ec.generate_private_key(ec.SECP521R1())
RSA = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]
RSA1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (refused)
P192 = ec.generate_private_key(ec.SECP192R1())
P224 = ec.generate_private_key(ec.SECP224R1())
K256 = ec.generate_private_key(ec.SECP256K1())
ED25519 = ed25519.Ed25519PrivateKey.generate()
DSA = dsa.generate_private_key(key_size=2048)


def sid(service: str = "web", dc: str = DC, td: str = TD, ns: str = "default") -> spiffe.ServiceID:
    return spiffe.ServiceID(td, ns, dc, service)


WEB = sid("web")
DB = sid("db")


def make_root(
    key: Any,
    *,
    td: str = TD,
    cn: str = "Trellis CA test",
    ttl: dt.timedelta = 10 * YEAR,
    now: dt.datetime = NOW,
) -> x509.Certificate:
    return px.build_ca(
        public_key=key.public_key(),
        trust_domain=td,
        common_name=cn,
        signer_key=key,
        signer=None,
        ttl=ttl,
        now=now,
    )


ROOT_KEY = EC[0]
ROOT = make_root(ROOT_KEY, cn="Trellis CA root-a")
RSA_ROOT_KEY = RSA[0]
RSA_ROOT = make_root(RSA_ROOT_KEY, cn="Trellis CA rsa")
INTER_KEY = EC[7]
INTER = px.build_ca(
    public_key=INTER_KEY.public_key(),
    trust_domain=TD,
    common_name="Trellis CA intermediate",
    signer_key=ROOT_KEY,
    signer=ROOT,
    ttl=5 * YEAR,
    now=NOW,
    path_length=0,
)


def _cn(text: str) -> x509.Name:
    # A CN holding a SPIFFE ID is longer than the 64 characters X.520 allows: build it anyway
    # (as an attacker would), silencing cryptography's warning about it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text, _validate=False)])


def _hash(key: Any) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def make_csr(
    key: Any,
    uris: Sequence[str] = (WEB.uri,),
    *,
    dns: Sequence[str] = (),
    emails: Sequence[str] = (),
    general: Sequence[x509.GeneralName] = (),
    subject: x509.Name | None = None,
    exts: Sequence[tuple[x509.ExtensionType, bool]] = (),
    san_critical: bool = True,
) -> x509.CertificateSigningRequest:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.RFC822Name(e) for e in emails]
    names += list(general)
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=san_critical)
    for ext, critical in exts:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, _hash(key))


def ku(**flags: bool) -> x509.KeyUsage:
    fields = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    fields.update(flags)
    return x509.KeyUsage(**fields)


def info_for(key: Any, identity: spiffe.ServiceID = WEB) -> CSRInfo:
    kind, bits = px.key_description(key.public_key())
    return CSRInfo(identity, key.public_key(), kind, bits)


def make_leaf(
    key: Any = EC[1],
    identity: spiffe.ServiceID = WEB,
    *,
    issuer: x509.Certificate = ROOT,
    issuer_key: Any = ROOT_KEY,
    ttl: dt.timedelta = TTL,
    now: dt.datetime | None = NOW,
) -> x509.Certificate:
    return px.build_leaf(
        info_for(key, identity), issuer=issuer, issuer_key=issuer_key, ttl=ttl, now=now
    )


def raw_cert(
    *,
    issuer: x509.Certificate,
    issuer_key: Any,
    key: Any = EC[1],
    sans: Sequence[x509.GeneralName] | None = (x509.UniformResourceIdentifier(WEB.uri),),
    key_usage: x509.KeyUsage | None = None,
    ca: bool | None = False,
    subject: x509.Name | None = None,
    not_before: dt.datetime = NOW - DAY,
    not_after: dt.datetime = NOW + DAY,
) -> x509.Certificate:
    """A certificate built directly, bypassing the CA's profile: what a buggy or hostile CA
    could issue under a trusted root."""
    b = (
        x509.CertificateBuilder()
        .subject_name(subject or x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(px.new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if key_usage is not None:
        b = b.add_extension(key_usage, critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    return b.sign(issuer_key, hashes.SHA256())


LEAF_KU = ku(digital_signature=True, key_agreement=True)


def pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def openssl_verify(
    tmp: pathlib.Path,
    leaf: x509.Certificate,
    bundle: Sequence[x509.Certificate],
    untrusted: Sequence[x509.Certificate] = (),
    *,
    at: dt.datetime = NOW,
    extra: Sequence[str] = (),
) -> tuple[bool, str]:
    """``openssl verify -CAfile <bundle> [-untrusted <chain>] <leaf>`` at time ``at``."""
    n = len(list(tmp.glob("leaf*.pem")))
    (tmp / f"leaf{n}.pem").write_bytes(pem([leaf]))
    (tmp / f"bundle{n}.pem").write_bytes(pem(bundle))
    cmd = ["openssl", "verify", "-attime", str(int(at.timestamp())), *extra]
    cmd += ["-CAfile", str(tmp / f"bundle{n}.pem")]
    if untrusted:
        (tmp / f"chain{n}.pem").write_bytes(pem(untrusted))
        cmd += ["-untrusted", str(tmp / f"chain{n}.pem")]
    cmd.append(str(tmp / f"leaf{n}.pem"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    text = out.stdout + out.stderr
    return out.returncode == 0 and text.strip().endswith(": OK"), text


STRICT_SERVER = ("-x509_strict", "-purpose", "sslserver")
STRICT_CLIENT = ("-x509_strict", "-purpose", "sslclient")


# -- DER surgery (for CSRs whose signature must not verify) --------------------------------


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _read_tlv(data: bytes, i: int) -> tuple[int, int]:
    """(start of content, end of element) of the DER element at ``i``."""
    n = data[i + 1]
    if n < 0x80:
        return i + 2, i + 2 + n
    k = n & 0x7F
    length = int.from_bytes(data[i + 2 : i + 2 + k], "big")
    return i + 2 + k, i + 2 + k + length


def csr_signed_by(
    csr: x509.CertificateSigningRequest, signer: Any
) -> x509.CertificateSigningRequest:
    """The CSR's own CertificationRequestInfo, re-signed by ``signer`` (another key than the
    one the CSR names, unless it is the same key): built by hand, as cryptography won't."""
    der = csr.public_bytes(serialization.Encoding.DER)
    tbs = csr.tbs_certrequest_bytes
    body, _ = _read_tlv(der, 0)
    assert der[body : body + len(tbs)] == tbs
    alg_start = body + len(tbs)
    _, alg_end = _read_tlv(der, alg_start)
    signature = signer.sign(tbs, ec.ECDSA(hashes.SHA256()))
    out = _tlv(0x30, tbs + der[alg_start:alg_end] + _tlv(0x03, b"\x00" + signature))
    return x509.load_der_x509_csr(out)


def flip_last_byte(csr: x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature value
    return x509.load_der_x509_csr(bytes(der))


def replace_in_der(
    csr: x509.CertificateSigningRequest, old: bytes, new: bytes
) -> x509.CertificateSigningRequest:
    der = csr.public_bytes(serialization.Encoding.DER)
    assert len(old) == len(new) and der.count(old) == 1
    return x509.load_der_x509_csr(der.replace(old, new))


def check(csr: x509.CertificateSigningRequest, **kw: Any) -> CSRInfo:
    kw.setdefault("trust_domain", TD)
    kw.setdefault("datacenter", DC)
    return px.check_csr(csr, **kw)


# == CSR policy =============================================================================

GOOD_CSRS: list[tuple[str, Callable[[], x509.CertificateSigningRequest], dict[str, Any], Any]] = [
    ("ec-p256", lambda: make_csr(EC[1]), {}, ("ec", 256, WEB)),
    ("ec-p384", lambda: make_csr(EC384), {}, ("ec", 384, WEB)),
    ("ec-p521", lambda: make_csr(EC521), {}, ("ec", 521, WEB)),
    ("rsa-2048", lambda: make_csr(RSA[1]), {}, ("rsa", 2048, WEB)),
    (
        "dns-sans-ignored",
        lambda: make_csr(EC[1], dns=["web.service.trellis", "localhost"]),
        {},
        ("ec", 256, WEB),
    ),
    (
        "upper-scheme-and-td-canonicalised",
        lambda: make_csr(EC[1], [WEB.uri.replace("spiffe", "SPIFFE").replace(TD, TD.upper())]),
        {},
        ("ec", 256, WEB),
    ),
    ("san-not-critical", lambda: make_csr(EC[1], san_critical=False), {}, ("ec", 256, WEB)),
    (
        "subject-cn-ignored",
        lambda: make_csr(EC[1], subject=_cn(DB.uri)),
        {},
        ("ec", 256, WEB),
    ),
    (
        "asks-ca-false",
        lambda: make_csr(EC[1], exts=[(x509.BasicConstraints(ca=False, path_length=None), True)]),
        {},
        ("ec", 256, WEB),
    ),
    (
        "asks-digital-signature",
        lambda: make_csr(EC[1], exts=[(ku(digital_signature=True), True)]),
        {},
        ("ec", 256, WEB),
    ),
    (
        "any-datacenter",
        lambda: make_csr(EC[1], [sid(dc="dc9").uri]),
        {"datacenter": None},
        ("ec", 256, sid(dc="dc9")),
    ),
    ("td-argument-case", lambda: make_csr(EC[1]), {"trust_domain": TD.upper()}, ("ec", 256, WEB)),
    # The identity (what the caller's ACLs are then asked about) is the URI SAN's, as written:
    ("names-db", lambda: make_csr(EC[1], [DB.uri]), {}, ("ec", 256, DB)),
    ("service-case-kept", lambda: make_csr(EC[1], [sid("Web").uri]), {}, ("ec", 256, sid("Web"))),
    # never a DNS name's, whatever it says
    (
        "dns-name-is-not-the-identity",
        lambda: make_csr(EC[1], [WEB.uri], dns=[DB.uri]),
        {},
        ("ec", 256, WEB),
    ),
    ("only-ec-allowed", lambda: make_csr(EC[1]), {"allowed_key_types": ("ec",)}, ("ec", 256, WEB)),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "want"), [c[1:] for c in GOOD_CSRS], ids=[c[0] for c in GOOD_CSRS]
)
def test_check_csr_accepts(
    factory: Callable[[], x509.CertificateSigningRequest], kwargs: dict[str, Any], want: Any
) -> None:
    csr = factory()
    info = check(csr, **kwargs)
    kind, bits, identity = want
    assert info.identity == identity
    assert info.identity.uri == identity.uri
    assert (info.key_type, info.key_bits) == (kind, bits)
    assert info.public_key == csr.public_key()


def _dir_name(text: str) -> x509.DirectoryName:
    # An OU, not a CN: cryptography warns (an error here) when it decodes a CN over 64 bytes.
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, text)])
    return x509.DirectoryName(name)


def _upn(text: str) -> x509.OtherName:
    raw = text.encode()
    return x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), _tlv(0x0C, raw))


_OTHER_TD = sid(td=TD_B)
BAD_CSRS: list[tuple[str, Callable[[], x509.CertificateSigningRequest], dict[str, Any], str]] = [
    # -- the one URI SAN (CVE-2022-40716)
    ("no-san", lambda: make_csr(EC[1], []), {}, "exactly one URI SAN, it names 0"),
    ("dns-only", lambda: make_csr(EC[1], [], dns=["web"]), {}, "it names 0"),
    ("two-uris-same", lambda: make_csr(EC[1], [WEB.uri, WEB.uri]), {}, "it names 2"),
    ("two-uris-web-db", lambda: make_csr(EC[1], [WEB.uri, DB.uri]), {}, "it names 2"),
    (
        "two-uris-second-foreign",
        lambda: make_csr(EC[1], [WEB.uri, "https://evil.example/"]),
        {},
        "it names 2",
    ),
    ("three-uris", lambda: make_csr(EC[1], [WEB.uri, DB.uri, sid("api").uri]), {}, "it names 3"),
    # -- SAN type confusion (CVE-2022-21656): only URI SANs name an identity
    ("spiffe-in-dns", lambda: make_csr(EC[1], [], dns=[WEB.uri]), {}, "it names 0"),
    ("spiffe-in-email", lambda: make_csr(EC[1], [], emails=[WEB.uri]), {}, "it names 0"),
    (
        "spiffe-in-dirname",
        lambda: make_csr(EC[1], [], general=[_dir_name(WEB.uri)]),
        {},
        "it names 0",
    ),
    ("spiffe-in-othername", lambda: make_csr(EC[1], [], general=[_upn(WEB.uri)]), {}, "it names 0"),
    (
        "spiffe-in-cn",
        lambda: make_csr(EC[1], [], subject=_cn(WEB.uri)),
        {},
        "it names 0",
    ),
    # -- the URI must be one of our service identities
    (
        "agent-id",
        lambda: make_csr(EC[1], [f"spiffe://{TD}/agent/client/dc/dc1/id/abc"]),
        {},
        "not a service identity",
    ),
    ("signing-id", lambda: make_csr(EC[1], [f"spiffe://{TD}"]), {}, "not a service identity"),
    ("https-uri", lambda: make_csr(EC[1], ["https://web.example/"]), {}, "not a service identity"),
    ("extra-segment", lambda: make_csr(EC[1], [WEB.uri + "/x"]), {}, "not a service identity"),
    (
        "dotdot",
        lambda: make_csr(EC[1], [f"spiffe://{TD}/ns/default/dc/dc1/svc/../x"]),
        {},
        "'.' or '..'",
    ),
    ("trailing-newline", lambda: make_csr(EC[1], [WEB.uri + "\n"]), {}, "path segment"),
    ("query", lambda: make_csr(EC[1], [WEB.uri + "?x=db"]), {}, "query"),
    ("other-trust-domain", lambda: make_csr(EC[1], [_OTHER_TD.uri]), {}, "trust domain"),
    ("suffix-trust-domain", lambda: make_csr(EC[1], [sid(td="x." + TD).uri]), {}, "trust domain"),
    ("other-datacenter", lambda: make_csr(EC[1], [sid(dc="dc2").uri]), {}, "datacenter 'dc2'"),
    ("datacenter-case", lambda: make_csr(EC[1], [sid(dc="DC1").uri]), {}, "datacenter 'DC1'"),
    ("other-namespace", lambda: make_csr(EC[1], [sid(ns="team-a").uri]), {}, "namespace 'team-a'"),
    # -- asks to be a CA
    (
        "asks-ca-true",
        lambda: make_csr(EC[1], exts=[(x509.BasicConstraints(ca=True, path_length=None), True)]),
        {},
        "may not ask for a CA certificate",
    ),
    (
        "asks-ca-true-noncritical",
        lambda: make_csr(EC[1], exts=[(x509.BasicConstraints(ca=True, path_length=0), False)]),
        {},
        "may not ask for a CA certificate",
    ),
    (
        "asks-key-cert-sign",
        lambda: make_csr(EC[1], exts=[(ku(digital_signature=True, key_cert_sign=True), True)]),
        {},
        "certificate or CRL signing",
    ),
    (
        "asks-crl-sign",
        lambda: make_csr(EC[1], exts=[(ku(digital_signature=True, crl_sign=True), False)]),
        {},
        "certificate or CRL signing",
    ),
    # -- signature
    ("signature-flipped", lambda: flip_last_byte(make_csr(EC[1])), {}, "signature does not verify"),
    (
        "signed-by-another-key",
        lambda: csr_signed_by(make_csr(EC[1]), EC[2]),
        {},
        "signature does not verify",
    ),
    (
        "identity-edited-after-signing",
        lambda: replace_in_der(make_csr(EC[1]), b"/svc/web", b"/svc/dbx"),
        {},
        "signature does not verify",
    ),
    (
        "rsa-signature-flipped",
        lambda: flip_last_byte(make_csr(RSA[1])),
        {},
        "signature does not verify",
    ),
    # -- keys
    ("rsa-1024", lambda: make_csr(RSA1024), {}, "RSA-1024 is not allowed"),
    ("ec-p192", lambda: make_csr(P192), {}, "secp192r1 is not allowed"),
    ("ec-p224", lambda: make_csr(P224), {}, "secp224r1 is not allowed"),
    ("ec-secp256k1", lambda: make_csr(K256), {}, "secp256k1 is not allowed"),
    ("ed25519", lambda: make_csr(ED25519), {}, "Ed25519PublicKey is not allowed"),
    ("dsa", lambda: make_csr(DSA), {}, "DSAPublicKey is not allowed"),
    (
        "rsa-when-only-ec",
        lambda: make_csr(RSA[1]),
        {"allowed_key_types": ("ec",)},
        "rsa keys are not allowed",
    ),
    (
        "ec-when-only-rsa",
        lambda: make_csr(EC[1]),
        {"allowed_key_types": ["rsa"]},
        "ec keys are not allowed",
    ),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "words"), [c[1:] for c in BAD_CSRS], ids=[c[0] for c in BAD_CSRS]
)
def test_check_csr_refuses(
    factory: Callable[[], x509.CertificateSigningRequest], kwargs: dict[str, Any], words: str
) -> None:
    with pytest.raises(PolicyError, match=re.escape(words)):
        check(factory(), **kwargs)


def test_check_csr_takes_no_callback() -> None:
    """The ACL decision is not made inside the pure check: it was a ``may_sign`` callback,
    through which the API's PermissionDenied was raised from in here. The check takes data
    only and returns the identity; the caller decides on it before signing (test_ca_api.py,
    test_the_acl_decision_is_made_on_the_checked_identity_before_signing)."""
    params = inspect.signature(px.check_csr).parameters
    assert set(params) == {"csr", "trust_domain", "datacenter", "allowed_key_types"}


def test_resigned_csr_builder_is_sound() -> None:
    # The hand-built CSR of "signed-by-another-key" passes when the right key signs it: the
    # refusal above is about the key, not about broken DER.
    good = csr_signed_by(make_csr(EC[1]), EC[1])
    assert good.is_signature_valid
    assert check(good).identity == WEB
    flipped = flip_last_byte(make_csr(EC[1]))
    assert not flipped.is_signature_valid


def test_tampered_csr_is_refused_through_pem_too() -> None:
    bad = flip_last_byte(make_csr(EC[1]))
    loaded = px.load_csr(bad.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PolicyError, match="signature"):
        check(loaded)


# -- load_csr ------------------------------------------------------------------------------

_GOOD_PEM = make_csr(EC[1]).public_bytes(serialization.Encoding.PEM)
_CERT_PEM = ROOT.public_bytes(serialization.Encoding.PEM)


def _padded(total: int) -> bytes:
    """The good CSR PEM, preceded by explanatory text, ``total`` bytes in all."""
    pad = total - len(_GOOD_PEM)
    line = b"x" * 63 + b"\n"
    text = line * (pad // 64) + b"x" * (pad % 64)
    if pad % 64:
        text = text[:-1] + b"\n"
    return text + _GOOD_PEM


LOAD_BAD: list[tuple[str, Any, str]] = [
    ("oversize", _padded(px.MAX_CSR_BYTES + 1), f"larger than {px.MAX_CSR_BYTES} bytes"),
    ("oversize-str", _padded(px.MAX_CSR_BYTES + 1).decode(), "larger than"),
    ("huge", _GOOD_PEM * 200, "larger than"),
    ("two-blocks", _GOOD_PEM + _GOOD_PEM, "exactly one PEM"),
    ("csr-and-cert", _GOOD_PEM + _CERT_PEM, "exactly one PEM"),
    ("certificate", _CERT_PEM, "exactly one PEM"),
    ("empty", b"", "exactly one PEM"),
    ("der", make_csr(EC[1]).public_bytes(serialization.Encoding.DER), "exactly one PEM"),
    (
        "new-csr-label",
        _GOOD_PEM.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"),
        "exactly one PEM",
    ),
    (
        "bad-base64",
        b"-----BEGIN CERTIFICATE REQUEST-----\nnot*base64!\n-----END CERTIFICATE REQUEST-----\n",
        "does not parse",
    ),
    (
        "truncated",
        _GOOD_PEM[:100] + b"\n-----END CERTIFICATE REQUEST-----\n",
        "does not parse",
    ),
    (
        "garbage-der",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAAAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "does not parse",
    ),
]


@pytest.mark.parametrize(("data", "words"), [c[1:] for c in LOAD_BAD], ids=[c[0] for c in LOAD_BAD])
def test_load_csr_refuses(data: Any, words: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(words)):
        px.load_csr(data)


@pytest.mark.parametrize(
    "data",
    [_GOOD_PEM, _GOOD_PEM.decode(), _padded(px.MAX_CSR_BYTES)],
    ids=["bytes", "str", "exactly-16-KiB"],
)
def test_load_csr_accepts(data: Any) -> None:
    if isinstance(data, bytes) and len(data) > len(_GOOD_PEM):
        assert len(data) == px.MAX_CSR_BYTES
    csr = px.load_csr(data)
    assert check(csr).identity == WEB


def test_build_csr_passes_the_policy() -> None:
    csr = px.build_csr(EC[1], WEB)
    assert csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        WEB.uri
    ]
    assert check(csr).identity == WEB
    assert check(px.build_csr(EC384, DB)).identity == DB


# == Leaf profile ============================================================================


def assert_leaf_profile(
    leaf: x509.Certificate,
    info: CSRInfo,
    issuer: x509.Certificate,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> None:
    exts = leaf.extensions
    assert len(leaf.subject) == 0
    assert leaf.issuer == issuer.subject
    san = exts.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(info.identity.uri)]
    k = exts.get_extension_for_class(x509.KeyUsage)
    assert k.critical
    assert k.value.digital_signature
    assert not k.value.key_cert_sign and not k.value.crl_sign
    assert not k.value.content_commitment and not k.value.data_encipherment
    # digitalSignature only, for EC and RSA (the README's profile; test_leaf_key_usage.py).
    assert not k.value.key_encipherment and not k.value.key_agreement
    eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert sorted(o.dotted_string for o in eku) == sorted(
        o.dotted_string for o in (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    ski = exts.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == px.key_id(info.public_key)
    aki = exts.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == issuer_ski.digest
    assert leaf.public_key() == info.public_key
    start = now.replace(microsecond=0)
    assert leaf.not_valid_before_utc == start - dt.timedelta(minutes=1)
    assert leaf.not_valid_after_utc == min(start + ttl, issuer.not_valid_after_utc)
    assert 0 < leaf.serial_number < 2**159
    known = {
        x509.SubjectAlternativeName,
        x509.KeyUsage,
        x509.ExtendedKeyUsage,
        x509.BasicConstraints,
        x509.SubjectKeyIdentifier,
        x509.AuthorityKeyIdentifier,
    }
    assert {type(e.value) for e in exts} == known and len(exts) == len(known)
    leaf.verify_directly_issued_by(issuer)


ISSUERS = {
    "ec-root": (ROOT, ROOT_KEY, [ROOT], []),
    "rsa-root": (RSA_ROOT, RSA_ROOT_KEY, [RSA_ROOT], []),
    "ec-intermediate": (INTER, INTER_KEY, [ROOT], [INTER]),
}
SUBJECT_KEYS = {"ec-p256": EC[1], "ec-p384": EC384, "rsa-2048": RSA[1]}


@pytest.mark.parametrize("issuer_name", list(ISSUERS))
@pytest.mark.parametrize("key_name", list(SUBJECT_KEYS))
def test_build_leaf_profile(tmp_path: pathlib.Path, issuer_name: str, key_name: str) -> None:
    issuer, issuer_key, bundle, chain = ISSUERS[issuer_name]
    info = check(make_csr(SUBJECT_KEYS[key_name]))
    leaf = px.build_leaf(info, issuer=issuer, issuer_key=issuer_key, ttl=TTL, now=NOW)
    assert_leaf_profile(leaf, info, issuer, NOW, TTL)
    assert px.verify_peer([leaf, *chain], {TD: bundle}, now=NOW) == WEB
    for extra in ((), STRICT_SERVER, STRICT_CLIENT):
        ok, out = openssl_verify(tmp_path, leaf, bundle, chain, extra=extra)
        assert ok, out


_FAR = x509.UnrecognizedExtension(
    ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x18\x0f99991231235959Z"
)
GREEDY_CSRS: list[tuple[str, Callable[[], x509.CertificateSigningRequest]]] = [
    (
        "ca-true",
        lambda: make_csr(EC[1], exts=[(x509.BasicConstraints(ca=True, path_length=None), True)]),
    ),
    (
        "key-cert-sign",
        lambda: make_csr(
            EC[1], exts=[(ku(digital_signature=True, key_cert_sign=True, crl_sign=True), True)]
        ),
    ),
    ("extra-uri", lambda: make_csr(EC[1], [WEB.uri, DB.uri])),
    ("dns-sans", lambda: make_csr(EC[1], dns=["web.service.trellis", "db.service.trellis"])),
    (
        "email-and-cn",
        lambda: make_csr(
            EC[1],
            emails=["root@example.org"],
            subject=_cn("db"),
        ),
    ),
    (
        "code-signing-eku",
        lambda: make_csr(
            EC[1], exts=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), True)]
        ),
    ),
    (
        "private-key-usage-period",
        lambda: make_csr(
            EC[1],
            exts=[
                (
                    x509.PrivateKeyUsagePeriod(not_before=None, not_after=dt.datetime(9999, 1, 1)),
                    False,
                )
            ],
        ),
    ),
    ("private-validity-request", lambda: make_csr(EC[1], exts=[(_FAR, False)])),
]


@pytest.mark.parametrize("factory", [c[1] for c in GREEDY_CSRS], ids=[c[0] for c in GREEDY_CSRS])
def test_build_leaf_forces_the_profile_whatever_the_csr_asks(
    tmp_path: pathlib.Path, factory: Callable[[], x509.CertificateSigningRequest]
) -> None:
    csr = factory()
    try:
        info = check(csr)
    except PolicyError:
        # Refused at the door; still, build_leaf takes only the identity and the key, so even
        # a provider that skipped the check could not pass the CSR's wishes on.
        info = CSRInfo(WEB, csr.public_key(), "ec", 256)  # type: ignore[arg-type]
    leaf = px.build_leaf(info, issuer=ROOT, issuer_key=ROOT_KEY, ttl=TTL, now=NOW)
    assert_leaf_profile(leaf, info, ROOT, NOW, TTL)
    assert leaf.not_valid_after_utc == NOW + TTL
    ok, out = openssl_verify(tmp_path, leaf, [ROOT], extra=STRICT_CLIENT)
    assert ok, out


@pytest.mark.parametrize(
    ("issuer_ttl", "ttl", "want_after"),
    [
        (10 * YEAR, TTL, NOW + TTL),
        (10 * YEAR, dt.timedelta(seconds=1), NOW + dt.timedelta(seconds=1)),
        (dt.timedelta(hours=1), TTL, NOW + dt.timedelta(hours=1)),
        (dt.timedelta(hours=72), TTL, NOW + TTL),
        (dt.timedelta(hours=1), 100 * YEAR, NOW + dt.timedelta(hours=1)),
    ],
    ids=["ttl", "one-second", "clipped-to-issuer", "equal", "huge-ttl-clipped"],
)
def test_build_leaf_not_after(
    issuer_ttl: dt.timedelta, ttl: dt.timedelta, want_after: dt.datetime
) -> None:
    issuer = make_root(EC[3], ttl=issuer_ttl)
    leaf = px.build_leaf(info_for(EC[1]), issuer=issuer, issuer_key=EC[3], ttl=ttl, now=NOW)
    assert leaf.not_valid_after_utc == want_after
    assert leaf.not_valid_after_utc <= issuer.not_valid_after_utc
    assert leaf.not_valid_before_utc == NOW - dt.timedelta(minutes=1)


@pytest.mark.parametrize(
    ("issuer_now", "ttl"),
    [
        (NOW - 2 * YEAR, TTL),  # the issuer expired a year ago
        (NOW, dt.timedelta(0)),
        (NOW, -TTL),
    ],
    ids=["issuer-expired", "zero-ttl", "negative-ttl"],
)
def test_build_leaf_refuses_an_expired_issuer_or_empty_lifetime(
    issuer_now: dt.datetime, ttl: dt.timedelta
) -> None:
    issuer = make_root(EC[3], ttl=YEAR, now=issuer_now)
    with pytest.raises(PolicyError, match="expired"):
        px.build_leaf(info_for(EC[1]), issuer=issuer, issuer_key=EC[3], ttl=ttl, now=NOW)


def test_build_leaf_microseconds_and_serial() -> None:
    now = NOW + dt.timedelta(microseconds=999_999)
    leaf = px.build_leaf(
        info_for(EC[1]), issuer=ROOT, issuer_key=ROOT_KEY, ttl=TTL, now=now, serial=12345
    )
    assert leaf.serial_number == 12345
    assert leaf.not_valid_before_utc == NOW - dt.timedelta(minutes=1)
    serials = {make_leaf().serial_number for _ in range(5)}
    assert len(serials) == 5


def _custom_root(key: Any, *, ski: bytes, name: str = "Acme Root") -> x509.Certificate:
    """An operator's own root: its subject and SKI are not what build_ca would make."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "NL"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - 30 * DAY)
        .not_valid_after(NOW + 5 * YEAR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ku(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TD}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


CUSTOM_KEY = EC[6]
CUSTOM_ROOT = _custom_root(CUSTOM_KEY, ski=b"\x42" * 8)


def test_leaf_of_a_custom_root_names_its_ski(tmp_path: pathlib.Path) -> None:
    """AKI = the issuer's SKI, even when the issuer's SKI is not SHA-1 of its key: OpenSSL
    matches the two, and refused such leaves ("unable to get local issuer certificate")."""
    info = info_for(EC[1])
    leaf = px.build_leaf(info, issuer=CUSTOM_ROOT, issuer_key=CUSTOM_KEY, ttl=TTL, now=NOW)
    assert_leaf_profile(leaf, info, CUSTOM_ROOT, NOW, TTL)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == b"\x42" * 8
    ok, out = openssl_verify(tmp_path, leaf, [CUSTOM_ROOT], extra=STRICT_CLIENT)
    assert ok, out
    assert px.verify_peer([leaf], {TD: [CUSTOM_ROOT]}, now=NOW) == WEB


# -- build_ca ---------------------------------------------------------------------------------


def assert_ca_profile(cert: x509.Certificate, td: str = TD, *, ski_from_key: bool = True) -> None:
    exts = cert.extensions
    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    k = exts.get_extension_for_class(x509.KeyUsage)
    assert k.critical and k.value.key_cert_sign and k.value.crl_sign
    uris = exts.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == [f"spiffe://{td}"]
    assert spiffe.parse(uris[0]).path == ""
    assert exts.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    if ski_from_key:
        assert exts.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == px.key_id(
            cert.public_key()  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("key", [EC[3], EC384, RSA[2]], ids=["ec-p256", "ec-p384", "rsa-2048"])
def test_build_ca_root(tmp_path: pathlib.Path, key: Any) -> None:
    root = make_root(key, cn="Trellis CA x", ttl=YEAR)
    assert_ca_profile(root)
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Trellis CA x"
    assert root.not_valid_before_utc == NOW - dt.timedelta(minutes=1)
    assert root.not_valid_after_utc == NOW + YEAR
    aki = root.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == px.key_id(key.public_key())
    root.verify_directly_issued_by(root)
    ok, out = openssl_verify(tmp_path, root, [root], extra=("-x509_strict",))
    assert ok, out
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length is None


def test_build_ca_intermediate(tmp_path: pathlib.Path) -> None:
    assert_ca_profile(INTER)
    assert INTER.issuer == ROOT.subject
    assert INTER.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    aki = INTER.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == px.key_id(ROOT_KEY.public_key())
    INTER.verify_directly_issued_by(ROOT)
    ok, out = openssl_verify(tmp_path, INTER, [ROOT], extra=("-x509_strict",))
    assert ok, out
    # Never outlives its signer.
    short = make_root(EC[4], ttl=DAY)
    inter = px.build_ca(
        public_key=EC[5].public_key(),
        trust_domain=TD,
        common_name="i",
        signer_key=EC[4],
        signer=short,
        ttl=YEAR,
        now=NOW,
    )
    assert inter.not_valid_after_utc == short.not_valid_after_utc


def test_build_ca_refuses_a_trust_domain_with_a_path() -> None:
    with pytest.raises(spiffe.SpiffeIDError):
        make_root(EC[3], td=f"{TD}/ns/default")


def test_root_is_not_a_peer() -> None:
    with pytest.raises(PeerRejected, match="CA certificate"):
        px.verify_peer([ROOT], {TD: [ROOT]}, now=NOW)


# == Peer verification ======================================================================


def test_verify_peer_accepts_the_expected_identity() -> None:
    leaf = make_leaf()
    assert px.verify_peer([leaf], {TD: [ROOT]}, now=NOW, expected_identity=WEB) == WEB
    # The name alone would accept this leaf for "web" of another datacenter: the whole ID not.
    assert px.verify_peer([leaf], {TD: [ROOT]}, now=NOW, expected_service="web") == WEB
    with pytest.raises(PeerRejected):
        px.verify_peer([leaf], {TD: [ROOT]}, now=NOW, expected_identity=sid("web", dc="dc2"))


def test_verify_peer_accepts_a_good_leaf() -> None:
    leaf = make_leaf()
    assert px.leaf_identity(leaf) == WEB
    assert px.verify_peer([leaf], {TD: [ROOT]}, now=NOW) == WEB
    assert px.verify_peer([leaf], {TD: [ROOT]}, now=NOW, expected_service="web") == WEB
    assert px.verify_peer([leaf], {TD: [RSA_ROOT, ROOT], TD_B: [RSA_ROOT]}, now=NOW) == WEB
    assert (
        px.verify_peer(
            [make_leaf(issuer=INTER, issuer_key=INTER_KEY), INTER], {TD: [ROOT]}, now=NOW
        )
        == WEB
    )
    # On the real clock (no ``now`` anywhere), through an intermediate.
    root = px.build_ca(
        public_key=EC[3].public_key(),
        trust_domain=TD,
        common_name="r",
        signer_key=EC[3],
        signer=None,
        ttl=DAY,
    )
    inter = px.build_ca(
        public_key=EC[4].public_key(),
        trust_domain=TD,
        common_name="i",
        signer_key=EC[3],
        signer=root,
        ttl=DAY,
    )
    leaf2 = make_leaf(EC[2], DB, issuer=inter, issuer_key=EC[4], now=None)
    assert px.verify_peer([leaf2, inter], {TD: [root]}) == DB
    with pytest.raises(PeerRejected, match="does not verify"):
        px.verify_peer([leaf2], {TD: [root]})


_SHARED_KEY = EC[5]
# Trust domain B's root, and a leaf it signed that claims trust domain A (TD).
_ROOT_B = make_root(_SHARED_KEY, td=TD_B, cn="Trellis CA b")
_ROOT_A_SHARED = make_root(_SHARED_KEY, td=TD, cn="Trellis CA a-shared")
_LEAF_A_BY_B = make_leaf(EC[1], WEB, issuer=_ROOT_B, issuer_key=_SHARED_KEY)
_ROGUE_KEY = EC[4]
_ROGUE_ROOT = make_root(_ROGUE_KEY, cn="Trellis CA root-a")  # same name as ROOT, other key


def _two_uris() -> list[x509.Certificate]:
    return [
        raw_cert(
            issuer=ROOT,
            issuer_key=ROOT_KEY,
            key_usage=LEAF_KU,
            sans=[x509.UniformResourceIdentifier(WEB.uri), x509.UniformResourceIdentifier(DB.uri)],
        )
    ]


def _raw(**kw: Any) -> Callable[[], list[x509.Certificate]]:
    kw.setdefault("key_usage", LEAF_KU)
    return lambda: [raw_cert(issuer=ROOT, issuer_key=ROOT_KEY, **kw)]


BAD_PEERS: list[tuple[str, Callable[[], list[x509.Certificate]], Any, dict[str, Any], str]] = [
    ("empty-chain", lambda: [], {TD: [ROOT]}, {}, "no certificate"),
    ("root-as-leaf", lambda: [ROOT], {TD: [ROOT]}, {}, "CA certificate"),
    ("intermediate-as-leaf", lambda: [INTER, ROOT], {TD: [ROOT]}, {}, "CA certificate"),
    ("two-uri-sans", _two_uris, {TD: [ROOT]}, {}, "2 URI SANs"),
    (
        "two-uri-sans-same",
        _raw(sans=[x509.UniformResourceIdentifier(WEB.uri)] * 2),
        {TD: [ROOT]},
        {},
        "2 URI SANs",
    ),
    ("no-san", _raw(sans=None), {TD: [ROOT]}, {}, "0 URI SANs"),
    (
        "dns-san-only",
        _raw(sans=[x509.DNSName("web.service.trellis")]),
        {TD: [ROOT]},
        {},
        "0 URI SANs",
    ),
    ("spiffe-in-dns-san", _raw(sans=[x509.DNSName(WEB.uri)]), {TD: [ROOT]}, {}, "0 URI SANs"),
    ("spiffe-in-email-san", _raw(sans=[x509.RFC822Name(WEB.uri)]), {TD: [ROOT]}, {}, "0 URI SANs"),
    (
        "spiffe-in-cn",
        _raw(sans=None, subject=_cn(WEB.uri)),
        {TD: [ROOT]},
        {},
        "0 URI SANs",
    ),
    (
        "dns-san-names-expected",
        _raw(sans=[x509.UniformResourceIdentifier(WEB.uri), x509.DNSName(DB.uri)]),
        {TD: [ROOT]},
        {"expected_service": "db"},
        "expected 'db'",
    ),
    (
        "signing-id-in-leaf",
        _raw(sans=[x509.UniformResourceIdentifier(f"spiffe://{TD}")]),
        {TD: [ROOT]},
        {},
        "not a service identity",
    ),
    (
        "agent-id",
        _raw(sans=[x509.UniformResourceIdentifier(f"spiffe://{TD}/agent/client/dc/dc1/id/x")]),
        {TD: [ROOT]},
        {},
        "not a service identity",
    ),
    ("no-key-usage", _raw(key_usage=None), {TD: [ROOT]}, {}, "no key usage"),
    (
        "key-cert-sign-without-ca-flag",
        _raw(ca=None, key_usage=ku(digital_signature=True, key_cert_sign=True)),
        {TD: [ROOT]},
        {},
        "key usage",
    ),
    (
        "crl-sign",
        _raw(key_usage=ku(digital_signature=True, crl_sign=True)),
        {TD: [ROOT]},
        {},
        "key usage",
    ),
    ("no-digital-signature", _raw(key_usage=ku(key_agreement=True)), {TD: [ROOT]}, {}, "key usage"),
    ("ca-flag-with-leaf-ku", _raw(ca=True), {TD: [ROOT]}, {}, "CA certificate"),
    # -- trust domains: the bundle is the one of the leaf's own trust domain (SECURITY 1.3)
    ("no-bundle-for-td", lambda: [make_leaf()], {TD_B: [ROOT]}, {}, "no trust bundle"),
    ("empty-bundle-for-td", lambda: [make_leaf()], {TD: []}, {}, "no trust bundle"),
    (
        "td-a-leaf-signed-by-td-b-root",
        lambda: [_LEAF_A_BY_B],
        {TD_B: [_ROOT_B]},
        {},
        "no trust bundle",
    ),
    (
        "td-a-leaf-by-b-root-both-bundles",
        lambda: [_LEAF_A_BY_B],
        {TD: [ROOT], TD_B: [_ROOT_B]},
        {},
        "does not verify",
    ),
    (
        "td-a-leaf-by-b-root-shared-key-other-name",
        lambda: [_LEAF_A_BY_B],
        {TD: [_ROOT_A_SHARED], TD_B: [_ROOT_B]},
        {},
        "does not verify",
    ),
    (
        "td-a-leaf-with-td-b-root-as-intermediate",
        lambda: [_LEAF_A_BY_B, _ROOT_B],
        {TD: [ROOT], TD_B: [_ROOT_B]},
        {},
        "does not verify",
    ),
    # -- time and trust
    (
        "expired",
        lambda: [make_leaf()],
        {TD: [ROOT]},
        {"now": NOW + TTL + dt.timedelta(seconds=1)},
        "does not verify",
    ),
    (
        "not-yet-valid",
        lambda: [make_leaf()],
        {TD: [ROOT]},
        {"now": NOW - dt.timedelta(minutes=2)},
        "does not verify",
    ),
    (
        "untrusted-root",
        lambda: [make_leaf(issuer=_ROGUE_ROOT, issuer_key=_ROGUE_KEY)],
        {TD: [ROOT]},
        {},
        "does not verify",
    ),
    (
        "untrusted-root-presented",
        lambda: [make_leaf(issuer=_ROGUE_ROOT, issuer_key=_ROGUE_KEY), _ROGUE_ROOT],
        {TD: [ROOT]},
        {},
        "does not verify",
    ),
    (
        "intermediate-missing",
        lambda: [make_leaf(issuer=INTER, issuer_key=INTER_KEY)],
        {TD: [ROOT]},
        {},
        "does not verify",
    ),
    # -- the expected destination (CVE-2021-32574)
    (
        "expected-service-mismatch",
        lambda: [make_leaf()],
        {TD: [ROOT]},
        {"expected_service": "db"},
        "expected 'db'",
    ),
    (
        "expected-service-case",
        lambda: [make_leaf()],
        {TD: [ROOT]},
        {"expected_service": "Web"},
        "expected 'Web'",
    ),
    (
        "expected-identity-other-datacenter",
        lambda: [make_leaf()],
        {TD: [ROOT]},
        {"expected_identity": sid("web", dc="dc2")},
        f"expected {sid('web', dc='dc2').uri}",
    ),
    (
        "expected-identity-other-trust-domain",
        lambda: [make_leaf()],
        {TD: [ROOT]},
        {"expected_identity": sid("web", td=TD_B)},
        f"expected {sid('web', td=TD_B).uri}",
    ),
    (
        "expected-identity-other-namespace",
        lambda: [make_leaf()],
        {TD: [ROOT]},
        {"expected_identity": sid("web", ns="team-a")},
        "expected spiffe://",
    ),
    (
        "expected-identity-other-service",
        lambda: [make_leaf()],
        {TD: [ROOT]},
        {"expected_identity": DB},
        f"expected {DB.uri}",
    ),
]


@pytest.mark.parametrize(
    ("chain", "bundles", "kwargs", "words"),
    [c[1:] for c in BAD_PEERS],
    ids=[c[0] for c in BAD_PEERS],
)
def test_verify_peer_rejects(
    chain: Callable[[], list[x509.Certificate]], bundles: Any, kwargs: dict[str, Any], words: str
) -> None:
    kwargs.setdefault("now", NOW)
    with pytest.raises(PeerRejected, match=re.escape(words)):
        px.verify_peer(chain(), bundles, **kwargs)


def test_shared_key_leaf_would_pass_a_naive_verifier() -> None:
    """Control for the trust-domain cases above: the B-signed leaf is cryptographically fine
    (a global pool holding B's root accepts it); only the choice of bundle refuses it."""
    leaf = _LEAF_A_BY_B
    verifier = PolicyBuilder().store(Store([_ROOT_B])).time(NOW).build_client_verifier()
    verifier.verify(leaf, [])
    assert px.verify_peer([leaf], {TD: [_ROOT_B]}, now=NOW) == WEB


def test_raw_cert_builder_is_sound() -> None:
    """Control for the raw-certificate cases: with one URI SAN and leaf usages it passes."""
    assert px.verify_peer(_raw()(), {TD: [ROOT]}, now=NOW) == WEB
    with pytest.raises(PeerRejected, match="0 URI SANs"):
        px.leaf_identity(_raw(sans=[x509.DNSName(WEB.uri)])()[0])


def test_leaf_without_basic_constraints_is_a_leaf() -> None:
    # RFC 5280: no BasicConstraints means not a CA; the key usage still has to be a leaf's.
    cert = raw_cert(issuer=ROOT, issuer_key=ROOT_KEY, ca=None, key_usage=LEAF_KU)
    assert px.leaf_identity(cert) == WEB


# == Rotation ===============================================================================


@functools.cache
def rotation(kind: str) -> dict[str, Any]:
    """Old root, new root, the new root cross-signed by the old one, and a leaf of each."""
    keys = {
        "ec": (EC[2], EC[3]),
        "rsa": (RSA[1], RSA[2]),
        "ec-rsa": (EC[2], RSA[2]),
        "rsa-ec": (RSA[1], EC[3]),
    }
    if kind == "ec-custom":
        old_key, new_key = EC[2], CUSTOM_KEY
        old = make_root(old_key, cn="Trellis CA old", now=NOW - 90 * DAY)
        new = CUSTOM_ROOT
    else:
        old_key, new_key = keys[kind]
        old = make_root(old_key, cn="Trellis CA old", now=NOW - 90 * DAY)
        new = make_root(new_key, cn="Trellis CA new", now=NOW - DAY)
    cross = px.cross_sign(new, old_root=old, old_key=old_key, trust_domain=TD, now=NOW)
    return {
        "old": old,
        "new": new,
        "cross": cross,
        "old_leaf": make_leaf(EC[1], WEB, issuer=old, issuer_key=old_key),
        "new_leaf": make_leaf(EC384, DB, issuer=new, issuer_key=new_key),
    }


ROTATION_KINDS = ["ec", "rsa", "ec-rsa", "rsa-ec", "ec-custom"]
# (leaf, presented intermediates, the sidecar's bundle, verifies?)
ROTATION_CASES = [
    ("old-leaf/old-bundle", "old_leaf", [], ["old"], True),
    ("old-leaf/old+new-bundle", "old_leaf", [], ["old", "new"], True),
    ("old-leaf/new-bundle", "old_leaf", [], ["new"], False),
    ("old-leaf+cross/new-bundle", "old_leaf", ["cross"], ["new"], False),
    ("new-leaf+cross/old-bundle", "new_leaf", ["cross"], ["old"], True),
    ("new-leaf/old-bundle", "new_leaf", [], ["old"], False),
    ("new-leaf+cross/old+new-bundle", "new_leaf", ["cross"], ["old", "new"], True),
    ("new-leaf/old+new-bundle", "new_leaf", [], ["old", "new"], True),
    ("new-leaf+cross/new-bundle", "new_leaf", ["cross"], ["new"], True),
    ("new-leaf/new-bundle", "new_leaf", [], ["new"], True),
]


@pytest.mark.parametrize(
    ("leaf_name", "chain_names", "bundle_names", "ok"),
    [c[1:] for c in ROTATION_CASES],
    ids=[c[0] for c in ROTATION_CASES],
)
@pytest.mark.parametrize("kind", ROTATION_KINDS)
def test_rotation(
    tmp_path: pathlib.Path,
    kind: str,
    leaf_name: str,
    chain_names: list[str],
    bundle_names: list[str],
    ok: bool,
) -> None:
    r = rotation(kind)
    leaf = r[leaf_name]
    chain = [r[n] for n in chain_names]
    bundle = [r[n] for n in bundle_names]
    want = WEB if leaf_name == "old_leaf" else DB
    if ok:
        assert px.verify_peer([leaf, *chain], {TD: bundle}, now=NOW) == want
    else:
        with pytest.raises(PeerRejected, match="does not verify"):
            px.verify_peer([leaf, *chain], {TD: bundle}, now=NOW)
    verified, out = openssl_verify(tmp_path, leaf, bundle, chain, extra=STRICT_CLIENT)
    assert verified is ok, out


@pytest.mark.parametrize("kind", ROTATION_KINDS)
def test_cross_signed_certificate(kind: str) -> None:
    r = rotation(kind)
    old, new, cross = r["old"], r["new"], r["cross"]
    assert cross.subject == new.subject
    assert cross.issuer == old.subject
    assert cross.public_key() == new.public_key()
    assert_ca_profile(cross, ski_from_key=kind != "ec-custom")
    new_ski = new.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert cross.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == new_ski
    old_ski = old.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cross.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == old_ski.digest
    assert cross.not_valid_after_utc <= old.not_valid_after_utc
    assert cross.not_valid_after_utc <= new.not_valid_after_utc
    cross.verify_directly_issued_by(old)


def test_cross_signed_validity_is_clipped_to_the_old_root(tmp_path: pathlib.Path) -> None:
    old = make_root(EC[2], cn="Trellis CA old", ttl=30 * DAY, now=NOW - DAY)
    new = make_root(EC[3], cn="Trellis CA new", ttl=10 * YEAR)
    cross = px.cross_sign(new, old_root=old, old_key=EC[2], trust_domain=TD, now=NOW)
    assert cross.not_valid_after_utc == old.not_valid_after_utc
    leaf = make_leaf(issuer=new, issuer_key=EC[3])
    assert px.verify_peer([leaf, cross], {TD: [old]}, now=NOW) == WEB


# == Property: whatever the CSR holds, the leaf names exactly the caller ====================

SERVICES = ["web", "db", "api", "Web"]
_KEYS = [EC[1], EC384, RSA[1], RSA1024, P192]
_ALLOWED_KEYS = {id(EC[1]), id(EC384), id(RSA[1])}

_uri = st.one_of(
    st.builds(
        lambda s, dc, ns, td: spiffe.ServiceID(td, ns, dc, s).uri,
        st.sampled_from(SERVICES),
        st.sampled_from([DC, "dc2", "DC1"]),
        st.sampled_from(["default", "default", "other"]),
        st.sampled_from([TD, TD, TD_B, TD.upper()]),
    ),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.sampled_from(
        [
            f"spiffe://{TD}",
            f"spiffe://{TD}/agent/client/dc/dc1/id/x",
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web/x",
            f"spiffe://{TD}/ns/default/dc/dc1/svc/../web",
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web\n",
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web?x",
            f"SPIFFE://{TD}/ns/default/dc/dc1/svc/db",
        ]
    ),
)
_dns = st.one_of(
    st.sampled_from(["web", "db.service.trellis", "localhost"]),
    st.builds(lambda s: sid(s).uri, st.sampled_from(SERVICES)),
)


@st.composite
def csr_requests(draw: st.DrawFn) -> dict[str, Any]:
    caller = draw(st.sampled_from(SERVICES))
    # The caller's own ID (as is, or with the scheme and trust domain in upper case), often
    # alone: otherwise almost no example would be acceptable and the accept path untested.
    own = draw(
        st.sampled_from(
            [sid(caller).uri, sid(caller).uri.replace("spiffe", "SPIFFE").replace(TD, TD.upper())]
        )
    )
    others = st.lists(_uri, max_size=3)
    uris = draw(
        st.one_of(
            st.just([own]),
            others,
            st.tuples(others, others).map(lambda ab: [*ab[0], own, *ab[1]]),
        )
    )
    flags = st.tuples(st.booleans(), st.booleans(), st.booleans())
    return {
        "uris": uris,
        "dns": draw(st.lists(_dns, max_size=2)),
        "ca": draw(st.sampled_from([None, None, False, True])),
        "ku": draw(st.sampled_from([None, None, (True, False, False)]) | flags),
        "key": draw(st.sampled_from([0, 0, 1, 2, 3, 4])),
        "tamper": draw(st.sampled_from([False, False, False, True])),
        "caller": caller,
    }


_BASE = {"dns": [], "ca": None, "ku": None, "key": 0, "tamper": False, "caller": "web"}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(csr_requests())
# Both outcomes on every run, whatever hypothesis draws:
@example({**_BASE, "uris": [WEB.uri]})
@example({**_BASE, "uris": [WEB.uri], "dns": [DB.uri], "key": 2})
@example({**_BASE, "uris": [WEB.uri, WEB.uri]})
@example({**_BASE, "uris": [DB.uri]})
@example({**_BASE, "uris": [], "dns": [WEB.uri]})
@example({**_BASE, "uris": [WEB.uri], "tamper": True})
@example({**_BASE, "uris": [WEB.uri], "ca": True})
@example({**_BASE, "uris": [WEB.uri], "key": 3})
def test_property_leaf_names_exactly_the_caller(req: dict[str, Any]) -> None:
    key = _KEYS[req["key"]]
    exts: list[tuple[x509.ExtensionType, bool]] = []
    if req["ca"] is not None:
        exts.append((x509.BasicConstraints(ca=req["ca"], path_length=None), True))
    if req["ku"] is not None:
        ds, kcs, crl = req["ku"]
        exts.append((ku(digital_signature=ds, key_cert_sign=kcs, crl_sign=crl), True))
    csr = make_csr(key, req["uris"], dns=req["dns"], exts=exts)
    if req["tamper"]:
        csr = flip_last_byte(csr)
    caller = req["caller"]
    mine = sid(caller)

    def names_caller(uri: str) -> bool:
        try:
            return spiffe.parse_service(uri) == mine
        except spiffe.SpiffeIDError:
            return False

    exactly_the_caller = len(req["uris"]) == 1 and names_caller(req["uris"][0])
    acceptable = (
        exactly_the_caller
        and not req["tamper"]
        and id(key) in _ALLOWED_KEYS
        and req["ca"] is not True
        and not (req["ku"] is not None and (req["ku"][1] or req["ku"][2]))
    )
    try:
        info = px.check_csr(csr, trust_domain=TD, datacenter=DC)
        # The CA's next step (CAManager.sign_csr): the caller's ACL decision on the identity
        # the check returned; here the caller may write its own service only.
        if info.identity.service != caller:
            raise PolicyError(f"the caller may not obtain {info.identity.service!r}")
    except PolicyError:
        event("refused")
        assert not acceptable, req
        return
    event("accepted")
    assert acceptable, req
    assert info.identity == mine
    leaf = px.build_leaf(info, issuer=ROOT, issuer_key=ROOT_KEY, ttl=TTL, now=NOW)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [n for n in san if isinstance(n, x509.UniformResourceIdentifier)] == [
        x509.UniformResourceIdentifier(mine.uri)
    ]
    assert len(list(san)) == 1
    assert px.verify_peer([leaf], {TD: [ROOT]}, now=NOW, expected_service=caller) == mine
