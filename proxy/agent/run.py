"""``trellis agent``: start the node agent, print its banner, run until a signal or a leave.

SIGHUP reloads the config files. SIGTERM and SIGINT leave gracefully (everything the agent
registered is deregistered and its sidecars are stopped) unless ``leave_on_terminate`` is
off, when the catalog entries stay for the next start of the agent to take over.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sys

import trio

from trellis.api import __version__
from trellis.proxy.agent import wiring
from trellis.proxy.agent.core import Agent, Options
from trellis.proxy.agent.httpd import serve
from trellis.proxy.agent.localapi import LocalAPI, server_fetch
from trellis.proxy.agent.shared import SharedReads

log = logging.getLogger("trellis.agent")
MAX_BODY = 4 * 1024 * 1024


def _listener_socket(opts: Options) -> socket.socket:
    if opts.http_fd is not None:
        sock = socket.socket(fileno=opts.http_fd)
    else:
        family = socket.AF_INET6 if ":" in opts.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((opts.bind, opts.http_port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {opts.bind}:{opts.http_port}: {e.strerror}") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def run_agent(opts: Options) -> int:
    def out(line: str) -> None:
        print(line, flush=True)

    agent = Agent(
        opts, make_runner=wiring.make_runner, make_supervisor=wiring.make_supervisor, out=out
    )
    for problem in agent.state.load():
        log.error("data dir: %s", problem)
    try:
        raw = _listener_socket(opts)
    except OSError as e:
        print(f"Error! {e}", file=sys.stderr, flush=True)
        return 1
    host, port = raw.getsockname()[:2]
    agent.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    lines = [
        "==> Trellis agent running!",
        f"         Version: {__version__}",
        f"       Node name: {opts.node}",
        f"        HTTP API: {agent.url}",
        f"         Servers: {', '.join(agent.servers.addresses)}",
        f"        Node TTL: {opts.node_ttl:g}s",
    ]
    out("\n".join(lines))
    agent.load_files()
    for s in agent.state.api_services.values():
        out(f"    Service: {s.name} (ID {s.id}) from the local API")
    out("")
    out("==> Log data will now stream in as it occurs:")

    stop = trio.Event()
    leave = {"graceful": opts.leave_on_terminate}
    shared = SharedReads(server_fetch(agent))
    api = LocalAPI(agent, on_leave=lambda: (leave.update(graceful=True), stop.set()), shared=shared)

    async def signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as rx:
            task_status.started()
            async for sig in rx:
                if sig == signal.SIGHUP:
                    errors = await agent.reload()
                    log.info("reloaded the config files (%d refused)", len(errors))
                else:
                    stop.set()
                    return

    async def loops(
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Anti-entropy runs in its own scope, ended before a leave: a sync running alongside
        # the leave would register again what the leave takes out.
        async with trio.open_nursery() as inner:
            task_status.started(inner.cancel_scope)
            inner.start_soon(agent._datacenter)
            inner.start_soon(agent._heartbeat_loop)
            inner.start_soon(agent._sync_loop)
            inner.start_soon(agent._push_loop)
            inner.start_soon(agent._watch_loop)

    async def orphaned() -> None:
        while os.getppid() == opts.parent_pid:
            await trio.sleep(0.5)
        log.warning("the process that started this agent is gone: stopping")
        stop.set()

    async with trio.open_nursery() as nursery:
        if opts.parent_pid is not None:
            nursery.start_soon(orphaned)
        await nursery.start(signals)
        await nursery.start(agent.runner.run)
        await nursery.start(agent.supervisor.run)
        await nursery.start(shared.run)
        agent.changed()
        nursery.start_soon(functools.partial(serve, listener, api.handle, max_body=MAX_BODY))
        sync_scope = await nursery.start(loops)
        await stop.wait()
        sync_scope.cancel()
        if leave["graceful"]:
            log.info("leaving: deregistering this node's services")
            await agent.leave()
        else:
            with trio.move_on_after(10):
                await agent.supervisor.stop_all()
        nursery.cancel_scope.cancel()
    await agent.servers.aclose()
    out("==> Trellis agent stopped")
    return 0


def main(opts: Options, log_level: str = "info") -> int:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stdout,
    )
    try:
        return trio.run(run_agent, opts)
    except KeyboardInterrupt:
        return 130
