"""``/v1/config``: Consul's config entries for the kinds that map onto Trellis (see
``trellis.api.config_entries`` for what each kind is backed by)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flask import Blueprint

from trellis.api import config_entries as ce
from trellis.api.acl import service as acl
from trellis.api.acl.rules import Authorizer
from trellis.api.feed import Watch
from trellis.api.http import blocking, json_body, json_response, services, uint_arg
from trellis.api.store.security import IntentionRecord
from trellis.api.views.catalog import check_dc
from trellis.proxy import authz

bp = Blueprint("config", __name__)


def _prefix(kind: str) -> str:
    return f"config/{kind}/"


# -- ACLs, as Consul's (each kind's CanRead / CanWrite) ------------------------------------------


def may_read(authz_: Authorizer, kind: str, name: str) -> bool:
    if kind == ce.INTENTIONS:
        return authz_.intention_read(name)
    if kind == ce.SERVICE_DEFAULTS:
        return authz_.service_read(name)
    return True  # proxy-defaults: any token may read it (Consul's)


def require_write(kind: str, name: str) -> None:
    a = acl.current()
    if kind == ce.INTENTIONS:
        acl.require(a.intention_write(name), f"intentions:write on {name!r}")
    elif kind == ce.SERVICE_DEFAULTS:
        acl.require(a.service_write(name), f"service:write on {name!r}")
    else:
        acl.require(a.operator_write(), "operator:write")


# -- reads --------------------------------------------------------------------------------------


def _intention_entries(only: str | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """The service-intentions entries (of destination ``only``, or all), built from the
    intentions store in one read, with that read's index."""
    records, index = services().store.intentions_at()
    by_dest: dict[str, list[IntentionRecord]] = {}
    for r in records:
        if only is None or r.destination == only:
            by_dest.setdefault(r.destination, []).append(r)
    out = {}
    for dest, recs in by_dest.items():
        recs.sort(key=lambda r: (-authz.precedence(r.source, r.destination), r.source))
        out[dest] = {
            "Kind": ce.INTENTIONS,
            "Name": dest,
            "Sources": [
                {
                    "Name": r.source,
                    "Action": r.action,
                    "Precedence": authz.precedence(r.source, r.destination),
                    "Type": "consul",
                    "Description": r.description,
                    "LegacyID": r.id,
                    "LegacyMeta": dict(r.meta),
                    "LegacyCreateTime": r.created_at,
                    "LegacyUpdateTime": r.updated_at,
                }
                for r in recs
            ],
            "CreateIndex": min(r.create_index for r in recs),
            "ModifyIndex": max(r.modify_index for r in recs),
        }
    return out, index


def _stored(kind: str, only: str | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """The stored entries of ``kind`` (or the one named ``only``) with the index to answer
    with, read first (see blocking): the entry's key's, or the system topic's, which every
    entry write moves."""
    store = services().store
    prefix = _prefix(kind) + (only or "")
    # One entry: its own key's index (moved by its writes only), else the topic's.
    index = (only is not None and store.topic_index(f"system/{prefix}")) or store.topic_index(
        "system"
    )
    out = {}
    for key, value, created, modified in store.system_list(prefix):
        name = key[len(_prefix(kind)) :]
        if only is not None and name != only:
            continue
        out[name] = {**value, "CreateIndex": created, "ModifyIndex": modified}
    return out, index


def _entries(kind: str, only: str | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    if kind == ce.INTENTIONS:
        return _intention_entries(only)
    return _stored(kind, only)


def _watch(kind: str) -> Watch:
    if kind == ce.INTENTIONS:
        return Watch("intentions", prefixes=("",))
    return Watch("system", prefixes=(_prefix(kind),))


@bp.get("/v1/config/<kind>")
def list_entries(kind: str):
    """Every entry of ``kind`` the token may read, by name; blocking."""
    check_dc()
    ce.kind_arg(kind)
    authz_ = acl.current()
    data, index = blocking(_watch(kind), lambda: _entries(kind))
    out = [e for n, e in sorted(data.items()) if may_read(authz_, kind, n)]
    return json_response(out, index=index)


@bp.get("/v1/config/<kind>/<name>")
def get_entry(kind: str, name: str):
    """One entry; 404 when there is none (blocking all the same, with the index)."""
    check_dc()
    ce.kind_arg(kind)
    name = ce.entry_name(kind, name)
    a = acl.current()
    acl.require(may_read(a, kind, name), f"read on {kind} {name!r}")
    data, index = blocking(_watch(kind), lambda: _entries(kind, name))
    entry = data.get(name)
    if entry is None:
        return json_response(
            {
                "error": f"Config entry not found for {kind!r} / {name!r}",
                "code": "not_found",
                "status": 404,
            },
            status=404,
            index=index,
        )
    return json_response(entry, index=index)


# -- writes -------------------------------------------------------------------------------------


@bp.put("/v1/config")
def put_entry():
    """Create or replace an entry; with ``?cas=N`` only if its ModifyIndex is still N (0:
    only if there is none), answering ``false`` otherwise, as Consul."""
    check_dc()
    cas = uint_arg("cas")
    body = json_body()
    kind, name, entry = ce.check_entry(ce.fold_keys(body))
    require_write(kind, name)
    if kind == ce.INTENTIONS:
        return json_response(_put_intentions(name, entry["Sources"], cas))
    return json_response(_write_stored(kind, name, entry, cas))


@bp.delete("/v1/config/<kind>/<name>")
def delete_entry(kind: str, name: str):
    """Delete an entry (a missing one is no error). Without ``?cas`` the answer is ``{}``, with
    it ``true``/``false``, as Consul answers each."""
    check_dc()
    ce.kind_arg(kind)
    name = ce.entry_name(kind, name)
    cas = uint_arg("cas")
    require_write(kind, name)
    if kind == ce.INTENTIONS:
        done = _put_intentions(name, None, cas)
    else:
        done = _write_stored(kind, name, None, cas)
    return json_response(done if cas is not None else {})


def _write_stored(kind: str, name: str, entry: dict[str, Any] | None, cas: int | None) -> bool:
    """Put (or, with None, delete) the entry's document; with ``cas``, compare-and-set on
    its modify index in the same transaction (0: it must not exist), False on a mismatch."""
    key = _prefix(kind) + name
    expect = {key: cas} if cas is not None else None
    return services().store.system_write({key: entry}, expect=expect) is not None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _put_intentions(
    destination: str, sources: list[dict[str, Any]] | None, cas: int | None
) -> bool:
    """Make the intentions to ``destination`` exactly ``sources`` (None: delete them all)."""
    store = services().store
    current, _ = _intention_entries(destination)
    existing = current.get(destination)
    if cas is not None and (existing["ModifyIndex"] if existing else 0) != cas:
        return False
    have = {s["Name"]: s for s in (existing or {}).get("Sources", [])}
    want = {s["Name"]: s for s in (sources or [])}
    now = _now()
    for src, s in want.items():
        old = have.get(src)
        if old is not None and (old["Action"], old["Description"], old["LegacyMeta"]) == (
            s["Action"],
            s["Description"],
            s["LegacyMeta"],
        ):
            continue  # unchanged: its indexes stay
        store.intention_put(
            IntentionRecord(
                id=old["LegacyID"] if old else str(uuid.uuid4()),
                source=src,
                destination=destination,
                action=s["Action"],
                description=s["Description"],
                meta=s["LegacyMeta"],
                created_at=old["LegacyCreateTime"] if old else now,
                updated_at=now,
            )
        )
    for src, old in have.items():
        if src not in want:
            store.intention_delete(old["LegacyID"])
    return True
