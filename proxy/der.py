"""A small, strict DER reader for the few certificate fields the data plane needs.

Pure and standard-library only, so that a long-running sidecar never imports ``cryptography``
(its Rust extension and x509 modules cost some 9 MB of a sidecar's RSS, measured, issue 10).
The control plane and the tests keep using ``cryptography`` (``trellis.proxy.x509``).

Theory of operation
-------------------
A certificate is a tree of TLV (tag, length, value) elements. ``_Reader`` walks one level of
that tree inside ``[pos, end)`` of the original bytes, never copying, and checks every length
against the end of its enclosing element before anything is read: a length that runs past its
parent, an indefinite length (BER, not DER), a non-minimal length or integer, trailing bytes,
a tag we do not expect: all raise ``DERError``, and nothing else escapes (a hypothesis test
feeds random and mutated certificates). ``certificate`` reads the TBSCertificate far enough to
return the serial, the validity and the extensions (OID -> critical flag and raw value), and
skips the rest without interpreting it; the decoders below read the extension values the
proxy uses.

What this module does *not* do: verify anything. OpenSSL has verified the chain of every
peer certificate handed to it (``trellis.proxy.tls``), and the follower reads only what the
control plane issued; the leaf-profile rules live in ``trellis.proxy.profile``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

# Universal tags (all DER elements here use the one-byte tag form).
_BOOLEAN = 0x01
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_SEQUENCE = 0x30

OID_SUBJECT_KEY_IDENTIFIER = "2.5.29.14"
OID_KEY_USAGE = "2.5.29.15"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_AUTHORITY_KEY_IDENTIFIER = "2.5.29.35"

#: KeyUsage bits (RFC 5280 4.2.1.3), named as ``cryptography.x509.KeyUsage`` names them.
KEY_USAGE_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)

#: Lengths take at most this many octets: 4 GiB is more than any certificate.
_MAX_LENGTH_OCTETS = 4


class DERError(ValueError):
    """The bytes are not a DER certificate (or extension) this module can read. Whoever sent
    the bytes is at fault: a peer, or the control plane's answer."""


@dataclass(frozen=True)
class Extension:
    critical: bool
    value: bytes


@dataclass(frozen=True)
class Certificate:
    """The fields of a certificate the data plane reads; times are UTC."""

    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    extensions: Mapping[str, Extension]


class _Reader:
    """The elements of ``data[pos:end]``, one after another."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def done(self) -> bool:
        return self.pos >= self.end

    def peek_tag(self) -> int | None:
        return self.data[self.pos] if self.pos < self.end else None

    def element(self, what: str) -> tuple[int, int, int]:
        """The next element: ``(tag, start, stop)`` of its contents."""
        data, pos, end = self.data, self.pos, self.end
        if pos + 2 > end:
            raise DERError(f"{what}: truncated")
        tag = data[pos]
        if tag & 0x1F == 0x1F:
            raise DERError(f"{what}: multi-byte tags are not used in certificates")
        first = data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise DERError(f"{what}: indefinite length (BER, not DER)")
        else:
            n = first & 0x7F
            if n > _MAX_LENGTH_OCTETS:
                raise DERError(f"{what}: length of {n} octets")
            if pos + n > end:
                raise DERError(f"{what}: truncated length")
            length = int.from_bytes(data[pos : pos + n], "big")
            if data[pos] == 0 or length < 0x80:
                raise DERError(f"{what}: length not in its shortest form")
            pos += n
        if pos + length > end:
            raise DERError(f"{what}: length runs past its container")
        self.pos = pos + length
        return tag, pos, pos + length

    def expect(self, tag: int, what: str) -> tuple[int, int]:
        got, start, stop = self.element(what)
        if got != tag:
            raise DERError(f"{what}: tag 0x{got:02x}, expected 0x{tag:02x}")
        return start, stop

    def inner(self, tag: int, what: str) -> _Reader:
        start, stop = self.expect(tag, what)
        return _Reader(self.data, start, stop)

    def bytes_of(self, tag: int, what: str) -> bytes:
        start, stop = self.expect(tag, what)
        return self.data[start:stop]

    def finish(self, what: str) -> None:
        if self.pos != self.end:
            raise DERError(f"{what}: unexpected trailing bytes")


def _integer(raw: bytes, what: str) -> int:
    if not raw:
        raise DERError(f"{what}: empty integer")
    if len(raw) > 1 and ((raw[0] == 0 and raw[1] < 0x80) or (raw[0] == 0xFF and raw[1] >= 0x80)):
        raise DERError(f"{what}: integer not in its shortest form")
    return int.from_bytes(raw, "big", signed=True)


def _boolean(raw: bytes, what: str) -> bool:
    if raw == b"\xff":
        return True
    if raw == b"\x00":
        return False
    raise DERError(f"{what}: a DER boolean is one octet, 00 or ff")


#: Decoded OIDs, a handful in practice; bounded, since a peer chooses what it sends.
_OID_CACHE: dict[bytes, str] = {}
_OID_CACHE_SIZE = 64


def _oid(raw: bytes, what: str) -> str:
    hit = _OID_CACHE.get(raw)
    if hit is not None:
        return hit
    text = _decode_oid(raw, what)
    if len(_OID_CACHE) < _OID_CACHE_SIZE:
        _OID_CACHE[raw] = text
    return text


def _decode_oid(raw: bytes, what: str) -> str:
    if not raw:
        raise DERError(f"{what}: empty object identifier")
    arcs: list[int] = []
    value = 0
    fresh = True
    for b in raw:
        if fresh and b == 0x80:
            raise DERError(f"{what}: object identifier arc not in its shortest form")
        value = (value << 7) | (b & 0x7F)
        if value >> 64:
            raise DERError(f"{what}: object identifier arc larger than 64 bits")
        fresh = not b & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    if not fresh:
        raise DERError(f"{what}: truncated object identifier")
    first = arcs[0]
    head = [first // 40, first % 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _time(tag: int, raw: bytes, what: str) -> dt.datetime:
    # RFC 5280 4.1.2.5: UTCTime YYMMDDHHMMSSZ, GeneralizedTime YYYYMMDDHHMMSSZ; seconds always,
    # no fractions, always Zulu.
    if tag == _UTC_TIME and len(raw) == 13:
        yy = raw[:2]
        rest = raw[2:12]
    elif tag == _GENERALIZED_TIME and len(raw) == 15:
        yy = raw[:4]
        rest = raw[4:14]
    else:
        raise DERError(f"{what}: not a UTCTime or GeneralizedTime of RFC 5280's form")
    digits = yy + rest
    if raw[-1:] != b"Z" or not (digits.isascii() and digits.isdigit()):
        raise DERError(f"{what}: not a UTCTime or GeneralizedTime of RFC 5280's form")
    year = int(yy)
    if tag == _UTC_TIME:
        year += 1900 if year >= 50 else 2000
    month, day, hour, minute, second = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    try:
        return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    except ValueError:
        raise DERError(f"{what}: not a valid date and time") from None


def certificate(der: bytes) -> Certificate:
    """Read a DER certificate's serial, validity and extensions; DERError if malformed."""
    if not isinstance(der, bytes):
        raise DERError("a certificate is bytes")
    top = _Reader(der)
    cert = top.inner(_SEQUENCE, "certificate")
    top.finish("certificate")
    tbs = cert.inner(_SEQUENCE, "tbsCertificate")
    cert.expect(_SEQUENCE, "signatureAlgorithm")
    cert.expect(_BIT_STRING, "signatureValue")
    cert.finish("certificate")
    if tbs.peek_tag() == 0xA0:
        tbs.expect(0xA0, "version")
    serial = _integer(tbs.bytes_of(_INTEGER, "serialNumber"), "serialNumber")
    tbs.expect(_SEQUENCE, "signature")
    tbs.expect(_SEQUENCE, "issuer")
    validity = tbs.inner(_SEQUENCE, "validity")
    times = []
    for what in ("notBefore", "notAfter"):
        tag, start, stop = validity.element(what)
        times.append(_time(tag, der[start:stop], what))
    validity.finish("validity")
    tbs.expect(_SEQUENCE, "subject")
    tbs.expect(_SEQUENCE, "subjectPublicKeyInfo")
    for tag in (0x81, 0xA1, 0x82, 0xA2):  # issuerUniqueID, subjectUniqueID: skipped
        if tbs.peek_tag() == tag:
            tbs.element("uniqueID")
    extensions: dict[str, Extension] = {}
    if tbs.peek_tag() == 0xA3:
        wrapper = tbs.inner(0xA3, "extensions")
        seq = wrapper.inner(_SEQUENCE, "extensions")
        wrapper.finish("extensions")
        while not seq.done():
            ext = seq.inner(_SEQUENCE, "extension")
            oid = _oid(ext.bytes_of(_OID, "extnID"), "extnID")
            critical = False
            if ext.peek_tag() == _BOOLEAN:
                critical = _boolean(ext.bytes_of(_BOOLEAN, "critical"), "critical")
                if not critical:
                    raise DERError("critical: FALSE is the default and is not encoded in DER")
            value = ext.bytes_of(_OCTET_STRING, "extnValue")
            ext.finish("extension")
            if oid in extensions:
                raise DERError(f"extension {oid} appears twice")
            extensions[oid] = Extension(critical, value)
    tbs.finish("tbsCertificate")
    return Certificate(serial, times[0], times[1], extensions)


# -- extension values ------------------------------------------------------------------------


def basic_constraints_ca(value: bytes) -> bool:
    """BasicConstraints' cA flag."""
    top = _Reader(value)
    seq = top.inner(_SEQUENCE, "basicConstraints")
    top.finish("basicConstraints")
    ca = False
    if seq.peek_tag() == _BOOLEAN:
        ca = _boolean(seq.bytes_of(_BOOLEAN, "cA"), "cA")
        if not ca:
            raise DERError("cA: FALSE is the default and is not encoded in DER")
    if not seq.done():
        length = _integer(seq.bytes_of(_INTEGER, "pathLenConstraint"), "pathLenConstraint")
        if length < 0:
            raise DERError("pathLenConstraint: negative")
    seq.finish("basicConstraints")
    return ca


def key_usage(value: bytes) -> frozenset[str]:
    """The KeyUsage bits that are set, by name (``KEY_USAGE_BITS``)."""
    top = _Reader(value)
    raw = top.bytes_of(_BIT_STRING, "keyUsage")
    top.finish("keyUsage")
    if not raw or raw[0] > 7 or (len(raw) == 1 and raw[0] != 0):
        raise DERError("keyUsage: malformed bit string")
    unused, bits = raw[0], raw[1:]
    if bits and bits[-1] & ((1 << unused) - 1):
        raise DERError("keyUsage: unused bits are not zero")
    return frozenset(
        name
        for i, name in enumerate(KEY_USAGE_BITS)
        if i // 8 < len(bits) and bits[i // 8] & (0x80 >> (i % 8))
    )


#: GeneralName's choices (RFC 5280 4.2.1.6), implicitly tagged: [0], [3], [4], [5] are
#: constructed, the others primitive.
_GENERAL_NAME_TAGS = frozenset({0xA0, 0x81, 0x82, 0xA3, 0xA4, 0xA5, 0x86, 0x87, 0x88})


@dataclass(frozen=True)
class SubjectAltNames:
    uris: tuple[str, ...]
    #: How many names of other kinds (DNS names, e-mail and IP addresses, ...).
    others: int


def subject_alt_names(value: bytes) -> SubjectAltNames:
    """The URI names ([6] IA5String) of a SubjectAltName, and a count of the other names."""
    top = _Reader(value)
    seq = top.inner(_SEQUENCE, "subjectAltName")
    top.finish("subjectAltName")
    uris: list[str] = []
    others = 0
    while not seq.done():
        tag, start, stop = seq.element("GeneralName")
        if tag not in _GENERAL_NAME_TAGS:
            raise DERError(f"GeneralName: tag 0x{tag:02x} is not a GeneralName")
        if tag == 0x86:
            raw = value[start:stop]
            if not raw.isascii():
                raise DERError("uniformResourceIdentifier: not an IA5String")
            uris.append(raw.decode("ascii"))
        else:
            others += 1
    return SubjectAltNames(tuple(uris), others)


def authority_key_id(value: bytes) -> bytes | None:
    """AuthorityKeyIdentifier's keyIdentifier ([0]), None when it has none."""
    top = _Reader(value)
    seq = top.inner(_SEQUENCE, "authorityKeyIdentifier")
    top.finish("authorityKeyIdentifier")
    key_id = None
    if seq.peek_tag() == 0x80:
        key_id = seq.bytes_of(0x80, "keyIdentifier")
    if seq.peek_tag() == 0xA1:
        seq.element("authorityCertIssuer")
    if seq.peek_tag() == 0x82:
        seq.element("authorityCertSerialNumber")
    seq.finish("authorityKeyIdentifier")
    return key_id


def subject_key_id(value: bytes) -> bytes:
    """SubjectKeyIdentifier: an OCTET STRING."""
    top = _Reader(value)
    key_id = top.bytes_of(_OCTET_STRING, "subjectKeyIdentifier")
    top.finish("subjectKeyIdentifier")
    return key_id


# -- PEM and formatting ----------------------------------------------------------------------

_PEM_BLOCK = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----"
)


def pem_certificates(text: str) -> list[bytes]:
    """The DER bytes of every CERTIFICATE block of a PEM text, in order; DERError if there
    is none or one does not decode."""
    if not isinstance(text, str):
        raise DERError("PEM text is a string")
    out = []
    for m in _PEM_BLOCK.finditer(text):
        try:
            out.append(base64.b64decode("".join(m.group(1).split()), validate=True))
        except binascii.Error as e:
            raise DERError(f"a PEM certificate does not decode: {e}") from None
    if not out:
        raise DERError("no PEM CERTIFICATE block")
    return out


def pem(der: bytes) -> str:
    """A DER certificate as one PEM block (64 characters a line, as OpenSSL writes it)."""
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def colon_hex(data: bytes) -> str:
    """``ab:cd:...``: how Consul prints key IDs and serial numbers."""
    return ":".join(f"{b:02x}" for b in data)


def serial_hex(serial: int) -> str:
    return colon_hex(serial.to_bytes((serial.bit_length() + 7) // 8 or 1, "big"))
