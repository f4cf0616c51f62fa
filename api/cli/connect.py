"""``trellis connect proxy``: the sidecar and the developer proxy (Consul's flags).

The flags are parsed here into ``trellis.proxy.run.Options``; the proxy itself (trio, the
byte path) is imported only when the command runs.
"""

from __future__ import annotations

import argparse

from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    FlagParser,
    Registry,
    add_http_flags,
    duration,
)


def _positive(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def _flags(p: FlagParser) -> None:
    p.flag(
        "sidecar-for",
        metavar="id",
        help="Run the sidecar of the service with this ID: its configuration comes from the "
        "connect-proxy registered for it (connect.sidecar_service) or from the service's "
        "connect.proxy block, and follows changes to it.",
    )
    p.flag(
        "proxy-id",
        metavar="id",
        help="Run the connect-proxy service registered under this ID.",
    )
    p.flag(
        "service",
        metavar="name",
        help="Run a proxy for this service identity from flags (the developer proxy).",
    )
    p.flag(
        "upstream",
        metavar="name:port",
        action="append",
        default=[],
        help="With -service: listen on 127.0.0.1:port (or name:addr:port) and connect each "
        "connection to the service 'name' over Connect. Repeatable.",
    )
    p.flag(
        "listen",
        metavar="addr:port",
        help="With -service: also accept Connect connections for the service on this address.",
    )
    p.flag(
        "service-addr",
        metavar="addr:port",
        help="With -listen: where accepted connections go.",
    )
    p.flag(
        "register",
        action="store_true",
        help="With -listen: register this proxy in the catalog, and take it out on exit.",
    )
    p.flag(
        "ca-file",
        metavar="path",
        section="HTTP API Options",
        help="CA certificate file to verify an HTTPS API with.",
    )
    p.flag(
        "metrics-addr",
        metavar="addr:port",
        help="Serve Prometheus metrics at http://addr:port/metrics.",
    )
    p.flag(
        "parent-pid",
        type=_positive,
        metavar="pid",
        help="Stop (drain and exit, as on SIGTERM) when the process with this PID, which "
        "must be this proxy's parent, is gone. The node agent sets it on the sidecars it runs.",
    )
    p.flag("log-level", default="info", metavar="level", help="debug, info, warn or error.")
    p.flag("log-json", action="store_true", help="Log one JSON object a line.")
    p.flag(
        "handshake-timeout",
        type=duration,
        default=10.0,
        metavar="duration",
        help="How long a TLS handshake may take (default 10s).",
    )
    p.flag(
        "idle-timeout",
        type=duration,
        default=3600.0,
        metavar="duration",
        help="Close a connection with no bytes either way for this long (default 1h).",
    )
    p.flag(
        "max-connections",
        type=_positive,
        default=8192,
        metavar="n",
        help="Refuse new connections while this many are open (default 8192).",
    )
    p.flag(
        "drain-timeout",
        type=duration,
        default=10.0,
        metavar="duration",
        help="On SIGTERM or SIGINT, how long open connections may finish (default 10s).",
    )
    add_http_flags(p)


def proxy(ctx: Context, ns: argparse.Namespace) -> int:
    from trellis.proxy.run import Options, main
    from trellis.proxy.sidecar import Limits

    if ns.args:
        raise CommandError(f"Error! Unexpected argument: {ns.args[0]}")
    modes = [m for m in ("sidecar_for", "proxy_id", "service") if getattr(ns, m)]
    if len(modes) != 1:
        raise CommandError("Error! Give exactly one of -sidecar-for, -proxy-id or -service")
    if ns.service is None and (ns.upstream or ns.listen or ns.service_addr or ns.register):
        raise CommandError(
            "Error! -upstream, -listen, -service-addr and -register go with -service"
        )
    if ns.register and not ns.listen:
        raise CommandError("Error! -register needs -listen (there is nothing to register)")
    if ns.log_level.lower() not in ("debug", "info", "warn", "warning", "error"):
        raise CommandError(f"Error! Unknown log level {ns.log_level!r}")
    # The token: -token, then -token-file, then the environment (Context.client's order).
    token = ns.token
    if not token and ns.token_file:
        try:
            with open(ns.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise CommandError(
                f"Error! Cannot read token file {ns.token_file}: {e.strerror}"
            ) from None
    opts = Options(
        http_addr=ns.http_addr or ctx.http_addr,
        token=token or ctx.token,
        ca_file=ns.ca_file,
        sidecar_for=ns.sidecar_for,
        proxy_id=ns.proxy_id,
        service=ns.service,
        upstreams=tuple(ns.upstream),
        listen=ns.listen,
        service_addr=ns.service_addr,
        register=ns.register,
        metrics_addr=ns.metrics_addr,
        log_level={"warn": "warning"}.get(ns.log_level.lower(), ns.log_level.lower()),
        log_json=ns.log_json,
        parent_pid=ns.parent_pid,
        limits=Limits(
            handshake_timeout=ns.handshake_timeout,
            idle_timeout=ns.idle_timeout,
            max_connections=ns.max_connections,
            drain=ns.drain_timeout,
        ),
    )
    return main(opts, ctx.stdout, ctx.stderr)


def register(r: Registry) -> None:
    r.group(("connect",), "Interact with Trellis Connect")
    r.add(
        Command(
            ("connect", "proxy"),
            "Runs a Connect proxy",
            "trellis connect proxy [options]",
            proxy,
            _flags,
            http=False,
            description="""
            Run a Connect proxy: the sidecar of a registered service, or a proxy for a
            service identity given by flags (the developer proxy).

                $ trellis connect proxy -sidecar-for web
                $ trellis connect proxy -service alice -upstream postgresql:9191

            The proxy gets its certificate from the Trellis server, accepts only
            mutual-TLS connections that intentions allow, and relays plain TCP to the
            local app and from local upstream ports.
            """,
        )
    )
