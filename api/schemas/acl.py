"""ACL policy and token bodies (``PUT /v1/acl/policy[/<id>]``, ``PUT /v1/acl/token[/<id>]``).

A body is the whole new state of the object. Consul's Go client sends the read-only fields
back (``CreateIndex``, ``ModifyIndex``, ``Hash``, ``CreateTime``, zero on create): they are
accepted and ignored. ``AccessorID``, ``SecretID`` and a policy's ``ID`` may be empty or null
(the Go client sends ""), meaning "none"; whether one may be given at all depends on create or
update, and is the view's rule. That a named policy exists is the store's, checked in the view.
"""

from __future__ import annotations

import datetime as dt
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

from trellis.api.acl import identities as ids
from trellis.api.acl.rules import RulesError, parse_rules
from trellis.api.schemas import Ignored, Strict, StrictBoolean
from trellis.proxy.durations import DurationError, parse_duration

#: Consul's default bounds on a token's lifetime (``acl.token_min_expiration_ttl`` and
#: ``acl.token_max_expiration_ttl``): one minute to one day.
MIN_EXPIRATION_TTL = 60.0
MAX_EXPIRATION_TTL = 24 * 3600.0


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


class AccessorID(OptionalUUID):
    """A UUID kept as it was given (Consul keeps an accessor's case; lookups ignore it)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str | None:
        checked = super()._deserialize(value, attr, data, **kwargs)
        return None if checked is None else str(value)


class TTL(fields.Field):
    """``ExpirationTTL``: a Go duration string ("1h") or, as Go's client sends a
    ``time.Duration``, a whole number of nanoseconds; loads as seconds."""

    json_types = frozenset({"string", "integer"})
    default_error_messages = {"invalid": "must be a duration such as '1h'"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.make_error("invalid")
        if isinstance(value, int):
            return value / 1e9
        try:
            return parse_duration(value) if value else 0.0
        except DurationError:
            raise self.make_error("invalid") from None


class Timestamp(fields.String):
    """``ExpirationTime``: an RFC 3339 time; loads as epoch seconds."""

    default_error_messages = {"invalid": "must be an RFC 3339 time"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise self.make_error("invalid") from None
        if parsed.tzinfo is None:
            raise self.make_error("invalid")
        return parsed.timestamp()


class ServiceIdentitySchema(Strict):
    ServiceName = fields.String(required=True)
    Datacenters = fields.List(fields.String(), allow_none=True, load_default=None)

    @validates_schema
    def _name(self, data: dict[str, Any], **kwargs: Any) -> None:
        _check_name(data.get("ServiceName"), "ServiceName")

    @post_load
    def _shape(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"ServiceName": data["ServiceName"]}
        if data["Datacenters"]:
            out["Datacenters"] = list(data["Datacenters"])
        return out


class NodeIdentitySchema(Strict):
    NodeName = fields.String(required=True)
    Datacenter = fields.String(required=True)

    @validates_schema
    def _name(self, data: dict[str, Any], **kwargs: Any) -> None:
        _check_name(data.get("NodeName"), "NodeName")


class TemplatedPolicySchema(Strict):
    TemplateName = fields.String(required=True)
    TemplateVariables = fields.Dict(
        keys=fields.String(), values=fields.String(), allow_none=True, load_default=None
    )
    Datacenters = fields.List(fields.String(), allow_none=True, load_default=None)

    @validates_schema
    def _renders(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "TemplateName" in data:
            try:
                ids.templated_rules(data["TemplateName"], data.get("TemplateVariables") or {})
            except ids.IdentityError as e:
                raise ValidationError(str(e)) from None

    @post_load
    def _shape(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"TemplateName": data["TemplateName"]}
        if data["TemplateVariables"]:
            out["TemplateVariables"] = dict(data["TemplateVariables"])
        if data["Datacenters"]:
            out["Datacenters"] = list(data["Datacenters"])
        return out


def _check_name(name: Any, what: str) -> None:
    if name is not None:
        try:
            ids.check_name(name, what)
        except ids.IdentityError as e:
            raise ValidationError(str(e)) from None


def _list_of(schema: type[Schema]) -> fields.List:
    return fields.List(fields.Nested(schema), allow_none=True, load_default=None)


def identities_of(data: dict[str, Any]) -> dict[str, Any]:
    """The identities of a loaded body, as the store keeps them (empty lists left out)."""
    return {
        k: list(data[k])
        for k in ("ServiceIdentities", "NodeIdentities", "TemplatedPolicies")
        if data[k]
    }


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


class LinkSchema(PolicyLinkSchema):
    """A role a token holds, by ``ID`` or by ``Name`` (the same shape as a policy link)."""


class TokenSchema(_ACLBody):
    """A token. ``AccessorID``/``SecretID``: made by the server unless given on create; on
    update the AccessorID must match the path and a SecretID other than the token's own is
    refused (the view's rules).
    ``ExpirationTTL`` (1m-24h) or ``ExpirationTime``: when it stops working, set on create
    only (the view's rule: Consul refuses to change it)."""

    AccessorID = AccessorID()
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
    Roles = fields.List(fields.Nested(LinkSchema), allow_none=True, load_default=None)
    ServiceIdentities = _list_of(ServiceIdentitySchema)
    NodeIdentities = _list_of(NodeIdentitySchema)
    TemplatedPolicies = _list_of(TemplatedPolicySchema)
    ExpirationTTL = TTL(allow_none=True, load_default=None)
    ExpirationTime = Timestamp(allow_none=True, load_default=None)
    Legacy = Ignored()

    @validates_schema
    def _ttl(self, data: dict[str, Any], **kwargs: Any) -> None:
        ttl = data.get("ExpirationTTL")
        if ttl and not MIN_EXPIRATION_TTL <= ttl <= MAX_EXPIRATION_TTL:
            raise ValidationError("must be between 1m and 24h", "ExpirationTTL")
        if ttl and data.get("ExpirationTime") is not None:
            raise ValidationError(
                "give ExpirationTTL or ExpirationTime, not both", "ExpirationTime"
            )

    @post_load
    def _no_policies(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["policies"] = list(data["policies"] or ())
        data["Roles"] = list(data["Roles"] or ())
        return data


class RoleSchema(_ACLBody):
    """A role: policies (by ID or name) and identities. ``ID``: refused on create, must match
    the path on update (the view's rule)."""

    ID = OptionalUUID()
    Name = fields.String(
        required=True,
        validate=validate.Regexp(
            r"^[A-Za-z0-9_-]{1,256}$", error="must be 1-256 letters, digits, '-' or '_'"
        ),
        error_messages={"required": "is required (1-256 letters, digits, '-' or '_')"},
    )
    Description = fields.String(load_default="")
    Policies = fields.List(fields.Nested(PolicyLinkSchema), allow_none=True, load_default=None)
    ServiceIdentities = _list_of(ServiceIdentitySchema)
    NodeIdentities = _list_of(NodeIdentitySchema)
    TemplatedPolicies = _list_of(TemplatedPolicySchema)

    @post_load
    def _lists(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["Policies"] = list(data["Policies"] or ())
        return data


class TokenCloneSchema(Strict):
    """``PUT /v1/acl/token/<id>/clone``: an optional new ``Description``."""

    Description = fields.String(
        load_default=None,
        validate=validate.Length(max=512, error="must be a string of at most 512 characters"),
    )


class TemplateVariablesSchema(Strict):
    """The variables of a templated policy (``POST /v1/acl/templated-policy/preview/<name>``):
    only ``Name`` exists among Consul's builtin templates."""

    Name = fields.String(load_default=None, allow_none=True)
