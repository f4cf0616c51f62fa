"""proxy/der.py and proxy/profile.py: the sidecar's DER reader against ``cryptography`` on real
certificates, field by field; the leaf-profile verdict the same from both readers; and
malformed input, random or mutated, never raising anything but ``DERError``."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trellis.proxy import der, profile, spiffe, tls
from trellis.proxy import x509 as px
from trellis.proxy.follower import leaf_from_json, roots_from_json

from .ca_support import certs, service_csr
from .mesh_support import MeshCA

CA = MeshCA()
OTHER = MeshCA("0d0d0d0d-0000-4000-8000-000000000002.trellis")
KEY = px.generate_key()


def _custom(
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool | None = False,
    path_length: int | None = None,
    ku: dict[str, bool] | None = None,
    aki: x509.AuthorityKeyIdentifier | None = None,
    ski: bool = True,
    not_after: dt.datetime | None = None,
    serial: int = 4242,
    subject: x509.Name | None = None,
) -> x509.Certificate:
    """A certificate with whatever a test wants, signed by ``CA``."""
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject or x509.Name([]))
        .issuer_name(CA.root.subject)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(not_after or now + dt.timedelta(hours=1))
    )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    if ku is not None:
        bits = dict.fromkeys(der.KEY_USAGE_BITS, False) | ku
        b = b.add_extension(x509.KeyUsage(**bits), critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if aki is not None:
        b = b.add_extension(aki, critical=False)
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(KEY.public_key()), False)
    return b.sign(CA.key, hashes.SHA256())


URI = x509.UniformResourceIdentifier
DS = {"digital_signature": True}


def _real_certificates() -> list[x509.Certificate]:
    """What the mesh issues, what the refusal tests issue, and the odd shapes RFC 5280 allows."""
    intermediate_key = px.generate_key()
    intermediate = px.build_ca(
        public_key=intermediate_key.public_key(),
        trust_domain=CA.trust_domain,
        common_name="Intermediate",
        signer_key=CA.key,
        signer=CA.root,
        ttl=dt.timedelta(days=3),
    )
    signed = certs(
        px.cert_pem(
            px.build_leaf(
                px.check_csr(
                    px.load_csr(service_csr(CA.trust_domain, "api")), trust_domain=CA.trust_domain
                ),
                issuer=intermediate,
                issuer_key=intermediate_key,
                ttl=dt.timedelta(hours=3),
            )
        )
    )
    web = CA.leaf("web")
    return [
        CA.root,
        OTHER.root,
        intermediate,
        px.cross_sign(
            OTHER.root, old_root=CA.root, old_key=CA.key, trust_domain=OTHER.trust_domain
        ),
        web.cert,
        *signed,
        CA.odd_leaf([CA.uri("web"), CA.uri("db")]).cert,
        CA.odd_leaf([]).cert,
        CA.odd_leaf([CA.uri("web")], self_signed=True).cert,
        CA.odd_leaf([CA.uri("x")], signer=web).cert,
        CA.odd_leaf(["spiffe://td/not/a/service"]).cert,
        CA.odd_leaf(
            [CA.uri("late")], not_after=dt.datetime(2051, 6, 1, 12, 30, 59, tzinfo=dt.UTC)
        ).cert,
        _custom(
            sans=[
                x509.DNSName("web.example"),
                URI(CA.uri("web")),
                x509.RFC822Name("a@example.com"),
                x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                x509.RegisteredID(NameOID.COMMON_NAME),
                x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")])),
                x509.OtherName(NameOID.COMMON_NAME, b"\x0c\x01a"),
            ],
            ku=DS,
        ),
        _custom(sans=[x509.DNSName(CA.uri("web"))], ku=DS),
        _custom(sans=[URI(CA.uri("web"))], ku=None),
        _custom(sans=[URI(CA.uri("web"))], ku=DS, ca=None),
        _custom(sans=[URI(CA.uri("web"))], ku=DS | {"crl_sign": True}),
        _custom(sans=[URI(CA.uri("web"))], ku={"key_encipherment": True}),
        _custom(sans=[URI(CA.uri("web"))], ku=DS, ca=True, path_length=3),
        _custom(
            sans=[URI(CA.uri("web"))],
            ku={"key_agreement": True, "encipher_only": True, "digital_signature": True},
        ),
        _custom(
            sans=[URI(CA.uri("web"))],
            ku={"key_agreement": True, "decipher_only": True, "key_cert_sign": True},
        ),
        _custom(
            sans=[URI(CA.uri("web"))],
            ku=DS,
            aki=x509.AuthorityKeyIdentifier(
                b"\x01" * 20, [x509.DNSName("issuer.example")], 1234567890123456789
            ),
            ski=False,
            serial=(1 << 158) | 77,
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "with a subject")]),
        ),
        _custom(
            sans=[URI(CA.uri("web"))],
            ku=DS,
            aki=x509.AuthorityKeyIdentifier(None, [x509.DNSName("issuer.example")], 5),
            serial=1,
        ),
    ]


REAL = _real_certificates()
REAL_DER = [c.public_bytes(Encoding.DER) for c in REAL]


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension | None:
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None


def _ku_bits(ku: x509.KeyUsage) -> frozenset[str]:
    names = set()
    for name in der.KEY_USAGE_BITS:
        if name in ("encipher_only", "decipher_only") and not ku.key_agreement:
            continue  # cryptography refuses to say unless key_agreement is set
        if getattr(ku, name):
            names.add(name)
    return frozenset(names)


@pytest.mark.parametrize("index", range(len(REAL)))
def test_every_field_equals_what_cryptography_reads(index):
    cert, raw = REAL[index], REAL_DER[index]
    got = der.certificate(raw)
    assert got.serial == cert.serial_number
    assert got.not_before == cert.not_valid_before_utc
    assert got.not_after == cert.not_valid_after_utc
    assert {oid: e.critical for oid, e in got.extensions.items()} == {
        e.oid.dotted_string: e.critical for e in cert.extensions
    }
    exts = got.extensions
    bc = _ext(cert, x509.BasicConstraints)
    assert (bc is None) == (der.OID_BASIC_CONSTRAINTS not in exts)
    if bc is not None:
        assert der.basic_constraints_ca(exts[der.OID_BASIC_CONSTRAINTS].value) == bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert (ku is None) == (der.OID_KEY_USAGE not in exts)
    if ku is not None:
        bits = der.key_usage(exts[der.OID_KEY_USAGE].value)
        if not ku.value.key_agreement:
            bits -= {"encipher_only", "decipher_only"}
        assert bits == _ku_bits(ku.value)
    san = _ext(cert, x509.SubjectAlternativeName)
    assert (san is None) == (der.OID_SUBJECT_ALT_NAME not in exts)
    if san is not None:
        names = der.subject_alt_names(exts[der.OID_SUBJECT_ALT_NAME].value)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        assert names.uris == tuple(uris)
        assert names.others == len(san.value) - len(uris)
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    assert (aki is None) == (der.OID_AUTHORITY_KEY_IDENTIFIER not in exts)
    if aki is not None:
        got_aki = der.authority_key_id(exts[der.OID_AUTHORITY_KEY_IDENTIFIER].value)
        assert got_aki == aki.value.key_identifier
    ski = _ext(cert, x509.SubjectKeyIdentifier)
    assert (ski is None) == (der.OID_SUBJECT_KEY_IDENTIFIER not in exts)
    if ski is not None:
        assert der.subject_key_id(exts[der.OID_SUBJECT_KEY_IDENTIFIER].value) == ski.value.digest
    # And the PEM round trip the follower relies on.
    assert der.pem(raw) == px.cert_pem(cert)
    assert der.pem_certificates(px.cert_pem(cert)) == [raw]


def test_the_samples_cover_both_time_forms_and_every_verdict():
    assert any(c.not_valid_after_utc.year >= 2050 for c in REAL)  # GeneralizedTime
    assert any(c.not_valid_after_utc.year < 2050 for c in REAL)  # UTCTime
    reasons = {_verdict_by_cryptography(c) for c in REAL}
    assert {
        "the peer presented a CA certificate, not a leaf",
        "the peer's certificate has no key usage",
        "the peer's certificate has a CA's key usage",
        "the peer's certificate has 2 URI SANs, not exactly 1",
        "the peer's certificate has 0 URI SANs, not exactly 1",
    } <= reasons
    assert any(str(r).startswith("the peer's URI SAN is not a service identity") for r in reasons)
    assert any(isinstance(r, spiffe.ServiceID) for r in reasons)


def _verdict_by_cryptography(cert: x509.Certificate) -> spiffe.ServiceID | str:
    try:
        return px.leaf_identity(cert)
    except px.PeerRejected as e:
        return str(e)


def _verdict_by_der(raw: bytes) -> spiffe.ServiceID | str:
    try:
        return profile.der_leaf(raw).identity
    except px.PeerRejected as e:
        return str(e)


@pytest.mark.parametrize("index", range(len(REAL)))
def test_the_sidecar_and_cryptography_judge_a_leaf_alike(index):
    cert, raw = REAL[index], REAL_DER[index]
    expected = _verdict_by_cryptography(cert)
    assert _verdict_by_der(raw) == expected
    verdict = tls.PeerCache().verdict(raw)
    if isinstance(expected, str):
        assert (verdict.identity, verdict.reason) == (None, expected)
    else:
        assert verdict.identity == expected
        aki = _ext(cert, x509.AuthorityKeyIdentifier)
        want = (aki.value.key_identifier or b"").hex() if aki is not None else ""
        assert verdict.issuer_key_id == want


def test_the_follower_reads_a_signed_leaf_and_the_roots_as_before():
    web = CA.leaf("web")
    leaf = leaf_from_json({"CertPEM": web.cert_pem + px.cert_pem(CA.root)})
    assert leaf.cert_pem == web.cert_pem
    assert leaf.chain_pem == (px.cert_pem(CA.root),)
    assert leaf.not_before == web.cert.not_valid_before_utc.timestamp()
    assert leaf.not_after == web.cert.not_valid_after_utc.timestamp()
    assert leaf.serial == px.serial_hex(web.cert.serial_number)
    aki = web.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf.issuer_key_id == aki.value.key_identifier.hex()
    roots = roots_from_json(CA.roots_json(OTHER), 7)
    assert roots.key_ids == {px.key_id(c.public_key()).hex() for c in (CA.root, OTHER.root)}
    assert roots.pems == (CA.root_pem, OTHER.root_pem)
    with pytest.raises(der.DERError):
        leaf_from_json({"CertPEM": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"})
    with pytest.raises(der.DERError, match="no PEM CERTIFICATE"):
        roots_from_json({"TrustDomain": "td", "Roots": [{"RootCert": "garbage"}]}, 1)


# -- malformed input -------------------------------------------------------------------------

WEB_DER = REAL_DER[4]


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + body


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "truncated"),
        (b"\x30\x80" + WEB_DER[4:] + b"\x00\x00", "indefinite length"),
        (b"\x30\x81\x05" + b"\x02\x01\x01" * 2, "shortest form"),
        (b"\x30\x82\x00\x05" + b"\x00" * 5, "shortest form"),
        (WEB_DER + b"\x00", "trailing bytes"),
        (WEB_DER[:-1], "runs past"),
        (b"\x1f\x01\x00", "multi-byte tags"),
        (b"\x30\x85\x01\x00\x00\x00\x00", "length of 5 octets"),
        (b"\x31\x00", "expected 0x30"),
    ],
)
def test_malformed_certificates_are_refused_with_a_reason(data, words):
    with pytest.raises(der.DERError, match=words):
        der.certificate(data)


@pytest.mark.parametrize(
    ("decoder", "value", "words"),
    [
        (der.basic_constraints_ca, _tlv(0x30, b"\x01\x01\x00"), "FALSE is the default"),
        (der.basic_constraints_ca, _tlv(0x30, b"\x01\x01\x01"), "boolean is one octet"),
        (der.basic_constraints_ca, _tlv(0x30, b"\x01\x01\xff\x02\x01\xff"), "negative"),
        (der.basic_constraints_ca, _tlv(0x30, b"\x01\x01\xff\x02\x02\x00\x01"), "shortest"),
        (der.key_usage, _tlv(0x03, b"\x08\x80"), "malformed bit string"),
        (der.key_usage, _tlv(0x03, b"\x01"), "malformed bit string"),
        (der.key_usage, _tlv(0x03, b"\x07\x81"), "unused bits"),
        (der.subject_alt_names, _tlv(0x30, _tlv(0xA6, b"")), "not a GeneralName"),
        (der.subject_alt_names, _tlv(0x30, _tlv(0x86, "é".encode())), "IA5String"),
        (der.authority_key_id, _tlv(0x30, _tlv(0x04, b"x")), "trailing bytes"),
        (der.subject_key_id, _tlv(0x04, b"x") + b"\x00", "trailing bytes"),
        (der.subject_key_id, _tlv(0x03, b"\x00"), "expected 0x04"),
    ],
)
def test_malformed_extension_values_are_refused_with_a_reason(decoder, value, words):
    with pytest.raises(der.DERError, match=words):
        decoder(value)


def _children(data: bytes, start: int, stop: int) -> list[tuple[int, bytes]]:
    """The elements inside ``data[start:stop]``: (tag, whole encoding)."""
    r = der._Reader(data, start, stop)
    out = []
    while not r.done():
        begin = r.pos
        tag, _, end = r.element("child")
        out.append((tag, data[begin:end]))
    return out


def _with_extensions(*extensions: bytes) -> bytes:
    """``WEB_DER`` with its extensions replaced (the signature no longer matches: the reader
    does not check it)."""
    ((_, cert),) = _children(WEB_DER, 0, len(WEB_DER))
    (_, tbs), *rest = _children(cert, 2 + (cert[1] & 0x7F if cert[1] & 0x80 else 0), len(cert))
    fields = _children(tbs, 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0), len(tbs))
    body = b"".join(raw for tag, raw in fields if tag != 0xA3)
    body += _tlv(0xA3, _tlv(0x30, b"".join(extensions)))
    return _tlv(0x30, _tlv(0x30, body) + b"".join(raw for _, raw in rest))


def _extension(oid: bytes, value: bytes, critical: bytes = b"") -> bytes:
    return _tlv(0x30, _tlv(0x06, oid) + critical + _tlv(0x04, value))


SKI_OID = b"\x55\x1d\x0e"


def test_duplicate_extensions_and_an_encoded_default_are_refused():
    ski = _extension(SKI_OID, _tlv(0x04, b"k"))
    assert der.certificate(_with_extensions(ski)).extensions["2.5.29.14"] == der.Extension(
        False, _tlv(0x04, b"k")
    )
    with pytest.raises(der.DERError, match="appears twice"):
        der.certificate(_with_extensions(ski, ski))
    with pytest.raises(der.DERError, match="FALSE is the default"):
        der.certificate(_with_extensions(_extension(SKI_OID, b"", b"\x01\x01\x00")))
    with pytest.raises(der.DERError, match="shortest form"):
        der.certificate(_with_extensions(_extension(b"\x55\x80\x1d", b"")))
    with pytest.raises(der.DERError, match="larger than 64 bits"):
        der.certificate(_with_extensions(_extension(b"\x55" + b"\xff" * 10 + b"\x01", b"")))


@pytest.mark.parametrize(
    ("tag", "text", "when"),
    [
        (0x17, b"491231235959Z", dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),
        (0x17, b"500101000000Z", dt.datetime(1950, 1, 1, tzinfo=dt.UTC)),
        (0x18, b"20500101000000Z", dt.datetime(2050, 1, 1, tzinfo=dt.UTC)),
        (0x17, b"491231235959+0100", None),
        (0x17, b"4912312359Z", None),
        (0x18, b"20500101000000.5Z", None),
        (0x17, b"491331235959Z", None),
        (0x17, b"4912312359 9Z", None),
        (0x17, "४९1231235959Z".encode()[:13], None),
    ],
)
def test_times_take_rfc_5280s_two_forms_only(tag, text, when):
    if when is None:
        with pytest.raises(der.DERError):
            der._time(tag, text, "t")
    else:
        assert der._time(tag, text, "t") == when


def _exercise(raw: bytes) -> None:
    """Everything the sidecar does with a peer's bytes: only DERError may escape."""
    try:
        cert = der.certificate(raw)
    except der.DERError:
        return
    decoders = {
        der.OID_BASIC_CONSTRAINTS: der.basic_constraints_ca,
        der.OID_KEY_USAGE: der.key_usage,
        der.OID_SUBJECT_ALT_NAME: der.subject_alt_names,
        der.OID_AUTHORITY_KEY_IDENTIFIER: der.authority_key_id,
        der.OID_SUBJECT_KEY_IDENTIFIER: der.subject_key_id,
    }
    for oid, decode in decoders.items():
        ext = cert.extensions.get(oid)
        for value in (ext.value if ext else b"", raw):
            try:
                decode(value)
            except der.DERError:
                pass
    try:
        profile.der_leaf(raw)
    except (der.DERError, profile.PeerRejected):
        pass


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_nothing_but_der_error(data):
    _exercise(data)
    _exercise(b"\x30" + data)
    _exercise(b"\x30\x82" + data)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(REAL_DER)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0x82, 0x84, 0xFF]))
        elif kind == "cut":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
    return bytes(raw)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_mutated_certificates_raise_nothing_but_der_error(data):
    _exercise(data)
    verdict = tls.PeerCache().verdict(data)
    assert (verdict.identity is None) == bool(verdict.reason)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300), st.sampled_from([px.cert_pem(c) for c in REAL[:3]]))
def test_pem_text_raises_nothing_but_der_error(noise, pem):
    for text in (noise, pem[: len(noise)] + noise, pem.replace("M", noise[:1] or "M", 1)):
        try:
            der.pem_certificates(text)
        except der.DERError:
            pass
