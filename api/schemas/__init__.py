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
# Consul decodes a request body with Go's encoding/json (``lib.DecodeJSON``; before 1.7 with
# mapstructure, which matches names the same way). encoding/json matches an object key to a
# struct field by the field's name or tag, preferring an exact match but also accepting one
# that differs only in case, compared as ``bytes.EqualFold`` compares: Unicode simple case
# folding, under which the only non-ASCII letters equal to ASCII ones are U+017F (long s,
# equal to "s") and U+212A (Kelvin sign, equal to "k"). It does so at every level it decodes
# into a struct (``Check``, ``Connect.SidecarService.Proxy.Upstreams``...), and never in a
# map: the keys of ``Meta``, ``NodeMeta``, ``TaggedAddresses`` or a proxy's ``Config`` are
# data and keep their case. ``fold_names`` does the same with the schema for the struct: a
# ``Nested`` field is a struct, a ``Dict`` field a map (whose values are folded only when
# they are structs themselves), anything else a value left alone.
#
# One difference, on purpose: a body that names one field twice in two spellings
# (``{"Name": "a", "name": "b"}``) is refused. encoding/json keeps the last one, so what the
# client meant depends on the order of its keys, and a proxy or audit log that reads the
# first one would see another request than the one Trellis runs.


def _fold(name: str) -> str:
    """``name`` in one case: equal for two names that Go's ``bytes.EqualFold`` calls equal,
    as far as the ASCII field names of a schema can tell (see above)."""
    return name.replace("\u017f", "s").lower()


#: Per schema class: the input name of each field (its ``data_key`` or its attribute name)
#: by its folded form, and the field by its input name.
_SHAPES: dict[type[Schema], tuple[dict[str, str], dict[str, fields.Field]]] = {}


def _shape(schema: Schema) -> tuple[dict[str, str], dict[str, fields.Field]]:
    shape = _SHAPES.get(type(schema))
    if shape is None:
        by_name = {f.data_key or n: f for n, f in schema.load_fields.items()}
        folded = {_fold(n): n for n in by_name}
        # Two fields whose names differ only in case would make the folding ambiguous.
        assert len(folded) == len(by_name), f"{type(schema).__name__}: names clash in case"
        shape = _SHAPES[type(schema)] = (folded, by_name)
    return shape


def fold_names(schema: Schema, data: Any) -> Any:
    """``data`` with each field name spelled as ``schema`` (and its nested schemas) declare
    it, matched as Consul's decoder matches them (see above). A name no field matches is
    kept as sent, for the schema to refuse (or ignore, where it ignores unknown fields).
    Raises ``BadRequest`` (the client's fault) for a field given twice in two spellings."""
    # dict, not Mapping: a parsed JSON body holds dicts, and the ABC check costs a third of
    # the time here.
    if not isinstance(data, dict):
        return data
    folded, by_name = _shape(schema)
    out: dict[Any, Any] = {}
    for key, value in data.items():
        name = key
        if isinstance(key, str) and key not in by_name:
            name = folded.get(_fold(key), key)
        if name in out:
            raise BadRequest(
                f"field {name!r} is given twice (as {key!r} and another spelling; field"
                " names are matched in any case)"
            )
        field = by_name.get(name)
        out[name] = value if field is None else _fold_value(field, value)
    return out


def _fold_value(field: fields.Field, value: Any) -> Any:
    if isinstance(field, fields.Nested):
        inner = field.schema
        if field.many and isinstance(value, list):
            return [fold_names(inner, v) for v in value]
        return fold_names(inner, value)
    if isinstance(field, fields.List) and isinstance(value, list):
        return [_fold_value(field.inner, v) for v in value]
    if isinstance(field, fields.Dict) and isinstance(value, dict):
        values = field.value_field
        if values is None:
            return value
        # The keys are data (a tagged address's name): only struct values are folded.
        return {k: _fold_value(values, v) for k, v in value.items()}
    return value
