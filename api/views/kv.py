"""``/v1/kv/<key>``: Consul's K/V API (get, recurse, keys, raw, put with cas/flags or a lock's
acquire/release, delete)."""

from __future__ import annotations

import base64
import time
from urllib.parse import unquote_to_bytes

from flask import Blueprint, Response, request
from werkzeug.routing import PathConverter

from trellis.api.acl import service as acl
from trellis.api.errors import BadRequest, PayloadTooLarge
from trellis.api.feed import Watch
from trellis.api.http import (
    add_index_headers,
    blocking,
    json_response,
    present,
    services,
    str_arg,
    uint_arg,
)
from trellis.api.store.base import KVEntry
from trellis.api.views.catalog import check_dc

bp = Blueprint("kv", __name__)


class KeyConverter(PathConverter):
    """Werkzeug's ``path`` converter, but also matching newlines (its ``.`` does not), so that
    a key holding one reaches ``check_key`` and is refused as a bad key (400), rather than
    answered "no such endpoint" (404)."""

    regex = "(?s:[^/].*?)"


@bp.record_once
def _add_converter(state) -> None:
    # Recorded before the routes below, so it is in the URL map before they are compiled.
    state.app.url_map.converters["kvkey"] = KeyConverter


MAX_KEY_BYTES = 1024


def check_key(key: str, *, allow_empty: bool) -> str:
    """Refuse keys that no client means: control characters, ``.``/``..`` segments, huge."""
    if key == "":
        if allow_empty:
            return key
        raise BadRequest("Missing key name")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(f"key is longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise BadRequest("key contains control characters")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in key):
        raise BadRequest("key is not valid UTF-8")
    if "\ufffd" in key and not _raw_path_is_utf8():
        # Werkzeug decodes an invalid UTF-8 path with errors="replace", so /v1/kv/%ff and
        # /v1/kv/%fe both became the key "\ufffd": a PUT silently wrote another key than the
        # client named. Look at the raw path to tell them from a real U+FFFD.
        raise BadRequest("key is not valid UTF-8")
    if any(seg in (".", "..") for seg in key.split("/")):
        raise BadRequest("key must not contain '.' or '..' segments")
    return key


def _raw_path_is_utf8() -> bool:
    """Whether the path the client sent decodes as UTF-8. Gunicorn and Werkzeug keep it in
    RAW_URI/REQUEST_URI (still %-encoded); PATH_INFO is the decoded form, as latin-1."""
    env = request.environ
    try:
        raw = env.get("RAW_URI") or env.get("REQUEST_URI")
        if raw:
            unquote_to_bytes(raw.encode("latin-1").split(b"?", 1)[0]).decode("utf-8")
        else:
            env.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        return False
    return True


def entry_json(e: KVEntry) -> dict:
    return {
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        # Consul reports an empty value (a "folder" key such as ``app/``) as null, not "".
        "Value": base64.b64encode(e.value).decode() if e.value else None,
        "Session": e.session,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    }


def _folded_keys(entries: list[KVEntry], prefix: str, sep: str | None) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for e in entries:
        k = e.key
        if sep:
            i = k.find(sep, len(prefix))
            if i >= 0:
                k = k[: i + len(sep)]
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


@bp.get("/v1/kv/", defaults={"key": ""})
@bp.get("/v1/kv/<kvkey:key>")
def get(key: str):
    check_dc()  # K/V took ?dc= and answered from this datacenter whatever it named
    recurse, keys, raw = present("recurse"), present("keys"), present("raw")
    sep = str_arg("separator", max_len=64)
    check_key(key, allow_empty=recurse or keys)
    authz = acl.current()
    if not (keys or recurse):
        acl.require(authz.key_read(key), f"key:read on {key!r}")
    elif keys and services().settings.acl_enable_key_list_policy:
        acl.require(authz.key_list(key), f"key:list on {key!r}")
    store = services().store
    if keys or recurse:
        watch = Watch("kv", prefixes=(key,))

        def compute():
            index = store.kv_index(key, exact=False)  # first: see blocking
            return store.kv_list(key), index
    else:
        watch = Watch("kv", exact=(key,))

        def compute():
            e = store.kv_get(key)
            if e is None:
                # A missing key reports the index of its last delete (or of the table), read
                # before a second look: a put between the two looks is then never hidden
                # behind its own index with "no such key" (see blocking).
                index = store.kv_index(key, exact=True)
                e = store.kv_get(key)
                if e is None:
                    return [], index
            return [e], e.modify_index

    entries, index = blocking(watch, compute)
    filtered = False
    if keys or recurse:
        # A recursive read or a key listing returns only what the token may read, as in
        # Consul, and says so when it hid something.
        allowed = authz.key_list if keys else authz.key_read
        visible = [e for e in entries if allowed(e.key)]
        filtered = len(visible) < len(entries)
        entries = visible
    extra = {"X-Consul-Results-Filtered-By-ACLs": "true"} if filtered else None
    if not entries:
        # The same error shape as every other error (api.errors.TrellisError.to_json).
        body = {"error": f"no key found at {key!r}", "code": "not_found", "status": 404}
        resp = json_response(body, status=404, headers=extra)
        add_index_headers(resp, index)
        return resp
    if keys:
        return json_response(_folded_keys(entries, key, sep), index=index, headers=extra)
    if raw and not recurse:
        # Served as bytes that a browser must not sniff into HTML (CVE-2020-25864).
        resp = Response(entries[0].value or b"", mimetype="application/octet-stream")
        add_index_headers(resp, index)
        return resp
    return json_response([entry_json(e) for e in entries], index=index, headers=extra)


@bp.put("/v1/kv/", defaults={"key": ""})
@bp.put("/v1/kv/<kvkey:key>")
def put(key: str):
    check_dc()
    check_key(key, allow_empty=False)
    settings = services().settings
    flags = uint_arg("flags") or 0
    cas = uint_arg("cas")
    limit = settings.kv_max_value_size
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Value exceeds {limit} byte limit")
    value = request.get_data(cache=False)
    if len(value) > limit:
        raise PayloadTooLarge(f"Value exceeds {limit} byte limit")
    acl.require(acl.current().key_write(key), f"key:write on {key!r}")
    store = services().store
    # As Consul: release wins over acquire, and either over cas (kvs_endpoint.go).
    if "release" in request.args:
        session = _session_arg("release")
        return json_response(store.kv_release(key, value, session=session, flags=flags))
    if "acquire" in request.args:
        session = _session_arg("acquire")
        ok = store.kv_acquire(key, value, session=session, flags=flags, now=time.time())
        return json_response(ok)
    ok = store.kv_put(key, value, flags=flags, cas=cas)
    return json_response(ok)


def _session_arg(name: str) -> str:
    """The session of ``?acquire=`` / ``?release=``; the client's fault if it names none."""
    session = str_arg(name, max_len=128)
    if not session:
        raise BadRequest(f"query parameter {name!r} must name a session")
    return session


@bp.delete("/v1/kv/", defaults={"key": ""})
@bp.delete("/v1/kv/<kvkey:key>")
def delete(key: str):
    check_dc()
    recurse = present("recurse")
    check_key(key, allow_empty=recurse)
    cas = uint_arg("cas")
    if recurse and cas is not None:
        raise BadRequest("cas cannot be combined with recurse")
    authz = acl.current()
    if recurse:
        acl.require(authz.key_write_prefix(key), f"key:write on every key under {key!r}")
    else:
        acl.require(authz.key_write(key), f"key:write on {key!r}")
    ok = services().store.kv_delete(key, recurse=recurse, cas=cas)
    return json_response(ok)
