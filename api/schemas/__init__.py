"""Request bodies: one way to validate them all, with marshmallow.

Theory of operation
-------------------
Every JSON body the HTTP API accepts has a schema in this package, one module per resource
(``catalog``, ``intentions``, ``acl``, ``ca``). A view parses the JSON (``trellis.api.http.
json_body``: size, depth, valid Unicode), then calls ``load(SomeSchema, body)``, which
returns a plain dict or raises ``BadRequest``. Nothing else checks a body's shape; what is left
in a view is what needs the store or the caller's token (does the policy exist, may this
token write that).

The rules every schema follows:

* **Unknown fields are refused** (``Strict``), so a typo is an error, not a silently ignored
  setting. Fields that Consul's clients send back as they read them (``CreateIndex``,
  ``Hash``...) are declared ``Ignored``: accepted with any value, dropped from the result.
* **No coercion.** Integers are ``strict`` (``"80"`` and ``1.5`` are refused, as Go's
  encoding/json refuses them), booleans are ``true``/``false`` only where Consul's own field
  is a bool (``StrictBoolean``), numbers are finite JSON numbers, never strings.
* **Field names in any case**, as Consul's decoder reads them (``fold_names``, run by
  ``load`` before the schema): ``serviceid`` is ``ServiceID``, at every level the schema
  describes; the keys of maps that hold user data (``Meta``, ``NodeMeta``, a proxy's
  ``Config``) are kept as sent.
* **One error shape.** ``load`` turns marshmallow's nested messages into one line, each
  problem as ``<path>: <problem>`` (``Config.LeafCertTTL: must be between 1h and 8760h``,
  ``Checks.0.Bogus: Unknown field.``), every problem at once, separated by ``; ``. The
  handler in ``trellis.api.app`` renders it as ``{"error", "code", "status"}`` with 400.
  Messages never repeat a value that may be a secret (a token, a private key).

``openapi.yaml`` describes the same bodies; ``tests/test_schemas_openapi.py`` compares every
request schema there with the marshmallow schema here (field names, JSON types, required
fields, closed or open) and fails on any difference, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, missing, post_load

from trellis.api.errors import BadRequest
from trellis.proxy.requestrules import FieldNameError, Kind, ListOf, MapOf, Shape
from trellis.proxy.requestrules import fold_names as _fold_names

__all__ = [
    "FiniteNumber",
    "Ignored",
    "Rejected",
    "Strict",
    "StrictBoolean",
    "ValidationError",
    "flatten",
    "fold_names",
    "load",
]


# ``json_types`` on a field class: the JSON types it takes (None: any), for the comparison with
# openapi.yaml (tests/test_schemas_openapi.py); marshmallow's own fields are mapped there.


class Ignored(fields.Raw):
    """A read-only field a client may send back (any value, null included); never loaded."""

    json_types = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_none=True, **kwargs)


class Rejected(fields.Raw):
    """A field that is refused with its own message (more useful than "Unknown field.")."""

    json_types = None

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(allow_none=True, **kwargs)
        self.message = message

    def deserialize(self, value: Any, attr: str | None = None, data: Any = None, **kw: Any) -> Any:
        # Overridden (not _deserialize) so that null is refused too; absent is fine.
        if value is missing:
            return missing
        raise ValidationError(self.message)


class StrictBoolean(fields.Boolean):
    """``true`` or ``false``, nothing else (marshmallow's Boolean also takes "yes", 1, "on")."""

    default_error_messages = {"invalid": "must be true or false", "null": "must be true or false"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if value is True or value is False:
            return value
        raise self.make_error("invalid")


class FiniteNumber(fields.Field):
    """A JSON number, whole or not: never a string, a bool, or a value that overflows a float
    (``1e400`` parses as infinity, and ``10**400`` cannot become a float at all)."""

    json_types = frozenset({"number"})
    default_error_messages = {"invalid": "must be a number", "null": "must be a number"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise self.make_error("invalid")
        return value


class Strict(Schema):
    """Refuses unknown fields; drops ``Ignored`` ones from the result."""

    class Meta:
        unknown = RAISE

    @post_load
    def _drop_ignored(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        for name, field in self.load_fields.items():
            if isinstance(field, Ignored):
                data.pop(name, None)
        return data


#: One instance per schema class. Making a marshmallow schema deep-copies its declared fields
#: (about 100 us for the authorize body, measured): as much as the rest of the request. An
#: instance keeps no state between loads, so one serves every request.
_INSTANCES: dict[type[Schema], Schema] = {}


def load(schema: Schema | type[Schema], data: Any, *, path: str = "", what: str = "") -> dict:
    """``schema.load(data)``, or BadRequest (the client's fault) naming every bad field.

    ``schema`` is a schema class (its one shared instance is used) or an instance. ``path``
    prefixes the field names (``Config`` for a CA provider's settings); ``what``, if given,
    starts the message (a config file is not a request body).
    """
    if isinstance(schema, type):
        instance = _INSTANCES.get(schema)
        if instance is None:
            instance = _INSTANCES[schema] = schema()
        schema = instance
    try:
        result: dict = schema.load(fold_names(schema, data))
    except ValidationError as e:
        problems = flatten(e.messages, path)
        raise BadRequest(f"{what}: {problems}" if what else problems) from None
    return result


def flatten(messages: Any, path: str = "") -> str:
    """marshmallow's nested messages as ``path: problem; path: problem``.

    ``_schema`` (a message about the object as a whole) names the object itself, and a Dict
    field's ``value``/``key`` level is left out: ``Meta.k: Not a valid string.``.
    """
    if isinstance(messages, Mapping):
        parts = []
        for key, sub in messages.items():
            if key == "_schema" or (path and key in ("value", "key")):
                sub_path = path
            else:
                sub_path = f"{path}.{key}" if path else str(key)
            parts.append(flatten(sub, sub_path))
        return "; ".join(parts)
    if isinstance(messages, list):
        if all(isinstance(m, str) for m in messages):
            text = " ".join(messages)
            return f"{path}: {text}" if path else text
        return "; ".join(flatten(m, path) for m in messages)
    return f"{path}: {messages}" if path else str(messages)


# -- field names in any case ---------------------------------------------------------------
#
# The rule is ``trellis.proxy.requestrules``'s (its docstring says how Consul's decoder matches
# names), shared with the node agent. Here a schema is turned into that module's ``Shape``
# once per class: a ``Nested`` field is a struct, a ``Dict`` field a map (whose values are
# folded only when they are structs themselves), anything else a value left alone.

#: One shape per schema class (made on first use; a schema that holds itself, as a service's
#: ``Connect.SidecarService``, finds its own shape here while it is being made).
_SHAPES: dict[type[Schema], Shape] = {}


def _shape(schema: Schema) -> Shape:
    cls = type(schema)
    shape = _SHAPES.get(cls)
    if shape is None:
        shape = _SHAPES[cls] = Shape(cls.__name__)
        try:
            shape.define({f.data_key or n: _kind(f) for n, f in schema.load_fields.items()})
        except BaseException:
            del _SHAPES[cls]
            raise
    return shape


def _kind(field: fields.Field) -> Kind:
    if isinstance(field, fields.Nested):
        inner = _shape(field.schema)
        return ListOf(inner) if field.many else inner
    if isinstance(field, fields.List):
        item = _kind(field.inner)
        return None if item is None else ListOf(item)
    if isinstance(field, fields.Dict) and field.value_field is not None:
        value = _kind(field.value_field)
        return None if value is None else MapOf(value)
    return None


def fold_names(schema: Schema, data: Any) -> Any:
    """``data`` with each field name spelled as ``schema`` (and its nested schemas) declare
    it, matched as Consul's decoder matches them (``trellis.proxy.requestrules``). A name no
    field matches is kept as sent, for the schema to refuse (or ignore, where it ignores
    unknown fields). Raises ``BadRequest`` (the client's fault) for a field given twice in
    two spellings."""
    if not isinstance(data, dict):
        return data
    try:
        return _fold_names(_shape(schema), data)
    except FieldNameError as e:
        raise BadRequest(str(e)) from None
