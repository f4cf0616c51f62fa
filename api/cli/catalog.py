"""``trellis catalog ...``, ``trellis members`` and ``trellis info``: read-only views, laid out as
``consul catalog``, ``consul members`` and ``consul info`` lay them out."""

from __future__ import annotations

import argparse
import json
from typing import Any

from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    FlagParser,
    Registry,
    add_format_flag,
    columnize,
    exactly,
    tabulate,
)
from trellis.proxy.client import APIError


def _services_flags(p: FlagParser) -> None:
    p.flag(
        "tags",
        action="store_true",
        help="Display each service's tags as a comma-separated list beside each service entry.",
    )
    add_format_flag(p)


def catalog_services(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    with ctx.client(ns) as c:
        try:
            services: dict[str, list[str]] = c.catalog_services().value
        except APIError as e:
            raise CommandError(f"Error listing services: {e.message}") from None
    if ns.format == "json":
        ctx.print_json(services)
        return 0
    if not services:
        ctx.err("No services match the given query - try expanding your search.")
        return 0
    names = sorted(services)
    if ns.tags:
        ctx.out(tabulate([(n, ",".join(sorted(services[n] or []))) for n in names]))
    else:
        for n in names:
            ctx.out(n)
    return 0


def _short_id(node_id: str) -> str:
    # The first group of the UUID, as Consul shortens it (8 characters).
    i = node_id.find("-")
    return node_id[:i] if i > 0 else node_id


def catalog_nodes(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    with ctx.client(ns) as c:
        try:
            nodes: list[dict[str, Any]] = c.catalog_nodes().value
        except APIError as e:
            raise CommandError(f"Error listing nodes: {e.message}") from None
    if ns.format == "json":
        ctx.print_json(nodes)
        return 0
    if not nodes:
        ctx.err("No nodes match the given query - try expanding your search.")
        return 0
    rows = [("Node", "ID", "Address", "DC")]
    for n in sorted(nodes, key=lambda n: n.get("Node", "")):
        rows.append(
            (
                str(n.get("Node", "")),
                _short_id(str(n.get("ID") or "")),
                str(n.get("Address", "")),
                str(n.get("Datacenter", "")),
            )
        )
    ctx.out(columnize(rows))
    return 0


def _service_flags(p: FlagParser) -> None:
    p.flag("tag", metavar="string", help="Only list the instances that have this tag.")
    add_format_flag(p)


def catalog_service(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 1, "SERVICE")
    name = ns.args[0]
    with ctx.client(ns) as c:
        try:
            instances: list[dict[str, Any]] = c.catalog_service(name, tag=ns.tag).value
        except APIError as e:
            raise CommandError(f"Error listing instances of {name}: {e.message}") from None
    if ns.format == "json":
        ctx.print_json(instances)
        return 0
    if not instances:
        ctx.err("No instances match the given query - try expanding your search.")
        return 0
    rows = [("ID", "Node", "Address", "Port", "Tags")]
    for s in sorted(instances, key=lambda s: (s.get("Node", ""), s.get("ServiceID", ""))):
        rows.append(
            (
                str(s.get("ServiceID", "")),
                str(s.get("Node", "")),
                str(s.get("ServiceAddress") or s.get("Address") or ""),
                str(s.get("ServicePort", "")),
                ",".join(s.get("ServiceTags") or []),
            )
        )
    ctx.out(columnize(rows))
    return 0


# -- members and info --------------------------------------------------------------------------


def node_status(check: dict[str, Any] | None) -> str:
    """A node's member status from its ``serfHealth`` check: alive (passing, or no check:
    a node registered without an agent), left (its agent left gracefully) or failed (the
    server turned the check critical when the agent stopped talking for its -node-ttl)."""
    if check is None or check.get("Status") == "passing":
        return "alive"
    if "left" in str(check.get("Output") or ""):
        return "left"
    return "failed"


def _members(
    self_info: dict[str, Any],
    nodes: list[dict[str, Any]],
    health: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, str]]:
    """One row per catalog node. The node this server runs as is its "server" member; the
    others are nodes whose agents registered them ("client"). ``health``: each node's
    serfHealth check, for its status."""
    health = health or {}
    config = self_info.get("Config") or {}
    member = self_info.get("Member") or {}
    tags = member.get("Tags") or {}
    me = config.get("NodeName") or member.get("Name") or ""
    build = str(config.get("Version") or tags.get("build") or "").split(":", 1)[0]
    protocol = str(tags.get("vsn") or "2")
    kind = "server" if config.get("Server", True) else "client"
    rows: list[dict[str, str]] = []
    seen = False
    for n in nodes:
        name = str(n.get("Node", ""))
        meta = n.get("Meta") or {}
        row = {
            "Node": name,
            "Address": str(n.get("Address", "")),
            "Status": node_status(health.get(name)),
            "Type": "client",
            "Build": str(meta.get("trellis-version") or ""),
            "Protocol": str(meta.get("trellis-protocol") or ""),
            "DC": str(n.get("Datacenter", "")),
        }
        if name == me:
            seen = True
            addr = member.get("Addr")
            port = member.get("Port")
            if addr:
                row["Address"] = f"{addr}:{port}" if port else str(addr)
            row.update(Type=kind, Build=build, Protocol=protocol)
        rows.append(row)
    if not seen and me:
        # The server does not register itself in the catalog (register_node off): still list it.
        addr = member.get("Addr") or ""
        port = member.get("Port")
        rows.append(
            {
                "Node": me,
                "Address": f"{addr}:{port}" if addr and port else str(addr),
                "Status": "alive",
                "Type": kind,
                "Build": build,
                "Protocol": protocol,
                "DC": str(config.get("Datacenter", "")),
            }
        )
    rows.sort(key=lambda r: (r["Type"] != "server", r["Node"]))
    return rows


def members(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    with ctx.client(ns) as c:
        try:
            self_info = c.agent_self()
            nodes = c.catalog_nodes().value
            r = c.request("GET", "/v1/health/state/any", allow=(404,))
            checks = r.json() if r.status == 200 else []
            health = {
                str(x.get("Node")): x
                for x in checks or []
                if isinstance(x, dict) and x.get("CheckID") == "serfHealth"
            }
            rows = _members(self_info, nodes, health)
        except APIError as e:
            raise CommandError(f"Error retrieving members: {e.message}") from None
    if ns.format == "json":
        ctx.print_json(rows)
        return 0
    cols = ("Node", "Address", "Status", "Type", "Build", "Protocol", "DC")
    ctx.out(columnize([cols, *([r[k] for k in cols] for r in rows)]))
    return 0


def _scalar(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    if isinstance(v, int | float):
        return str(v)
    return json.dumps(v, sort_keys=True)


def info_sections(self_info: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``Stats`` from /v1/agent/self, as ``consul info`` prints it; without ``Stats``, each
    object-valued member of the answer (Config, Member, ...) is a section."""
    stats = self_info.get("Stats")
    if not isinstance(stats, dict):
        stats = {k.lower(): v for k, v in self_info.items() if isinstance(v, dict)}
    out: dict[str, dict[str, str]] = {}
    for section in sorted(stats):
        values = stats[section]
        if not isinstance(values, dict):
            continue
        out[section] = {k: _scalar(values[k]) for k in sorted(values)}
    return out


def info(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    with ctx.client(ns) as c:
        try:
            sections = info_sections(c.agent_self())
        except APIError as e:
            raise CommandError(f"Error querying agent: {e.message}") from None
    if ns.format == "json":
        ctx.print_json(sections)
        return 0
    for section, values in sections.items():
        ctx.out(f"{section}:")
        for k, v in values.items():
            ctx.out(f"\t{k} = {v}")
    return 0


def register(r: Registry) -> None:
    r.group(("catalog",), "Interact with the catalog")
    r.add(
        Command(
            ("catalog", "services"),
            "Lists all registered services in a datacenter",
            "trellis catalog services [options]",
            catalog_services,
            _services_flags,
            description="Lists the names of the services in the catalog; -tags adds their tags.",
        ),
        Command(
            ("catalog", "nodes"),
            "Lists all nodes in the given datacenter",
            "trellis catalog nodes [options]",
            catalog_nodes,
            add_format_flag,
            description="Lists the nodes in the catalog.",
        ),
        Command(
            ("catalog", "service"),
            "Lists the instances of a service",
            "trellis catalog service [options] SERVICE",
            catalog_service,
            _service_flags,
            description="Lists the instances of one service: ID, node, address, port and tags.",
        ),
        Command(
            ("members",),
            "Lists the members of a Trellis cluster",
            "trellis members [options]",
            members,
            add_format_flag,
            description="Lists the nodes of the cluster, the server's own node first.",
        ),
        Command(
            ("info",),
            "Provides debugging information for operators",
            "trellis info [options]",
            info,
            add_format_flag,
            description="Prints what the server reports about itself, by section.",
        ),
    )
