"""Consul's session bodies: what ``PUT /v1/session/create`` takes and what the reads return.

Pure: no I/O. ``parse_create`` reads a create body as Consul's decoder does (field names in any
case: python-consul sends ``name``, ``lockdelay``, ``ttl``) and raises ``BadRequest`` for
anything it would refuse; the client is at fault for every error here.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from trellis.api.errors import BadRequest
from trellis.api.store.sessions import DELETE, RELEASE, Session
from trellis.proxy.durations import DurationError, format_duration, parse_duration

#: Consul's defaults and bounds.
DEFAULT_LOCK_DELAY = 15.0
MAX_LOCK_DELAY = 60.0
MAX_TTL = 24 * 3600.0
DEFAULT_CHECK = "serfHealth"
#: A bare number below this is seconds, above it nanoseconds (Consul's lockDelayMinThreshold).
_LOCK_DELAY_SECONDS_BELOW = 1000
_NS = 1_000_000_000

#: Lower-cased field name -> its name in Consul's docs. Fields Consul takes but Trellis has no
#: use for (ID: the server makes it; indexes of a session read back; the OSS namespace and
#: partition) are accepted and ignored.
_FIELDS = {
    f.lower(): f
    for f in (
        "Name",
        "Node",
        "LockDelay",
        "Behavior",
        "TTL",
        "Checks",
        "NodeChecks",
        "ServiceChecks",
    )
}
_IGNORED = {"id", "createindex", "modifyindex", "namespace", "partition"}


def parse_create(body: Mapping[str, Any] | None, *, default_node: str, ttl_min: float) -> Session:
    """The session a create body asks for, with a fresh ID (indexes are the store's)."""
    fields: dict[str, Any] = {}
    for key, value in (body or {}).items():
        low = key.lower()
        if low in _IGNORED:
            continue
        name = _FIELDS.get(low)
        if name is None:
            raise BadRequest(f"unknown field {key!r} in the session")
        if name in fields:
            raise BadRequest(f"field {name!r} given twice (field names ignore case)")
        fields[name] = value
    node = _string(fields, "Node") or default_node
    name = _string(fields, "Name")
    behavior = _string(fields, "Behavior") or RELEASE
    if behavior not in (RELEASE, DELETE):
        raise BadRequest(f"Invalid Behavior setting '{behavior}'")
    lock_delay = _lock_delay(fields.get("LockDelay"))
    ttl, ttl_seconds = _ttl(fields.get("TTL"), ttl_min)
    node_checks = _ids(fields, "NodeChecks") if "NodeChecks" in fields else None
    old_checks = _ids(fields, "Checks") if "Checks" in fields else None
    service_checks = _service_checks(fields.get("ServiceChecks"))
    if node_checks is None and old_checks is None and service_checks is None:
        # Consul's default: the node's serfHealth, unless the client named checks (an
        # explicit empty list means "none", as Patroni sends it).
        node_checks = [DEFAULT_CHECK]
    merged = list(dict.fromkeys([*(node_checks or []), *(old_checks or [])]))
    return Session(
        id=str(uuid.uuid4()),
        node=node,
        name=name,
        lock_delay=lock_delay,
        behavior=behavior,
        ttl=ttl,
        ttl_seconds=ttl_seconds,
        node_checks=tuple(merged),
        service_checks=tuple(service_checks or ()),
    )


def session_json(s: Session) -> dict[str, Any]:
    """A session as Consul's reads return it (``LockDelay`` in nanoseconds, Go's Duration)."""
    return {
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": round(s.lock_delay * _NS),
        "Behavior": s.behavior,
        "TTL": s.ttl,
        "Checks": list(s.node_checks),
        "NodeChecks": list(s.node_checks),
        "ServiceChecks": [{"ID": c, "Namespace": ""} for c in s.service_checks] or None,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    }


def _string(fields: Mapping[str, Any], name: str) -> str:
    v = fields.get(name)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise BadRequest(f"{name} must be a string")
    if len(v) > 256 or any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise BadRequest(f"{name} must be at most 256 characters, without control characters")
    return v


def _ids(fields: Mapping[str, Any], name: str) -> list[str]:
    v = fields.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise BadRequest(f"{name} must be a list of check IDs")
    if len(v) > 64:
        raise BadRequest(f"{name} may name at most 64 checks")
    return list(v)


def _service_checks(v: Any) -> list[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > 64:
        raise BadRequest("ServiceChecks must be a list of at most 64 {ID, Namespace} objects")
    out = []
    for item in v:
        if not isinstance(item, dict):
            raise BadRequest("ServiceChecks must be a list of {ID, Namespace} objects")
        low = {k.lower(): x for k, x in item.items()}
        unknown = set(low) - {"id", "namespace"}
        if unknown:
            raise BadRequest(f"unknown field {sorted(unknown)[0]!r} in ServiceChecks")
        check_id = low.get("id")
        if not isinstance(check_id, str) or not check_id:
            raise BadRequest("each ServiceChecks entry needs an ID")
        out.append(check_id)
    return out


def _lock_delay(v: Any) -> float:
    if v is None or v == "":
        return DEFAULT_LOCK_DELAY
    if isinstance(v, bool):
        raise BadRequest("LockDelay must be a duration such as '15s'")
    if isinstance(v, int | float):
        # Consul reads a bare number below 1000 as seconds, else as nanoseconds.
        seconds = float(v) if v < _LOCK_DELAY_SECONDS_BELOW else float(v) / _NS
    elif isinstance(v, str):
        try:
            seconds = parse_duration(v)
        except DurationError as e:
            raise BadRequest(f"LockDelay: {e}") from None
    else:
        raise BadRequest("LockDelay must be a duration such as '15s'")
    if not 0 <= seconds <= MAX_LOCK_DELAY:
        raise BadRequest(f"LockDelay must be between 0s and {format_duration(MAX_LOCK_DELAY)}")
    return seconds


def _ttl(v: Any, ttl_min: float) -> tuple[str, float]:
    if v is None or v == "":
        return "", 0.0
    if not isinstance(v, str):
        raise BadRequest("TTL must be a duration string such as '30s'")
    try:
        seconds = parse_duration(v)
    except DurationError as e:
        raise BadRequest(f"TTL: {e}") from None
    if seconds == 0:
        return "", 0.0
    if not ttl_min <= seconds <= MAX_TTL:
        raise BadRequest(
            f"Invalid Session TTL '{v}', must be between"
            f" [{format_duration(ttl_min)}={format_duration(MAX_TTL)}]"
        )
    return v, seconds
