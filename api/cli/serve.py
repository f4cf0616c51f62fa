"""``trellis dev`` and ``trellis server``: parse Consul-style flags into ``Settings`` field values
and hand them to ``trellis.api.server``.

Only the flags given on the command line go into the dict, so that the config file and the
environment keep every value the operator did not override. ``trellis.api.server`` is imported
inside the commands: the client commands must not pay for (or depend on) gunicorn and Flask.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    FlagParser,
    Registry,
    at_most,
    integer,
)
from trellis.api.settings import WORKER_CLASSES

_S = argparse.SUPPRESS


def _common_flags(p: FlagParser) -> None:
    p.flag(
        "data-dir",
        default=_S,
        metavar="path",
        help="Directory for the server's data (the SQLite file). 'trellis dev' uses a "
        "temporary directory by default.",
    )
    p.flag(
        "store",
        default=_S,
        metavar="url",
        help="Store URL: sqlite:///path/to/trellis.db or postgresql://user@host/db. Empty "
        "means SQLite in the data directory.",
    )
    p.flag("datacenter", default=_S, metavar="name", help="Datacenter name (default dc1).")
    p.flag(
        "node",
        default=_S,
        metavar="name",
        help="Name of this node (default: the host name).",
    )
    p.flag(
        "bind",
        default=_S,
        metavar="address",
        help="Address the HTTP API and DNS listen on (default 127.0.0.1).",
    )
    p.flag("http-port", type=integer, default=_S, metavar="port", help="HTTP API port (8500).")
    p.flag(
        "dns-port",
        type=integer,
        default=_S,
        metavar="port",
        help="DNS port (8600); 0 picks a free port, -1 turns DNS off.",
    )
    p.flag("domain", default=_S, metavar="domain", help='DNS domain (default "trellis.").')
    p.flag(
        "workers",
        type=integer,
        default=_S,
        metavar="n",
        help="Number of gunicorn worker processes.",
    )
    p.flag(
        "worker-class",
        choices=WORKER_CLASSES,
        default=_S,
        metavar="|".join(WORKER_CLASSES),
        help="gunicorn worker class (default gevent).",
    )
    p.flag(
        "log-level",
        default=_S,
        metavar="level",
        help="Log level: debug, info, warning or error.",
    )


def _server_flags(p: FlagParser) -> None:
    p.flag(
        "config",
        aliases=("config-file",),
        default=None,
        metavar="path",
        help="Configuration file (JSON, or HCL when it ends in .hcl).",
    )
    _common_flags(p)


_NAMES = {
    "data_dir": "data_dir",
    "store": "store",
    "datacenter": "datacenter",
    "node": "node_name",
    "http_port": "http_port",
    "dns_port": "dns_port",
    "domain": "domain",
    "workers": "workers",
    "worker_class": "worker_class",
    "log_level": "log_level",
}


def settings_values(ns: argparse.Namespace) -> dict[str, Any]:
    """The ``Settings`` fields set by the flags that were given, and only those."""
    given = vars(ns)
    values = {field: given[dest] for dest, field in _NAMES.items() if dest in given}
    if "bind" in given:
        values["http_host"] = given["bind"]
        values["dns_host"] = given["bind"]
    return values


def parse_server_args(argv: Sequence[str], *, dev: bool) -> tuple[dict[str, Any], str | None]:
    """Parse ``trellis dev`` (``dev=True``) or ``trellis server`` arguments into
    ``(settings values, config file)``; raises UsageError."""
    cmd = DEV if dev else SERVER
    ns = cmd.parser().parse(argv)
    at_most(ns.args, 0)
    return settings_values(ns), getattr(ns, "config", None)


def _run_dev(ctx: Context, ns: argparse.Namespace) -> int:
    at_most(ns.args, 0)
    try:
        from trellis.api.server import main_dev
    except ImportError as e:
        raise CommandError(f"Error! The Trellis server is not available: {e}") from None
    dirs = tuple(getattr(ns, "config_dir", ()) or ())
    for d in dirs:
        # Here, not in the agent: an agent that refuses to start leaves dev without its API.
        if not os.path.isdir(d):
            raise CommandError(f"Error! Config directory {d} does not exist")
    return _call(lambda: main_dev(settings_values(ns), dirs))


def _run_server(ctx: Context, ns: argparse.Namespace) -> int:
    at_most(ns.args, 0)
    try:
        from trellis.api.server import main_server
    except ImportError as e:
        raise CommandError(f"Error! The Trellis server is not available: {e}") from None
    return _call(lambda: main_server(settings_values(ns), ns.config))


def _call(fn: Any) -> int:
    from trellis.api.errors import ConfigError

    try:
        rc = fn()
    except ConfigError as e:
        raise CommandError(f"Error! {e}") from None
    return int(rc or 0)


def _dev_flags(p: FlagParser) -> None:
    _common_flags(p)
    p.flag(
        "config-dir",
        action="append",
        default=_S,
        metavar="path",
        help="Service and check definitions (*.json, *.hcl) for dev's node agent to load. "
        "Repeatable.",
    )


DEV = Command(
    ("dev",),
    "Run a throw-away server on this machine, for development",
    "trellis dev [options]",
    _run_dev,
    _dev_flags,
    description="""
    Starts everything on one machine: a server (SQLite in a temporary data directory,
    deleted when it stops; the built-in CA; DNS on 127.0.0.1:8600) and in front of it
    the node agent of this host (trellis agent), which serves the HTTP API on
    127.0.0.1:8500 (-bind, -http-port): it answers the /v1/agent endpoints and
    forwards the rest to the server, which listens on a free 127.0.0.1 port of its
    own (printed as "Server API"). Nothing else is needed. A service registered with
    "connect": {"proxy": {}}, in a -config-dir file or through the API
    (PUT /v1/agent/service/register), gets a sidecar the agent runs. Ctrl-C stops
    the agent first (it deregisters its services and stops their sidecars), then
    the server.
    """,
    http=False,
)

SERVER = Command(
    ("server",),
    "Run the control plane (HTTP API and DNS)",
    "trellis server -config FILE [options]",
    _run_server,
    _server_flags,
    description="""
    Runs the control plane under gunicorn. Settings come from the config file, then
    the TRELLIS_* environment variables, then these flags.
    """,
    http=False,
)


def register(r: Registry) -> None:
    r.add(DEV, SERVER)
