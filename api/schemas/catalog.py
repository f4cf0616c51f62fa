"""Catalog and agent registration bodies (``/v1/catalog/register``, ``/v1/agent/service/register``,
``/v1/agent/check/register``...).

They come in two spellings, the API form (``Name``, ``Port``, ``Connect``) and the config-file
form (``name``, ``port``, ``connect``); ``trellis.api.catalog.to_pascal`` rewrites the second
into the first before these schemas see it, so they validate one spelling.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from trellis.api.schemas import Strict
from trellis.api.store.base import CHECK_STATES, CRITICAL, PASSING, WARNING
from trellis.proxy.durations import DurationError, parse_duration

_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Size limits of a registration, each refused with a 400 that names it. Meta: Consul's own
# (metaMaxKeyPairs, metaKeyMaxLength, metaValueMaxLength). Tags and checks: Consul bounds them
# only by the body size, so a service with 50,000 tags went into the store, and into every
# catalog read and DNS answer built from it. Trellis's bounds leave room for tag-driven
# routers (dozens of tags) and are documented in the README.
MAX_META_KEYS, MAX_META_KEY_LENGTH, MAX_META_VALUE_LENGTH = 64, 128, 512
MAX_TAGS, MAX_TAG_LENGTH = 128, 256
#: Checks of one service (``Check`` and ``Checks``), or of one catalog registration.
MAX_CHECKS = 32


def _check_meta(meta: Mapping[str, Any], what: str) -> None:
    if len(meta) > MAX_META_KEYS:
        raise ValidationError(f"may hold at most {MAX_META_KEYS} keys, not {len(meta)}", what)
    for k, v in meta.items():
        if not _META_KEY.fullmatch(k):
            raise ValidationError(
                f"key {k[: MAX_META_KEY_LENGTH + 1]!r} must be 1-{MAX_META_KEY_LENGTH}"
                " letters, digits, '-' or '_'",
                what,
            )
        if not isinstance(v, str) or len(v) > MAX_META_VALUE_LENGTH:
            raise ValidationError(
                f"value of {k!r} must be a string of at most {MAX_META_VALUE_LENGTH} characters",
                what,
            )


def _check_count(data: dict, what: str) -> None:
    """At most MAX_CHECKS checks in ``Check`` and ``Checks`` together."""
    n = len(data.get("Checks") or []) + (1 if data.get("Check") else 0)
    if n > MAX_CHECKS:
        raise ValidationError(f"{what} may have at most {MAX_CHECKS} checks, not {n}", "Checks")


def _at_most_tags(tags: list[str] | None) -> None:
    if tags is not None and len(tags) > MAX_TAGS:
        raise ValidationError(f"a service may have at most {MAX_TAGS} tags, not {len(tags)}")


class WeightsSchema(Strict):
    Passing = fields.Integer(strict=True, load_default=1, validate=validate.Range(min=1, max=65535))
    Warning = fields.Integer(strict=True, load_default=1, validate=validate.Range(min=0, max=65535))


class TaggedAddressSchema(Strict):
    Address = fields.String(required=True)
    Port = fields.Integer(strict=True, load_default=0, validate=validate.Range(min=0, max=65535))


class CheckSchema(Strict):
    CheckID = fields.String()
    ID = fields.String()
    Name = fields.String()
    Notes = fields.String()
    Status = fields.String(validate=validate.OneOf(CHECK_STATES))
    ServiceID = fields.String()
    Output = fields.String()
    TTL = fields.String()
    HTTP = fields.String()
    Method = fields.String()
    Header = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))
    Body = fields.String()
    TCP = fields.String()
    Interval = fields.String()
    Timeout = fields.String()
    TLSSkipVerify = fields.Boolean()
    TLSServerName = fields.String()
    DeregisterCriticalServiceAfter = fields.String()
    SuccessBeforePassing = fields.Integer(strict=True, validate=validate.Range(min=0))
    FailuresBeforeCritical = fields.Integer(strict=True, validate=validate.Range(min=0))
    AliasService = fields.String()
    AliasNode = fields.String()
    Type = fields.String()
    Definition = fields.Dict()
    Namespace = fields.String()

    @validates_schema
    def _durations(self, data: dict, **kw: Any) -> None:
        for k in ("TTL", "Interval", "Timeout", "DeregisterCriticalServiceAfter"):
            if k in data and data[k] != "":
                try:
                    parse_duration(data[k])
                except DurationError as e:
                    raise ValidationError(str(e), k) from None
        kinds = [k for k in ("TTL", "HTTP", "TCP", "AliasService") if data.get(k)]
        if len(kinds) > 1:
            raise ValidationError(f"a check has one type; got {', '.join(kinds)}")
        if (data.get("HTTP") or data.get("TCP")) and not data.get("Interval"):
            raise ValidationError("HTTP and TCP checks need an Interval")
        if data.get("HTTP") and not re.match(r"^https?://", data["HTTP"]):
            raise ValidationError("HTTP must be an http:// or https:// URL", "HTTP")


class UpstreamSchema(Strict):
    DestinationType = fields.String(validate=validate.OneOf(["service", "prepared_query"]))
    DestinationName = fields.String(required=True)
    DestinationNamespace = fields.String()
    DestinationPartition = fields.String()
    DestinationPeer = fields.String()
    Datacenter = fields.String()
    LocalBindAddress = fields.String()
    LocalBindPort = fields.Integer(strict=True, validate=validate.Range(min=0, max=65535))
    LocalBindSocketPath = fields.String()
    LocalBindSocketMode = fields.String()
    Config = fields.Dict()
    MeshGateway = fields.Dict()
    CentrallyConfigured = fields.Boolean()


class ProxySchema(Strict):
    """``Proxy`` of a connect-proxy service (1.3+), also the 1.2 managed ``Connect.Proxy``."""

    DestinationServiceName = fields.String()
    DestinationServiceID = fields.String()
    LocalServiceAddress = fields.String()
    LocalServicePort = fields.Integer(strict=True, validate=validate.Range(min=0, max=65535))
    LocalServiceSocketPath = fields.String()
    Mode = fields.String()
    Config = fields.Dict()
    Upstreams = fields.List(fields.Nested(UpstreamSchema))
    MeshGateway = fields.Dict()
    Expose = fields.Dict()
    TransparentProxy = fields.Dict()
    # The 1.2 managed proxy's fields.
    ExecMode = fields.String()
    Command = fields.List(fields.String())


class ServiceSchema(Strict):
    ID = fields.String()
    Name = fields.String()
    Service = fields.String()  # catalog/register's spelling of Name
    Tags = fields.List(
        fields.String(validate=validate.Length(max=MAX_TAG_LENGTH)),
        allow_none=True,
        validate=_at_most_tags,
    )
    Address = fields.String()
    TaggedAddresses = fields.Dict(keys=fields.String(), values=fields.Nested(TaggedAddressSchema))
    Meta = fields.Dict(keys=fields.String(), values=fields.Raw(), allow_none=True)
    Port = fields.Integer(strict=True, validate=validate.Range(min=0, max=65535))
    Kind = fields.String(
        validate=validate.OneOf(
            ["", "connect-proxy", "mesh-gateway", "terminating-gateway", "ingress-gateway"]
        )
    )
    Proxy = fields.Nested(ProxySchema, allow_none=True)
    Connect = fields.Nested(lambda: ConnectSchema(), allow_none=True)
    Check = fields.Nested(CheckSchema, allow_none=True)
    Checks = fields.List(fields.Nested(CheckSchema), allow_none=True)
    EnableTagOverride = fields.Boolean()
    Weights = fields.Nested(WeightsSchema, allow_none=True)
    Namespace = fields.String()
    Partition = fields.String()
    Locality = fields.Dict()
    SocketPath = fields.String()
    CreateIndex = fields.Integer(strict=True)
    ModifyIndex = fields.Integer(strict=True)

    @validates_schema
    def _meta(self, data: dict, **kw: Any) -> None:
        _check_meta(data.get("Meta") or {}, "Meta")
        _check_count(data, "a service")


class ConnectSchema(Strict):
    Native = fields.Boolean()
    Proxy = fields.Nested(ProxySchema, allow_none=True)
    SidecarService = fields.Nested(ServiceSchema, allow_none=True)


class CatalogRegisterSchema(Strict):
    ID = fields.String()
    Node = fields.String(required=True)
    Address = fields.String(required=True)
    Datacenter = fields.String()
    TaggedAddresses = fields.Dict(keys=fields.String(), values=fields.String())
    NodeMeta = fields.Dict(keys=fields.String(), values=fields.Raw(), allow_none=True)
    Service = fields.Nested(ServiceSchema, allow_none=True)
    Check = fields.Nested(CheckSchema, allow_none=True)
    Checks = fields.List(fields.Nested(CheckSchema), allow_none=True)
    SkipNodeUpdate = fields.Boolean()
    Namespace = fields.String()
    Partition = fields.String()

    @validates_schema
    def _meta(self, data: dict, **kw: Any) -> None:
        _check_meta(data.get("NodeMeta") or {}, "NodeMeta")
        _check_count(data, "a registration")


class CatalogDeregisterSchema(Strict):
    """``PUT /v1/catalog/deregister``: the node, or one of its services or checks."""

    Node = fields.String(
        required=True,
        validate=validate.Length(min=1, error="Missing data for required field."),
    )
    ServiceID = fields.String()
    CheckID = fields.String()
    Datacenter = fields.String()
    Namespace = fields.String()
    Partition = fields.String()


class CheckUpdateSchema(Strict):
    """``PUT /v1/agent/check/update/<id>``; an empty body (or null) means passing, as in Consul."""

    Status = fields.String(
        load_default=PASSING,
        validate=validate.OneOf(
            (PASSING, WARNING, CRITICAL), error="must be passing, warning or critical"
        ),
    )
    Output = fields.String(allow_none=True, load_default=None)
