"""``/v1/catalog/*``: the cluster-wide view of nodes and services."""

from __future__ import annotations

from collections.abc import Iterable

from flask import Blueprint

from trellis.api import catalog as cat
from trellis.api.acl import service as acl
from trellis.api.acl.rules import Authorizer
from trellis.api.errors import BadRequest, Conflict
from trellis.api.feed import Watch
from trellis.api.http import (
    accepts_filter,
    blocking,
    filter_arg,
    json_body,
    json_response,
    services,
    str_arg,
)
from trellis.api.schemas import load
from trellis.api.schemas.catalog import CatalogDeregisterSchema, CatalogRegisterSchema
from trellis.api.store.base import Check, Node, NodeView, Prepare, Registration, Service
from trellis.proxy import filtershapes as shapes

bp = Blueprint("catalog", __name__)

ALL = Watch("catalog", prefixes=("",))


def svc_watch(name: str) -> Watch:
    return Watch("catalog", exact=(f"svc/{name}",))


def check_dc() -> None:
    dc = str_arg("dc", max_len=64)
    if dc and dc != services().settings.datacenter:
        raise BadRequest(f"No path to datacenter {dc!r}")


def tags_arg() -> tuple[str, ...]:
    from flask import request

    return tuple(t for t in request.args.getlist("tag") if t)


def require_overwrite_write(
    view: NodeView, authz: Authorizer, svcs: Iterable[Service], checks: Iterable[Check]
) -> None:
    """A registration replaces the service or check that has its ID on the node: that needs
    write on what it replaces too, or ``service:write`` on ``web`` would let a token overwrite
    (take over, or silence the checks of) ``db``'s instance by reusing its ID. Consul vets the
    same (``vetRegisterWithACL``, ``vetServiceRegisterWithAuthorizer``: "Vet any service that
    might be getting overwritten", and the same for checks on the agent).

    Run from a registration's ``prepare`` (``Store.register``), so ``view`` is the node as the
    write's own transaction sees it. ``authz`` is resolved before the write: nothing here
    reads the store or blocks.

    Fix: registrations checked only the names they wrote, never what they overwrote; then
    they checked what they overwrote in a read before the write, and a registration that
    landed in between was overwritten without write on it.
    """
    for s in svcs:
        old = view.service(s.id)
        if old is not None and old.name != s.name:
            acl.require(authz.service_write(old.name), f"service:write on {old.name!r}")
    for c in checks:
        old_check = view.check(c.check_id)
        if old_check is None or old_check.service_name == c.service_name:
            continue
        if old_check.service_name:
            name = old_check.service_name
            acl.require(authz.service_write(name), f"service:write on {name!r}")
        else:
            acl.require(authz.node_write(c.node), f"node:write on {c.node!r}")


def require_same_owners(view: NodeView, reg: Registration) -> None:
    """A check for a service already on the node was vetted (``service:write`` on its name)
    against that service as read before the write. If another registration replaced (or
    removed) the service meanwhile, the check would land on another service's instance, under
    a permission for the old one: Conflict instead, which the caller may retry. Run from a
    registration's ``prepare``, like ``require_overwrite_write``."""
    own = {s.id for s in reg.services}
    for c in reg.checks:
        if not c.service_id or c.service_id in own:
            continue
        current = view.service(c.service_id)
        if current is None or current.name != c.service_name:
            raise Conflict(
                f"service ID {c.service_id!r} changed while its check {c.check_id!r} was"
                " being registered; retry"
            )


def guard_overwrites(authz: Authorizer) -> Prepare:
    """The ``prepare`` of a registration whose only in-transaction work is these checks."""

    def prepare(view: NodeView, reg: Registration) -> Registration:
        require_same_owners(view, reg)
        require_overwrite_write(view, authz, reg.services, reg.checks)
        return reg

    return prepare


@bp.put("/v1/catalog/register")
def register():
    check_dc()
    body = load(CatalogRegisterSchema, cat.to_pascal(json_body()))
    settings = services().settings
    if body.get("Datacenter") and body["Datacenter"] != settings.datacenter:
        raise BadRequest(f"No path to datacenter {body['Datacenter']!r}")
    node_name = cat.valid_name("node name", body["Node"])
    node = Node(
        name=node_name,
        id=body.get("ID", ""),
        address=body["Address"],
        datacenter=settings.datacenter,
        tagged_addresses=body.get("TaggedAddresses") or {},
        meta=body.get("NodeMeta") or {},
    )
    svcs = []
    checks_defs = list(body.get("Checks") or [])
    if body.get("Check"):
        checks_defs.append(body["Check"])
    svc = None
    if body.get("Service"):
        svc = cat.build_service(node_name, body["Service"])
        svcs.append(svc)
    checks = []
    for d in checks_defs:
        sid = d.get("ServiceID", "")
        owner = svc if svc and sid == svc.id else None
        if sid and owner is None:
            existing = services().store.services(node=node_name)
            owner = next((s for s in existing if s.id == sid), None)
            if owner is None:
                raise BadRequest(f"check refers to unknown service ID {sid!r}")
        checks += cat.build_checks(node_name, owner, [d])
    skip_node = bool(body.get("SkipNodeUpdate"))
    authz = acl.current()
    if not skip_node:
        acl.require_node_write(node_name)
    for s in svcs:
        acl.require_registration(s.name, s.destination)
    for c in checks:
        if c.service_name:
            acl.require_service_write(c.service_name)
        else:
            acl.require_node_write(node_name)

    def prepare(view: NodeView, reg: Registration) -> Registration:
        # Inside the write: whether the node exists (SkipNodeUpdate creates a missing one,
        # which needs node:write) and what the registration overwrites, as the write sees it.
        if skip_node and view.node() is None:
            acl.require(authz.node_write(node_name), f"node:write on {node_name!r}")
        require_same_owners(view, reg)
        require_overwrite_write(view, authz, reg.services, reg.checks)
        return reg

    services().store.register(
        Registration(
            node=node,
            services=tuple(svcs),
            checks=tuple(checks),
            keep_existing_node=skip_node,
        ),
        prepare=prepare,
    )
    return json_response(True)


@bp.put("/v1/catalog/deregister")
def deregister():
    check_dc()
    body = load(CatalogDeregisterSchema, cat.to_pascal(json_body()))
    node = body["Node"]
    store = services().store
    if body.get("ServiceID"):
        owner = next((s for s in store.services(node=node) if s.id == body["ServiceID"]), None)
        if owner is not None:
            acl.require_service_write(owner.name)
        else:
            acl.require_node_write(node)
        store.deregister_service(node, body["ServiceID"])
    elif body.get("CheckID"):
        check = next(iter(store.checks(node=node, check_id=body["CheckID"])), None)
        if check is not None and check.service_name:
            acl.require_service_write(check.service_name)
        else:
            acl.require_node_write(node)
        store.deregister_check(node, body["CheckID"])
    else:
        acl.require_node_write(node)
        store.deregister_node(node)
    return json_response(True)


@bp.get("/v1/catalog/datacenters")
def datacenters():
    return json_response([services().settings.datacenter])


@bp.get("/v1/catalog/services")
@accepts_filter
def list_services():
    check_dc()
    store = services().store
    flt = filter_arg(shapes.SERVICE_NODE)

    def compute():
        index = store.topic_index("catalog")  # first: see blocking
        out: dict[str, list[str]] = {}
        svcs = store.services()
        if flt is not None:
            # As Consul: the filter runs on each instance (the shape of catalog/service/{name}),
            # and the names and tags are those of the instances it keeps.
            nodes = {n.name: n for n in store.nodes()}
            svcs = [
                s
                for s in svcs
                if s.node in nodes and flt(cat.catalog_service_json(nodes[s.node], s))
            ]
        for s in svcs:
            tags = out.setdefault(s.name, [])
            tags.extend(t for t in s.tags if t not in tags)
        return out, index

    data, index = blocking(ALL, compute)
    authz = acl.current()
    data = {k: v for k, v in data.items() if authz.service_read(k)}
    return json_response(data, index=index)


@bp.get("/v1/catalog/nodes")
@accepts_filter
def list_nodes():
    check_dc()
    store = services().store
    flt = filter_arg(shapes.NODE)

    def compute():
        index = store.topic_index("catalog")  # first: see blocking
        return [cat.node_json(n) for n in store.nodes()], index

    data, index = blocking(ALL, compute)
    authz = acl.current()
    data = [n for n in data if authz.node_read(n["Node"]) and (flt is None or flt(n))]
    return json_response(data, index=index)


def _service_index(name: str) -> int:
    store = services().store
    return store.topic_index(f"catalog/svc/{name}") or store.topic_index("catalog")


@bp.get("/v1/catalog/service/<name>")
@accepts_filter
def service(name: str):
    check_dc()
    return _instances(name, connect=False)


@bp.get("/v1/catalog/connect/<name>")
@accepts_filter
def connect(name: str):
    check_dc()
    return _instances(name, connect=True)


def _instances(name: str, *, connect: bool):
    store = services().store
    tags = tags_arg()
    flt = filter_arg(shapes.SERVICE_NODE)

    def compute():
        index = _service_index(name)  # first: see blocking
        if connect:
            svcs = store.services(destination=name) + [
                s for s in store.services(name=name) if (s.connect or {}).get("Native")
            ]
        else:
            svcs = store.services(name=name)
        svcs = [s for s in svcs if set(tags) <= set(s.tags)]
        nodes = {n.name: n for n in (store.node(x) for x in {s.node for s in svcs}) if n}
        out = [cat.catalog_service_json(nodes[s.node], s) for s in svcs if s.node in nodes]
        return out, index

    data, index = blocking(svc_watch(name), compute)
    authz = acl.current()
    # Without service:read on the name the list is empty (Consul filters, it does not 403).
    data = [
        d
        for d in data
        if authz.service_read(d["ServiceName"])
        and authz.service_read(name)
        and authz.node_read(d["Node"])
        and (flt is None or flt(d))
    ]
    return json_response(data, index=index)


@bp.get("/v1/catalog/node/<node>")
@accepts_filter
def node(node: str):
    check_dc()
    store = services().store
    # As Consul: the filter runs on each of the node's services, not on the node.
    flt = filter_arg(shapes.NODE_SERVICE)

    def compute():
        idx = store.topic_index(f"catalog/node/{node}") or store.topic_index("catalog")  # first
        n = store.node(node)
        if n is None:
            return None, idx
        svcs = {s.id: cat.service_json(s) for s in store.services(node=node)}
        return {"Node": cat.node_json(n), "Services": svcs}, idx

    data, index = blocking(Watch("catalog", exact=(f"node/{node}",)), compute)
    authz = acl.current()
    if data is not None:
        if not authz.node_read(node):
            data = None
        else:
            data = {
                **data,
                "Services": {
                    k: v
                    for k, v in data["Services"].items()
                    if authz.service_read(v["Service"]) and (flt is None or flt(v))
                },
            }
    return json_response(data, index=index)


@bp.get("/v1/catalog/node-services/<node>")
@accepts_filter
def node_services(node: str):
    """Consul's newer shape of ``catalog/node``: the services as a list rather than a map by
    ID. An unknown node is ``{"Node": null, "Services": []}``, as Consul answers it."""
    check_dc()
    store = services().store
    flt = filter_arg(shapes.NODE_SERVICE)

    def compute():
        idx = store.topic_index(f"catalog/node/{node}") or store.topic_index("catalog")  # first
        n = store.node(node)
        if n is None:
            return {"Node": None, "Services": []}, idx
        svcs = [cat.service_json(s) for s in store.services(node=node)]
        return {"Node": cat.node_json(n), "Services": svcs}, idx

    data, index = blocking(Watch("catalog", exact=(f"node/{node}",)), compute)
    authz = acl.current()
    if data["Node"] is not None and not authz.node_read(node):
        data = {"Node": None, "Services": []}
    data = {
        **data,
        "Services": [
            v
            for v in data["Services"]
            if authz.service_read(v["Service"]) and (flt is None or flt(v))
        ],
    }
    return json_response(data, index=index)


@bp.get("/v1/catalog/gateway-services/<gateway>")
def gateway_services(gateway: str):
    """The services a terminating or ingress gateway routes to, which Consul takes from the
    gateway's config entry. Trellis has no gateways (no config entry of those kinds is
    accepted: see ``/v1/config``), so the list is always empty; still a blocking read of the
    gateway's name, with its index, as clients poll it. ``service:read`` on the gateway."""
    check_dc()

    def compute():
        return [], _service_index(gateway)

    authz = acl.current()
    acl.require(authz.service_read(gateway), f"service:read on {gateway!r}")
    data, index = blocking(svc_watch(gateway), compute)
    return json_response(data, index=index)
