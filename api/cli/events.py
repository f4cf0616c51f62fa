"""``trellis maint``, ``trellis event`` and ``trellis watch``, as ``consul maint``, ``consul
event`` and ``consul watch``.

``trellis watch`` follows one kind of view with blocking reads and hands each change to a
handler. It supports ``-type event`` (Trellis's only watch type so far): the first read hands
the handler every event the agent lists, each later one the events after the last it handled,
found as Consul's watch finds them, by the event whose ID gives the index it last saw
(``trellis.api.events.id_to_index``). The handler is a shell command that gets the events as
a JSON array on its stdin, and the index in ``CONSUL_INDEX``; it runs to its end before the
next read. Without a handler, the first result is printed as JSON and the command exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from typing import Any
from urllib.parse import quote

from trellis.api.cli.base import Command, CommandError, Context, FlagParser, Registry, UsageError
from trellis.api.events import id_to_index
from trellis.api.maintenance import NODE_CHECK_ID, SERVICE_CHECK_PREFIX
from trellis.proxy.client import APIError

#: Watch types ``trellis watch`` supports.
WATCH_TYPES = ("event",)
#: A blocking read's wait while watching.
WATCH_WAIT = "5m"
#: After a failed read, the first pause before the next (doubled up to RETRY_MAX).
RETRY_MIN, RETRY_MAX = 1.0, 30.0


# -- maint ---------------------------------------------------------------------------------


def _maint_flags(p: FlagParser) -> None:
    p.flag("enable", action="store_true", help="Enable maintenance mode.")
    p.flag("disable", action="store_true", help="Disable maintenance mode.")
    p.flag(
        "reason",
        default="",
        metavar="string",
        help="Text describing the maintenance reason (with -enable).",
    )
    p.flag(
        "service",
        default="",
        metavar="string",
        help="Control maintenance mode for the service of this ID rather than the node.",
    )


def maint(ctx: Context, ns: argparse.Namespace) -> int:
    if ns.args:
        raise UsageError("Error! Too many arguments")
    if ns.enable and ns.disable:
        raise UsageError("Error! Only one of -enable or -disable may be provided")
    if not ns.enable and ns.reason:
        raise UsageError("Error! Reason may only be provided with -enable")
    if not ns.enable and not ns.disable and ns.service:
        raise UsageError("Error! Service requires either -enable or -disable")
    with ctx.client(ns) as client:
        if not ns.enable and not ns.disable:
            return _list_maintenance(ctx, client)
        params = {"enable": "true" if ns.enable else "false"}
        if ns.reason:
            params["reason"] = ns.reason
        if ns.service:
            client.request(
                "PUT", f"/v1/agent/service/maintenance/{quote(ns.service, safe='')}", params=params
            )
            verb = "entered" if ns.enable else "left"
            ctx.out(f"Service {verb} maintenance mode: {ns.service}")
        else:
            client.request("PUT", "/v1/agent/maintenance", params=params)
            ctx.out("Node entered maintenance mode" if ns.enable else "Node left maintenance mode")
    return 0


def _list_maintenance(ctx: Context, client: Any) -> int:
    checks = client.request("GET", "/v1/agent/checks").json()
    if not isinstance(checks, dict):
        raise CommandError("Error! The agent's checks are not a JSON object")
    for cid, c in sorted(checks.items()):
        if cid == NODE_CHECK_ID:
            ctx.out("Node:")
            ctx.out(f"  Name:   {c.get('Node', '')}")
            ctx.out(f"  Reason: {c.get('Notes', '')}")
            ctx.out("")
        elif cid.startswith(SERVICE_CHECK_PREFIX):
            ctx.out("Service:")
            ctx.out(f"  ID:     {c.get('ServiceID', '')}")
            ctx.out(f"  Reason: {c.get('Notes', '')}")
            ctx.out("")
    return 0


# -- event ---------------------------------------------------------------------------------


def _event_flags(p: FlagParser) -> None:
    p.flag("name", default="", metavar="string", help="Name of the event (required).")
    p.flag("node", default="", metavar="string", help="Regular expression to filter on node names.")
    p.flag(
        "service",
        default="",
        metavar="string",
        help="Regular expression to filter on service names.",
    )
    p.flag(
        "tag",
        default="",
        metavar="string",
        help="Regular expression to filter on service tags (needs -service).",
    )


def event(ctx: Context, ns: argparse.Namespace) -> int:
    if not ns.name:
        raise UsageError("Error! Event name must be specified")
    if ns.tag and not ns.service:
        raise UsageError("Error! Cannot provide tag filter without service filter")
    if len(ns.args) > 1:
        raise UsageError("Error! Too many arguments: give the payload as one argument")
    payload = ns.args[0].encode() if ns.args else None
    params = {"node": ns.node or None, "service": ns.service or None, "tag": ns.tag or None}
    with ctx.client(ns) as client:
        r = client.request(
            "PUT", f"/v1/event/fire/{quote(ns.name, safe='')}", params=params, content=payload
        )
        ctx.out(f"Event ID: {r.json()['ID']}")
    return 0


# -- watch ---------------------------------------------------------------------------------


def _watch_flags(p: FlagParser) -> None:
    p.flag(
        "type",
        default="",
        metavar="string",
        help=f"The kind of view to watch (required): {', '.join(WATCH_TYPES)}.",
    )
    p.flag("name", default="", metavar="string", help="With -type event: the event name.")


def _new_events(events: list[Any], last: int | None) -> list[Any]:
    """The events after the one whose ID gives ``last`` (all of them if none does), as
    Consul's event watch prunes what it already handled."""
    if last is None:
        return events
    for i, ev in enumerate(events):
        if isinstance(ev, dict) and id_to_index(str(ev.get("ID", ""))) == last:
            return events[i + 1 :]
    return events


def _run_handler(ctx: Context, handler: list[str], value: Any, index: int) -> None:
    argv = ["/bin/sh", "-c", handler[0]] if len(handler) == 1 else handler
    data = json.dumps(value).encode()
    env = {**os.environ, "CONSUL_INDEX": str(index)}
    try:
        done = subprocess.run(argv, input=data, env=env, check=False)
    except OSError as e:
        ctx.err(f"Error! Cannot start the handler: {e.strerror}")
        return
    if done.returncode != 0:
        ctx.err(f"Error! The handler exited with {done.returncode}")


def watch(ctx: Context, ns: argparse.Namespace) -> int:
    if not ns.type:
        raise UsageError("Error! Watch type must be specified")
    if ns.type not in WATCH_TYPES:
        raise UsageError(
            f"Error! Unsupported watch type {ns.type!r}: trellis watch supports"
            f" {', '.join(WATCH_TYPES)}"
        )
    handler = list(ns.args)
    params = {"name": ns.name or None}
    _end_on_sigterm()
    with ctx.client(ns) as client:
        last: int | None = None
        pause = RETRY_MIN
        while True:
            try:
                if last is None:
                    r = client.request("GET", "/v1/event/list", params=params)
                else:
                    r = client.request(
                        "GET", "/v1/event/list", params=params, index=last, wait=WATCH_WAIT
                    )
                events = r.json()
            except APIError as e:  # ConnectionFailed too
                if last is None and not handler:
                    raise
                ctx.err(f"Error! Watch read failed, retrying in {pause:.0f}s: {e.message}")
                time.sleep(pause)
                pause = min(RETRY_MAX, pause * 2)
                continue
            pause = RETRY_MIN
            index = r.index if r.index is not None else 1
            if not isinstance(events, list):
                raise CommandError("Error! The event list is not a JSON array")
            if not handler:
                ctx.print_json(events)
                return 0
            if last is None or index != last:
                fresh = _new_events(events, last)
                if last is None or fresh:
                    ctx.stdout.flush()
                    _run_handler(ctx, handler, fresh, index)
                last = index


def _end_on_sigterm() -> None:
    """SIGTERM ends the watch as SIGINT does (``main`` answers both with exit status 130);
    a handler still running is killed with it (subprocess.run does that)."""

    def handle(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (run in-process): nothing to catch
        pass


def register(r: Registry) -> None:
    r.add(
        Command(
            ("maint",),
            "Controls node or service maintenance mode",
            "trellis maint [options]",
            maint,
            _maint_flags,
            description="""
            Places a node or service into maintenance mode, or takes it out. In
            maintenance mode a node or service is left out of DNS and of passing health
            queries (a critical check, "_node_maintenance" or
            "_service_maintenance:<ID>", says why).

            With neither -enable nor -disable, lists what is in maintenance on the agent.

                $ trellis maint -enable -reason "kernel upgrade"
                $ trellis maint -enable -service web-1
                $ trellis maint -disable -service web-1
            """,
        ),
        Command(
            ("event",),
            "Fire a new event",
            "trellis event [options] [payload]",
            event,
            _event_flags,
            description="""
            Fires a user event, with an optional payload. The node, service and tag
            filters are regular expressions saying which agents process it.

                $ trellis event -name deploy -service web v1.4.2
            """,
        ),
        Command(
            ("watch",),
            "Watch for changes in Trellis",
            "trellis watch -type event [-name NAME] [handler]",
            watch,
            _watch_flags,
            description="""
            Watches a view and runs the handler (a shell command) on every change, with
            the new data as JSON on its stdin. Without a handler, prints the current
            data as JSON and exits. Supported types: event (the events after the last
            one handled; the first run gets every event the agent lists).

                $ trellis watch -type event -name deploy ./deploy-handler.sh
            """,
        ),
    )
