"""Consul's session bodies: what ``PUT /v1/session/create`` takes and what the reads return.

Pure: no I/O. ``parse_create`` reads a create body as Consul's decoder does (field names in any
case: python-consul sends ``name``, ``lockdelay``, ``ttl``), checks its shape with the
schema (``trellis.api.schemas.session``) and its values here, and raises ``BadRequest`` for
anything Consul would refuse; the client is at fault for every error here.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from trellis.api.errors import BadRequest
from trellis.api.schemas import load
from trellis.api.schemas.session import SessionCreateSchema
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


def parse_create(body: Mapping[str, Any] | None, *, default_node: str, ttl_min: float) -> Session:
    """The session a create body asks for, with a fresh ID (indexes are the store's)."""
    # ``load`` matches the field names in any case, as Consul's decoder does.
    fields = load(SessionCreateSchema, body or {})
    node = fields.get("Node") or default_node
    behavior = fields.get("Behavior") or RELEASE
    if behavior not in (RELEASE, DELETE):
        raise BadRequest(f"Invalid Behavior setting '{behavior}'")
    lock_delay = _lock_delay(fields.get("LockDelay"))
    ttl, ttl_seconds = _ttl(fields.get("TTL"), ttl_min)
    node_checks, service_checks = _node_checks(fields), fields.get("ServiceChecks") or ()
    return Session(
        id=str(uuid.uuid4()),
        node=node,
        name=fields.get("Name") or "",
        lock_delay=lock_delay,
        behavior=behavior,
        ttl=ttl,
        ttl_seconds=ttl_seconds,
        node_checks=node_checks,
        service_checks=tuple(dict.fromkeys(c["ID"] for c in service_checks)),
    )


def _node_checks(fields: Mapping[str, Any]) -> tuple[str, ...]:
    """The node checks of a create body, as Consul settles ``NodeChecks`` against the older
    ``Checks`` (agent/session_endpoint.go): both default to ``serfHealth``; an empty
    ``Checks`` means no node checks at all (how clients before Consul 1.7, Patroni among
    them, ask for none); ``Checks`` holding just ``serfHealth``, or an empty ``NodeChecks``,
    leaves ``NodeChecks`` alone; otherwise the two lists are merged. ``ServiceChecks`` does not
    drop the default."""
    node = list(fields["NodeChecks"] or ()) if "NodeChecks" in fields else [DEFAULT_CHECK]
    old = list(fields["Checks"] or ()) if "Checks" in fields else [DEFAULT_CHECK]
    if not old:
        node = []
    elif old == [DEFAULT_CHECK] or not node:
        old = []
    return tuple(dict.fromkeys([*node, *old]))


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


def _lock_delay(v: Any) -> float:
    if v is None or v == "":
        return DEFAULT_LOCK_DELAY
    if isinstance(v, int | float):
        # Consul reads a bare number below 1000 as seconds, else as nanoseconds.
        seconds = float(v) if v < _LOCK_DELAY_SECONDS_BELOW else float(v) / _NS
    else:
        try:
            seconds = parse_duration(str(v))
        except DurationError as e:
            raise BadRequest(f"LockDelay: {e}") from None
    if not 0 <= seconds <= MAX_LOCK_DELAY:
        raise BadRequest(f"LockDelay must be between 0s and {format_duration(MAX_LOCK_DELAY)}")
    return seconds


def _ttl(v: Any, ttl_min: float) -> tuple[str, float]:
    if v is None or v == "":
        return "", 0.0
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
