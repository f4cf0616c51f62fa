"""Maintenance mode, the pure part shared by the server's agent endpoints
(``trellis.api.views.agent``) and the node agent (``trellis.proxy.agent.localapi``).

As Consul: maintenance is a critical check of its own on the node (``_node_maintenance``) or
on one service (``_service_maintenance:<service ID>``), with the reason as its ``Notes``.
Being critical, it takes the node's services (or the one service) out of passing health
queries and out of DNS, as any critical check does, with no special case anywhere else;
disabling removes the check. Enabling twice keeps the first check (and its reason), as Consul.
"""

from __future__ import annotations

from typing import Any

from trellis.api.errors import BadRequest

NODE_CHECK_ID = "_node_maintenance"
SERVICE_CHECK_PREFIX = "_service_maintenance:"
NODE_CHECK_NAME = "Node Maintenance Mode"
SERVICE_CHECK_NAME = "Service Maintenance Mode"
#: The check's type in the catalog, as Consul's.
CHECK_TYPE = "maintenance"
DEFAULT_NODE_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided."
    " This is a default message."
)
DEFAULT_SERVICE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided."
    " This is a default message."
)
MAX_REASON = 1024

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_enable(value: str | None) -> bool:
    """``?enable=`` as Consul reads it (Go's ParseBool); the client is at fault for a missing
    or unreadable one (BadRequest)."""
    if value is None or value == "":
        raise BadRequest("Missing value for enable")
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f"Invalid value for enable: {value[:40]!r}")


def check_reason(reason: str | None) -> str:
    """``?reason=`` (empty: none); BadRequest (the client's) for one that is too long or
    holds control characters."""
    reason = reason or ""
    if len(reason) > MAX_REASON:
        raise BadRequest(f"query parameter 'reason' is longer than {MAX_REASON} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in reason):
        raise BadRequest("query parameter 'reason' contains control characters")
    return reason


def service_check_id(service_id: str) -> str:
    return SERVICE_CHECK_PREFIX + service_id


def is_maintenance_check(check_id: str) -> bool:
    return check_id == NODE_CHECK_ID or check_id.startswith(SERVICE_CHECK_PREFIX)


def node_check(reason: str) -> dict[str, Any]:
    """The node maintenance check as a catalog check body (PascalCase)."""
    return {
        "CheckID": NODE_CHECK_ID,
        "Name": NODE_CHECK_NAME,
        "Notes": reason or DEFAULT_NODE_REASON,
        "Status": "critical",
        "Type": CHECK_TYPE,
    }


def service_check(service_id: str, reason: str) -> dict[str, Any]:
    """A service's maintenance check as a catalog check body (PascalCase)."""
    return {
        "CheckID": service_check_id(service_id),
        "Name": SERVICE_CHECK_NAME,
        "Notes": reason or DEFAULT_SERVICE_REASON,
        "Status": "critical",
        "Type": CHECK_TYPE,
        "ServiceID": service_id,
    }
