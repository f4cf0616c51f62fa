"""ACL policy and token bodies (``PUT /v1/acl/policy[/<id>]``, ``PUT /v1/acl/token[/<id>]``).

A body is the whole new state of the object. Consul's Go client sends the read-only fields
back (``CreateIndex``, ``ModifyIndex``, ``Hash``, ``CreateTime``, zero on create): they are
accepted and ignored. ``AccessorID``, ``SecretID`` and a policy's ``ID`` may be empty or null
(the Go client sends ""), meaning "none"; whether one may be given at all depends on create or
update, and is the view's rule. That a named policy exists is the store's, checked in the view.
"""

from __future__ import annotations

import uuid
from typing import Any

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from trellis.api.acl.rules import RulesError, parse_rules
from trellis.api.schemas import Ignored, Rejected, Strict, StrictBoolean


class OptionalUUID(fields.String):
    """A UUID, normalized (lower case, hyphens); "" and null are None. The message never
    repeats the value: for ``SecretID`` it is a secret, even a mistyped one."""

    default_error_messages = {"invalid": "must be a UUID"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_none=True, load_default=None, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str | None:
        if value == "":
            return None
        if not isinstance(value, str):
            raise self.make_error("invalid")
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise self.make_error("invalid") from None


class Rules(fields.String):
    """Consul's policy language, in HCL or JSON (``trellis.api.acl.rules``)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text: str = super()._deserialize(value, attr, data, **kwargs)
        try:
            parse_rules(text)
        except RulesError as e:
            raise ValidationError(str(e)) from None
        return text


class _ACLBody(Strict):
    """The read-only fields of a policy or a token, which clients send back: ignored."""

    CreateIndex = Ignored()
    ModifyIndex = Ignored()
    Hash = Ignored()
    CreateTime = Ignored()


class PolicySchema(_ACLBody):
    """A policy. ``ID``: refused on create, must match the path on update (the view's rule)."""

    ID = OptionalUUID()
    name = fields.String(
        data_key="Name",
        required=True,
        validate=validate.Regexp(
            r"^[A-Za-z0-9_-]{1,128}$", error="must be 1-128 letters, digits, '-' or '_'"
        ),
        error_messages={"required": "is required (1-128 letters, digits, '-' or '_')"},
    )
    description = fields.String(data_key="Description", load_default="")
    rules = Rules(data_key="Rules", load_default="")
    datacenters = fields.List(
        fields.String(), data_key="Datacenters", allow_none=True, load_default=None
    )

    @post_load
    def _tuples(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["datacenters"] = tuple(data["datacenters"] or ())
        return data


class PolicyLinkSchema(Schema):
    """A policy a token holds, by ``ID`` or by ``Name``. Other keys are ignored, as before
    (Consul's link has only these two)."""

    class Meta:
        unknown = EXCLUDE

    ID = OptionalUUID()
    Name = fields.String(allow_none=True, load_default=None)

    @validates_schema
    def _one(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.get("ID") and not data.get("Name"):
            raise ValidationError("needs an ID or a Name")


class TokenSchema(_ACLBody):
    """A token. ``AccessorID``/``SecretID``: made by the server unless given on create; on
    update the AccessorID must match the path and a SecretID is refused (the view's rules)."""

    AccessorID = OptionalUUID()
    SecretID = OptionalUUID()
    description = fields.String(
        data_key="Description",
        load_default="",
        validate=validate.Length(max=512, error="must be a string of at most 512 characters"),
    )
    policies = fields.List(
        fields.Nested(PolicyLinkSchema),
        data_key="Policies",
        allow_none=True,
        load_default=None,
    )
    local = StrictBoolean(data_key="Local", load_default=False)
    ExpirationTTL = Rejected("is not supported yet")

    @post_load
    def _no_policies(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["policies"] = list(data["policies"] or ())
        return data
