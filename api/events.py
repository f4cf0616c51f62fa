"""User events, the pure part: checking what a client fires, the JSON Consul's clients read,
the index of a list, and which events an agent processes. No I/O; the server's views
(``trellis.api.views.event``) and the node agent (``trellis.proxy.agent.localapi``) share it.

* ``event/list``'s ``X-Consul-Index`` is Consul's: derived from the ID of the last event
  listed (``id_to_index``, the 128 bits of the UUID folded to 64), not the store's index. A
  Consul watch (and Consul's own API client, ``IDToIndex``) finds the events it has already
  handled by comparing that index with each event's ID, so a store index would make it hand
  every event to its handler again. Such an index does not grow; a blocking list waits while
  it is *equal* to the client's (``trellis.api.longpoll.Since.changed``), as Consul's does.
* The node, service and tag filters are regular expressions (RE2, the syntax of Consul's Go
  ``regexp``, and linear in time whatever the pattern: the patterns come from clients),
  matched as Go's ``MatchString`` does, anywhere in the name. An agent processes an event
  when its node name matches the node filter, and one of its services matches the service
  filter with one of that service's tags matching the tag filter (``processes``).
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from trellis.api.errors import BadRequest

if TYPE_CHECKING:  # the node agent imports this module, and needs nothing of the store
    from trellis.api.store.events import UserEvent

#: The version of Consul's user event message that Trellis's events correspond to.
EVENT_VERSION = 1

#: How many events the store keeps (Consul's agents keep their last 256 each).
HISTORY = 256
#: The largest payload accepted, in bytes. Consul refuses events over serf's 512-byte message
#: limit; the store has no such limit, and HISTORY events of this size are at most 16 MiB.
MAX_PAYLOAD = 64 * 1024
MAX_NAME = 256
MAX_FILTER = 512
#: RE2's memory budget for one compiled filter (a bigger pattern is refused as invalid).
REGEX_MAX_MEM = 1 << 20


def check_name(name: str) -> str:
    """An event name as fired; the client is at fault for a bad one (BadRequest)."""
    if not name:
        raise BadRequest("an event needs a name")
    if name.startswith("_"):
        # As Consul: names starting with an underscore are reserved for internal events.
        raise BadRequest("event names starting with '_' are reserved")
    if len(name) > MAX_NAME:
        raise BadRequest(f"an event name is at most {MAX_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadRequest("an event name may not hold control characters")
    return name


@functools.lru_cache(maxsize=512)
def _compile(pattern: str, what: str) -> Any:
    # google-re2, imported on first use: the node agent loads its native library only when an
    # event with a filter comes by.
    import re2

    options = re2.Options()
    options.log_errors = False  # the client's mistake goes back to the client, not the log
    options.max_mem = REGEX_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        detail = e.args[0] if e.args else e
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise BadRequest(
            f"query parameter {what!r}: invalid regular expression: {detail}"
        ) from None


def check_filters(node: str, service: str, tag: str) -> None:
    """The filters of a fire, as Consul checks them: each a valid regular expression, and a
    tag filter only with a service filter. BadRequest (the client's) otherwise."""
    for what, pattern in (("node", node), ("service", service), ("tag", tag)):
        if len(pattern) > MAX_FILTER:
            raise BadRequest(f"query parameter {what!r} is longer than {MAX_FILTER} characters")
        if pattern:
            _compile(pattern, what)
    if tag and not service:
        raise BadRequest("cannot provide a tag filter without a service filter")


def event_json(ev: UserEvent) -> dict[str, Any]:
    return {
        "ID": ev.id,
        "Name": ev.name,
        "Payload": base64.b64encode(ev.payload).decode() if ev.payload is not None else None,
        "NodeFilter": ev.node_filter,
        "ServiceFilter": ev.service_filter,
        "TagFilter": ev.tag_filter,
        "Version": EVENT_VERSION,
        "LTime": ev.ltime,
    }


def id_to_index(event_id: str) -> int:
    """Consul's index of an event ID: the UUID's first 64 bits XOR its last 64."""
    digits = event_id.replace("-", "")
    if len(digits) != 32:
        return 0
    try:
        return int(digits[:16], 16) ^ int(digits[16:], 16)
    except ValueError:
        return 0


def list_index(events: Sequence[dict[str, Any]]) -> int:
    """The ``X-Consul-Index`` of a listing (its events' JSON): the last one's, or 1 for none
    (never 0, which a client would take as "no index" and poll without blocking)."""
    if not events:
        return 1
    return id_to_index(str(events[-1]["ID"])) or 1


def processes(ev: dict[str, Any], node: str, services: Iterable[tuple[str, Sequence[str]]]) -> bool:
    """Whether the agent of ``node``, running ``services`` (name, tags), processes the event
    (its JSON), as a Consul agent decides which events it keeps."""
    node_filter = str(ev.get("NodeFilter") or "")
    service_filter = str(ev.get("ServiceFilter") or "")
    tag_filter = str(ev.get("TagFilter") or "")
    try:
        if node_filter and not _compile(node_filter, "node").search(node):
            return False
        if not service_filter:
            return True
        svc_re = _compile(service_filter, "service")
        tag_re = _compile(tag_filter, "tag") if tag_filter else None
    except BadRequest:
        return False  # checked when fired; an unreadable filter matches nothing
    for name, tags in services:
        if not svc_re.search(name):
            continue
        if tag_re is None or any(tag_re.search(t) for t in tags):
            return True
    return False
