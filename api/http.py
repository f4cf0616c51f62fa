"""Request parsing and response helpers shared by every blueprint.

Everything here validates what the client sent and raises ``BadRequest`` (never lets a
``ValueError`` or a ``KeyError`` escape into a 500). Blocking queries live here too: see
``blocking``.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, request

from api.errors import BadRequest, UnsupportedMediaType
from api.feed import Watch
from proxy.durations import DurationError, parse_duration

U64_MAX = (1 << 64) - 1


def services():
    """The per-app services (store, settings, ...) set up by ``create_app``."""
    return current_app.extensions["trellis"]


def flag(name: str) -> bool:
    """A boolean query parameter: present (``?recurse``) or ``true``/``1`` is true."""
    if name not in request.args:
        return False
    v = request.args.get(name, "").strip().lower()
    if v in ("", "true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise BadRequest(f"query parameter {name!r} must be true or false, not {v!r}")


def uint_arg(name: str, *, maximum: int = U64_MAX) -> int | None:
    v = request.args.get(name)
    if v is None:
        return None
    v = v.strip()
    if not v.isdigit():
        raise BadRequest(f"query parameter {name!r} must be a whole number >= 0, not {v!r}")
    n = int(v)
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
    raw = request.get_data(cache=True)
    if not raw.strip():
        if required:
            raise BadRequest("request body is empty; expected a JSON object")
        return None
    ctype = request.mimetype
    if (
        ctype
        and ctype not in ("application/json", "text/plain", "application/octet-stream")
        and ("json" not in ctype)
    ):
        # Consul clients send JSON with assorted content types (or none); only refuse the
        # ones that are clearly something else, such as form posts.
        if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            raise UnsupportedMediaType(f"expected a JSON body, got {ctype}")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if isinstance(data, dict) or (allow_list and isinstance(data, list)):
        return data
    if data is None and not required:
        return None
    raise BadRequest("request body must be a JSON object")


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


def blocking(watch: Watch, compute: Callable[[], tuple[Any, int]]) -> tuple[Any, int]:
    """Run a read as a Consul blocking query.

    ``compute()`` returns ``(result, index)``. Without ``?index`` (or with 0) it runs once.
    Otherwise it returns as soon as the result's index is above the client's, or when ``wait``
    (plus up to wait/16 of jitter, so that many clients do not return together) has passed,
    with the latest result either way. See ``api.feed`` for why no wake-up can be lost.
    """
    min_index = uint_arg("index")
    wait = wait_arg()
    feed = services().store.feed
    if not min_index:
        return compute()
    deadline = time.monotonic() + wait + random.uniform(0, wait / 16)  # noqa: S311 - jitter
    while True:
        pos = feed.position()
        result, index = compute()
        if index > min_index:
            return result, index
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return result, index
        feed.wait(watch, pos, remaining)


def content_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def hash_blocking(watch: Watch, compute: Callable[[], Any]) -> tuple[Any, str]:
    """Agent-local blocking by content hash (``?hash=&wait=``), as Consul's agent endpoints do."""
    want = str_arg("hash")
    wait = wait_arg()
    feed = services().store.feed
    deadline = time.monotonic() + wait
    while True:
        pos = feed.position()
        result = compute()
        h = content_hash(result)
        if not want or h != want:
            return result, h
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return result, h
        feed.wait(watch, pos, remaining)
