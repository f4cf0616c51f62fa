"""``/v1/event/fire/{name}`` and ``/v1/event/list``: Consul's user events.

An event is a row in the store (``trellis.api.store.events``), so every server lists the
same history, the newest ``HISTORY`` events of the cluster. A server lists every event
whatever its filters (it keeps the cluster's history); a node agent lists those its node
processes (``trellis.api.events.processes``), as a Consul agent does.

ACLs as Consul: ``event:write`` on the name to fire; a listing holds only the events whose
names the token may read (``event:read``), not a 403.
"""

from __future__ import annotations

import uuid

from flask import Blueprint, request

from trellis.api import events
from trellis.api.acl import service as acl
from trellis.api.errors import PayloadTooLarge
from trellis.api.feed import Watch
from trellis.api.http import digest_blocking, json_response, services, str_arg
from trellis.api.store.events import UserEvent
from trellis.api.views.catalog import check_dc

bp = Blueprint("event", __name__)

_WATCH = Watch("event", prefixes=("",))


@bp.put("/v1/event/fire/<name>")
def fire(name: str):
    check_dc()
    name = events.check_name(name)
    node = str_arg("node", max_len=events.MAX_FILTER) or ""
    service = str_arg("service", max_len=events.MAX_FILTER) or ""
    tag = str_arg("tag", max_len=events.MAX_FILTER) or ""
    events.check_filters(node, service, tag)
    acl.require(acl.current().event_write(name), f"event:write on {name!r}")
    if request.content_length is not None and request.content_length > events.MAX_PAYLOAD:
        raise PayloadTooLarge(f"an event's payload is at most {events.MAX_PAYLOAD} bytes")
    payload = request.get_data(cache=False)
    if len(payload) > events.MAX_PAYLOAD:
        raise PayloadTooLarge(f"an event's payload is at most {events.MAX_PAYLOAD} bytes")
    ev = UserEvent(
        id=str(uuid.uuid4()),
        name=name,
        # As Consul: no body is no payload (null), not an empty one.
        payload=payload or None,
        node_filter=node,
        service_filter=service,
        tag_filter=tag,
    )
    stored = services().store.event_fire(ev, keep=events.HISTORY)
    return json_response(events.event_json(stored))


@bp.get("/v1/event/list")
def list_events():
    check_dc()
    name = str_arg("name", max_len=events.MAX_NAME) or ""
    authz = acl.current()
    store = services().store

    def compute() -> tuple[tuple[list[dict], bool], int]:
        named = [ev for ev in store.events() if not name or ev.name == name]
        out = [events.event_json(ev) for ev in named if authz.event_read(ev.name)]
        # The index is the readable listing's: events the token may not read move nothing.
        return (out, len(out) < len(named)), events.list_index(out)

    (data, filtered), index = digest_blocking(_WATCH, compute)
    extra = {"X-Consul-Results-Filtered-By-ACLs": "true"} if filtered else None
    return json_response(data, index=index, headers=extra)
