"""Check HTTP responses against ``openapi.yaml``, the contract of the Trellis HTTP API.

``validate(method, path, query_string, status, headers, body, content_type)`` raises
``AssertionError`` (with every problem listed) when a response does not match the spec. Two
adapters call it on every response:

* ``ValidatingClient(app.test_client())``: a Flask test client whose every request is checked
  (the ``app_client`` fixture returns one, so every in-process API test checks the contract);
  ``client.raw`` is the unchecked client, for the rare test that means to break the rules.
* ``httpx_event_hook`` / ``async_httpx_event_hook``: for an ``httpx`` client talking to a real
  server: ``httpx.Client(event_hooks={"response": [httpx_event_hook]})``.

How a response is checked:

1. The path is matched against the spec's path templates here, not by openapi-core: a ``{x}``
   matches one segment, except a path parameter marked ``x-trellis-greedy: true`` (the K/V
   ``{key}``, Flask's ``<path:key>``), which matches the rest of the path, slashes included. A
   literal template beats a templated one, as Flask's router does.
2. No template matches: the server must have answered ``404`` with the ``Error`` body. A
   template matches but has no operation for the method: ``405`` with ``Error`` and ``Allow``.
3. Otherwise openapi-core's ``V31ResponseValidator`` checks the status code (it must be listed),
   the content type, the body against the schema, and the response headers, given the
   resolved template as the request's ``path_pattern``. An empty body is allowed only where the
   spec lists a non-JSON media type (a raw K/V read of an empty value) or no content at all;
   a body where the spec lists no content is an error. ``HEAD`` is checked as ``GET`` without
   the body; ``OPTIONS`` (answered by Flask itself) is not checked.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import yaml
from jsonschema.exceptions import best_match
from jsonschema_path import SchemaPath
from openapi_core.datatypes import RequestParameters
from openapi_core.validation.response import (
    V31ResponseHeadersValidator,
    V31ResponseValidator,
)
from openapi_schema_validator import OAS31Validator
from werkzeug.datastructures import Headers, ImmutableMultiDict

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

#: Every (METHOD, template, status) that a validated response had, across the test session;
#: the smoke walk uses it to prove that every operation was exercised.
SEEN: set[tuple[str, str, int]] = set()


# -- the spec ------------------------------------------------------------------------------------


@functools.cache
def spec_dict() -> dict[str, Any]:
    with SPEC_PATH.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@functools.cache
def _spec_path() -> SchemaPath:
    return SchemaPath.from_dict(spec_dict())


@functools.cache
def _validators() -> tuple[V31ResponseValidator, V31ResponseHeadersValidator]:
    sp = _spec_path()
    return V31ResponseValidator(sp), V31ResponseHeadersValidator(sp)


def _deref(obj: Any) -> Any:
    """Follow a local ``$ref`` (``#/components/...``) once."""
    while isinstance(obj, Mapping) and "$ref" in obj:
        node: Any = spec_dict()
        for part in obj["$ref"].lstrip("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def spec_operations() -> set[tuple[str, str]]:
    """Every (METHOD, path template) the spec describes."""
    out = set()
    for template, item in spec_dict()["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                out.add((method.upper(), template))
    return out


@dataclass(frozen=True)
class _Template:
    template: str
    regex: re.Pattern[str]
    methods: frozenset[str]
    #: literal characters, so that ``/v1/agent/service/register`` beats ``.../{service_id}``
    literal_len: int


def greedy_params(template: str) -> set[str]:
    """The path parameters of ``template`` that may contain ``/`` (``x-trellis-greedy``)."""
    item = spec_dict()["paths"][template]
    params = list(item.get("parameters", []))
    for method in HTTP_METHODS:
        params += (item.get(method) or {}).get("parameters", [])
    out = set()
    for p in map(_deref, params):
        if p.get("in") == "path" and p.get("x-trellis-greedy"):
            out.add(p["name"])
    return out


@functools.cache
def _templates() -> tuple[_Template, ...]:
    out = []
    for template, item in spec_dict()["paths"].items():
        greedy = greedy_params(template)
        parts = re.split(r"\{([^}]+)\}", template)
        rx = ""
        for i, part in enumerate(parts):
            if i % 2 == 0:
                rx += re.escape(part)
            else:
                rx += f"(?P<{part}>(?s:.+))" if part in greedy else f"(?P<{part}>[^/]+)"
        methods = frozenset(m.upper() for m in HTTP_METHODS if m in item)
        literal = sum(len(p) for p in parts[0::2])
        out.append(_Template(template, re.compile(rx + r"\Z"), methods, literal))
    # Most literal first: a literal path beats a template, as with Flask's router.
    out.sort(key=lambda t: (-t.literal_len, t.template))
    return tuple(out)


def resolve(method: str, path: str) -> tuple[str | None, dict[str, str], set[str]]:
    """``(template, path params, allowed methods)`` for a request.

    ``template`` is None when no template has ``method`` (then the allowed methods of the
    templates that match the path, if any, say whether it is a 404 or a 405).
    """
    method = method.upper()
    allowed: set[str] = set()
    for t in _templates():
        m = t.regex.match(path)
        if not m:
            continue
        if method in t.methods:
            return t.template, m.groupdict(), allowed | set(t.methods)
        allowed |= t.methods
    return None, {}, allowed


# -- openapi-core's request/response protocols ---------------------------------------------------


@dataclass
class _Request:
    method: str
    path: str
    path_pattern: str
    parameters: RequestParameters
    host_url: str = "http://trellis.invalid"
    body: bytes | None = None
    content_type: str = ""


@dataclass
class _Response:
    status_code: int
    headers: Headers
    content_type: str
    data: bytes | None = field(default=None)


# -- validation ----------------------------------------------------------------------------------


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _schema_error(e: Any) -> str:
    """One JSON-schema error; for a failed oneOf/anyOf, also the likeliest branch's reason."""
    text = f"at {getattr(e, 'json_path', '$')}: {_short(getattr(e, 'message', str(e)))}"
    if getattr(e, "context", None):
        best = best_match([e])
        if best is not e:
            text += f"\n        most likely: at {best.json_path}: {_short(best.message)}"
    return text


def _describe(exc: BaseException) -> str:
    """A readable account of an openapi-core error, down to each JSON-schema violation."""
    head = f"{type(exc).__name__}: {_short(str(exc))}"
    header = getattr(exc, "name", None)
    if isinstance(header, str):
        head = f"header {header}: {head}"
    seen: set[int] = {id(exc)}
    details: list[str] = []
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        schema_errors = getattr(cause, "schema_errors", None)
        if schema_errors:
            what = f"header {header}" if isinstance(header, str) else "the body"
            head = f"{type(exc).__name__} ({what} does not match its schema):"
            details = [_schema_error(e) for e in schema_errors]
            break
        details.append(f"caused by {type(cause).__name__}: {_short(str(cause))}")
        cause = cause.__cause__ or cause.__context__
    return "\n      ".join([head, *details])


def schema_problems(name: str, instance: Any) -> list[str]:
    """What is wrong with ``instance`` per ``components/schemas/<name>`` (empty: valid)."""
    # The component schemas use '#/components/...' references: validate against a copy of the
    # schema that carries the components, so that they resolve within one document.
    schema = dict(spec_dict()["components"]["schemas"][name])
    schema["components"] = spec_dict()["components"]
    validator = OAS31Validator(schema)
    return [_schema_error(e) for e in validator.iter_errors(instance)]


def _error_schema_problems(name: str, body: bytes) -> list[str]:
    try:
        data = json.loads(body)
    except ValueError as e:
        return [f"body is not JSON ({e})"]
    return schema_problems(name, data)


def _mimetype(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _as_headers(headers: Any) -> Headers:
    if isinstance(headers, Headers):
        return headers
    h = Headers()
    items = headers.multi_items() if hasattr(headers, "multi_items") else headers.items()
    for k, v in items:
        h.add(k, v)
    return h


def problems(
    method: str,
    path: str,
    query_string: str | bytes,
    status: int,
    headers: Any,
    body: bytes | None,
    content_type: str | None,
) -> tuple[str | None, list[str]]:
    """``(template, problems)``: what is wrong with this response, per the spec (empty: OK)."""
    method = method.upper()
    if method == "OPTIONS":
        return None, []
    body = body or b""
    hdrs = _as_headers(headers)
    lookup = "GET" if method == "HEAD" else method
    template, path_params, allowed = resolve(lookup, path)
    if template is None:
        if not allowed:
            if status != 404:
                return None, [f"no path in the spec matches {path!r}, yet the status is {status}"]
            return None, _error_schema_problems("Error404", body)
        out = []
        if status != 405:
            out.append(
                f"the spec has no {method} for {path!r} (only {', '.join(sorted(allowed))}),"
                f" yet the status is {status}"
            )
            return None, out
        if "Allow" not in hdrs:
            out.append("a 405 must carry an Allow header")
        return None, out + _error_schema_problems("Error405", body)

    if isinstance(query_string, bytes):
        query_string = query_string.decode("utf-8", "replace")
    query = ImmutableMultiDict(parse_qsl(query_string, keep_blank_values=True))
    request = _Request(
        method=lookup.lower(),
        path=template,
        path_pattern=template,
        parameters=RequestParameters(query=query, path=path_params),
    )
    response = _Response(
        status_code=status, headers=hdrs, content_type=content_type or "", data=body or None
    )
    full, headers_only = _validators()

    # What does the spec say about this status?
    op = spec_dict()["paths"][template][lookup.lower()]
    declared = _deref(op.get("responses", {}).get(str(status)))
    if declared is None:
        listed = ", ".join(op.get("responses", {}))
        return template, [f"status {status} is not one of the spec's ({listed})"]
    content = declared.get("content") or {}
    mimetype = _mimetype(content_type)

    out: list[str] = []
    if method == "HEAD":
        errors: Iterable[BaseException] = headers_only.iter_errors(request, response)
    elif not body:
        if content and mimetype not in content:
            out.append(f"content type {mimetype!r} is not one of the spec's ({', '.join(content)})")
        elif content and "json" in mimetype:
            out.append("the body is empty, but the spec says JSON")
        errors = headers_only.iter_errors(request, response)
    elif not content:
        out.append(f"the spec lists no body for {status}, yet there are {len(body)} bytes")
        errors = headers_only.iter_errors(request, response)
    else:
        errors = full.iter_errors(request, response)
    out.extend(_describe(e) for e in errors)
    return template, out


def validate(
    method: str,
    path: str,
    query_string: str | bytes,
    status: int,
    headers: Any,
    body: bytes | None,
    content_type: str | None,
) -> str | None:
    """Check one response against the spec; ``AssertionError`` lists what is wrong.

    Returns the matched path template (None for 404/405 of unknown routes and for OPTIONS).
    """
    template, found = problems(method, path, query_string, status, headers, body, content_type)
    if found:
        qs = query_string.decode() if isinstance(query_string, bytes) else query_string
        url = path + (f"?{qs}" if qs else "")
        shown = (body or b"")[:800]
        raise AssertionError(
            f"{method.upper()} {url} -> {status} ({content_type or 'no content type'})"
            f" does not match openapi.yaml"
            + (f" [{template}]" if template else "")
            + ":\n  - "
            + "\n  - ".join(found)
            + f"\n  body: {shown!r}"
        )
    if template is not None:
        SEEN.add(("GET" if method.upper() == "HEAD" else method.upper(), template, status))
    return template


# -- adapters ------------------------------------------------------------------------------------


class ValidatingClient:
    """A Flask test client that checks every response against the spec.

    ``ValidatingClient(app.test_client())`` has the test client's interface (``get``, ``put``,
    ``open``, ...; anything else is delegated); ``.raw`` is the unchecked client; ``.seen`` the
    ``(METHOD, template, status)`` of every checked response.
    """

    def __init__(self, client: Any) -> None:
        self.raw = client
        self.seen: set[tuple[str, str, int]] = set()

    def __getattr__(self, name: str) -> Any:
        if name == "raw":  # not set yet (copy, pickle): do not recurse
            raise AttributeError(name)
        return getattr(self.raw, name)

    def open(self, *args: Any, **kwargs: Any) -> Any:
        resp = self.raw.open(*args, **kwargs)
        req = resp.request
        template = validate(
            req.method,
            req.path,
            req.query_string,
            resp.status_code,
            resp.headers,
            resp.get_data(),
            resp.headers.get("Content-Type"),
        )
        if template is not None:
            method = "GET" if req.method == "HEAD" else req.method
            self.seen.add((method, template, resp.status_code))
        return resp

    def get(self, *args: Any, **kw: Any) -> Any:
        return self.open(*args, method="GET", **kw)

    def put(self, *args: Any, **kw: Any) -> Any:
        return self.open(*args, method="PUT", **kw)

    def post(self, *args: Any, **kw: Any) -> Any:
        return self.open(*args, method="POST", **kw)

    def delete(self, *args: Any, **kw: Any) -> Any:
        return self.open(*args, method="DELETE", **kw)

    def patch(self, *args: Any, **kw: Any) -> Any:
        return self.open(*args, method="PATCH", **kw)

    def head(self, *args: Any, **kw: Any) -> Any:
        return self.open(*args, method="HEAD", **kw)

    def options(self, *args: Any, **kw: Any) -> Any:
        return self.open(*args, method="OPTIONS", **kw)

    def __enter__(self) -> ValidatingClient:
        self.raw.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.raw.__exit__(*exc)


def _validate_httpx(response: Any) -> None:
    req = response.request
    validate(
        req.method,
        req.url.path,
        req.url.query,
        response.status_code,
        response.headers,
        response.content,
        response.headers.get("content-type"),
    )


def httpx_event_hook(response: Any) -> None:
    """An ``httpx.Client`` response hook: reads the body, then checks the response.

    ``httpx.Client(base_url=url, event_hooks={"response": [httpx_event_hook]})``
    """
    response.read()
    _validate_httpx(response)


async def async_httpx_event_hook(response: Any) -> None:
    """The same for an ``httpx.AsyncClient``."""
    await response.aread()
    _validate_httpx(response)
