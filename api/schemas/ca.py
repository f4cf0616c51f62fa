"""Connect CA bodies: the configuration (``PUT /v1/connect/ca/configuration``), a CSR to sign
(``POST /v1/connect/ca/sign``) and a rotation (``POST /v1/connect/ca/rotate``).

The configuration is loaded in two steps, because what ``Config`` may hold depends on the
provider and, for Vault, on what is stored already (a ``Token`` left out is kept): the request
schema checks the envelope (``Provider``, ``Config`` an object, ``ForceWithoutCrossSigning``),
then ``validate_config`` checks ``Config`` against the provider's schema and fills in the
defaults. Every value is checked for its type *and* its range here, before it reaches the
signing path: a rate of 5e-324 CSRs per second once passed, and every later CSR failed with an
overflow (a 500); ``{}`` as a key type was a 500 at once (an unhashable dict).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from trellis.api.schemas import FiniteNumber, Ignored, Strict, StrictBoolean, load
from trellis.proxy.durations import DurationError, format_duration, parse_duration

ALIASES = {"consul": "builtin"}
PROVIDERS = ("builtin", "vault")
KEY_BITS = {"ec": (256, 384, 521), "rsa": (2048, 3072, 4096)}
#: Leaf lifetimes Trellis signs (Consul's bounds).
MIN_LEAF_TTL, MAX_LEAF_TTL = 3600.0, 8760 * 3600.0
#: The lowest rate that is not "no limit": one CSR every 1000 s (the longest Retry-After).
MIN_RATE, MAX_RATE = 0.001, 1_000_000
MAX_CONCURRENT = 100_000
#: Consul's defaults of the durations, as its GET returns them.
DURATION_DEFAULTS = {"LeafCertTTL": "72h", "IntermediateCertTTL": "8760h", "RootCertTTL": "87600h"}


class Duration(fields.Field):
    """A Go duration (``72h``, ``1h30m``) or a number of seconds (``7200``, as before: the
    value went through ``str()``); loaded as seconds. Durations are at most 100 years."""

    json_types = frozenset({"string", "number"})
    default_error_messages = {
        "invalid": "must be a duration such as 72h",
        "null": "must be a duration such as 72h",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.make_error("invalid")
        try:
            return parse_duration(str(value))
        except DurationError as e:
            raise ValidationError(str(e)) from None


def _rate(value: float) -> None:
    if value != 0 and not MIN_RATE <= value <= MAX_RATE:
        raise ValidationError(f"must be 0 (no limit) or between {MIN_RATE} and {MAX_RATE:,}")


class CommonConfigSchema(Strict):
    """The options every provider takes, each with its default."""

    error_messages = {"type": "must be an object"}
    #: The shortest LeafCertTTL accepted: Consul's 1h, unless the server's
    #: ``connect.min_leaf_cert_ttl`` lowers it (``validate_config``'s ``min_leaf_ttl``).
    min_leaf_ttl = MIN_LEAF_TTL

    LeafCertTTL = Duration(load_default=72 * 3600.0)
    IntermediateCertTTL = Duration(load_default=8760 * 3600.0)
    RootCertTTL = Duration(load_default=87600 * 3600.0)
    PrivateKeyType = fields.String(
        load_default="ec",
        validate=validate.OneOf(tuple(KEY_BITS), error="must be ec or rsa"),
    )
    PrivateKeyBits = fields.Integer(strict=True, load_default=256)
    CSRMaxPerSecond = FiniteNumber(load_default=50, validate=_rate)
    CSRMaxConcurrent = fields.Integer(
        strict=True,
        load_default=0,
        validate=validate.Range(
            min=0, max=MAX_CONCURRENT, error=f"must be 0 (no limit) to {MAX_CONCURRENT:,}"
        ),
    )

    @validates_schema
    def _together(self, data: dict[str, Any], **kwargs: Any) -> None:
        errors: dict[str, str] = {}
        leaf = data["LeafCertTTL"]
        if not self.min_leaf_ttl <= leaf <= MAX_LEAF_TTL:
            lowest = format_duration(self.min_leaf_ttl) if self.min_leaf_ttl != 3600 else "1h"
            errors["LeafCertTTL"] = f"must be between {lowest} and 8760h (one year)"
        elif data["IntermediateCertTTL"] < 3 * leaf:
            errors["IntermediateCertTTL"] = "must be at least 3 x LeafCertTTL"
        if data["RootCertTTL"] < data["IntermediateCertTTL"]:
            errors["RootCertTTL"] = "must be at least IntermediateCertTTL"
        allowed = KEY_BITS[data["PrivateKeyType"]]
        if data["PrivateKeyBits"] not in allowed:
            errors["PrivateKeyBits"] = (
                f"must be one of {', '.join(map(str, allowed))} for {data['PrivateKeyType']}"
            )
        if errors:
            raise ValidationError(errors)

    @post_load(pass_original=True)
    def _as_written(self, data: dict[str, Any], original: Any, **kwargs: Any) -> dict[str, Any]:
        # Kept as the client wrote them (checked above as seconds): Consul stores the
        # configuration as given, and its clients compare what they read back with what they
        # wrote ("72h", not "72h0m0s"). A left-out one is Consul's default, spelt as Consul's.
        for name, default in DURATION_DEFAULTS.items():
            data[name] = original[name] if name in original else default
        return data


class BuiltinConfigSchema(CommonConfigSchema):
    """The built-in provider: bring your own root with ``PrivateKey`` and ``RootCert``."""

    error_messages = {"unknown": "is not a setting of the builtin provider"}

    PrivateKey = fields.String()
    RootCert = fields.String()


class VaultConfigSchema(CommonConfigSchema):
    """The Vault provider. The address and the mount paths are checked further by the
    provider itself (``trellis.api.ca.vault.parse_config``)."""

    error_messages = {"unknown": "is not a setting of the vault provider"}

    Address = fields.String(
        required=True,
        validate=validate.Length(min=1, error="is required for the vault provider"),
        error_messages={"required": "is required for the vault provider"},
    )
    Token = fields.String(
        required=True,
        validate=validate.Length(min=1, error="is required for the vault provider"),
        error_messages={"required": "is required for the vault provider"},
    )
    RootPKIPath = fields.String()
    IntermediatePKIPath = fields.String()
    CAFile = fields.String()
    CAPath = fields.String()
    CertFile = fields.String()
    KeyFile = fields.String()
    TLSServerName = fields.String()
    TLSSkipVerify = StrictBoolean()
    Namespace = fields.String()
    AuthMethod = fields.Dict(allow_none=True)


CONFIG_SCHEMAS: dict[str, type[CommonConfigSchema]] = {
    "builtin": BuiltinConfigSchema,
    "vault": VaultConfigSchema,
}


_FLOORED: dict[tuple[str, float], type[CommonConfigSchema]] = {}


def _schema(provider: str, min_leaf_ttl: float) -> type[CommonConfigSchema]:
    """The provider's schema with ``min_leaf_ttl`` as the LeafCertTTL floor (one class per
    floor, so that ``load`` keeps reusing one instance of it)."""
    base = CONFIG_SCHEMAS[provider]
    if min_leaf_ttl == base.min_leaf_ttl:
        return base
    key = (provider, min_leaf_ttl)
    if key not in _FLOORED:
        _FLOORED[key] = type(base.__name__, (base,), {"min_leaf_ttl": min_leaf_ttl})
    return _FLOORED[key]


def validate_config(
    provider: str,
    config: Mapping[str, Any],
    *,
    path: str = "Config",
    what: str = "",
    min_leaf_ttl: float = MIN_LEAF_TTL,
) -> dict[str, Any]:
    """``config`` checked for ``provider`` (``builtin`` or ``vault``), with the defaults filled
    in and the durations kept as written (``72h`` stays ``72h``). BadRequest (the client's fault,
    or the operator's for a config file: ``path`` and ``what`` say where) naming every bad
    field. ``min_leaf_ttl``: the server's floor for LeafCertTTL (1h unless configured)."""
    return load(_schema(provider, min_leaf_ttl), config, path=path, what=what)


class ProviderName(fields.String):
    """``builtin`` or ``vault``; ``consul`` is Consul's name for the built-in provider."""

    default_error_messages = {"invalid": "is required: builtin (alias consul) or vault"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        name: str = super()._deserialize(value, attr, data, **kwargs)
        name = ALIASES.get(name, name)
        if name not in PROVIDERS:
            raise ValidationError(
                f"must be builtin (alias consul) or vault, not {name!r}"
                if name
                else "is required: builtin (alias consul) or vault"
            )
        return name


class CAConfigurationSchema(Strict):
    """``PUT /v1/connect/ca/configuration``. Consul's Go client (api.CAConfig) sends back
    ``State`` (null), ``CreateIndex`` and ``ModifyIndex`` (zero): accepted and ignored."""

    provider = ProviderName(
        data_key="Provider",
        required=True,
        error_messages={"required": "is required: builtin (alias consul) or vault"},
    )
    # ``Config`` is checked by validate_config once the stored configuration is known. null is
    # no Config; any other non-object ([], "", 0) is an error, not "no Config".
    config = fields.Dict(
        data_key="Config",
        allow_none=True,
        load_default=None,
        error_messages={"invalid": "must be an object"},
    )
    force = StrictBoolean(data_key="ForceWithoutCrossSigning", load_default=False)
    State = Ignored()
    CreateIndex = Ignored()
    ModifyIndex = Ignored()

    @post_load(pass_original=True)
    def _no_config(self, data: dict[str, Any], original: Any, **kwargs: Any) -> dict[str, Any]:
        if data["config"] is None:
            data["config"] = {}
        # The provider's name as written (``consul``), which a read returns; ``provider`` is
        # the one Trellis runs (``builtin``).
        data["named"] = original["Provider"]
        return data


class SignSchema(Strict):
    """``POST /v1/connect/ca/sign``: a PEM CSR; the CA's policy judges its content."""

    CSR = fields.String(
        required=True,
        validate=validate.Length(min=1, error="is required (a PEM certificate request)"),
        error_messages={
            "required": "is required (a PEM certificate request)",
            "invalid": "is required (a PEM certificate request)",
            "null": "is required (a PEM certificate request)",
        },
    )


class RotateSchema(Strict):
    """``POST /v1/connect/ca/rotate`` (Trellis's): the body is optional."""

    force = StrictBoolean(data_key="ForceWithoutCrossSigning", load_default=False)
