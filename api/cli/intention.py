"""``trellis intention ...``: which services may connect to which, as ``consul intention`` does it.

Output and messages are Consul's, word for word (``Created: web => db (allow)``, ``Intention
deleted.``, the ``get`` layout, the ``list`` table), so that people and scripts used to
Consul's CLI find what they expect. Where Trellis differs, it says so in the command's help:

* ``create`` also takes ``-description``; ``-replace`` replaces the intention of the pair by
  name (``PUT /v1/connect/intentions/exact``) and prints ``Replaced: web => db (deny)``, in the
  form of ``Created: ...`` (Consul prints nothing then, which leaves a script, or a person,
  unable to tell a replacement from a command that did nothing);
* ``check`` exits 0 for ``Allowed`` and 2 for ``Denied``; an error (a usage error, the server
  unreachable) exits 1, as every Trellis command does, so a script can tell the three apart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from trellis.api.cli.base import Command, CommandError, Context, FlagParser, Registry, columnize
from trellis.proxy.client import APIError

#: ``trellis intention check``: the exit status of ``Denied`` (``Allowed`` is 0, an error 1).
EXIT_DENIED = 2
#: ``trellis intention list`` with no intention at all (Consul's status for it).
EXIT_NO_INTENTIONS = 2

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _q(text: str) -> str:
    """A string quoted as Go's ``%q`` quotes it (for the names Trellis accepts: the same)."""
    return json.dumps(text, ensure_ascii=False)


def label(ixn: Mapping[str, Any]) -> str:
    """``web => db (allow)``: Consul's ``Intention.String()``."""
    return (
        f"{ixn.get('SourceName', '')} => {ixn.get('DestinationName', '')} ({ixn.get('Action', '')})"
    )


def rfc850(timestamp: str) -> str:
    """An API time (``2026-01-02T15:04:05.123456Z``) in local time, as Go's ``time.RFC850``
    formats it (``Friday, 02-Jan-26 16:04:05 CET``), whatever the locale."""
    text = timestamp.strip()
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text  # not a time the server sends; show it as it is
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    local = when.astimezone()
    zone = local.tzname() or local.strftime("%z")
    return (
        f"{_DAYS[local.weekday()]}, {local.day:02d}-{_MONTHS[local.month - 1]}-"
        f"{local.year % 100:02d} {local:%H:%M:%S} {zone}"
    )


# -- create ------------------------------------------------------------------------------------


def _meta_pair(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f'Missing "=" value in argument: {text}')
    return key, value


def _create_flags(p: FlagParser) -> None:
    p.flag("allow", action="store_true", help="Create an intention that allows when matched.")
    p.flag("deny", action="store_true", help="Create an intention that denies when matched.")
    p.flag(
        "replace",
        action="store_true",
        help="Replace the intention of the same source and destination, if there is one.",
    )
    p.flag(
        "description",
        default="",
        metavar="string",
        help="A description of the intention, for people (at most 512 characters).",
    )
    p.flag(
        "meta",
        type=_meta_pair,
        action="append",
        default=[],
        metavar="key=value",
        help="Metadata to set on the intention, formatted as key=value. This flag may be "
        "specified multiple times to set multiple meta fields.",
    )


def intention_create(ctx: Context, ns: argparse.Namespace) -> int:
    allow, deny = ns.allow, ns.deny
    if not allow and not deny:
        allow = True
    if allow and deny:
        raise CommandError("Only one of -allow or -deny may be specified.")
    if len(ns.args) != 2:
        raise CommandError("Error: Must specify two arguments: source and destination")
    source, destination = ns.args
    action = "allow" if allow else "deny"
    meta = dict(ns.meta)
    ixn = {"SourceName": source, "DestinationName": destination, "Action": action}
    with ctx.client(ns) as c:
        if ns.replace:
            try:
                old = c.intention_get_exact(source, destination).value
            except APIError as e:
                raise CommandError(
                    "Error looking up intention for replacement with source "
                    f"{_q(source)} and destination {_q(destination)}: {e.message}"
                ) from None
            if old is not None:
                try:
                    c.intention_upsert_exact(
                        source, destination, action, description=ns.description, meta=meta
                    )
                except APIError as e:
                    raise CommandError(
                        f"Error replacing intention with source {_q(source)} "
                        f"and destination {_q(destination)}: {e.message}"
                    ) from None
                ctx.out(f"Replaced: {label(ixn)}")
                return 0
        try:
            c.intention_create(source, destination, action, description=ns.description, meta=meta)
        except APIError as e:
            raise CommandError(f"Error creating intention {_q(label(ixn))}: {e.message}") from None
    ctx.out(f"Created: {label(ixn)}")
    return 0


# -- get ---------------------------------------------------------------------------------------


def _find(ctx: Context, ns: argparse.Namespace) -> dict[str, Any]:
    """The intention named by ``ID`` or by ``SRC DST``, with Consul's messages."""
    with ctx.client(ns) as c:
        if len(ns.args) == 1:
            (intention_id,) = ns.args
            try:
                found = c.intention_get(intention_id)
            except APIError as e:
                raise CommandError(f"Error reading the intention: {e.message}") from None
            if found is None:
                raise CommandError(f"Intention not found with ID {_q(intention_id)}")
            return found
        if len(ns.args) == 2:
            source, destination = ns.args
            try:
                found = c.intention_get_exact(source, destination).value
            except APIError as e:
                raise CommandError(f"Error reading the intention: {e.message}") from None
            if found is None:
                raise CommandError(
                    f"Intention not found with source {_q(source)} "
                    f"and destination {_q(destination)}"
                )
            return found
    raise CommandError("command requires exactly 1 or 2 arguments")  # pragma: no cover


def intention_get(ctx: Context, ns: argparse.Namespace) -> int:
    if len(ns.args) not in (1, 2):
        raise CommandError("command requires exactly 1 or 2 arguments")
    ixn = _find(ctx, ns)
    rows = [
        ("Source:", str(ixn.get("SourceName", ""))),
        ("Destination:", str(ixn.get("DestinationName", ""))),
    ]
    if ixn.get("Action"):
        rows.append(("Action:", str(ixn["Action"])))
    if ixn.get("ID"):
        rows.append(("ID:", str(ixn["ID"])))
    if ixn.get("Description"):
        rows.append(("Description:", str(ixn["Description"])))
    meta = ixn.get("Meta") or {}
    for k in sorted(meta):
        rows.append((f"Meta[{k}]:", str(meta[k])))
    rows.append(("Created At:", rfc850(str(ixn.get("CreatedAt", "")))))
    # Consul's columnize trims every cell.
    ctx.out(columnize([tuple(cell.strip() for cell in row) for row in rows]))
    return 0


# -- delete ------------------------------------------------------------------------------------


def intention_delete(ctx: Context, ns: argparse.Namespace) -> int:
    if len(ns.args) not in (1, 2):
        raise CommandError("command requires exactly 1 or 2 arguments")
    with ctx.client(ns) as c:
        try:
            if len(ns.args) == 1:
                c.intention_delete(ns.args[0])
            else:
                c.intention_delete_exact(ns.args[0], ns.args[1])
        except APIError as e:
            raise CommandError(f"Error deleting the intention: {e.message}") from None
    ctx.out("Intention deleted.")
    return 0


# -- list --------------------------------------------------------------------------------------


def intention_list(ctx: Context, ns: argparse.Namespace) -> int:
    if ns.args:
        raise CommandError(f"Too many arguments (expected 0, got {len(ns.args)})")
    with ctx.client(ns) as c:
        try:
            ixns = c.intentions_list().value
        except APIError as e:
            raise CommandError(f"Failed to retrieve the intentions list: {e.message}") from None
    if not ixns:
        ctx.err("There are no intentions.")
        return EXIT_NO_INTENTIONS
    rows = [("ID", "Source", "Action", "Destination", "Precedence")]
    for i in ixns:
        rows.append(
            (
                str(i.get("ID", "")),
                str(i.get("SourceName", "")),
                str(i.get("Action", "")),
                str(i.get("DestinationName", "")),
                str(i.get("Precedence", "")),
            )
        )
    ctx.out(columnize(rows))
    return 0


# -- match -------------------------------------------------------------------------------------


def _match_flags(p: FlagParser) -> None:
    p.flag("source", action="store_true", help="Match intentions with the given source.")
    p.flag(
        "destination",
        action="store_true",
        help="Match intentions with the given destination (the default).",
    )


def intention_match(ctx: Context, ns: argparse.Namespace) -> int:
    if len(ns.args) != 1:
        raise CommandError("Error: command requires exactly one argument: src or dst")
    if ns.source and ns.destination:
        raise CommandError("Error: only one of -source or -destination may be specified")
    name = ns.args[0]
    by = "source" if ns.source else "destination"
    with ctx.client(ns) as c:
        try:
            matches = c.intention_match(by, [name]).value
        except APIError as e:
            raise CommandError(f"Error matching the connection: {e.message}") from None
    for ixn in matches.get(name) or []:
        ctx.out(label(ixn))
    return 0


# -- check -------------------------------------------------------------------------------------


def intention_check(ctx: Context, ns: argparse.Namespace) -> int:
    if len(ns.args) != 2:
        raise CommandError("Error: command requires exactly two arguments: src and dst")
    source, destination = ns.args
    with ctx.client(ns) as c:
        try:
            allowed = c.intention_check(source, destination)
        except APIError as e:
            raise CommandError(f"Error checking the connection: {e.message}") from None
    if allowed:
        ctx.out("Allowed")
        return 0
    ctx.out("Denied")
    return EXIT_DENIED


def register(r: Registry) -> None:
    r.group(("intention",), "Interact with Connect service intentions")
    r.add(
        Command(
            ("intention", "create"),
            "Create intentions for service connections.",
            "trellis intention create [options] SRC DST",
            intention_create,
            _create_flags,
            description="""
            Create an intention: may SRC open connections to DST? SRC and DST are
            service names, or "*" for any service.

                $ trellis intention create web db

            An "allow" intention is created by default. To create a "deny" intention,
            give the "-deny" flag.

            If the pair has an intention already, creation fails. To replace it, give
            the "-replace" flag: its action, description and metadata are replaced by
            this command's, and "Replaced: SRC => DST (action)" is printed.
            """,
        ),
        Command(
            ("intention", "get"),
            "Show information about an intention.",
            "trellis intention get [options] SRC DST\nUsage: trellis intention get [options] ID",
            intention_get,
            description="""
            Read and show the details about an intention. The intention can be looked
            up via an exact source/destination match or via the unique intention ID.

                $ trellis intention get web db
            """,
        ),
        Command(
            ("intention", "delete"),
            "Delete an intention.",
            "trellis intention delete [options] SRC DST\n"
            "Usage: trellis intention delete [options] ID",
            intention_delete,
            description="""
            Delete an intention. This cannot be reversed. The intention can be looked
            up via an exact source/destination match or via the unique intention ID.

                $ trellis intention delete web db
            """,
        ),
        Command(
            ("intention", "list"),
            "List connect intentions",
            "trellis intention list [options]",
            intention_list,
            description="List all intentions, highest precedence first.",
        ),
        Command(
            ("intention", "match"),
            "Show intentions that match a source or destination.",
            "trellis intention match [options] SRC|DST",
            intention_match,
            _match_flags,
            description="""
            Show the list of intentions that would be enforced for a given source
            or destination. The intentions are listed in the order they would be
            evaluated.

                $ trellis intention match db
                $ trellis intention match -source web
            """,
        ),
        Command(
            ("intention", "check"),
            "Check whether a connection between two services is allowed.",
            "trellis intention check [options] SRC DST",
            intention_check,
            description="""
            Check whether a connection between SRC and DST would be allowed by
            Connect given the current configuration. Prints "Allowed" (exit status 0)
            or "Denied" (exit status 2); an error exits with 1.

                $ trellis intention check web db
            """,
        ),
    )
