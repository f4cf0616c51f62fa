"""``PUT /v1/txn``: Consul's transactions (K/V, node, service and check operations applied
all-or-nothing, in one store transaction: ``trellis.api.store.txn``).

The request is checked whole before anything runs: a malformed operation is a 400, more than
``MAX_OPS`` operations a 413 (Consul's limit and status). Then the K/V permissions, which
depend only on the request, are checked per operation as Consul's ``preCheck`` does: a
denied operation is an error entry for that operation and nothing runs. The catalog writes
ask the token from inside the transaction (``may_write``), because their permission depends
on what is stored. Reads are filtered afterwards, as Consul filters them: a result the token
may not read is left out.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

from flask import Blueprint
from marshmallow import ValidationError

from trellis.api.acl import service as acl
from trellis.api.acl.rules import Authorizer
from trellis.api.catalog import (
    build_checks,
    build_service,
    check_json,
    node_json,
    service_json,
    to_pascal,
    valid_name,
)
from trellis.api.errors import BadRequest, PayloadTooLarge
from trellis.api.http import json_body, json_response, services
from trellis.api.schemas import flatten, load
from trellis.api.schemas.catalog import CheckSchema, ServiceSchema
from trellis.api.schemas.catalog import _check_meta as check_meta
from trellis.api.store.base import Node, Service
from trellis.api.store.txn import CHECK, KV, NODE, SERVICE, VERBS, TxnOp
from trellis.api.views.catalog import check_dc
from trellis.api.views.kv import check_key, entry_json

bp = Blueprint("txn", __name__)

#: Consul's limit on the operations of one transaction (``maxTxnOps``).
MAX_OPS = 128


#: The fields of each kind of operation (lower case: matched case-insensitively).
_FIELDS = {
    KV: {"verb", "key", "value", "flags", "index", "session"},
    NODE: {"verb", "node"},
    SERVICE: {"verb", "node", "service"},
    CHECK: {"verb", "check"},
}


def _ci(d: dict, name: str) -> Any:
    """A field of a decoded body, its name matched case-insensitively (Consul's decoder)."""
    if name in d:
        return d[name]
    low = name.lower()
    for k, v in d.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def _obj(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise BadRequest(f"{where} must be a JSON object")
    return v


def _str(v: Any, where: str, *, required: bool = False) -> str:
    if v is None:
        v = ""
    if not isinstance(v, str):
        raise BadRequest(f"{where} must be a string")
    if required and not v:
        raise BadRequest(f"{where} is required")
    return v


def _uint(v: Any, where: str, *, bits: int = 64) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << bits):
        raise BadRequest(f"{where} must be a whole number from 0 to {(1 << bits) - 1}")
    return v


def parse_ops(body: Any, *, max_value: int) -> list[TxnOp]:
    """The client's operations as store values. The client is at fault for each error: a
    BadRequest for what is malformed, a PayloadTooLarge for more than MAX_OPS operations or
    a value above the K/V limit."""
    if not isinstance(body, list):
        raise BadRequest("request body must be a JSON list of operations")
    if len(body) > MAX_OPS:
        raise PayloadTooLarge(f"Transaction contains too many operations ({len(body)} > {MAX_OPS})")
    ops = []
    for i, op in enumerate(body):
        try:
            ops.append(_parse_op(i, op, max_value))
        except BadRequest as e:
            if not e.message.startswith("operation "):
                raise BadRequest(f"operation {i}: {e.message}") from None
            raise
    return ops


def _parse_op(i: int, raw: Any, max_value: int) -> TxnOp:
    at = f"operation {i}"
    raw = _obj(raw, at)
    kinds = [(k, v) for k in (KV, NODE, SERVICE, CHECK) if (v := _ci(raw, k)) is not None]
    if len(kinds) != 1 or len(raw) != 1:
        raise BadRequest(f"{at} must hold exactly one of KV, Node, Service or Check")
    kind, d = kinds[0]
    d = _obj(d, f"{at}.{kind}")
    unknown = sorted(str(k) for k in d if str(k).lower() not in _FIELDS[kind])
    if unknown:
        # Consul's own Namespace/Partition (Enterprise) are not known here either: refused
        # rather than ignored, like every unknown field (README, "The HTTP API").
        raise BadRequest(f"{at}.{kind}: unknown field {unknown[0]!r}")
    verb = _str(_ci(d, "Verb"), f"{at}.{kind}.Verb", required=True)
    if verb not in VERBS[kind]:
        raise BadRequest(f"{at}: unknown {kind} verb {verb!r}")
    index = _uint(_ci(d, "Index"), f"{at}.{kind}.Index")
    if kind == KV:
        key = _str(_ci(d, "Key"), f"{at}.KV.Key")
        check_key(key, allow_empty=verb in ("get-tree", "delete-tree"))
        value = b""
        encoded = _ci(d, "Value")
        if encoded is not None:
            try:
                value = base64.b64decode(_str(encoded, f"{at}.KV.Value"), validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"{at}.KV.Value must be base64") from None
        if len(value) > max_value:
            raise PayloadTooLarge(f"{at}: Value exceeds {max_value} byte limit")
        session = _str(_ci(d, "Session"), f"{at}.KV.Session")
        if verb in ("lock", "unlock") and not session:
            raise BadRequest(f"{at}: {verb} needs a Session")
        return TxnOp(
            KV,
            verb,
            key=key,
            value=value,
            flags=_uint(_ci(d, "Flags"), f"{at}.KV.Flags"),
            index=index,
            session=session,
        )
    if kind == NODE:
        n = _obj(_ci(d, "Node"), f"{at}.Node.Node")
        node_id = _str(_ci(n, "ID"), f"{at}.Node.Node.ID")
        # get and delete may name the node by its ID alone (Consul: the ID takes precedence).
        by_id = bool(node_id) and verb in ("get", "delete", "delete-cas")
        name = _str(_ci(n, "Node"), f"{at}.Node.Node.Node", required=not by_id)
        if name:
            valid_name("node name", name)
        index = index or _uint(_ci(n, "ModifyIndex"), f"{at}.Node.Node.ModifyIndex")
        node = Node(
            name=name,
            id=node_id,
            address=_str(_ci(n, "Address"), f"{at}.Node.Node.Address"),
            datacenter=services().settings.datacenter,
            tagged_addresses=_str_map(_ci(n, "TaggedAddresses"), f"{at}.Node.Node.TaggedAddresses"),
            meta=_meta(_ci(n, "Meta"), f"{at}.Node.Node.Meta"),
        )
        return TxnOp(NODE, verb, index=index, node=node)
    if kind == SERVICE:
        node_name = _str(_ci(d, "Node"), f"{at}.Service.Node", required=True)
        s = _obj(_ci(d, "Service"), f"{at}.Service.Service")
        index = index or _uint(_ci(s, "ModifyIndex"), f"{at}.Service.Service.ModifyIndex")
        if verb in ("set", "cas"):
            body = load(ServiceSchema, to_pascal(s), path=f"{at}.Service.Service")
            if body.get("Check") or body.get("Checks"):
                raise BadRequest(f"{at}: a service operation has no checks (use Check operations)")
            svc = build_service(node_name, body)
        else:
            sid = _str(_ci(s, "ID"), f"{at}.Service.Service.ID", required=True)
            svc = Service(node=node_name, id=sid, name="")
        return TxnOp(SERVICE, verb, index=index, service=svc)
    c = _obj(_ci(d, "Check"), f"{at}.Check.Check")
    node_name = _str(_ci(c, "Node"), f"{at}.Check.Check.Node", required=True)
    index = index or _uint(_ci(c, "ModifyIndex"), f"{at}.Check.Check.ModifyIndex")
    _str(_ci(c, "CheckID"), f"{at}.Check.Check.CheckID", required=True)
    # The check as a health endpoint shows it (what a client read and sends back): its
    # read-only fields are dropped, its Definition (HTTP, Interval, ...) checked as a
    # registration's.
    definition = _ci(c, "Definition")
    definition = {} if definition is None else _obj(definition, f"{at}.Check.Check.Definition")
    spec = {k: v for k, v in to_pascal(c).items() if k not in _CHECK_READ_ONLY}
    spec = load(CheckSchema, {**spec, **to_pascal(definition)}, path=f"{at}.Check.Check")
    (check,) = build_checks(node_name, None, [spec], now=time.time())
    return TxnOp(CHECK, verb, index=index, check=check)


#: Fields of a check that a health endpoint reports and a write ignores (or takes elsewhere).
_CHECK_READ_ONLY = {
    "Node",
    "ServiceName",
    "ServiceTags",
    "CreateIndex",
    "ModifyIndex",
    "Definition",
}


def _meta(v: Any, where: str) -> dict[str, str]:
    meta = _str_map(v, where)
    try:
        check_meta(meta, where)
    except ValidationError as e:
        messages = e.messages if isinstance(e.messages, list) else [flatten(e.messages)]
        raise BadRequest(f"{where}: {'; '.join(map(str, messages))}") from None
    return meta


def _str_map(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise BadRequest(f"{where} must be an object of strings")
    return dict(v)


def kv_denied(authz: Authorizer, op: TxnOp) -> bool:
    """Consul's pre-check of a K/V operation: reads are filtered afterwards; check-index and
    check-session reveal the key, so need key:read; delete-tree every key under the prefix;
    every other verb key:write."""
    if op.verb in ("get", "get-or-empty", "get-tree"):
        return False
    if op.verb in ("check-index", "check-session"):
        return not authz.key_read(op.key)
    if op.verb == "delete-tree":
        return not authz.key_write_prefix(op.key)
    return not authz.key_write(op.key)


def readable(authz: Authorizer, kind: str, value: Any) -> bool:
    if kind == KV:
        return authz.key_read(value.key)
    if kind == NODE:
        return authz.node_read(value.name)
    if kind == SERVICE:
        return authz.service_read(value.name)
    if value.service_id:
        return authz.service_read(value.service_name)
    return authz.node_read(value.node)


def result_json(kind: str, value: Any, datacenter: str) -> dict:
    if kind == KV:
        return {KV: entry_json(value)}
    if kind == NODE:
        return {NODE: node_json(value)}
    if kind == SERVICE:
        return {SERVICE: service_json(value)}
    return {CHECK: check_json(value)}


@bp.put("/v1/txn")
def txn():
    check_dc()
    settings = services().settings
    ops = parse_ops(json_body(allow_list=True), max_value=settings.kv_max_value_size)
    authz = acl.current()
    denied = [
        {"OpIndex": i, "What": "Permission denied"}
        for i, op in enumerate(ops)
        if op.kind == KV and kv_denied(authz, op)
    ]
    if denied:
        return json_response({"Results": None, "Errors": denied}, status=409)

    def may_write(resource: str, name: str) -> bool:
        return authz.node_write(name) if resource == "node" else authz.service_write(name)

    out = services().store.txn(ops, now=time.time(), may_write=may_write)
    if out.errors:
        errors = [{"OpIndex": i, "What": what} for i, what in out.errors]
        return json_response({"Results": None, "Errors": errors}, status=409)
    visible = [(k, v) for k, v in out.results if readable(authz, k, v)]
    headers = {}
    if len(visible) < len(out.results):
        headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
    body = {
        "Results": [result_json(k, v, settings.datacenter) for k, v in visible],
        "Errors": None,
    }
    # As Consul: a transaction of reads only is answered as a query, with its index.
    read_only = all(op.read_only for op in ops)
    return json_response(body, index=out.index if read_only else None, headers=headers)
