"""openapi.yaml and the marshmallow schemas describe the same request bodies.

Every operation of openapi.yaml with a JSON request body names the schema (a component) that
describes it, and ``BODIES`` names the marshmallow schema that validates it. For each pair,
``differences`` compares what both sides say: the field names (as sent on the wire), each
field's JSON types (``null`` included), which fields are required, and whether unknown fields
are refused; it follows nested objects, lists of objects and maps of objects on both sides.
A field added, dropped, retyped or made required on one side only fails the test, as does a
JSON body that has no entry here.

Two things are deliberately not compared: value constraints (patterns, ranges, enums), which
the endpoint tests pin, and fields that a schema declares only to refuse them with a better
message than "Unknown field." (``trellis.api.schemas.Rejected``), which the spec leaves out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from marshmallow import EXCLUDE, RAISE, Schema, fields

from tests.openapi_check import HTTP_METHODS, _deref, spec_dict
from trellis.api.schemas import Rejected
from trellis.api.schemas.acl import (
    PolicySchema,
    RoleSchema,
    TemplateVariablesSchema,
    TokenCloneSchema,
    TokenSchema,
)
from trellis.api.schemas.ca import (
    BuiltinConfigSchema,
    CAConfigurationSchema,
    RotateSchema,
    SignSchema,
    VaultConfigSchema,
)
from trellis.api.schemas.catalog import (
    CatalogDeregisterSchema,
    CatalogRegisterSchema,
    CheckSchema,
    CheckUpdateSchema,
    ServiceSchema,
)
from trellis.api.schemas.intentions import AuthorizeSchema, IntentionExactSchema, IntentionSchema
from trellis.api.schemas.query import PreparedQuerySchema
from trellis.api.schemas.session import SessionCreateSchema

#: (METHOD, path) -> (the openapi component that describes the body, the marshmallow schema).
BODIES: dict[tuple[str, str], tuple[str, type[Schema]]] = {
    ("PUT", "/v1/catalog/register"): ("CatalogRegistration", CatalogRegisterSchema),
    ("PUT", "/v1/catalog/deregister"): ("CatalogDeregistration", CatalogDeregisterSchema),
    ("PUT", "/v1/agent/service/register"): ("AgentServiceFields", ServiceSchema),
    ("PUT", "/v1/agent/check/register"): ("CheckDefinition", CheckSchema),
    ("PUT", "/v1/agent/check/update/{check_id}"): ("CheckUpdate", CheckUpdateSchema),
    ("PUT", "/v1/connect/ca/configuration"): ("CAConfigurationRequest", CAConfigurationSchema),
    ("POST", "/v1/connect/ca/sign"): ("CASignRequest", SignSchema),
    ("POST", "/v1/connect/ca/rotate"): ("CARotateRequest", RotateSchema),
    ("POST", "/v1/connect/intentions"): ("IntentionCreateBody", IntentionSchema),
    ("PUT", "/v1/connect/intentions/{intention_id}"): ("IntentionCreateBody", IntentionSchema),
    ("PUT", "/v1/connect/intentions/exact"): ("IntentionExactBody", IntentionExactSchema),
    ("POST", "/v1/agent/connect/authorize"): ("AuthorizeBody", AuthorizeSchema),
    ("PUT", "/v1/session/create"): ("SessionCreateBody", SessionCreateSchema),
    ("POST", "/v1/query"): ("PreparedQueryBody", PreparedQuerySchema),
    ("PUT", "/v1/query/{query_id}"): ("PreparedQueryBody", PreparedQuerySchema),
    ("PUT", "/v1/acl/policy"): ("ACLPolicyBody", PolicySchema),
    ("PUT", "/v1/acl/policy/{policy_id}"): ("ACLPolicyBody", PolicySchema),
    ("PUT", "/v1/acl/token"): ("ACLTokenBody", TokenSchema),
    ("PUT", "/v1/acl/token/{accessor_id}"): ("ACLTokenBody", TokenSchema),
    ("PUT", "/v1/acl/token/{accessor_id}/clone"): ("ACLTokenCloneBody", TokenCloneSchema),
    ("PUT", "/v1/acl/role"): ("ACLRoleBody", RoleSchema),
    ("PUT", "/v1/acl/role/{role_id}"): ("ACLRoleBody", RoleSchema),
    ("POST", "/v1/acl/templated-policy/preview/{name}"): (
        "ACLTemplateVariables",
        TemplateVariablesSchema,
    ),
}

_ANY = None  # a field or schema that takes any JSON value


# -- the openapi side ------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def oa_types(schema: Any) -> frozenset[str] | None:
    """The JSON types a (sub)schema allows; None for any."""
    schema = _deref(schema)
    if "type" in schema:
        t = schema["type"]
        return frozenset([t] if isinstance(t, str) else t)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            parts = [oa_types(s) for s in schema[key]]
            return None if any(p is None for p in parts) else frozenset().union(*parts)
    if "allOf" in schema:
        typed = [p for p in (oa_types(s) for s in schema["allOf"]) if p is not None]
        return typed[0] if typed else None
    if "const" in schema:
        return frozenset([_json_type(schema["const"])])
    if "enum" in schema:
        return frozenset(_json_type(v) for v in schema["enum"])
    return _ANY


def _object_branch(schema: Any) -> Any | None:
    """The object schema within ``schema`` (one branch of a oneOf with null, say)."""
    schema = _deref(schema)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            for branch in schema[key]:
                found = _object_branch(branch)
                if found is not None:
                    return found
            return None
    if "properties" in schema or "allOf" in schema:
        return schema
    return None


def oa_object(schema: Any) -> tuple[dict[str, Any], set[str], bool]:
    """An object schema's properties, required names and whether it is closed, with its
    ``allOf`` parts merged."""
    schema = _deref(schema)
    props: dict[str, Any] = dict(schema.get("properties") or {})
    required = set(schema.get("required") or ())
    closed = (
        schema.get("additionalProperties") is False or schema.get("unevaluatedProperties") is False
    )
    for part in schema.get("allOf") or ():
        p, r, c = oa_object(part)
        props.update(p)
        required |= r
        closed = closed or c
    return props, required, closed


# -- the marshmallow side --------------------------------------------------------------------------


def mm_types(field: fields.Field) -> frozenset[str] | None:
    """The JSON types a marshmallow field takes; None for any."""
    declared: Any = ...
    for klass in type(field).__mro__:
        if "json_types" in klass.__dict__:
            declared = klass.__dict__["json_types"]
            break
    if declared is not ...:
        if declared is None:
            return None
        base = frozenset(declared)
    elif isinstance(field, fields.Boolean):
        base = frozenset({"boolean"})
    elif isinstance(field, fields.Integer):
        base = frozenset({"integer"})
    elif isinstance(field, fields.Number):
        base = frozenset({"number"})
    elif isinstance(field, fields.String):
        base = frozenset({"string"})
    elif isinstance(field, fields.Mapping | fields.Nested):
        base = frozenset({"object"})
    elif isinstance(field, fields.List):
        base = frozenset({"array"})
    elif type(field) is fields.Raw:
        return None
    else:
        raise AssertionError(f"teach this test the JSON types of {type(field).__name__}")
    return base | {"null"} if field.allow_none else base


def _closed(schema: Schema) -> bool:
    unknown = schema.unknown
    assert unknown in (RAISE, EXCLUDE), f"{type(schema).__name__}: unknown={unknown!r}"
    return unknown == RAISE


def _wire_fields(schema: Schema) -> dict[str, fields.Field]:
    return {
        (f.data_key or name): f
        for name, f in schema.load_fields.items()
        if not isinstance(f, Rejected)
    }


# -- the comparison --------------------------------------------------------------------------------


def differences(
    oa_schema: Any, mm_schema: Schema, where: str, seen: set | None = None
) -> list[str]:
    """What openapi's object schema and marshmallow's schema say differently."""
    seen = set() if seen is None else seen
    key = (id(_deref(oa_schema)), type(mm_schema))
    if key in seen:
        return []
    seen.add(key)
    props, required, closed = oa_object(oa_schema)
    mm = _wire_fields(mm_schema)
    out = []
    for name in sorted(set(props) - set(mm)):
        out.append(f"{where}.{name}: in openapi.yaml, not in {type(mm_schema).__name__}")
    for name in sorted(set(mm) - set(props)):
        out.append(f"{where}.{name}: in {type(mm_schema).__name__}, not in openapi.yaml")
    mm_required = {name for name, f in mm.items() if f.required}
    if mm_required != required:
        out.append(
            f"{where}: required {sorted(required)} in openapi.yaml, "
            f"{sorted(mm_required)} in {type(mm_schema).__name__}"
        )
    if closed != _closed(mm_schema):
        out.append(
            f"{where}: unknown fields {'refused' if closed else 'allowed'} in openapi.yaml, "
            f"not in {type(mm_schema).__name__}"
        )
    for name in sorted(set(props) & set(mm)):
        out += _field_differences(props[name], mm[name], f"{where}.{name}", seen)
    return out


def _field_differences(oa: Any, field: fields.Field, where: str, seen: set) -> list[str]:
    want, got = oa_types(oa), mm_types(field)
    if want != got:
        show = sorted(want) if want is not None else "any"
        have = sorted(got) if got is not None else "any"
        return [f"{where}: {show} in openapi.yaml, {have} in the schema"]
    oa = _deref(oa)
    if isinstance(field, fields.Nested):
        branch = _object_branch(oa)
        if branch is None:
            return [f"{where}: an object in the schema, no object schema in openapi.yaml"]
        return differences(branch, field.schema, where, seen)
    if isinstance(field, fields.List):
        items = _deref(_array_branch(oa)).get("items", {})
        return _field_differences(items, field.inner, f"{where}[]", seen)
    if isinstance(field, fields.Dict) and isinstance(field.value_field, fields.Nested):
        values = _object_branch(oa)
        values = _deref(values if values is not None else oa).get("additionalProperties")
        if not isinstance(values, Mapping):
            return [f"{where}: a map of objects in the schema, not in openapi.yaml"]
        return _field_differences(values, field.value_field, f"{where}{{}}", seen)
    return []


def _array_branch(schema: Any) -> Any:
    schema = _deref(schema)
    for key in ("oneOf", "anyOf"):
        for branch in schema.get(key) or ():
            if "items" in _deref(branch):
                return _deref(branch)
    return schema


def _reachable(schema: Any, name: str) -> bool:
    """Whether component ``name`` is the schema or one of its anyOf/oneOf/allOf parts."""
    if isinstance(schema, Mapping) and schema.get("$ref") == f"#/components/schemas/{name}":
        return True
    schema = _deref(schema)
    return any(
        _reachable(part, name)
        for key in ("oneOf", "anyOf", "allOf")
        for part in schema.get(key) or ()
    )


def json_bodies() -> dict[tuple[str, str], Any]:
    out = {}
    for path, item in spec_dict()["paths"].items():
        for method in HTTP_METHODS:
            body = (item.get(method) or {}).get("requestBody")
            if body and "application/json" in body["content"]:
                out[(method.upper(), path)] = body["content"]["application/json"]["schema"]
    return out


# -- the tests -------------------------------------------------------------------------------------


#: JSON bodies checked by hand rather than by one schema, and why.
HAND_CHECKED = {
    # A list of operations of four kinds: trellis.api.views.txn.parse_ops checks each (its
    # Service and Check objects through ServiceSchema and CheckSchema); its refusals are
    # tests/test_api_txn.py::test_malformed_is_a_400_and_writes_nothing.
    ("PUT", "/v1/txn"),
    # Auth methods, binding rules and login (trellis.api.views.acl_login): closed objects
    # checked field by field there, the jwt Config by trellis.api.acl.jwtauth.JWTConfig.parse;
    # their refusals are tests/test_acl_login.py::test_jwks_url_is_refused_and_bad_config_is_a_400,
    # ::test_binding_rule_validation and ::test_wrong_key_alg_none_and_garbage_are_refused.
    ("PUT", "/v1/acl/auth-method"),
    ("PUT", "/v1/acl/auth-method/{name}"),
    ("PUT", "/v1/acl/binding-rule"),
    ("PUT", "/v1/acl/binding-rule/{rule_id}"),
    ("POST", "/v1/acl/login"),
    ("PUT", "/v1/acl/login"),
    # One field, {"Token": "<secret>"}: trellis.api.views.operator.set_token checks it; its
    # refusals are in tests/test_api_agent_operator.py
    # (test_agent_tokens_are_kept_private_under_their_kind).
    ("PUT", "/v1/agent/token/{kind}"),
    # A list of {Resource, Segment, Access}: trellis.api.acl.authorize checks each entry;
    # its refusals are in tests/test_acl_authorize.py
    # (test_a_bad_list_is_the_callers_400_for_the_whole_list).
    ("POST", "/v1/internal/acl/authorize"),
    # A config entry: its fields depend on its Kind; trellis.api.config_entries.check_entry
    # checks each kind's (refusals: tests/test_api_config_entries.py::
    # test_bad_entries_and_unsupported_kinds_are_400s).
    ("PUT", "/v1/config"),
}


def test_every_json_body_in_openapi_has_a_schema():
    assert set(json_bodies()) == set(BODIES) | HAND_CHECKED


@pytest.mark.parametrize(("operation", "pair"), BODIES.items(), ids=lambda x: str(x))
def test_openapi_and_the_schema_agree(operation, pair):
    component, schema = pair
    assert _reachable(json_bodies()[operation], component), (operation, component)
    oa = spec_dict()["components"]["schemas"][component]
    assert differences(oa, schema(), component) == []


def test_the_ca_provider_settings_agree():
    """``Config`` is checked after the envelope, by the provider's schema: openapi.yaml's
    ``CAProviderConfig`` lists what either provider takes."""
    oa = spec_dict()["components"]["schemas"]["CAProviderConfig"]
    props, required, closed = oa_object(oa)
    builtin, vault = _wire_fields(BuiltinConfigSchema()), _wire_fields(VaultConfigSchema())
    assert set(props) == set(builtin) | set(vault)
    assert required == set()  # nothing is required of both
    assert closed and _closed(BuiltinConfigSchema()) and _closed(VaultConfigSchema())
    problems = []
    for name in props:
        for fields_ in (builtin, vault):
            if name in fields_:
                problems += _field_differences(props[name], fields_[name], name, set())
    assert problems == []


# -- the comparison can fail -----------------------------------------------------------------------


class _Drifted(IntentionSchema):
    """IntentionSchema with four differences from openapi.yaml's IntentionCreateBody."""

    Colour = fields.String()  # not in the spec
    description = fields.Integer(data_key="Description")  # retyped
    meta = fields.Dict(data_key="Meta", required=True, allow_none=True)  # made required


def test_the_comparison_finds_each_kind_of_difference():
    oa = spec_dict()["components"]["schemas"]["IntentionCreateBody"]
    found = differences(oa, _Drifted(exclude=("Hash",)), "IntentionCreateBody")
    assert found == [
        "IntentionCreateBody.Hash: in openapi.yaml, not in _Drifted",
        "IntentionCreateBody.Colour: in _Drifted, not in openapi.yaml",
        "IntentionCreateBody: required ['Action', 'DestinationName', 'SourceName'] in"
        " openapi.yaml, ['Action', 'DestinationName', 'Meta', 'SourceName'] in _Drifted",
        "IntentionCreateBody.Description: ['string'] in openapi.yaml, ['integer'] in the schema",
    ]
    open_schema = IntentionSchema(unknown=EXCLUDE)
    assert differences(oa, open_schema, "X") == [
        "X: unknown fields refused in openapi.yaml, not in IntentionSchema"
    ]


def test_the_comparison_follows_nested_objects():
    class _Service(ServiceSchema):
        Port = fields.String()

    class _Registration(CatalogRegisterSchema):
        Service = fields.Nested(_Service, allow_none=True)

    oa = spec_dict()["components"]["schemas"]["CatalogRegistration"]
    assert differences(oa, _Registration(), "R") == [
        "R.Service.Port: ['integer'] in openapi.yaml, ['string'] in the schema"
    ]
