"""Keys and JWTs made in a test (``tests/test_acl_login.py``, the openapi walk, the ACL
matrix): signed with ``cryptography`` the way an identity provider would."""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign(key, claims: dict, alg: str | None = None, kid: str | None = None) -> str:
    """A compact JWS of ``claims``: RS256 for an RSA key, ES256 for P-256, else EdDSA."""
    if alg is None:
        if isinstance(key, rsa.RSAPrivateKey):
            alg = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            alg = "ES256"
        else:
            alg = "EdDSA"
    header = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signed = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    data = signed.encode()
    if alg == "RS256":
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = key.sign(data)
    return signed + "." + b64(sig)
