"""Request parsing and response helpers shared by every blueprint.

Everything here validates what the client sent and raises ``BadRequest`` (never lets a
``ValueError`` or a ``KeyError`` escape into a 500). Blocking queries live here too: see
``blocking``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

from flask import Response, current_app, request

from trellis.api.errors import BadRequest, PayloadTooLarge
from trellis.api.feed import Watch
from trellis.api.longpoll import RERUN, Park, Parked, Since, client_address
from trellis.proxy.bexpr import Filter, FilterError, Struct
from trellis.proxy.bexpr import parse_optional as parse_filter
from trellis.proxy.durations import DurationError, parse_duration
from trellis.proxy.requestrules import FALSE, FieldNameError, parse_bool, split_request_options

U64_MAX = (1 << 64) - 1
#: How deeply a JSON body may nest. Real registrations are under ten levels deep; the limit keeps
#: the recursive code that walks a body (to_pascal, marshmallow, json.dumps) far from Python's
#: recursion limit, which a 1 MiB body of ``[[[[...`` would otherwise reach (a 500).
MAX_JSON_DEPTH = 64

T = TypeVar("T")
V = TypeVar("V")


def services():
    """The per-app services (store, settings, ...) set up by ``create_app``."""
    return current_app.extensions["trellis"]


# Consul reads its boolean query parameters in two ways, and Trellis reads each as Consul does:
#
# * Present or absent (``if _, ok := params["recurse"]``): K/V's ``recurse``, ``keys`` and
#   ``raw``, and the consistency modes (``stale``, ``consistent``, ``cached``, ``leader``,
#   which Trellis has no use for: every read is consistent). The value is not looked at:
#   ``?recurse``, ``?recurse=``, ``?recurse=1`` and ``?recurse=None`` (what a Python client
#   sends for a flag it set to None) are all a recursive read: ``present``.
# * A value read with Go's ``strconv.ParseBool`` (``getBoolQueryParam``): ``passing``, ``pem``,
#   ``replace-existing-checks``. No value (``?passing``, ``?passing=``) is true; ``1``, ``t``,
#   ``true``, ``True``, ``TRUE`` are true and ``0``, ``f``, ``false``, ``False``, ``FALSE``
#   false; anything else is a 400, as in Consul (``?passing=None`` too): ``flag``.
#
# The differences, on purpose (README, "Consul request rules"): a present-or-absent flag whose
# value says false (``?recurse=false``) is refused, where Consul reads it as set; Consul's
# ``?pem`` with no value is false (JSON), and its ``replace-existing-checks`` is true only
# for no value or ``true`` (``=1`` is silently false).


def flag(name: str) -> bool:
    """A boolean query parameter that takes a value (see above): absent is false, no value
    true, else Go's ParseBool (``trellis.proxy.requestrules.parse_bool``, the node agent's
    rule too). Anything else is the client's fault: a 400."""
    if name not in request.args:
        return False
    v = request.args.get(name, "")
    value = parse_bool(v)
    if value is None:
        raise BadRequest(
            f"query parameter {name!r} must be true or false (or no value, which is true),"
            f" not {v[:64]!r}"
        )
    return value


def present(name: str) -> bool:
    """A present-or-absent query flag (see above): set by its name alone, whatever its value,
    except a value that says false. Consul would read ``?recurse=false`` as set, and delete a
    whole subtree for a client that asked for one key; the client means two things at once,
    so it gets a 400 that says which one Consul would do."""
    if name not in request.args:
        return False
    for v in request.args.getlist(name):
        if v in FALSE:
            raise BadRequest(
                f"query parameter {name!r} is set by its presence, whatever its value (Consul"
                f" reads {name}={v} as {name} set): leave it out to turn it off"
            )
    return True


def accepts_filter(view: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a view that evaluates ``?filter=`` (with ``filter_arg``); see ``refuse_filter``."""
    view.trellis_accepts_filter = True  # type: ignore[attr-defined]
    return view


def filter_arg(shape: Struct) -> Filter | None:
    """The request's ``?filter=`` expression, checked against the endpoint's ``shape``.

    ``None`` when there is none (an empty ``?filter=`` is no filter, in Consul too). A view
    reads it before it blocks, so a bad expression is answered at once rather than after the
    wait. The client wrote the expression: anything wrong with it is a 400 that says where.
    """
    try:
        return parse_filter(request.args.getlist("filter"), shape)
    except FilterError as e:
        raise BadRequest(f"query parameter 'filter': {e}") from None


def refuse_filter() -> None:
    """Refuse ``?filter=`` on endpoints that do not evaluate it (a ``before_request`` hook).

    The endpoints where Consul filters are marked with ``accepts_filter`` and evaluate the
    expression. Elsewhere Consul ignores the parameter; Trellis refuses it instead, because a
    client that sends one (a script, a tool that filters every call) would take the whole
    answer for a filtered one and act on entries it meant to exclude, and for a write it
    would not know that the filter changed nothing. The client is at fault only in asking for
    what this endpoint does not do, so it gets a 400 that says so. An empty ``?filter=``
    filters nothing and is accepted. A path that routes nowhere keeps its 404 or 405.
    """
    # Every request passes here: look at the raw query string before parsing the arguments
    # (a percent-encoded name, "%66ilter", still reaches the parsed check).
    raw = request.query_string
    if b"filter" not in raw and b"%" not in raw:
        return
    if request.url_rule is None or not any(v.strip() for v in request.args.getlist("filter")):
        return
    view = current_app.view_functions.get(request.endpoint or "")
    if request.method in ("GET", "HEAD") and getattr(view, "trellis_accepts_filter", False):
        return
    raise BadRequest(
        "query parameter 'filter' is not supported on this endpoint (Consul does not filter"
        " it either); Trellis refuses it rather than return results that look filtered and"
        " are not: leave out 'filter'"
    )


def clean_path(path: str) -> str:
    """``path`` as Go's net/http ServeMux cleans it before routing (``cleanPath``): repeated
    slashes merged, ``.`` segments dropped, each ``..`` with the segment before it (never
    above the root), a trailing slash kept. Pure."""
    if "//" not in path and "/." not in path and path.startswith("/"):
        return path  # the common case: nothing to clean, decided without splitting
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if out:
                out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    clean = "/" + "/".join(out)
    if path.endswith("/") and clean != "/":
        clean += "/"
    return clean


def redirect_unclean_path() -> Response | None:
    """Answer a path that is not in its clean form (``/v1/kv/a//b``) as Consul does, before
    routing (a ``before_request`` hook; the one place for every endpoint).

    Consul's HTTP server is Go's ServeMux, which redirects such a path to its clean form
    (``/v1/kv/a/b``) with a 301 whatever the method: a K/V key with an empty, ``.`` or ``..``
    segment can never be read or written through ``/v1/kv/`` (a transaction can write one).
    A read gets that 301 here too (with the query kept). A write does not: a client follows
    a 301 to a PUT either as a GET (Go's client: the write silently never happens) or as a
    PUT without its body (Python's requests: an empty value is written and acknowledged), so
    it is refused with a 400 that names the clean path; the client is at fault. A trailing
    slash is clean: ``PUT /v1/kv/dir/`` writes the key ``dir/`` (a "folder").
    """
    raw = request.environ.get("PATH_INFO", "")
    clean = clean_path(raw)
    if clean == raw:
        return None
    # PATH_INFO holds the path's bytes as latin-1 (WSGI); the Location is them %-encoded.
    location = quote(clean.encode("latin-1", "replace"), safe="/:@!$&'()*+,;=-._~")
    if request.query_string:
        location += "?" + request.query_string.decode("latin-1")
    if request.method in ("GET", "HEAD"):
        return Response(status=301, headers={"Location": location})
    raise BadRequest(
        f"the path {quote(raw.encode('latin-1', 'replace'), safe='/')!r} has an empty, '.' or"
        f" '..' segment: Consul redirects it to {location!r} (a 301, which clients follow"
        " without the write's body or method); send the clean path"
    )


#: The paths whose Consul endpoints take ``?peer=`` (a cluster peer's imported services).
PEERED_PATHS = ("/v1/catalog/", "/v1/health/")


def refuse_peer() -> Response | None:
    """``?peer=NAME`` on the catalog and health endpoints that take it in Consul (a
    ``before_request`` hook, the one place). Trellis has no cluster peering, so every peer is
    one it does not know. Ignoring the parameter answered with this cluster's instances as if
    they were the peer's, and the client would connect to them. Instead a read answers as
    Consul answers a peer it does not know: with nothing (an empty list or map; index 1, and a
    blocking read waits out its ``wait`` first, so that a client polling it does not spin). A
    write naming a peer is a 400. An empty ``?peer=`` is the local cluster, as in Consul."""
    if b"peer" not in request.query_string and b"%" not in request.query_string:
        return None
    if not request.path.startswith(PEERED_PATHS):
        return None
    if not any(v.strip() for v in request.args.getlist("peer")):
        return None
    if request.method not in ("GET", "HEAD"):
        raise BadRequest(
            "Trellis has no cluster peering: query parameter 'peer' names a peer that does"
            " not exist here; leave it out (or empty) for this cluster"
        )
    index = uint_arg("index")
    wait = wait_arg()
    if index:
        time.sleep(wait)  # cooperative under the gevent worker; bounded by max_wait
    path = request.path
    empty: Any = []
    if path == "/v1/catalog/services":
        empty = {}
    elif path.startswith("/v1/catalog/node/"):
        empty = None
    elif path.startswith("/v1/catalog/node-services/"):
        empty = {"Node": None, "Services": []}
    return json_response(empty, index=1)


def uint_arg(name: str, *, maximum: int = U64_MAX) -> int | None:
    v = request.args.get(name)
    if v is None:
        return None
    v = v.strip()
    # isdigit() alone also accepts non-ASCII digits: "\u0661" (Arabic-Indic one), which int()
    # reads as 1, and "\u00b2" (superscript two), which int() refuses (a 500). ASCII only.
    if not (v.isascii() and v.isdigit()):
        raise BadRequest(f"query parameter {name!r} must be a whole number >= 0, not {v!r}")
    # int() refuses strings of more than 4300 digits (a ValueError, so a 500); any number of
    # more than 20 digits is above U64_MAX anyway.
    digits = v.lstrip("0") or "0"
    n = int(digits) if len(digits) <= 20 else maximum + 1
    if n > maximum:
        raise BadRequest(f"query parameter {name!r} must be at most {maximum}")
    return n


def str_arg(name: str, *, max_len: int = 512) -> str | None:
    v = request.args.get(name)
    if v is None:
        return None
    if len(v) > max_len:
        raise BadRequest(f"query parameter {name!r} is longer than {max_len} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
        raise BadRequest(f"query parameter {name!r} contains control characters")
    return v


def json_body(*, required: bool = True, allow_list: bool = False) -> Any:
    """Parse the request body as JSON. An empty body is ``None`` when not ``required``."""
    # MAX_CONTENT_LENGTH is the larger of this limit and the K/V value limit (K/V PUTs are raw
    # bodies), so a smaller http_max_body must be enforced here for JSON bodies.
    limit = services().settings.http_max_body
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} byte limit")
    raw = request.get_data(cache=True)
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} byte limit")
    if not raw.strip():
        if required:
            raise BadRequest("request body is empty; expected a JSON object")
        return None
    # The Content-Type is not checked: Consul ignores it, and so do its users' scripts
    # (``curl -d @service.json`` sends application/x-www-form-urlencoded). The body must
    # parse as JSON whatever it claims to be.
    try:
        # NaN and Infinity are not JSON (RFC 8259); Python accepts them, stores them, and then
        # writes responses no JSON client can parse. Refuse them here, and the numbers that
        # become them: 1e400 parses as infinity, and an opaque map (a proxy's Config) kept it.
        data = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError:
        raise BadRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    _check_json_tree(data)
    if isinstance(data, dict):
        return _drop_request_options(data)
    if allow_list and isinstance(data, list):
        return data
    if data is None and not required:
        return None
    raise BadRequest("request body must be a JSON object")


def _drop_request_options(body: dict) -> dict:
    """``body`` without its ``WriteRequest``/``QueryOptions`` keys (in any case), which are
    accepted and ignored as Consul ignores them (``trellis.proxy.requestrules``, the rule the
    node agent shares): the token is the request's (header, or ``?token=``), never the body's.

    One refusal Consul does not make, with ACLs on: a body whose ``WriteRequest.Token`` is
    the only token the request carries. Consul runs it with the anonymous token, so the
    client believes it wrote as the token it sent and wrote as no one (or was refused, and
    cannot tell why). It is a 400 that says where to put the token; the client is at fault.
    With ACLs off no token matters, and the body is accepted as Consul accepts it.
    """
    try:
        split = split_request_options(body)
    except FieldNameError as e:
        raise BadRequest(str(e)) from None
    if split.token and services().settings.acl_enabled and not _request_carries_token():
        raise BadRequest(
            f"the token in {split.where} is not read (Consul ignores it too, and would run"
            " the request as anonymous): send it in the X-Consul-Token header"
        )
    return split.body


def _request_carries_token() -> bool:
    from trellis.api.acl.service import request_secret  # not at import: it imports this module

    return request_secret() is not None or bool(request.args.get("token"))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is too large for a number (JSON readers use doubles)")
    return value


def _finite_int(text: str) -> int:
    # Beyond a double's range a number reads as infinity in most JSON clients (Go's fails).
    if len(text.lstrip("-")) > 308:
        raise ValueError(f"{text[:40]}... is too large for a number (JSON readers use doubles)")
    return int(text)


# One decoder for every body: json.loads(raw, **hooks) would build a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite, parse_int=_finite_int)


def _check_json_tree(data: Any) -> None:
    """Refuse bodies nested deeper than MAX_JSON_DEPTH, and strings holding a lone surrogate.

    ``"\\ud800"`` is a valid JSON escape but no Unicode text: it cannot be encoded as UTF-8, so
    the store (and every response that would carry it) failed with a 500. Iterative, so that
    the check itself cannot overflow the stack.
    """
    stack = [(data, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((k, depth) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(
                    "request body holds a string that is not valid Unicode (a lone surrogate"
                    " escape such as \\ud800)"
                ) from None


def json_response(
    data: Any, *, status: int = 200, index: int | None = None, headers: dict | None = None
) -> Response:
    pretty = "pretty" in request.args
    body = json.dumps(data, indent=4 if pretty else None, separators=None if pretty else (",", ":"))
    resp = Response(body + ("\n" if pretty else ""), status=status, mimetype="application/json")
    if index is not None:
        add_index_headers(resp, index)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def add_index_headers(resp: Response, index: int) -> None:
    resp.headers["X-Consul-Index"] = str(max(1, index))
    resp.headers["X-Consul-KnownLeader"] = "true"
    resp.headers["X-Consul-LastContact"] = "0"


def wait_arg() -> float:
    """``?wait=`` as seconds, defaulting and clamped as Consul does (default 5m, max 10m)."""
    settings = services().settings
    v = request.args.get("wait")
    if v is None or v.strip() == "":
        return settings.default_wait
    try:
        w = parse_duration(v)
    except DurationError as e:
        raise BadRequest(f"query parameter 'wait': {e}") from None
    return min(w, settings.max_wait)


def blocking(
    watch: Watch,
    compute: Callable[[], tuple[T, int]],
    *,
    due_in: Callable[[tuple[T, int]], float] | None = None,
) -> tuple[T, int]:
    """Run a read as a Consul blocking query (``?index=&wait=``).

    ``compute()`` returns ``(result, index)``, and must never return an index newer than its
    result: read the index first (or in the same snapshot as the result), then the result. A
    write that commits between two separate reads then makes the result newer than the index,
    which costs the client one more query; the other way round, the answer would carry the
    write's index with the state before it, and the client's next query (at that index) would
    find nothing new and wait out its whole ``wait`` (the lost intention updates of the sidecar
    fan-out; tests/test_api_blocking_snapshot.py). Without ``?index`` (or with 0) it runs once.
    Otherwise it returns as soon as the result's index is above the client's, or when ``wait``
    (plus up to wait/16 of jitter, so that many clients do not return together) has passed,
    with the latest result either way. Until then the query is parked: this raises
    ``Parked``, and ``trellis.api.longpoll`` waits on the change feed outside the view, then runs
    the view again. See ``trellis.api.feed`` for why no wake-up can be lost.

    ``due_in(value)``, for a result that goes stale with time as well as with writes (an agent
    leaf falls due for renewal): the seconds after which the view must run again anyway.
    """
    min_index = uint_arg("index")
    wait = wait_arg()
    if not min_index:
        return compute()

    def versioned() -> tuple[tuple[T, int], str]:
        value = compute()
        return value, str(value[1])

    return _block(watch, Since.index(min_index), versioned, wait, due_in)


def digest_blocking(watch: Watch, compute: Callable[[], tuple[T, int]]) -> tuple[T, int]:
    """A blocking query (``?index=&wait=``) whose index is a digest of its result rather than
    a store position (``event/list``'s, as Consul's): it waits while the result's index is
    the client's, and answers as soon as it is any other. ``compute`` as for ``blocking``."""
    min_index = uint_arg("index")
    wait = wait_arg()
    if not min_index:
        return compute()

    def versioned() -> tuple[tuple[T, int], str]:
        value = compute()
        return value, str(value[1])

    return _block(watch, Since.changed(min_index), versioned, wait, None)


def content_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def hash_blocking(watch: Watch, compute: Callable[[], T]) -> tuple[T, str]:
    """Agent-local blocking by content hash (``?hash=&wait=``), as Consul's agent endpoints do:
    the same parked path as ``blocking``, with a result's content hash for its index."""
    want = str_arg("hash")
    wait = wait_arg()

    def versioned() -> tuple[tuple[T, str], str]:
        result = compute()
        h = content_hash(result)
        return (result, h), h

    if not want:
        return versioned()[0]
    return _block(watch, Since.hash(want), versioned, wait, None)


def _block(
    watch: Watch,
    since: Since,
    compute: Callable[[], tuple[V, str]],
    wait: float,
    due_in: Callable[[V], float] | None,
) -> V:
    """Return ``compute()``'s value if its version is news to the client (or the wait is
    over); otherwise park the query (raise ``Parked``). ``compute`` returns the value and its
    version (an index or a content hash, as ``since`` compares them)."""
    svc = services()
    key = _read_key()
    feed = svc.store.feed
    pos = feed.position()
    park = request.environ.get(RERUN)
    if park is None or park.timed:
        # A fresh request always reads the store itself, so that a client reads its own writes
        # even when another process served the write; so does a re-run at a recheck time,
        # since the shared reads only know about writes.
        if park is None:
            deadline = time.monotonic() + wait + random.uniform(0, wait / 16)  # noqa: S311
        else:
            deadline = park.deadline
        value, version = compute()
        svc.shared_reads.remember(key, pos, (value, version))
    else:
        # A re-run after a wake-up: the queries woken by the same change share one read.
        deadline = park.deadline
        value, version = svc.shared_reads.read(key, pos, compute)
    now = time.monotonic()
    if since.is_new(version) or now >= deadline or feed.draining:
        return value
    if park is None and since.ahead_of(version) and int(since.held) > svc.store.current_index():
        # An index this store never gave: the client holds one from a store that was replaced
        # (a server restarted empty, a restore). Consul would park it for the whole wait and
        # the client would learn only then that the index went back; answering now lets it
        # reset at once (a node agent then re-registers its node: anti-entropy). One extra
        # read, only for an index above the result's.
        return value
    if park is None and svc.parked_clients.full(client_address(request.environ)):
        # This client already holds its share of parked queries in this process: answer now
        # with what there is, as at the deadline (a client re-polls; it is not refused).
        return value
    recheck = math.inf
    if due_in is not None:
        # Not sooner than 50 ms: a result that claims to be due already must not spin.
        recheck = now + max(0.05, due_in(value))
    raise Parked(Park(watch, pos, deadline, key, since, version, recheck))


def _read_key() -> tuple:
    """What identifies a blocking read: the path, the arguments that shape the result, and
    whoever asks (results may later be filtered by token). Not what the client holds (its
    index or hash): queries holding different versions of one read share its result."""
    args = tuple(
        sorted(
            (k, v) for k, v in request.args.items(multi=True) if k not in ("index", "wait", "hash")
        )
    )
    who = (request.headers.get("X-Consul-Token", ""), request.headers.get("Authorization", ""))
    return (request.method, request.path, args, who)
