"""The ``jwt`` auth method: check a signed JSON Web Token, map its claims, bind rights. Pure.

Theory of operation
-------------------
A workload that holds a JWT signed by an issuer the operator trusts trades it for a Trellis
token (``POST /v1/acl/login``). Three steps, each pure and each here:

1. ``JWTConfig.parse(config)`` checks an auth method's ``Config`` when it is written (the
   operator's fault if wrong: a 400), and loads the keys that may sign tokens:
   ``JWTValidationPubKeys`` (PEM) or a JWKS document (``JWKSFile``, a Trellis extension: the
   view reads the file and passes its text; ``JWKSURL`` is refused, since a server must not
   depend on the network to log anyone in). OIDC discovery is refused for the same reason.
2. ``JWTConfig.verify(token, keys, now)`` checks the signature against those keys (RS*, PS*,
   ES*, EdDSA; the header's ``alg`` must be one of ``JWTSupportedAlgs`` and fit the key, so
   ``none`` and an HMAC keyed with a public key are refused), then ``exp``/``nbf``/``iat``
   with their leeways, ``iss`` and ``aud``. Any failure is a ``LoginError``: the caller's
   token is at fault, and the message says which check failed but never repeats the token.
3. ``JWTConfig.map_claims(claims)`` turns the claims into the variables binding rules see:
   ``value.<name>`` for each ``ClaimMappings`` entry (a string) and ``list.<name>`` for each
   ``ListClaimMappings`` one (a list of strings). A claim is named by its key, or by a JSON
   pointer (``/a/b``) for a nested one. Selectors (Consul's bexpr, ``trellis.proxy.bexpr``)
   and ``BindName`` interpolation (``${value.name}``) read only these variables.

The cryptography is the ``cryptography`` package's; nothing here parses ASN.1 or compares
signatures by hand.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from trellis.proxy import bexpr
from trellis.proxy.durations import DurationError, parse_duration

#: Consul's default when ``JWTSupportedAlgs`` is empty.
DEFAULT_ALGS = ("RS256",)
ALGS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_CURVES = {"ES256": ("P-256", 32), "ES384": ("P-384", 48), "ES512": ("P-521", 66)}
_JWK_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
#: Consul's defaults for a leeway of 0; -1 turns the leeway off.
DEFAULT_EXP_LEEWAY = 150.0
DEFAULT_NBF_LEEWAY = 150.0
DEFAULT_CLOCK_SKEW = 60.0
MAX_TOKEN_BYTES = 16 * 1024
#: The variables a claim mapping may name (they end up in selectors and ``${...}``).
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_INTERP = re.compile(r"\$\{([^}]*)\}")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class AuthMethodError(ValueError):
    """An auth method's or a binding rule's configuration cannot be used: the writer's fault."""


class LoginError(ValueError):
    """A bearer token that does not log in: the caller's fault."""


# -- configuration -----------------------------------------------------------------------------

CONFIG_KEYS = frozenset(
    {
        "JWTValidationPubKeys",
        "JWKSFile",
        "JWKSURL",
        "JWKSCACert",
        "OIDCDiscoveryURL",
        "OIDCDiscoveryCACert",
        "BoundIssuer",
        "BoundAudiences",
        "ClaimMappings",
        "ListClaimMappings",
        "JWTSupportedAlgs",
        "ClockSkewLeeway",
        "ExpirationLeeway",
        "NotBeforeLeeway",
    }
)


@dataclass(frozen=True)
class JWTConfig:
    pem_keys: tuple[PublicKey, ...] = ()
    jwks_file: str = ""
    bound_issuer: str = ""
    bound_audiences: tuple[str, ...] = ()
    claim_mappings: Mapping[str, str] = field(default_factory=dict)
    list_claim_mappings: Mapping[str, str] = field(default_factory=dict)
    algs: tuple[str, ...] = DEFAULT_ALGS
    clock_skew: float = DEFAULT_CLOCK_SKEW
    exp_leeway: float = DEFAULT_EXP_LEEWAY
    nbf_leeway: float = DEFAULT_NBF_LEEWAY

    @classmethod
    def parse(cls, config: Any) -> JWTConfig:
        """Check a ``jwt`` method's ``Config``; AuthMethodError says what is wrong."""
        if not isinstance(config, Mapping):
            raise AuthMethodError("Config must be an object")
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            raise AuthMethodError(f"Config: unknown field {unknown[0]!r}")
        for remote in ("JWKSURL", "OIDCDiscoveryURL"):
            if config.get(remote):
                raise AuthMethodError(
                    f"Config.{remote} is not supported: Trellis does not fetch keys over the"
                    " network; give JWTValidationPubKeys (PEM) or JWKSFile (a JWKS document on"
                    " the servers' disk)"
                )
        pems = _strings(config.get("JWTValidationPubKeys"), "JWTValidationPubKeys")
        jwks_file = config.get("JWKSFile") or ""
        if not isinstance(jwks_file, str):
            raise AuthMethodError("Config.JWKSFile must be a path")
        if bool(pems) == bool(jwks_file):
            raise AuthMethodError("Config: give exactly one of JWTValidationPubKeys and JWKSFile")
        keys = tuple(_pem_key(p, i) for i, p in enumerate(pems))
        algs = tuple(_strings(config.get("JWTSupportedAlgs"), "JWTSupportedAlgs")) or DEFAULT_ALGS
        for a in algs:
            if a not in ALGS:
                raise AuthMethodError(
                    f"Config.JWTSupportedAlgs: {a!r} is not one of {', '.join(ALGS)}"
                )
        issuer = config.get("BoundIssuer") or ""
        if not isinstance(issuer, str):
            raise AuthMethodError("Config.BoundIssuer must be a string")
        claims = _mapping(config.get("ClaimMappings"), "ClaimMappings")
        lists = _mapping(config.get("ListClaimMappings"), "ListClaimMappings")
        return cls(
            pem_keys=keys,
            jwks_file=jwks_file,
            bound_issuer=issuer,
            bound_audiences=tuple(_strings(config.get("BoundAudiences"), "BoundAudiences")),
            claim_mappings=claims,
            list_claim_mappings=lists,
            algs=algs,
            clock_skew=_leeway(
                config.get("ClockSkewLeeway"), "ClockSkewLeeway", DEFAULT_CLOCK_SKEW
            ),
            exp_leeway=_leeway(
                config.get("ExpirationLeeway"), "ExpirationLeeway", DEFAULT_EXP_LEEWAY
            ),
            nbf_leeway=_leeway(
                config.get("NotBeforeLeeway"), "NotBeforeLeeway", DEFAULT_NBF_LEEWAY
            ),
        )

    def variables(self) -> tuple[set[str], set[str]]:
        """The names binding rules may use: ``value.*`` and ``list.*``."""
        return set(self.claim_mappings.values()), set(self.list_claim_mappings.values())

    # -- login -------------------------------------------------------------------------------

    def verify(self, token: Any, keys: Sequence[Any], now: float) -> dict[str, Any]:
        """The claims of ``token`` if it is signed by one of ``keys`` and valid at ``now``."""
        if not isinstance(token, str) or not token:
            raise LoginError("BearerToken must be a non-empty string")
        if len(token) > MAX_TOKEN_BYTES:
            raise LoginError("BearerToken is too long")
        parts = token.split(".")
        if len(parts) != 3:
            raise LoginError("BearerToken is not a signed JWT (three dot-separated parts)")
        header = _json_part(parts[0], "header")
        claims = _json_part(parts[1], "payload")
        signature = _b64(parts[2], "signature")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algs:
            raise LoginError(f"the token's signing algorithm {alg!r} is not accepted")
        signed = (parts[0] + "." + parts[1]).encode("ascii")
        kid = header.get("kid")
        if not any(_verifies(alg, k, signed, signature) for k in _candidates(keys, kid)):
            raise LoginError("the token's signature does not verify with any configured key")
        self._check_claims(claims, now)
        return claims

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> None:
        skew = self.clock_skew
        exp = _numeric(claims, "exp")
        if exp is not None and now > exp + skew + self.exp_leeway:
            raise LoginError("the token has expired")
        nbf = _numeric(claims, "nbf")
        if nbf is not None and now < nbf - skew - self.nbf_leeway:
            raise LoginError("the token is not valid yet (nbf)")
        iat = _numeric(claims, "iat")
        if iat is not None and now < iat - skew - self.nbf_leeway:
            raise LoginError("the token was issued in the future (iat)")
        if self.bound_issuer and claims.get("iss") != self.bound_issuer:
            raise LoginError("the token's issuer (iss) is not the bound issuer")
        if self.bound_audiences:
            aud = claims.get("aud")
            given = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not set(self.bound_audiences) & {a for a in given if isinstance(a, str)}:
                raise LoginError("the token's audience (aud) is not a bound audience")

    def map_claims(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """The variables of a login: ``{"value": {name: str}, "list": {name: [str]}}``. A
        mapped claim the token lacks is left out (a selector sees it as empty)."""
        values: dict[str, str] = {}
        for claim, name in self.claim_mappings.items():
            v = _claim(claims, claim)
            if v is None:
                continue
            if isinstance(v, (list, dict)):
                raise LoginError(f"claim {claim!r} is not a single value")
            values[name] = _scalar_text(v)
        lists: dict[str, list[str]] = {}
        for claim, name in self.list_claim_mappings.items():
            v = _claim(claims, claim)
            if v is None:
                continue
            items = v if isinstance(v, list) else [v]
            if any(isinstance(i, (list, dict)) for i in items):
                raise LoginError(f"claim {claim!r} is not a list of values")
            lists[name] = [_scalar_text(i) for i in items]
        return {"value": values, "list": lists}


def jwks_keys(text: str) -> tuple[tuple[str | None, PublicKey], ...]:
    """The public keys of a JWKS document, with their ``kid``; AuthMethodError if unusable."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise AuthMethodError("the JWKS file is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise AuthMethodError('the JWKS file has no "keys" list')
    out = []
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            raise AuthMethodError(f"JWKS key {i} is not an object")
        if jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        out.append((kid if isinstance(kid, str) else None, _jwk_key(jwk, i)))
    if not out:
        raise AuthMethodError("the JWKS file holds no signing key")
    return tuple(out)


# -- binding rules -------------------------------------------------------------------------------

SELECTOR_SHAPE = bexpr.struct(
    value=bexpr.MapOf(bexpr.STRING), list=bexpr.MapOf(bexpr.ListOf(bexpr.STRING))
)


def check_selector(
    text: str, variables: tuple[set[str], set[str]] | None = None
) -> bexpr.Filter | None:
    """A binding rule's ``Selector`` (empty: every login matches); AuthMethodError if bad.
    With ``variables`` (``JWTConfig.variables()``), a ``value.x`` or ``list.x`` the method does
    not map is refused too: it could never match, and is most likely a typo."""
    if not text.strip():
        return None
    try:
        f = bexpr.parse(text, SELECTOR_SHAPE)
    except bexpr.FilterError as e:
        raise AuthMethodError(f"Selector: {e}") from None
    if variables is not None:
        known = {"value": variables[0], "list": variables[1]}
        for m in _matches(f.ast):
            steps = m.steps
            if len(steps) >= 2 and steps[1][0] == "key":
                kind, name = steps[0][1], steps[1][1]
                if name not in known[kind]:
                    have = ", ".join(f"{kind}.{n}" for n in sorted(known[kind])) or "none"
                    raise AuthMethodError(
                        f"Selector: {kind}.{name} is not a variable of this auth method"
                        f" (known: {have})"
                    )
    return f


def _matches(node: bexpr.Node) -> list[bexpr.Match]:
    if isinstance(node, bexpr.Match):
        return [node]
    if isinstance(node, bexpr.Not):
        return _matches(node.operand)
    return [m for part in node.operands for m in _matches(part)]


def interpolate(bind_name: str, variables: Mapping[str, Any]) -> str:
    """``BindName`` with each ``${value.name}`` replaced; LoginError if a variable is unset
    (the rule cannot bind anything for this login)."""

    def sub(m: re.Match[str]) -> str:
        kind, _, name = m.group(1).strip().partition(".")
        v = variables.get(kind, {}).get(name) if kind == "value" else None
        if v is None:
            raise LoginError(f"BindName variable ${{{m.group(1)}}} has no value for this login")
        return str(v)

    return _INTERP.sub(sub, bind_name)


def check_bind_name(bind_name: str, value_names: set[str]) -> None:
    """Every ``${...}`` in ``bind_name`` names a ``value.*`` variable the method maps."""
    if not bind_name:
        raise AuthMethodError("BindName is required")
    if "${" in _INTERP.sub("", bind_name):
        raise AuthMethodError("BindName has an unclosed ${")
    for m in _INTERP.finditer(bind_name):
        kind, _, name = m.group(1).strip().partition(".")
        if kind != "value" or name not in value_names:
            known = ", ".join(f"value.{n}" for n in sorted(value_names)) or "none"
            raise AuthMethodError(
                f"BindName: ${{{m.group(1)}}} is not a variable of this auth method"
                f" (known: {known})"
            )


# -- helpers -------------------------------------------------------------------------------------


def _strings(v: Any, name: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise AuthMethodError(f"Config.{name} must be a list of non-empty strings")
    return list(v)


def _mapping(v: Any, name: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise AuthMethodError(f"Config.{name} must be an object")
    out = {}
    for claim, var in v.items():
        if not isinstance(claim, str) or not claim or not isinstance(var, str):
            raise AuthMethodError(f"Config.{name}: claim names and variables are strings")
        if not _VAR_NAME.match(var):
            raise AuthMethodError(
                f"Config.{name}: {var!r} must be letters, digits and '_' (a selector name)"
            )
        out[claim] = var
    return out


def _leeway(v: Any, name: str, default: float) -> float:
    if v is None or v == 0 or v == "":
        return default
    if isinstance(v, bool):
        raise AuthMethodError(f"Config.{name} must be a number of seconds or a duration")
    if isinstance(v, (int, float)):
        secs = float(v)
    elif isinstance(v, str):
        if v.strip() == "-1":
            return 0.0
        try:
            secs = parse_duration(v)
        except DurationError:
            raise AuthMethodError(f"Config.{name}: {v!r} is not a duration") from None
    else:
        raise AuthMethodError(f"Config.{name} must be a number of seconds or a duration")
    if secs == -1:
        return 0.0
    if secs < 0 or secs > 86400:
        raise AuthMethodError(f"Config.{name} must be -1 (off) or between 0 and 24h")
    return secs


def _pem_key(text: str, i: int) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(text.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise AuthMethodError(f"Config.JWTValidationPubKeys[{i}] is not a PEM public key") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise AuthMethodError(f"Config.JWTValidationPubKeys[{i}]: only RSA, EC and Ed25519 keys")
    return key


def _b64(part: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise LoginError(f"the token's {what} is not base64url") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_part(part: str, what: str) -> dict[str, Any]:
    try:
        # NaN and Infinity are not JSON; Python would read them, and an ``exp`` of NaN
        # compares false with every time, which would pass the expiry check.
        v = json.loads(_b64(part, what), parse_constant=_no_constant)
    except ValueError:
        raise LoginError(f"the token's {what} is not JSON") from None
    if not isinstance(v, dict):
        raise LoginError(f"the token's {what} is not a JSON object")
    return v


def _jwk_int(jwk: Mapping[str, Any], name: str, i: int) -> int:
    v = jwk.get(name)
    if not isinstance(v, str):
        raise AuthMethodError(f"JWKS key {i}: {name!r} is missing")
    try:
        return int.from_bytes(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)), "big")
    except (binascii.Error, ValueError):
        raise AuthMethodError(f"JWKS key {i}: {name!r} is not base64url") from None


def _jwk_key(jwk: Mapping[str, Any], i: int) -> PublicKey:
    kty = jwk.get("kty")
    try:
        if kty == "RSA":
            return rsa.RSAPublicNumbers(_jwk_int(jwk, "e", i), _jwk_int(jwk, "n", i)).public_key()
        if kty == "EC":
            curve = _JWK_CURVES.get(str(jwk.get("crv")))
            if curve is None:
                raise AuthMethodError(f"JWKS key {i}: curve {jwk.get('crv')!r} not supported")
            return ec.EllipticCurvePublicNumbers(
                _jwk_int(jwk, "x", i), _jwk_int(jwk, "y", i), curve()
            ).public_key()
        if kty == "OKP" and jwk.get("crv") == "Ed25519":
            x = _jwk_int(jwk, "x", i).to_bytes(32, "big")
            return ed25519.Ed25519PublicKey.from_public_bytes(x)
    except (ValueError, OverflowError):
        raise AuthMethodError(f"JWKS key {i} is not a valid public key") from None
    raise AuthMethodError(f"JWKS key {i}: key type {kty!r} not supported (RSA, EC, OKP Ed25519)")


def _candidates(keys: Sequence[Any], kid: Any) -> list[PublicKey]:
    """PEM keys are tried in turn; JWKS keys (``(kid, key)`` pairs) by ``kid`` when the token
    names one."""
    out: list[PublicKey] = []
    for k in keys:
        if isinstance(k, tuple):
            if kid is None or k[0] is None or k[0] == kid:
                out.append(k[1])
        else:
            out.append(k)
    return out


def _verifies(alg: str, key: PublicKey, signed: bytes, signature: bytes) -> bool:
    try:
        if alg.startswith("RS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), _HASHES[alg[2:]]())
            return True
        if alg.startswith("PS") and isinstance(key, rsa.RSAPublicKey):
            h = _HASHES[alg[2:]]()
            key.verify(signature, signed, padding.PSS(padding.MGF1(h), h.digest_size), h)
            return True
        if alg.startswith("ES") and isinstance(key, ec.EllipticCurvePublicKey):
            curve, size = _EC_CURVES[alg]
            if not isinstance(key.curve, _JWK_CURVES[curve]) or len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(_HASHES[alg[2:]]()))
            return True
        if alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signed)
            return True
    except InvalidSignature:
        return False
    return False


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise LoginError(f"the token's {name} claim is not a number")
    return float(v)


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    if not name.startswith("/"):
        return claims.get(name)
    cur: Any = claims
    for step in name[1:].split("/"):
        step = step.replace("~1", "/").replace("~0", "~")
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(step)
    return cur


def _scalar_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
