"""``/v1/health/*``: instances with their checks, and checks by service, node or state."""

from __future__ import annotations

from flask import Blueprint

from trellis.api import catalog as cat
from trellis.api.acl import service as acl
from trellis.api.errors import BadRequest
from trellis.api.feed import Watch
from trellis.api.health import service_instances
from trellis.api.http import accepts_filter, blocking, filter_arg, flag, json_response, services
from trellis.api.store.base import CHECK_STATES
from trellis.api.views.catalog import ALL, _service_index, check_dc, svc_watch, tags_arg
from trellis.proxy import filtershapes as shapes

bp = Blueprint("health", __name__)


def _entries(name: str, *, connect: bool):
    check_dc()
    store = services().store
    passing, tags = flag("passing"), tags_arg()
    flt = filter_arg(shapes.CHECK_SERVICE_NODE)

    def compute():
        index = _service_index(name)  # first: see blocking
        out = []
        for inst in service_instances(
            store, name, connect=connect, tags=tags, passing_only=passing
        ):
            out.append(
                {
                    "Node": cat.node_json(inst.node),
                    "Service": cat.service_json(inst.service),
                    "Checks": [
                        cat.check_json(c, inst.service.tags if c.service_id else ())
                        for c in inst.checks
                    ],
                }
            )
        return out, index

    data, index = blocking(svc_watch(name), compute)
    authz = acl.current()
    data = [
        e
        for e in data
        if authz.service_read(name)
        and authz.service_read(e["Service"]["Service"])
        and authz.node_read(e["Node"]["Node"])
        and (flt is None or flt(e))
    ]
    return json_response(data, index=index)


def _visible(authz, check: dict) -> bool:
    """A check is visible with service:read on its service, or node:read for a node check."""
    if check["ServiceName"]:
        return authz.service_read(check["ServiceName"]) and authz.node_read(check["Node"])
    return authz.node_read(check["Node"])


@bp.get("/v1/health/service/<name>")
@accepts_filter
def service(name: str):
    return _entries(name, connect=False)


@bp.get("/v1/health/connect/<name>")
@accepts_filter
def connect(name: str):
    return _entries(name, connect=True)


@bp.get("/v1/health/checks/<name>")
@accepts_filter
def checks(name: str):
    check_dc()
    store = services().store
    flt = filter_arg(shapes.HEALTH_CHECK)

    def compute():
        index = _service_index(name)  # first: see blocking
        tags = {s.id: s.tags for s in store.services(name=name)}
        data = [
            cat.check_json(c, tags.get(c.service_id, ())) for c in store.checks(service_name=name)
        ]
        return data, index

    data, index = blocking(svc_watch(name), compute)
    authz = acl.current()
    data = [c for c in data if _visible(authz, c) and (flt is None or flt(c))]
    return json_response(data, index=index)


@bp.get("/v1/health/node/<node>")
@accepts_filter
def node(node: str):
    check_dc()
    store = services().store
    flt = filter_arg(shapes.HEALTH_CHECK)

    def compute():
        idx = store.topic_index(f"catalog/node/{node}") or store.topic_index("catalog")  # first
        return [cat.check_json(c) for c in store.checks(node=node)], idx

    data, index = blocking(Watch("catalog", exact=(f"node/{node}",)), compute)
    authz = acl.current()
    data = [c for c in data if _visible(authz, c) and (flt is None or flt(c))]
    return json_response(data, index=index)


@bp.get("/v1/health/state/<state>")
@accepts_filter
def state(state: str):
    check_dc()
    if state != "any" and state not in CHECK_STATES:
        raise BadRequest(f"state must be any, passing, warning or critical, not {state!r}")
    store = services().store
    flt = filter_arg(shapes.HEALTH_CHECK)

    def compute():
        index = store.topic_index("catalog")  # first: see blocking
        rows = store.checks(state=None if state == "any" else state)
        return [cat.check_json(c) for c in rows], index

    data, index = blocking(ALL, compute)
    authz = acl.current()
    data = [c for c in data if _visible(authz, c) and (flt is None or flt(c))]
    return json_response(data, index=index)


@bp.get("/v1/health/ingress/<name>")
@accepts_filter
def ingress(name: str):
    """The ingress gateways that route to ``name``, with their checks. Consul finds them
    through ingress-gateway config entries, which Trellis does not have (no gateways): the
    list is always empty, answered as a blocking read of the service, with its index, so a
    client polling it waits for changes as it would on Consul. ``?passing`` and ``?tag`` are
    accepted as on ``health/service``."""
    check_dc()
    flag("passing")  # read, so that a bad value is the client's 400 here too
    filter_arg(shapes.CHECK_SERVICE_NODE)

    def compute():
        return [], _service_index(name)

    data, index = blocking(svc_watch(name), compute)
    acl.current()  # an unknown token is refused as on every read
    return json_response(data, index=index)
