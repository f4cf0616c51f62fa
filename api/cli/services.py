"""``trellis services register|deregister``: agent service registration, as ``consul services``.

Definition files are in the config-file form: JSON or HCL holding ``{"service": {...}}`` or
``{"services": [...]}`` with snake_case keys. The bodies are sent to the agent as they are (the
server accepts the snake_case form), so that nothing here has to know every field.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from trellis.api.cli.base import Command, CommandError, Context, FlagParser, Registry, UsageError
from trellis.proxy.agent.definitions import DefinitionError, parse_document, split_document
from trellis.proxy.client import APIError


def services_from_file(path: str) -> list[dict[str, Any]]:
    """The service definitions in a JSON or HCL file; a bad file is the user's fault. The
    document is read as the node agent reads its config files
    (``trellis.proxy.agent.definitions``), but only services may be in it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CommandError(f"Error: Error reading {path}: {e.strerror}") from None
    try:
        doc = parse_document(text, path)
    except DefinitionError as e:
        raise CommandError(f"Error: Error decoding {path}: {e}") from None
    try:
        out, checks = split_document(doc)
    except DefinitionError as e:
        raise CommandError(f"Error: {path}: {e}") from None
    if checks:
        raise CommandError(f"Error: {path}: checks are registered by the agent's config files")
    if not out:
        raise CommandError(f"Error: {path} defines no service")
    return out


def _field(svc: dict[str, Any], snake: str) -> str:
    """The key a definition uses for a field: its own spelling if present, else snake_case."""
    pascal = "".join(p.capitalize() for p in snake.split("_"))
    if snake == "id":
        pascal = "ID"
    return pascal if pascal in svc else snake


def _name(svc: dict[str, Any]) -> str:
    return str(svc.get("name") or svc.get("Name") or "")


def _id(svc: dict[str, Any]) -> str:
    return str(svc.get("id") or svc.get("ID") or svc.get("Id") or "")


def _meta(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise UsageError(f'invalid value "{item}" for flag -meta: must be key=value')
        out[k] = v
    return out


def _register_flags(p: FlagParser) -> None:
    p.flag("name", metavar="string", help="Name of the service to register (flag-based form).")
    p.flag(
        "id",
        metavar="string",
        help="ID of the service to register. If it is not set, it defaults to the name.",
    )
    p.flag("address", metavar="string", help="Address of the service to register.")
    p.flag("port", type=int, metavar="int", help="Port of the service to register.")
    p.flag(
        "tag",
        action="append",
        default=[],
        metavar="string",
        help="Tag to add to the service. This flag can be given several times.",
    )
    p.flag(
        "meta",
        action="append",
        default=[],
        metavar="key=value",
        help="Metadata to set on the service, as key=value. This flag can be given several times.",
    )


def _flag_service(ns: argparse.Namespace) -> dict[str, Any]:
    svc: dict[str, Any] = {}
    if ns.name:
        svc["name"] = ns.name
    if ns.id:
        svc["id"] = ns.id
    if ns.address:
        svc["address"] = ns.address
    if ns.port is not None:
        svc["port"] = ns.port
    if ns.tag:
        svc["tags"] = list(ns.tag)
    meta = _meta(ns.meta)
    if meta:
        svc["meta"] = meta
    return svc


def _combine(svc: dict[str, Any], flags: dict[str, Any]) -> None:
    # As Consul does: a flag fills what the file leaves out; tags and meta are added.
    for f in ("id", "name", "address", "port"):
        if f in flags:
            k = _field(svc, f)
            if not svc.get(k):
                svc[k] = flags[f]
    if "meta" in flags:
        k = _field(svc, "meta")
        svc[k] = {**(svc.get(k) or {}), **flags["meta"]}
    if "tags" in flags:
        k = _field(svc, "tags")
        svc[k] = [*(svc.get(k) or []), *flags["tags"]]


def register_cmd(ctx: Context, ns: argparse.Namespace) -> int:
    flags = _flag_service(ns)
    if not ns.args and not ns.name:
        raise UsageError("Service registration requires at least one argument or flags.")
    if ns.args and ns.name:
        raise UsageError("Service registration requires arguments or -name, not both.")
    if ns.args:
        svcs = [s for path in ns.args for s in services_from_file(path)]
        for s in svcs:
            _combine(s, flags)
    else:
        svcs = [flags]
    with ctx.client(ns) as c:
        for s in svcs:
            name = _name(s)
            try:
                c.agent_service_register(s)
            except APIError as e:
                raise CommandError(f'Error registering service "{name}": {e.message}') from None
            ctx.out(f"Registered service: {name}")
    return 0


def _deregister_flags(p: FlagParser) -> None:
    p.flag("id", metavar="string", help="ID to deregister. Not with arguments.")


def _looks_like_file(arg: str) -> bool:
    return os.path.isfile(arg) or arg.endswith((".json", ".hcl"))


def deregister_cmd(ctx: Context, ns: argparse.Namespace) -> int:
    if not ns.args and not ns.id:
        raise UsageError("Service deregistration requires at least one argument or -id.")
    if ns.args and ns.id:
        raise UsageError("Service deregistration requires arguments or -id, not both.")
    ids: list[str] = []
    if ns.id:
        ids.append(ns.id)
    for arg in ns.args:
        if _looks_like_file(arg):
            ids.extend(_id(s) or _name(s) for s in services_from_file(arg))
        else:
            ids.append(arg)
    with ctx.client(ns) as c:
        for sid in ids:
            if not sid:
                continue
            try:
                c.agent_service_deregister(sid)
            except APIError as e:
                raise CommandError(f'Error deregistering service "{sid}": {e.message}') from None
            ctx.out(f"Deregistered service: {sid}")
    return 0


def register(r: Registry) -> None:
    r.group(("services",), "Interact with services")
    r.add(
        Command(
            ("services", "register"),
            "Register services with the local agent",
            "trellis services register [options] [FILE...]",
            register_cmd,
            _register_flags,
            description="""
            Registers one or more services with the agent, from definition files (JSON or
            HCL, {"service": {...}} or {"services": [...]}) or from flags.

                $ trellis services register web.json
                $ trellis services register -name=web -port=8080 -tag=v1
            """,
        ),
        Command(
            ("services", "deregister"),
            "Deregister services with the local agent",
            "trellis services deregister [options] [ID|FILE...]",
            deregister_cmd,
            _deregister_flags,
            description="""
            Deregisters services by ID, or those defined in the given files.

                $ trellis services deregister web
                $ trellis services deregister web.json
                $ trellis services deregister -id=web
            """,
        ),
    )
