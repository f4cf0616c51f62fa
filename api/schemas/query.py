"""The prepared query body (``POST /v1/query``, ``PUT /v1/query/{id}``).

Consul decodes this body with field names in any case (py-consul sends ``service``,
``onlypassing``, ``dns: {ttl}``): ``trellis.api.queries.parse_query`` folds the names, at
every level, to the ones below before loading. What depends on more than one field, on the
store (the session, a name in use) or on the caller's token is checked there or in the view.
"""

from __future__ import annotations

from marshmallow import fields, validate

from trellis.api.schemas import Ignored, Strict, StrictBoolean

#: At most this many tags, check IDs, datacenters or meta pairs in one query.
MAX_ITEMS = 64


def _text(max_len: int = 256) -> fields.String:
    return fields.String(validate=validate.Length(max=max_len))


def _strings() -> fields.List:
    return fields.List(_text(), allow_none=True, validate=validate.Length(max=MAX_ITEMS))


def _meta() -> fields.Dict:
    return fields.Dict(
        keys=_text(128),
        values=_text(512),
        allow_none=True,
        validate=validate.Length(max=MAX_ITEMS),
    )


class FailoverTargetSchema(Strict):
    Peer = _text()
    Datacenter = _text()
    Partition = _text()
    Namespace = _text()


class FailoverSchema(Strict):
    NearestN = fields.Integer(strict=True, validate=validate.Range(min=0, max=1 << 31))
    Datacenters = _strings()
    Targets = fields.List(
        fields.Nested(FailoverTargetSchema), allow_none=True, validate=validate.Length(max=64)
    )


class ConnectSchema(Strict):
    Enabled = StrictBoolean()


class QueryServiceSchema(Strict):
    Service = _text()
    Failover = fields.Nested(FailoverSchema, allow_none=True)
    IgnoreCheckIDs = _strings()
    OnlyPassing = StrictBoolean()
    Near = _text()
    Tags = _strings()
    NodeMeta = _meta()
    ServiceMeta = _meta()
    Connect = fields.Nested(ConnectSchema, allow_none=True)
    Peer = _text()
    SamenessGroup = _text()
    Namespace = _text()
    Partition = _text()


class QueryDNSSchema(Strict):
    TTL = _text(64)


class QueryTemplateSchema(Strict):
    Type = _text(64)
    Regexp = _text(1024)
    RemoveEmptyTags = StrictBoolean()


class PreparedQuerySchema(Strict):
    Name = _text()
    Session = _text(128)
    Token = _text(256)
    Service = fields.Nested(QueryServiceSchema, allow_none=True)
    DNS = fields.Nested(QueryDNSSchema, allow_none=True)
    Template = fields.Nested(QueryTemplateSchema, allow_none=True)
    # Read back from a query and sent again.
    ID = Ignored()
    CreateIndex = Ignored()
    ModifyIndex = Ignored()
