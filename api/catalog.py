"""Catalog domain logic: turning registration bodies into store values, and back into
Consul's response shapes.

Registration bodies come in two spellings: the API form (``Name``, ``Port``, ``Connect``) and
the config-file form (``name``, ``port``, ``connect``, ``sidecar_service``,
``destination_name``). ``to_pascal`` rewrites the second into the first, leaving the *values*
of opaque maps (``Meta``, ``Config``, ``TaggedAddresses`` keys, ``Header``) untouched, and the
marshmallow schemas (``trellis.api.schemas.catalog``) then validate one spelling, refusing
unknown fields so that a typo in a service definition is an error, not a silently ignored
setting.
"""

from __future__ import annotations

import time
from typing import Any

from trellis.api.errors import BadRequest
from trellis.api.store.base import CRITICAL, Check, Node, Service
from trellis.proxy import names
from trellis.proxy.agent.spelling import FREE_KEYS, OPAQUE, SpellingError  # noqa: F401
from trellis.proxy.agent.spelling import to_pascal as _to_pascal
from trellis.proxy.config import (  # noqa: F401
    SIDECAR_MAX_PORT,
    SIDECAR_MIN_PORT,
    ConfigError,
    sidecar_registration,
)
from trellis.proxy.durations import parse_duration


def to_pascal(value: Any, parent: str = "") -> Any:
    """Rewrite config-file (snake_case) keys into API (PascalCase) keys, recursively (the
    table is ``trellis.proxy.agent.spelling``'s, shared with the node agent)."""
    try:
        return _to_pascal(value, parent)
    except SpellingError as e:
        raise BadRequest(str(e)) from None


def valid_name(kind: str, name: str) -> str:
    """Service and node names must be DNS-safe: DNS is one of the ways they are looked up.
    One rule (``trellis.proxy.names``) for the catalog, intentions and certificates."""
    if not names.is_service_name(name):
        raise BadRequest(f"{kind} {name!r} is not valid: {names.RULE}")
    return name


def unwrap_service_body(body: dict) -> dict:
    """Accept ``{"service": {...}}`` (a config file) as well as the bare API body."""
    if len(body) == 1:
        ((k, v),) = body.items()
        if k in ("service", "Service") and isinstance(v, dict):
            return v
    return body


# -- building store values ------------------------------------------------------------------


def build_checks(
    node: str, service: Service | None, defs: list[dict], *, now: float | None = None
) -> list[Check]:
    now = time.time() if now is None else now
    out: list[Check] = []
    multi = len(defs) > 1
    for i, d in enumerate(defs, 1):
        sid = service.id if service else d.get("ServiceID", "")
        sname = service.name if service else ""
        default_id = f"service:{sid}" + (f":{i}" if multi else "") if sid else d.get("Name", "")
        check_id = d.get("CheckID") or d.get("ID") or default_id
        if not check_id:
            raise BadRequest("a node check needs a CheckID or a Name")
        if not names.is_instance_id(check_id):
            raise BadRequest(f"check ID {check_id!r} is not valid: {names.ID_RULE}")
        name = d.get("Name") or (f"Service '{sname}' check" if sname else check_id)
        ctype = (
            "ttl"
            if d.get("TTL")
            else "http"
            if d.get("HTTP")
            else "tcp"
            if d.get("TCP")
            else "alias"
            if d.get("AliasService") or d.get("AliasNode")
            else d.get("Type", "")
        )
        ttl = parse_duration(d["TTL"]) if d.get("TTL") else None
        definition = {
            k: d[k]
            for k in (
                "HTTP",
                "Method",
                "Header",
                "Body",
                "TCP",
                "Interval",
                "Timeout",
                "TTL",
                "TLSSkipVerify",
                "TLSServerName",
                "DeregisterCriticalServiceAfter",
                "AliasService",
                "AliasNode",
            )
            if k in d
        }
        out.append(
            Check(
                node=node,
                check_id=check_id,
                name=name,
                status=d.get("Status") or CRITICAL,
                notes=d.get("Notes", ""),
                output=d.get("Output", ""),
                service_id=sid,
                service_name=sname,
                type=ctype,
                definition=definition,
                ttl=ttl,
                expires_at=now + ttl if ttl else None,
            )
        )
    return out


def build_service(node: str, d: dict) -> Service:
    name = d.get("Name") or d.get("Service")
    if not name:
        raise BadRequest("Name: Missing data for required field.")
    valid_name("service name", name)
    sid = d.get("ID") or name
    if not names.is_instance_id(sid):
        raise BadRequest(f"service ID {sid!r} is not valid: {names.ID_RULE}")
    kind = d.get("Kind", "")
    proxy = d.get("Proxy")
    if kind == "connect-proxy":
        if not proxy or not proxy.get("DestinationServiceName"):
            raise BadRequest("a connect-proxy needs Proxy.DestinationServiceName")
        valid_name("destination service name", proxy["DestinationServiceName"])
    elif proxy:
        raise BadRequest("Proxy is only valid for Kind connect-proxy (use Connect.Proxy)")
    connect = d.get("Connect")
    if connect:
        connect = {k: v for k, v in connect.items() if k != "SidecarService"}
        if connect.get("Native") and connect.get("Proxy") is not None:
            raise BadRequest("a service cannot be Connect-native and have a managed proxy")
    weights = d.get("Weights") or {"Passing": 1, "Warning": 1}
    return Service(
        node=node,
        id=sid,
        name=name,
        tags=tuple(d.get("Tags") or ()),
        address=d.get("Address", ""),
        port=d.get("Port", 0),
        meta=dict(d.get("Meta") or {}),
        tagged_addresses={k: dict(v) for k, v in (d.get("TaggedAddresses") or {}).items()},
        weights={"Passing": weights.get("Passing", 1), "Warning": weights.get("Warning", 1)},
        kind=kind,
        proxy=proxy or None,
        connect=connect or None,
        enable_tag_override=bool(d.get("EnableTagOverride", False)),
    )


def sidecar_for(parent: Service, spec: dict, taken_ports: set[int]) -> dict:
    """The registration body of ``connect.sidecar_service``, with Consul's defaults
    (``trellis.proxy.config.sidecar_registration``, shared with the node agent)."""
    try:
        return sidecar_registration(
            spec,
            parent_id=parent.id,
            parent_name=parent.name,
            parent_port=parent.port,
            parent_address=parent.address,
            tags=parent.tags,
            meta=parent.meta,
            taken_ports=taken_ports,
        )
    except ConfigError as e:
        raise BadRequest(str(e)) from None


# -- Consul response shapes -------------------------------------------------------------------


def node_json(n: Node) -> dict:
    return {
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": dict(n.tagged_addresses) or {"lan": n.address, "wan": n.address},
        "Meta": dict(n.meta),
        "CreateIndex": n.create_index,
        "ModifyIndex": n.modify_index,
    }


def service_json(s: Service, datacenter: str | None = None) -> dict:
    d: dict[str, Any] = {
        "ID": s.id,
        "Service": s.name,
        "Tags": list(s.tags),
        "Address": s.address,
        "TaggedAddresses": dict(s.tagged_addresses),
        "Meta": dict(s.meta),
        "Port": s.port,
        "Weights": dict(s.weights),
        "EnableTagOverride": s.enable_tag_override,
        "Kind": s.kind,
        "Proxy": dict(s.proxy) if s.proxy is not None else None,
        "Connect": dict(s.connect) if s.connect is not None else None,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    }
    if datacenter is not None:
        d["Datacenter"] = datacenter
    return d


def agent_service_json(s: Service, datacenter: str) -> dict:
    d = service_json(s, datacenter)
    # The agent endpoints omit empty Proxy/Connect rather than sending null.
    for k in ("Proxy", "Connect"):
        if d[k] is None:
            del d[k]
    del d["CreateIndex"], d["ModifyIndex"]
    return d


def catalog_service_json(n: Node, s: Service) -> dict:
    return {
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": dict(n.tagged_addresses) or {"lan": n.address, "wan": n.address},
        "NodeMeta": dict(n.meta),
        "ServiceID": s.id,
        "ServiceName": s.name,
        "ServiceTags": list(s.tags),
        "ServiceAddress": s.address,
        "ServicePort": s.port,
        "ServiceMeta": dict(s.meta),
        "ServiceTaggedAddresses": dict(s.tagged_addresses),
        "ServiceWeights": dict(s.weights),
        "ServiceEnableTagOverride": s.enable_tag_override,
        "ServiceKind": s.kind,
        "ServiceProxy": dict(s.proxy) if s.proxy is not None else None,
        "ServiceConnect": dict(s.connect) if s.connect is not None else None,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    }


def check_json(c: Check, service_tags: tuple[str, ...] = ()) -> dict:
    return {
        "Node": c.node,
        "CheckID": c.check_id,
        "Name": c.name,
        "Status": c.status,
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": c.service_name,
        "ServiceTags": list(service_tags),
        "Type": c.type,
        "Definition": dict(c.definition),
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    }
