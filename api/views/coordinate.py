"""``/v1/coordinate/*`` and ``/v1/operator/raft/configuration``, answered for what Trellis is.

Consul's network coordinates come from Serf's gossip (Vivaldi round-trip estimates); Trellis
has no gossip, so it has no coordinates and makes none up: the node and datacenter reads
answer as Consul does for a cluster where no coordinate has been computed yet (no entries; a
node without one is a 404), and an update is refused, because storing it would let one client
steer every ``?near=`` sort while nothing else measures anything.

Consul's Raft configuration lists the servers that replicate its log. Trellis has no Raft: the
store (SQLite or PostgreSQL) is the single source of truth and every ``trellis server`` is
its own leader (``/v1/status/leader`` and ``/v1/status/peers`` name it, at the same
address). The configuration therefore lists this server alone, as leader and voter, and
``Index`` is the store's write index (what ``X-Consul-Index`` counts), the nearest true
figure to Raft's; ``ProtocolVersion`` is empty, as there is no Raft protocol to name.
"""

from __future__ import annotations

from flask import Blueprint

from trellis.api.acl import service as acl
from trellis.api.errors import BadRequest, NotFound
from trellis.api.feed import Watch
from trellis.api.http import blocking, json_response, services
from trellis.api.views.catalog import check_dc
from trellis.api.views.status import _addr

bp = Blueprint("coordinate", __name__)

#: Nothing ever changes the (empty) coordinates.
_NEVER = Watch("coordinate")


@bp.get("/v1/coordinate/datacenters")
def datacenters():
    acl.current()  # an unknown token is refused
    dc = services().settings.datacenter
    return json_response([{"Datacenter": dc, "AreaID": "wan", "Coordinates": []}])


@bp.get("/v1/coordinate/nodes")
def nodes():
    check_dc()
    acl.current()
    # Index 1: the (absent) coordinates never changed, so a blocking read waits out its wait.
    _, index = blocking(_NEVER, lambda: (None, 1))
    return json_response([], index=index)


@bp.get("/v1/coordinate/node/<node>")
def node(node: str):
    check_dc()
    acl.current()
    # Consul's 404 carries the blocking headers (py-consul reads them even from a 404).
    headers = {"X-Consul-Index": "1", "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
    if services().store.node(node) is None:
        raise NotFound(f"no node {node!r}", headers=headers)
    raise NotFound(
        f"node {node!r} has no coordinates (Trellis computes none: it has no gossip)",
        headers=headers,
    )


@bp.put("/v1/coordinate/update")
def update():
    check_dc()
    acl.current()
    raise BadRequest(
        "Trellis keeps no network coordinates (it has no gossip to measure them with), so it"
        " does not store this update; ?near= sorting is not available"
    )


@bp.get("/v1/operator/raft/configuration")
def raft_configuration():
    check_dc()
    acl.require_operator(write=False)
    s = services().settings
    store = services().store
    server = {
        "ID": (store.node(s.node_name).id if store.node(s.node_name) else "") or s.node_name,
        "Node": s.node_name,
        "Address": _addr(),
        "Leader": True,
        "Voter": True,
        "ProtocolVersion": "",
    }
    return json_response({"Servers": [server], "Index": store.current_index()})
