"""Consul's request rules that the servers and the node agent share: body field names in any
case, the request options a body may carry (``WriteRequest``), and boolean query flags read
as Go's ``ParseBool``. Pure: the servers (``trellis.api.schemas``, ``trellis.api.http``) and
the node agent's local API (``trellis.proxy.agent.definitions``, ``localapi``) both call it,
so one rule decides what ``serviceid`` or ``?replace-existing-checks=0`` means wherever a
request arrives.

Theory of operation
-------------------
Consul decodes a request body with Go's encoding/json (``lib.DecodeJSON``; before 1.7 with
mapstructure, which matches names the same way). encoding/json matches an object key to a
struct field by the field's name or tag, preferring an exact match but also accepting one that
differs only in case, compared as ``bytes.EqualFold`` compares: Unicode simple case folding,
under which the only non-ASCII letters equal to ASCII ones are U+017F (long s, equal to "s")
and U+212A (Kelvin sign, equal to "k"; ``str.lower`` already gives "k"). It does so at every
level it decodes into a struct (``Check``, ``Connect.SidecarService.Proxy.Upstreams``...), and
never in a map: the keys of ``Meta``, ``NodeMeta``, ``TaggedAddresses`` or a proxy's
``Config`` are data and keep their case.

A ``Shape`` says what a struct is: its fields' names as declared, and for each field what its
value holds (``None``: a value left alone, a ``Shape``: a struct, ``ListOf``/``MapOf``: a list
or a map of those). ``fold_names`` walks a body along a shape and spells each name as declared.

One difference, on purpose: a body that names one field twice in two spellings
(``{"Name": "a", "name": "b"}``) is refused. encoding/json keeps the last one, so what the
client meant depends on the order of its keys, and a proxy or audit log that reads the first
one would see another request than the one Trellis runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = [
    "FALSE",
    "REQUEST_OPTIONS",
    "TRUE",
    "FieldNameError",
    "ListOf",
    "MapOf",
    "RequestOptions",
    "Shape",
    "fold",
    "fold_names",
    "parse_bool",
    "split_request_options",
]


class FieldNameError(ValueError):
    """A body whose field names cannot be read (the sender's fault): a field given twice in
    two spellings, an unknown field (where the caller asks), a request option that is not an
    object."""


def fold(name: str) -> str:
    """``name`` in one case: equal for two names that Go's ``bytes.EqualFold`` calls equal,
    as far as the ASCII field names of a shape can tell (see above)."""
    return name.replace("\u017f", "s").lower()


class ListOf:
    """A list whose items are ``item`` (a ``Shape``, or another ``ListOf``/``MapOf``)."""

    __slots__ = ("item",)

    def __init__(self, item: Kind) -> None:
        self.item = item

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ListOf) and self.item == other.item

    def __repr__(self) -> str:
        return f"ListOf({self.item!r})"


class MapOf:
    """A map whose keys are data (kept as sent) and whose values are ``value``."""

    __slots__ = ("value",)

    def __init__(self, value: Kind) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MapOf) and self.value == other.value

    def __repr__(self) -> str:
        return f"MapOf({self.value!r})"


class Shape:
    """The fields of a struct: each name as declared and what its value holds. A shape may
    hold itself (a service's ``Connect.SidecarService`` is a service): make it, then
    ``define`` its fields."""

    __slots__ = ("fields", "folded", "name")

    def __init__(self, name: str, fields: Mapping[str, Kind] | None = None) -> None:
        self.name = name
        self.fields: dict[str, Kind] = {}
        self.folded: dict[str, str] = {}
        if fields is not None:
            self.define(fields)

    def define(self, fields: Mapping[str, Kind]) -> Shape:
        folded = {fold(n): n for n in fields}
        if len(folded) != len(fields):
            # The folding would have to pick one of them: a mistake in the declaration.
            raise ValueError(f"{self.name}: two field names differ only in case")
        self.fields = dict(fields)
        self.folded = folded
        return self

    def __eq__(self, other: object) -> bool:
        # By names and kinds, to the depth where a shape holds itself.
        return isinstance(other, Shape) and _same(self, other, set())

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Shape({self.name!r})"


Kind = Shape | ListOf | MapOf | None


def _same(a: Kind, b: Kind, seen: set[tuple[int, int]]) -> bool:
    if isinstance(a, Shape) and isinstance(b, Shape):
        if (id(a), id(b)) in seen:
            return True
        seen.add((id(a), id(b)))
        return a.fields.keys() == b.fields.keys() and all(
            _same(a.fields[k], b.fields[k], seen) for k in a.fields
        )
    if isinstance(a, ListOf) and isinstance(b, ListOf):
        return _same(a.item, b.item, seen)
    if isinstance(a, MapOf) and isinstance(b, MapOf):
        return _same(a.value, b.value, seen)
    return a is None and b is None


def fold_names(shape: Shape, data: Any, *, unknown: list[str] | None = None, path: str = "") -> Any:
    """``data`` with each field name spelled as ``shape`` (and the shapes in it) declare it,
    matched as Consul's decoder matches them (see above). A name no field matches is kept as
    sent; if ``unknown`` is given, its path (``Check.Bogus``, ``Checks.0.tll``) is added to
    it, for the caller to refuse. Anything but an object is returned as it is (the caller's
    schema says what it should have been). Raises ``FieldNameError`` (the sender's fault)
    for a field given twice in two spellings."""
    # dict, not Mapping: a parsed JSON body holds dicts, and the ABC check costs a third of
    # the time here.
    if not isinstance(data, dict):
        return data
    fields, folded = shape.fields, shape.folded
    out: dict[Any, Any] = {}
    for key, value in data.items():
        name = key
        if isinstance(key, str) and key not in fields:
            name = folded.get(fold(key), key)
        if name in out:
            at = f"{path}.{name}" if path else name
            raise FieldNameError(
                f"field {at!r} is given twice (as {key!r} and another spelling; field"
                " names are matched in any case)"
            )
        if name in fields:
            kind = fields[name]
            if kind is not None:
                at = f"{path}.{name}" if path else str(name)
                value = _fold_value(kind, value, unknown, at)
        elif unknown is not None:
            unknown.append(f"{path}.{name}" if path else str(name))
        out[name] = value
    return out


def _fold_value(kind: Kind, value: Any, unknown: list[str] | None, path: str) -> Any:
    if isinstance(kind, Shape):
        return fold_names(kind, value, unknown=unknown, path=path)
    if isinstance(kind, ListOf) and isinstance(value, list):
        return [_fold_value(kind.item, v, unknown, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(kind, MapOf) and isinstance(value, dict):
        # The keys are data (a tagged address's name): only the values are folded.
        return {k: _fold_value(kind.value, v, unknown, f"{path}.{k}") for k, v in value.items()}
    return value


# -- WriteRequest and QueryOptions -----------------------------------------------------------

#: The top-level keys of a body that Consul's clients send and Consul ignores, in folded case:
#: its request structs embed ``WriteRequest`` (``Token``) or ``QueryOptions``, which Consul
#: before 1.7 decoded from a key of that name (mapstructure) and then overwrote with the
#: request's own token. python-consul still sends ``{"WriteRequest": {"Token": ...}}`` with
#: ``catalog/register`` and ``catalog/deregister``.
REQUEST_OPTIONS = ("writerequest", "queryoptions")


class RequestOptions(NamedTuple):
    """A body less its request options (``split_request_options``)."""

    body: dict[Any, Any]
    #: The token one of them carried ("" if none), and where (``WriteRequest.Token``).
    token: str = ""
    where: str = ""


def split_request_options(body: dict[Any, Any]) -> RequestOptions:
    """``body`` without its ``WriteRequest``/``QueryOptions`` keys (in any case), which Consul
    accepts and ignores, and the token one of them carried: the caller decides what a token
    sent only there means (the request never runs as it). Raises ``FieldNameError`` (the
    sender's fault) for such a key whose value is not an object."""
    found = [k for k in body if isinstance(k, str) and fold(k) in REQUEST_OPTIONS]
    if not found:
        return RequestOptions(body)
    token = where = ""
    for k in found:
        v = body[k]
        if v is not None and not isinstance(v, dict):
            raise FieldNameError(f"{k} must be an object")
        for n, t in (v or {}).items():
            if isinstance(n, str) and fold(n) == "token" and t and not token:
                token, where = (t if isinstance(t, str) else str(t)), f"{k}.{n}"
    return RequestOptions({k: v for k, v in body.items() if k not in found}, token, where)


# -- boolean query flags -----------------------------------------------------------------------

#: Go's strconv.ParseBool, which Consul reads the query flags that take a value with
#: (``getBoolQueryParam``: ``passing``, ``pem``, ``replace-existing-checks``).
TRUE = frozenset({"1", "t", "T", "true", "True", "TRUE"})
FALSE = frozenset({"0", "f", "F", "false", "False", "FALSE"})


def parse_bool(value: str) -> bool | None:
    """A flag's value as Go's ParseBool reads it, no value being true (``?passing``); None
    for anything else (``None``, ``yes``), which the caller refuses."""
    if value == "" or value in TRUE:
        return True
    if value in FALSE:
        return False
    return None
