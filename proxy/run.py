"""``trellis connect proxy``: set up logging, the client, the follower and the sidecar; print
the banner; serve until SIGTERM or SIGINT; drain; exit.

The command line is parsed in ``trellis.api.cli.connect``; everything it read arrives here in
one frozen ``Options`` value, and nothing below reads the environment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import trio

from trellis.proxy import client as api
from trellis.proxy import config as pconfig
from trellis.proxy import keygen
from trellis.proxy.follower import Follower, FollowerError
from trellis.proxy.reactor import Reactor
from trellis.proxy.rlimits import raise_open_files
from trellis.proxy.sidecar import Limits, Sidecar, StartError

log = logging.getLogger("trellis.proxy")


@dataclass(frozen=True)
class Options:
    http_addr: str
    token: str | None = None
    ca_file: str | None = None
    sidecar_for: str | None = None
    proxy_id: str | None = None
    service: str | None = None
    upstreams: tuple[str, ...] = ()
    listen: str | None = None
    service_addr: str | None = None
    register: bool = False
    metrics_addr: str | None = None
    log_level: str = "info"
    log_json: bool = False
    limits: Limits = field(default_factory=Limits)
    #: ``-parent-pid``: the node agent that runs this sidecar; stop when it is gone.
    parent_pid: int | None = None


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "@level": record.levelname.lower(),
            "@module": record.name,
            "@message": record.getMessage(),
        }
        return json.dumps(doc)


class _HeldUntilBanner(logging.Handler):
    """Holds log lines until the banner is out (``open_gate``), so that they follow it, as
    "Log data will now stream in" promises, instead of cutting through it. Warnings and
    errors go out at once, with what was held before them: a proxy that cannot get to its
    banner (no control plane, a bad token) must say why while it waits.

    Not ``logging.handlers.MemoryHandler``, which does the same: importing that module (and
    the pickle it pulls in) costs every sidecar half a megabyte (issue 10's memory floor)."""

    CAPACITY = 10_000

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target
        self.held: list[logging.LogRecord] = []
        self.released = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.released:
            self.target.handle(record)
            return
        self.held.append(record)
        if record.levelno >= logging.WARNING or len(self.held) >= self.CAPACITY:
            self.flush()

    def flush(self) -> None:
        held, self.held = self.held, []
        for record in held:
            self.target.handle(record)

    def open_gate(self) -> None:
        # Not "release": logging.Handler.release() is its lock's.
        self.released = True
        self.flush()


_held: _HeldUntilBanner | None = None


def configure_logging(level: str, as_json: bool, stream: IO[str]) -> None:
    global _held
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        _JSONFormatter()
        if as_json
        else logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    )
    _held = _HeldUntilBanner(handler)
    root = logging.getLogger("trellis")
    root.handlers[:] = [_held]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False


def _release_log() -> None:
    if _held is not None:
        _held.open_gate()


def sidecar_locator(service_id: str) -> Callable[[dict[str, Any]], pconfig.ProxyConfig]:
    """``-sidecar-for ID``: the connect-proxy registered for service ID on this agent, or the
    service's own one-line ``connect.proxy`` form."""

    def locate(services: dict[str, Any]) -> pconfig.ProxyConfig:
        proxies = [
            s
            for s in services.values()
            if s.get("Kind") == "connect-proxy"
            and (s.get("Proxy") or {}).get("DestinationServiceID") == service_id
        ]
        if len(proxies) > 1:
            ids = ", ".join(sorted(str(p.get("ID")) for p in proxies))
            raise pconfig.ConfigError(
                f"service {service_id!r} has several sidecars ({ids}); use -proxy-id"
            )
        if proxies:
            return pconfig.from_proxy_service(proxies[0])
        svc = services.get(service_id)
        if svc is None:
            raise pconfig.ConfigError(f"no service with ID {service_id!r} is registered here")
        if (svc.get("Connect") or {}).get("Proxy") is not None:
            return pconfig.from_managed(svc)
        raise pconfig.ConfigError(
            f"service {service_id!r} has no sidecar: register it with connect.sidecar_service"
            " or connect.proxy"
        )

    return locate


def proxy_locator(proxy_id: str) -> Callable[[dict[str, Any]], pconfig.ProxyConfig]:
    """``-proxy-id ID``: the connect-proxy service registered under that ID."""

    def locate(services: dict[str, Any]) -> pconfig.ProxyConfig:
        svc = services.get(proxy_id)
        if svc is None:
            raise pconfig.ConfigError(f"no proxy service with ID {proxy_id!r} is registered here")
        return pconfig.from_proxy_service(svc)

    return locate


def build(opts: Options, client: api.Client) -> tuple[Follower, str]:
    """The follower for these options, and the configuration mode for the banner. The key and
    CSR are made by a child process, so that this long-running one never imports
    ``cryptography`` (``trellis.proxy.keygen``)."""
    keys = keygen.ChildKeys()
    if opts.sidecar_for:
        return Follower(client, locate=sidecar_locator(opts.sidecar_for), keys=keys), "Agent API"
    if opts.proxy_id:
        return Follower(client, locate=proxy_locator(opts.proxy_id), keys=keys), "Agent API"
    assert opts.service is not None
    cfg = pconfig.from_flags(
        opts.service, opts.upstreams, listen=opts.listen, service_addr=opts.service_addr
    )
    return Follower(client, config=cfg, keys=keys), "Flags"


def registration(cfg: pconfig.ProxyConfig) -> dict[str, Any]:
    """``-register``: the developer proxy's own catalog entry (a connect-proxy for its
    service, reachable at its ``-listen`` address)."""
    assert cfg.public is not None and cfg.local_app is not None
    host, port = cfg.public
    return {
        "ID": f"{cfg.service}-proxy-{port}",
        "Name": f"{cfg.service}-proxy",
        "Kind": "connect-proxy",
        "Address": host,
        "Port": port,
        "Proxy": {
            "DestinationServiceName": cfg.service,
            "LocalServiceAddress": cfg.local_app[0],
            "LocalServicePort": cfg.local_app[1],
        },
    }


def _raise_open_files_limit(connections: int) -> None:
    """Each relayed connection holds two descriptors."""
    need = 2 * connections + 256
    got = raise_open_files(need)
    if got < need:
        log.warning(
            "the open files limit (%d) is below what %d connections need (%d):"
            " raise it (ulimit -n) or lower -max-connections",
            got,
            connections,
            need,
        )


#: How often a sidecar with ``-parent-pid`` checks that its parent is still there (the
#: portable fallback for PR_SET_PDEATHSIG; one getppid() a second, off the byte path).
PARENT_CHECK_EVERY = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent goes, even by SIGKILL. The signal comes through
    the same handler as an operator's SIGTERM, so the sidecar drains and exits. Elsewhere, or
    if prctl is refused, the periodic check in ``_watch_parent`` is all there is.

    Linux sends it when the parent *thread* that forked this process exits, not the parent
    process: the supervisor forks from the thread it runs in, which lives as long as it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", e)


def main(opts: Options, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    configure_logging(opts.log_level, opts.log_json, err)
    if opts.parent_pid is not None:
        _die_with_parent()
        # The parent may have died before prctl took effect: then no signal will come.
        if os.getppid() != opts.parent_pid:
            err.write(f"Error: the parent process {opts.parent_pid} (-parent-pid) is gone\n")
            return 1
    _raise_open_files_limit(opts.limits.max_connections)
    try:
        client = api.Client(opts.http_addr, token=opts.token, verify=opts.ca_file or True)
    except api.ConnectionFailed as e:
        err.write(f"Error: {e}\n")
        return 1
    try:
        follower, mode = build(opts, client)
    except pconfig.ConfigError as e:
        err.write(f"Error: {e}\n")
        return 1
    out.write("==> Trellis Connect proxy starting...\n")
    out.write(f"    Configuration mode: {mode}\n")
    out.flush()
    reactor = Reactor()
    sidecar = Sidecar(follower, opts.limits, reactor=reactor, hosted=True)
    try:
        return reactor.host(_serve, opts, client, sidecar, out, err)
    except (FollowerError, StartError) as e:
        err.write(f"Error: {e}\n")
        return 1
    except BaseExceptionGroup as group:
        # Raised in one of trio's tasks (the follower's, a listener's): report the first
        # operator-facing error on one line; anything else is a bug and keeps its traceback.
        fatal, rest = group.split((FollowerError, StartError))
        if fatal is None:
            raise
        first = _leaves(fatal)[0]
        err.write(f"Error: {first}\n")
        if rest is not None:
            log.debug("while stopping: %r", rest)
        return 1
    finally:
        client.close()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _banner(out: IO[str], lines: Sequence[tuple[str, str]], metrics: str | None) -> None:
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        out.write(f"    {k:>{width}}: {v}\n")
    if metrics:
        out.write(f"    {'Metrics':>{width}}: http://{metrics}/metrics\n")
    out.write("\n==> Log data will now stream in as it occurs:\n\n")
    out.flush()
    _release_log()


async def _serve(
    opts: Options, client: api.Client, sidecar: Sidecar, out: IO[str], err: IO[str]
) -> int:
    stopping = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            def stop(why: str) -> None:
                if stopping.is_set():
                    return
                log.info("%s: stopping (draining for up to %gs)", why, opts.limits.drain)
                stopping.set()
                if sidecar.snapshot is None or not sidecar.bound:
                    nursery.cancel_scope.cancel()  # nothing serves yet: just go

            async def on_signal() -> None:
                async for sig in signals:
                    stop(signal.Signals(sig).name)
                    return

            nursery.start_soon(on_signal)
            if opts.parent_pid is not None:
                nursery.start_soon(_watch_parent, opts.parent_pid, stop)
            metrics_at = None
            if opts.metrics_addr:
                metrics_at = await _start_metrics(nursery, opts.metrics_addr, sidecar)
            await nursery.start(sidecar.run)
            snap = sidecar.snapshot
            assert snap is not None
            _banner(out, _describe(sidecar), metrics_at)
            registered: str | None = None
            if opts.register and snap.config.public is not None:
                body = registration(snap.config)
                await trio.to_thread.run_sync(client.agent_service_register, body)
                registered = body["ID"]
                log.info("registered %s in the catalog", registered)
            await stopping.wait()
            if registered:
                try:
                    await trio.to_thread.run_sync(client.agent_service_deregister, registered)
                except api.APIError as e:
                    log.warning("could not take %s out of the catalog: %s", registered, e)
            sidecar.stop()
            while not sidecar.reactor.closed:
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    return 0


async def _watch_parent(parent_pid: int, stop: Callable[[str], None]) -> None:
    """The portable fallback for PR_SET_PDEATHSIG: once the parent is gone, this process has
    been handed to another (init, or a subreaper), and getppid() says so."""
    while os.getppid() == parent_pid:
        await trio.sleep(PARENT_CHECK_EVERY)
    stop(f"the parent process {parent_pid} is gone")


async def _start_metrics(nursery: trio.Nursery, addr: str, sidecar: Sidecar) -> str:
    host, _, port = addr.rpartition(":")
    try:
        listeners = await trio.open_tcp_listeners(int(port), host=host or "127.0.0.1")
    except (OSError, ValueError) as e:
        raise StartError(f"-metrics-addr {addr}: {e}") from None
    sockname = listeners[0].socket.getsockname()
    # Imported only here: prometheus_client costs every proxy some 2.5 MB (measured, issue
    # 10), and most run without -metrics-addr.
    from trellis.proxy import metrics as pmetrics

    nursery.start_soon(pmetrics.serve, listeners[0], pmetrics.registry_for(sidecar))
    return f"{sockname[0]}:{sockname[1]}"


def _describe(sidecar: Sidecar) -> list[tuple[str, str]]:
    """The banner's lines, with the ports actually bound (a port 0 in the configuration)."""
    snap = sidecar.snapshot
    assert snap is not None
    cfg = snap.config
    lines = [("Service", cfg.service)]
    for u in cfg.upstreams:
        h, p = sidecar.bound.get(f"upstream {u.bind_address}:{u.bind_port}", u.listen)
        lines.append(("Upstream", pconfig.Upstream(u.destination, p, h).label()))
    if "public" in sidecar.bound and cfg.public is not None:
        h, p = sidecar.bound["public"]
        app = cfg.local_app
        lines.append(("Public listener", f"{h}:{p} => {app[0]}:{app[1]}" if app else f"{h}:{p}"))
    else:
        lines.append(("Public listener", "Disabled"))
    return lines
