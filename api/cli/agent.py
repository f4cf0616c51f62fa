"""``trellis agent`` (the node agent), ``trellis reload`` and ``trellis leave``.

The agent itself (trio, ``trellis.proxy.agent``) is imported only when the command runs: like
``trellis connect proxy`` it is a long-lived process on every node and must not carry the
server's imports (Flask, the store drivers).
"""

from __future__ import annotations

import argparse
import os
import socket

from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    FlagParser,
    Registry,
    duration,
    exactly,
)
from trellis.proxy.client import APIError


def _duration(text: str) -> float:
    v = duration(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero")
    return v


def _port(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return v


def _fd(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor") from None
    if v < 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not a listening socket's descriptor")
    return v


def _agent_flags(p: FlagParser) -> None:
    p.flag(
        "server",
        action="append",
        default=[],
        metavar="address",
        help="Address of a Trellis server's HTTP API (http://host:8500 or host:8500). "
        "Repeatable: the next is tried when one fails.",
    )
    p.flag("node", metavar="name", help="Name of this node (default: the host name).")
    p.flag(
        "advertise",
        metavar="address",
        help="The node's address in the catalog (default: the -bind address).",
    )
    p.flag(
        "config-dir",
        action="append",
        default=[],
        metavar="path",
        help="Directory of service and check definitions (*.json, *.hcl). Repeatable.",
    )
    p.flag(
        "config-file",
        action="append",
        default=[],
        metavar="path",
        help="File of service and check definitions. Repeatable.",
    )
    p.flag(
        "data-dir",
        metavar="path",
        help="Directory where the agent keeps the services registered through its API.",
    )
    p.flag("token", help="The agent's ACL token (also TRELLIS_HTTP_TOKEN).")
    p.flag("token-file", metavar="path", help="File holding the agent's ACL token.")
    p.flag("ca-file", metavar="path", help="CA certificate to verify an HTTPS server with.")
    p.flag("bind", default="127.0.0.1", metavar="address", help="Address of the local API.")
    p.flag(
        "http-port",
        type=_port,
        default=8500,
        metavar="port",
        help="Port of the local API (default 8500; 0 picks a free one, printed in the banner).",
    )
    p.flag("http-fd", type=_fd, help="(internal) a listening socket to serve the API on.")
    p.flag(
        "exit-with-parent",
        action="store_true",
        help="(internal) stop when the process that started the agent is gone (trellis dev).",
    )
    p.flag(
        "dev",
        action="store_true",
        help="(internal) the agent of trellis dev, in front of a server on the same node.",
    )
    p.flag(
        "node-ttl",
        type=_duration,
        default=30.0,
        metavar="duration",
        help="How long the servers wait for this agent before marking its node failed "
        "(default 30s).",
    )
    p.flag(
        "sync-interval",
        type=_duration,
        default=60.0,
        metavar="duration",
        help="Full anti-entropy sync period, jittered (default 60s).",
    )
    p.flag(
        "no-leave-on-terminate",
        action="store_true",
        help="On SIGTERM or SIGINT, keep this node's catalog entries (default: deregister).",
    )
    p.flag(
        "enable-script-checks",
        action="store_true",
        help="Allow checks that run a program (args); refused otherwise.",
    )
    p.flag(
        "proxy-min-port",
        type=_port,
        default=20000,
        metavar="port",
        help="Lowest public port of a managed sidecar (Consul's ports.proxy_min_port; 20000).",
    )
    p.flag(
        "proxy-max-port",
        type=_port,
        default=20255,
        metavar="port",
        help="Highest public port of a managed sidecar (ports.proxy_max_port; 20255).",
    )
    p.flag("log-level", default="info", metavar="level", help="debug, info, warn or error.")


def agent_cmd(ctx: Context, ns: argparse.Namespace) -> int:
    from trellis.proxy.agent.core import Options
    from trellis.proxy.agent.run import main

    if ns.args:
        raise CommandError(f"Error! Unexpected argument: {ns.args[0]}")
    if not ns.server:
        raise CommandError("Error! Give at least one -server address")
    token = ns.token
    if not token and ns.token_file:
        try:
            with open(ns.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise CommandError(
                f"Error! Cannot read token file {ns.token_file}: {e.strerror}"
            ) from None
    if not token:
        from trellis.proxy.agent.definitions import config_agent_token

        token = config_agent_token(ns.config_dir, ns.config_file)
    token = token or ctx.token or ""
    if ns.data_dir:
        try:
            os.makedirs(ns.data_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise CommandError(
                f"Error! Cannot create data dir {ns.data_dir}: {e.strerror}"
            ) from None
    if not 1 <= ns.proxy_min_port <= ns.proxy_max_port <= 65535:
        raise CommandError(
            "Error! -proxy-min-port and -proxy-max-port must be ports, the first not above"
            " the second"
        )
    for d in ns.config_dir:
        if not os.path.isdir(d):
            raise CommandError(f"Error! Config directory {d} does not exist")
    opts = Options(
        servers=list(ns.server),
        node=ns.node or socket.gethostname(),
        address=ns.advertise or ns.bind,
        config_dirs=list(ns.config_dir),
        config_files=list(ns.config_file),
        data_dir=ns.data_dir,
        token=token,
        ca_file=ns.ca_file,
        bind=ns.bind,
        http_port=ns.http_port,
        http_fd=ns.http_fd,
        node_ttl=ns.node_ttl,
        sync_interval=ns.sync_interval,
        leave_on_terminate=not ns.no_leave_on_terminate,
        enable_script_checks=ns.enable_script_checks,
        parent_pid=os.getppid() if ns.exit_with_parent else None,
        dev=ns.dev,
        proxy_min_port=ns.proxy_min_port,
        proxy_max_port=ns.proxy_max_port,
    )
    return main(opts, ns.log_level)


def reload_cmd(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    with ctx.client(ns) as c:
        try:
            c.request("PUT", "/v1/agent/reload")
        except APIError as e:
            raise CommandError(f"Error reloading: {e.message}") from None
    ctx.out("Configuration reload triggered")
    return 0


def leave_cmd(ctx: Context, ns: argparse.Namespace) -> int:
    exactly(ns.args, 0, "")
    with ctx.client(ns) as c:
        try:
            c.request("PUT", "/v1/agent/leave")
        except APIError as e:
            raise CommandError(f"Error leaving: {e.message}") from None
    ctx.out("Graceful leave complete")
    return 0


def register(r: Registry) -> None:
    r.add(
        Command(
            ("agent",),
            "Runs the node agent",
            "trellis agent -server ADDR [options]",
            agent_cmd,
            _agent_flags,
            description="""
            Runs the agent of this node: its HTTP API (the /v1/agent endpoints for this
            node, everything else forwarded to a server), its services and checks from
            the config directories and the API, kept in the catalog by anti-entropy.

                $ trellis agent -server 127.0.0.1:8500 -node web-1 -config-dir ./services \\
                    -data-dir ./agent-data -http-port 8501
            """,
            http=False,
        ),
        Command(
            ("reload",),
            "Triggers the agent to reload its configuration files",
            "trellis reload [options]",
            reload_cmd,
            description="Asks the local agent (-http-addr) to re-read its config files.",
        ),
        Command(
            ("leave",),
            "Gracefully leaves the cluster and shuts down the agent",
            "trellis leave [options]",
            leave_cmd,
            description="Asks the local agent (-http-addr) to deregister its node's services "
            "and stop.",
        ),
    )
