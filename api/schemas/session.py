"""The session create body (``PUT /v1/session/create``).

Consul decodes this body with field names in any case (python-consul sends ``name``,
``lockdelay``, ``ttl``, ``checks``): ``trellis.api.schemas.load`` folds the names to the ones
below, as for every body. What depends on more than one field or on units (the TTL's bounds,
the lock delay's number form) is checked in ``trellis.api.sessions.parse_create``.
"""

from __future__ import annotations

from typing import Any

from marshmallow import fields, validate

from trellis.api.schemas import Ignored, Strict


class Duration(fields.Field):
    """A duration as Consul's session takes it: a string ("15s") or a bare number."""

    json_types = frozenset({"string", "number"})
    default_error_messages = {"invalid": "must be a duration such as '15s'"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.make_error("invalid")
        return value


def _text() -> fields.String:
    return fields.String(validate=validate.Length(max=256))


def _ids() -> fields.List:
    return fields.List(
        fields.String(validate=validate.Length(min=1, max=256)),
        allow_none=True,
        validate=validate.Length(max=64),
    )


class ServiceCheckSchema(Strict):
    ID = fields.String(required=True, validate=validate.Length(min=1, max=256))
    Namespace = Ignored()


class SessionCreateSchema(Strict):
    Name = _text()
    Node = _text()
    LockDelay = Duration()
    Behavior = fields.String()
    TTL = fields.String(validate=validate.Length(max=64))
    Checks = _ids()
    NodeChecks = _ids()
    ServiceChecks = fields.List(
        fields.Nested(ServiceCheckSchema), allow_none=True, validate=validate.Length(max=64)
    )
    # Read back from a session and sent again, or Enterprise's (one value in OSS).
    ID = Ignored()
    CreateIndex = Ignored()
    ModifyIndex = Ignored()
    Namespace = Ignored()
    Partition = Ignored()
