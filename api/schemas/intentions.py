"""Intention bodies (``/v1/connect/intentions*``) and the authorize body.

The loaded dicts use the domain's names (``source``, ``destination``, ``action``...), not the
wire's, so the views build an ``IntentionRecord`` from them directly.

Consul's Go client (``api.Intention``) sends every field, the read-only ones zero and ``Hash``
null (no omitempty): the read-only fields are accepted and ignored, so an intention read back
can be sent back; refusing ``Hash`` made every IntentionCreate/IntentionUpdate of that client a
400. Namespaces and partitions are accepted only as Consul OSS's one value.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, post_load, validate

from trellis.api.schemas import Ignored, Rejected, Strict
from trellis.proxy import authz

_NOT_SERVED = "must be 'default' (namespaces and partitions are not served)"


class IntentionName(fields.String):
    """A service name or ``*`` alone (``trellis.proxy.authz.check_name``)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        name: str = super()._deserialize(value, attr, data, **kwargs)
        try:
            return authz.check_name(name)
        except authz.IntentionError as e:
            raise ValidationError(str(e)) from None


class ServiceName(IntentionName):
    """A service name; ``*`` is refused (a connection is always to one service)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        name = super()._deserialize(value, attr, data, **kwargs)
        if name == authz.WILDCARD:
            raise ValidationError("must be a service name, not '*'")
        return name


def _meta(meta: dict[str, Any]) -> None:
    if len(meta) > 64:
        raise ValidationError("must be an object with at most 64 keys")
    for k, v in meta.items():
        if not isinstance(v, str) or len(k) > 128 or len(v) > 512 or not k:
            raise ValidationError("keys and values must be strings (keys 1-128, values <= 512)")


def _namespace() -> fields.String:
    return fields.String(validate=validate.OneOf(("", "default"), error=_NOT_SERVED))


class IntentionFieldsSchema(Strict):
    """What every intention body holds; the names come from the body or from the query."""

    # Checked before the unknown fields (by being a field at all): its own message is the
    # useful one.
    Permissions = Rejected("L7 Permissions are not supported; use Action allow or deny")
    action = fields.String(
        data_key="Action",
        required=True,
        validate=validate.OneOf((authz.ALLOW, authz.DENY), error="must be allow or deny"),
        error_messages={"required": "is required (allow or deny)", "null": "must be allow or deny"},
    )
    description = fields.String(
        data_key="Description",
        load_default="",
        validate=validate.Length(max=512, error="must be a string of at most 512 characters"),
    )
    # null is no Meta; any other non-object ([] or "" as much as [1]) is an error.
    meta = fields.Dict(
        data_key="Meta",
        allow_none=True,
        load_default=None,
        validate=_meta,
        error_messages={"invalid": "must be an object with at most 64 keys"},
    )
    SourceType = fields.String(
        validate=validate.OneOf(("consul", ""), error="must be consul"),
    )
    SourceNS = _namespace()
    DestinationNS = _namespace()
    SourcePartition = _namespace()
    DestinationPartition = _namespace()
    ID = Ignored()
    Precedence = Ignored()
    CreatedAt = Ignored()
    UpdatedAt = Ignored()
    CreateIndex = Ignored()
    ModifyIndex = Ignored()
    Hash = Ignored()

    @post_load
    def _no_meta(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if data["meta"] is None:
            data["meta"] = {}
        return data


class IntentionSchema(IntentionFieldsSchema):
    """``POST /v1/connect/intentions`` and ``PUT /v1/connect/intentions/<id>``."""

    source = IntentionName(data_key="SourceName", required=True)
    destination = IntentionName(data_key="DestinationName", required=True)


class IntentionExactSchema(IntentionFieldsSchema):
    """``PUT /v1/connect/intentions/exact?source=&destination=``: the names are the query's;
    ``SourceName`` and ``DestinationName`` in the body are ignored."""

    SourceName = Ignored()
    DestinationName = Ignored()


class AuthorizeSchema(Strict):
    """``POST /v1/agent/connect/authorize``."""

    target = ServiceName(data_key="Target", required=True)
    uri = fields.String(
        data_key="ClientCertURI",
        required=True,
        validate=validate.Length(min=1, error="is required"),
    )
    serial = fields.String(data_key="ClientCertSerial", load_default="")
    Namespace = Ignored()
    Partition = Ignored()
