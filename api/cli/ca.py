"""``trellis ca ...``: the Connect certificate authority, as ``consul connect ca`` shows it.

``roots`` lists the trusted roots (or prints them as one PEM bundle), ``get-config`` and
``set-config`` read and replace the CA configuration (the JSON of ``consul connect ca
get-config``/``set-config``), ``rotate`` makes a new active root. The server never returns a
secret, so nothing printed here holds one.
"""

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
    UsageError,
    add_format_flag,
    columnize,
    exactly,
)
from trellis.proxy.client import APIError

#: Fields of ``get-config`` output that the server computes; dropped from a ``set-config``
#: file so that ``get-config > f; edit f; set-config -config-file f`` works.
READ_ONLY_FIELDS = ("CreateIndex", "ModifyIndex", "State")

FORCE_HELP = (
    "Go ahead even if the current CA cannot cross-sign the new root. Peers that have not "
    "yet fetched the new root reject leaves signed by it until they do, so connections may "
    "fail for a while. The default is false."
)


# -- roots -------------------------------------------------------------------------------------


def _roots_flags(p: FlagParser) -> None:
    p.flag(
        "pem",
        action="store_true",
        help="Print the root certificates as one PEM bundle (a trust bundle for tools such as "
        "openssl or curl) instead of a table.",
    )
    add_format_flag(p)


def ca_roots(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    if ns.pem and ns.format == "json":
        raise UsageError("Error! -pem and -format=json cannot be used together")
    with ctx.client(ns) as c:
        try:
            if ns.pem:
                bundle = c.ca_roots_pem()
            else:
                roots: dict[str, Any] = c.ca_roots().value
        except APIError as e:
            raise CommandError(f"Error! Failed to read the CA roots: {e.message}") from None
    if ns.pem:
        ctx.stdout.write(bundle if bundle.endswith("\n") or not bundle else bundle + "\n")
        return 0
    if ns.format == "json":
        ctx.print_json(roots)
        return 0
    rows = [("ID", "Name", "Active", "NotAfter")]
    for r in roots.get("Roots") or []:
        rows.append(
            (
                str(r.get("ID", "")),
                str(r.get("Name", "")),
                "true" if r.get("Active") else "false",
                str(r.get("NotAfter", "")),
            )
        )
    ctx.out(columnize(rows))
    return 0


# -- get-config / set-config -------------------------------------------------------------------


def ca_get_config(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    with ctx.client(ns) as c:
        try:
            config = c.ca_get_config()
        except APIError as e:
            raise CommandError(f"Error! Failed to read the CA configuration: {e.message}") from None
    # As Consul prints it (Go's json.MarshalIndent with a tab): the fields in the server's
    # order, the keys of the Config map sorted.
    if isinstance(config.get("Config"), dict):
        config = {**config, "Config": dict(sorted(config["Config"].items()))}
    ctx.out(json.dumps(config, indent="\t"))
    return 0


def _set_flags(p: FlagParser) -> None:
    p.flag(
        "config-file",
        metavar="path",
        help="The JSON file with the new configuration: Provider, Config and, optionally, "
        "ForceWithoutCrossSigning (the output of get-config is accepted as it is).",
    )
    p.flag("force-without-cross-signing", action="store_true", help=FORCE_HELP)


def ca_set_config(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    path = ns.config_file
    if not path:
        raise CommandError("Error! The -config-file flag is required")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CommandError(f"Error! Cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"Error! Config file {path} is not UTF-8 text") from None
    try:
        body = json.loads(text)
    except ValueError as e:
        raise CommandError(f"Error! Config file {path} is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise CommandError(f"Error! Config file {path} must hold a JSON object")
    # Other unknown fields go to the server, which refuses them with a clear message.
    body = {k: v for k, v in body.items() if k not in READ_ONLY_FIELDS}
    if ns.force_without_cross_signing:
        body["ForceWithoutCrossSigning"] = True
    with ctx.client(ns) as c:
        try:
            c.ca_set_config(body)
        except APIError as e:
            raise CommandError(f"Error! Failed to set the CA configuration: {e.message}") from None
    ctx.out("Configuration updated!")
    return 0


# -- rotate ------------------------------------------------------------------------------------


def _rotate_flags(p: FlagParser) -> None:
    p.flag("force-without-cross-signing", action="store_true", help=FORCE_HELP)


def ca_rotate(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    with ctx.client(ns) as c:
        try:
            roots = c.ca_rotate(force_without_cross_signing=ns.force_without_cross_signing)
        except APIError as e:
            raise CommandError(f"Error! Failed to rotate the CA root: {e.message}") from None
    ctx.out(f"Root rotated: new active root {roots.get('ActiveRootID', '')}")
    return 0


def register(r: Registry) -> None:
    r.group(("ca",), "Interact with the Connect certificate authority (CA)")
    r.add(
        Command(
            ("ca", "roots"),
            "Lists the trusted CA root certificates",
            "trellis ca roots [options]",
            ca_roots,
            _roots_flags,
            description="Lists the roots that peers trust: the active one, and the ones\n"
            "that were rotated out but may still have unexpired leaves.",
        ),
        Command(
            ("ca", "get-config"),
            "Display the current Connect CA configuration",
            "trellis ca get-config [options]",
            ca_get_config,
            description="Displays the current CA configuration as JSON (never with a secret).",
        ),
        Command(
            ("ca", "set-config"),
            "Modify the current Connect CA configuration",
            "trellis ca set-config -config-file FILE [options]",
            ca_set_config,
            _set_flags,
            description="Replaces the CA configuration. A change of the provider, the key\n"
            "type or size, or a custom root rotates the root.",
        ),
        Command(
            ("ca", "rotate"),
            "Make a new active CA root, cross-signed by the current one",
            "trellis ca rotate [options]",
            ca_rotate,
            _rotate_flags,
            description="Makes a new root with the current configuration and makes it\n"
            "active. The old root stays trusted until every leaf it signed has expired.",
        ),
    )
