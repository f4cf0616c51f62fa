"""Consul's ``POST /v1/internal/acl/authorize``: a token asks what it may do, without doing it.

Pure: no I/O. The view (trellis.api.views.authorize) hands ``decide`` the decoded body and the
request's Authorizer, the same one every other endpoint asks, so an answer here is exactly
what the endpoint in question would decide for that token (it reveals nothing more: any
token may find out by trying). The node agent, which holds no ACL rules, asks this before it
acts on a request of its own (``agent/leave``, ``agent/reload``).

The body is a list of at most ``MAX_REQUESTS`` objects ``{"Resource", "Segment", "Access"}``,
answered with the same list, each object with ``"Allow"`` added. Field names are read in any
case (as Consul's decoder does); any other field is refused, with its place. As in Consul:
the resource is matched exactly (``"operator"``, not ``"Operator"``), the access level in any
case, and an unknown resource or an access level the resource does not have is a 400 (the
caller's fault) for the whole list.

Resources, onto Trellis's rules:

* ``acl``, ``operator`` (read, write: no segment); ``node``, ``service``, ``session``,
  ``event``, ``query`` (read, write); ``intention`` (read, write, on the destination);
  ``key`` (read, list, write, ``write-prefix``).
* ``agent`` is ``node`` on the segment (the agent's node name): Trellis's rule language has
  no ``agent`` resource, an agent is its node (as ``agent/self`` and api/views/operator.py
  read it).
* ``mesh`` and ``peering`` are decided by the ``operator`` rule: Consul falls back to it when
  a policy has no ``mesh``/``peering`` rule, and Trellis's policies never have one.
* ``keyring`` (read, write) is never allowed: Trellis has no gossip keyring and its policies
  have no ``keyring`` rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trellis.api.acl.rules import Authorizer
from trellis.api.errors import BadRequest

#: Consul's limit on one request's list.
MAX_REQUESTS = 64
FIELDS = ("Resource", "Segment", "Access")
_FOLDED = {f.lower(): f for f in FIELDS}

Decide = Callable[[Authorizer, str], bool]


def _never(a: Authorizer, s: str) -> bool:
    return False


#: (resource, access) -> the question it asks the Authorizer of the segment.
_QUESTIONS: dict[str, dict[str, Decide]] = {
    "acl": {"read": lambda a, s: a.acl_read(), "write": lambda a, s: a.acl_write()},
    "operator": {
        "read": lambda a, s: a.operator_read(),
        "write": lambda a, s: a.operator_write(),
    },
    "mesh": {"read": lambda a, s: a.operator_read(), "write": lambda a, s: a.operator_write()},
    "peering": {
        "read": lambda a, s: a.operator_read(),
        "write": lambda a, s: a.operator_write(),
    },
    "keyring": {"read": _never, "write": _never},
    "agent": {"read": Authorizer.node_read, "write": Authorizer.node_write},
    "node": {"read": Authorizer.node_read, "write": Authorizer.node_write},
    "service": {"read": Authorizer.service_read, "write": Authorizer.service_write},
    "intention": {"read": Authorizer.intention_read, "write": Authorizer.intention_write},
    "session": {"read": Authorizer.session_read, "write": Authorizer.session_write},
    "event": {"read": Authorizer.event_read, "write": Authorizer.event_write},
    "query": {"read": Authorizer.query_read, "write": Authorizer.query_write},
    "key": {
        "read": Authorizer.key_read,
        "list": Authorizer.key_list,
        "write": Authorizer.key_write,
        "write-prefix": Authorizer.key_write_prefix,
    },
}


def _request(i: int, item: Any) -> dict[str, str]:
    if not isinstance(item, Mapping):
        raise BadRequest(f"[{i}]: each authorization must be a JSON object")
    out: dict[str, str] = {}
    for key, value in item.items():
        name = _FOLDED.get(str(key).lower())
        if name is None:
            raise BadRequest(
                f"[{i}]: unknown field {str(key)[:64]!r} (expected Resource, Segment, Access)"
            )
        if name in out:
            raise BadRequest(f"[{i}]: field {name!r} given twice")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise BadRequest(f"[{i}].{name}: must be a string")
        out[name] = value
    return out


def decide(authz: Authorizer, body: Any) -> list[dict[str, Any]]:
    """The answers for ``body`` (the decoded request list). BadRequest, the caller's fault,
    for a body that is not a list of at most MAX_REQUESTS objects of known fields, or that
    names an unknown resource or an access level its resource does not have."""
    if not isinstance(body, list):
        raise BadRequest("the body must be a JSON list of {Resource, Segment, Access}")
    if len(body) > MAX_REQUESTS:
        raise BadRequest(f"Refusing to process more than {MAX_REQUESTS} authorizations at once")
    out = []
    for i, item in enumerate(body):
        req = _request(i, item)
        resource, segment, access = (req.get(f, "") for f in FIELDS)
        levels = _QUESTIONS.get(resource)
        if levels is None:
            raise BadRequest(f"Invalid ACL resource requested: {resource[:64]!r}")
        question = levels.get(access.lower())
        if question is None:
            raise BadRequest(f"Invalid access level for {resource} resource: {access[:64]!r}")
        answer: dict[str, Any] = {"Resource": resource}
        if segment:
            answer["Segment"] = segment
        answer["Access"] = access
        answer["Allow"] = bool(question(authz, segment))
        out.append(answer)
    return out
