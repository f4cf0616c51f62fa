"""Running the control plane: ``trellis server`` and ``trellis dev``.

Theory of operation
-------------------
The master process (gunicorn's arbiter) checks the configuration and the store, binds every
listening socket itself (HTTP, and DNS over UDP and TCP), prints where everything listens, then
forks the workers. Binding in the master means a busy port is a clear error before anything
starts, port 0 works (the real port is printed), and every worker shares the same sockets.

Each worker builds its own app (``create_app``) after the fork: its own store connections and
change feed, following the other workers' commits through the store. Each worker also serves
DNS from the inherited DNS sockets; the kernel hands each datagram or connection to one of them.

The default worker class is gevent: a parked blocking query costs a greenlet, not a thread, so
thousands of long-polls do not tie up the workers (gthread and sync remain available). The
master checks the store in a short-lived child process and never imports the database driver
itself, so that each gevent worker imports psycopg after gevent has patched it, which is what
makes psycopg cooperative (``check_store``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import Any

from trellis.api import __version__
from trellis.api.errors import ConfigError, StoreUnavailable
from trellis.api.settings import Settings, build, from_env, load_file
from trellis.proxy.rlimits import raise_open_files

log = logging.getLogger("trellis.server")


def _fail(message: str) -> int:
    # One line, whatever the cause: driver errors (psycopg's) carry hints on further lines.
    message = " ".join(message.split())
    print(f"Error: {message}", file=sys.stderr, flush=True)
    return 1


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main_server(values: dict[str, Any], config_file: str | None) -> int:
    """``trellis server``: the production server. Flags override the config file."""
    try:
        merged: dict[str, Any] = {}
        if config_file:
            merged.update(load_file(config_file))
        merged.update(from_env(dict(os.environ)))
        merged.update(values)
        merged.setdefault("register_node", True)
        settings = build(merged)
    except ConfigError as e:
        return _fail(f"invalid configuration: {e}")
    if config_file:
        settings = dataclasses.replace(settings, config_file=os.path.abspath(config_file))
    return serve(settings)


def main_dev(values: dict[str, Any], agent_config_dirs: tuple[str, ...] = ()) -> int:
    """``trellis dev``: everything in one process tree, on a throw-away data dir: the server,
    and in front of it a node agent for the server's own node (``DevAgent``) that loads
    ``agent_config_dirs``."""
    own_dir = None
    master = os.getpid()  # see serve(): a worker unwinds this frame too
    merged: dict[str, Any] = {"workers": 1, "dev": True}
    merged.update(values)
    if not merged.get("data_dir") and not merged.get("store"):
        own_dir = tempfile.mkdtemp(prefix="trellis-dev-")
        merged["data_dir"] = own_dir
    try:
        settings = build(merged)
    except ConfigError as e:
        return _fail(f"invalid configuration: {e}")
    try:
        return serve(settings, agent_config_dirs=agent_config_dirs)
    finally:
        if own_dir and os.getpid() == master:
            shutil.rmtree(own_dir, ignore_errors=True)


def bind_http(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Each worker listens on the same port with its own socket (see _post_fork); the kernel
    # then spreads connections evenly over the workers, which one shared socket does not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def bind_agent(host: str, port: int) -> socket.socket:
    """The listening socket of dev's node agent, on the address users know. Without
    SO_REUSEPORT: a second ``trellis dev`` on the same port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(512)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror}") from None
    return sock


def _loopback(host: str) -> str:
    return "::1" if ":" in host else "127.0.0.1"


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def raise_open_files_limit(settings: Settings) -> None:
    """Raise this process's soft limit on open files to what the workers may need, up to the
    hard limit (as Go programs, Consul among them, do at start).

    A gevent worker holds up to ``worker_connections`` client connections, each a file
    descriptor; with the common soft limit of 1024, a worker past it fails every ``accept``
    (EMFILE), and new connections wait in the backlog whatever the per-client cap. Workers
    inherit the limit from the master.
    """
    # Client connections, DNS over TCP, store connections, log files and the like.
    need = settings.worker_connections + 1024
    got = raise_open_files(need)
    if got < need:
        log.warning(
            "the open files limit (%d) is below what %d connections per worker need (%d):"
            " raise it (ulimit -n) or lower server.worker_connections",
            got,
            settings.worker_connections,
            need,
        )


def serve(settings: Settings, *, agent_config_dirs: tuple[str, ...] = ()) -> int:
    # gunicorn's workers are forked inside app.run() below and leave by SystemExit, which
    # unwinds this frame in each worker too: what the finally clauses do (stop the agent,
    # leave the catalog, and main_dev's removal of its data dir) is the master's alone.
    master = os.getpid()
    configure_logging(settings.log_level)
    raise_open_files_limit(settings)
    if settings.data_dir:
        try:
            os.makedirs(settings.data_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            return _fail(f"cannot create data dir {settings.data_dir}: {e.strerror}")
        from trellis.api.datadir import check_dir

        try:
            check_dir(settings.data_dir)
        except ConfigError as e:
            return _fail(str(e))
    # Open the store once before any port is taken or worker forked: it runs the migrations
    # and proves the store is reachable. In a child process, see check_store.
    problem = check_store(settings.store_url)
    if problem:
        return _fail(f"cannot open the store {_redact(settings.store_url)}: {problem}")
    # The CA seal key, also in the master: a missing key (PostgreSQL) is a configuration error
    # to refuse here, not a traceback in every worker; and a SQLite server's generated key is
    # made once, before the workers race to make it.
    from trellis.api.ca.secrets import load_sealer
    from trellis.api.store import SQLITE, store_kind

    try:
        load_sealer(
            settings.ca_seal_key,
            settings.data_dir,
            shared_store=store_kind(settings.store_url) != SQLITE,
        )
    except ConfigError as e:
        return _fail(f"invalid configuration: {e}")

    # In dev the node agent owns the API address (DESIGN.md flow 1: what a user curls is a
    # node's API, and a one-line registration there gets its sidecar); the server listens
    # on a free loopback port that only the agent uses.
    agent_sock = None
    if settings.dev:
        try:
            agent_sock = bind_agent(settings.http_host, settings.http_port)
        except OSError as e:
            return _fail(str(e))
    try:
        if agent_sock is not None:
            http = bind_http(_loopback(settings.http_host), 0)
        else:
            http = bind_http(settings.http_host, settings.http_port)
    except OSError as e:
        if agent_sock is not None:
            agent_sock.close()
        return _fail(str(e))
    dns_socks = None
    if settings.dns_port >= 0:
        from trellis.api.dns import bind_dns_sockets

        try:
            dns_socks = bind_dns_sockets(settings.dns_host, settings.dns_port)
        except OSError as e:
            http.close()
            if agent_sock is not None:
                agent_sock.close()
            # bind_dns_sockets' message names the protocol, the address and the reason
            # ("DNS: cannot bind UDP 127.0.0.1:8600 (Address already in use)"); str(e) would
            # wrap it in "[Errno 98]" and repeat the address.
            return _fail(e.strerror if isinstance(e.strerror, str) else str(e))
        for s in dns_socks:
            s.set_inheritable(True)

    http_url = f"http://{_addr(http)}"
    agent = None
    if agent_sock is not None:
        try:
            agent = DevAgent(settings, agent_sock, http_url, agent_config_dirs)
        except OSError as e:
            http.close()
            return _fail(f"cannot start the node agent: {e}")
        finally:
            agent_sock.close()  # the agent has its own copy
    lines = [
        "==> Trellis " + ("dev mode" if settings.dev else "server") + " running",
        f"         Version: {__version__}",
        f"       Node name: {settings.node_name}",
        f"      Datacenter: {settings.datacenter}",
        f"           Store: {_redact(settings.store_url)}",
        *(
            [f"        HTTP API: {agent.url}", f"      Server API: {http_url}"]
            if agent
            else [f"        HTTP API: {http_url}"]
        ),
        "             DNS: "
        + (
            f"{_addr(dns_socks[0])} (UDP and TCP), domain {settings.domain_fqdn}"
            if dns_socks
            else "disabled"
        ),
        f"         Workers: {settings.workers} x {settings.worker_class}",
        "            ACLs: "
        + (
            f"enabled, default {settings.acl_default_policy}"
            if settings.acl_enabled
            else "disabled"
        ),
        "",
        "==> Log data will now stream in as it occurs:",
    ]
    print("\n".join(lines), flush=True)

    # The port clients reach the API on (the agent's in dev), for the ``consul`` service the
    # workers register: the configured one, or the one bound when 0 asked for a free port.
    api_port = int((agent.url if agent else http_url).rsplit(":", 1)[1])
    settings = dataclasses.replace(settings, http_port=api_port)
    app = TrellisGunicorn(settings, http, dns_socks, agent=agent)
    from gunicorn.errors import HaltServer

    try:
        app.run()
    except SystemExit as e:
        if agent is not None and agent.died:
            return _fail(agent.died)
        return int(e.code or 0)
    except HaltServer as e:
        # gunicorn raises this past run() when a second worker fails while it is already
        # halting for the first (e.g. every worker failed to boot); its log says why.
        return _fail(f"the server stopped: {e.reason}")
    finally:
        if os.getpid() == master:
            if agent is not None:
                agent.stop()
            _leave_catalog(settings)
    return 0


def _leave_catalog(settings: Settings) -> None:
    """After the workers stopped: this server's ``consul`` service leaves the catalog. Best
    effort: a store that is down keeps it listed (the log says so)."""
    from trellis.api.app import leave_catalog
    from trellis.api.store import open_store

    try:
        store = open_store(settings.store_url)
    except Exception as e:
        log.warning("could not leave the catalog: %s", e)
        return
    try:
        leave_catalog(store, settings)
    except Exception as e:
        log.warning("could not leave the catalog: %s", e)
    finally:
        store.close()


class DevAgent:
    """The ``trellis agent`` child of ``trellis dev``: the server's own node, serving the API
    address users know on ``sock`` (bound here, so a busy port fails before anything starts
    and the banner can print it before the child runs), forwarding to the server.

    Stopping: the agent goes first (``stop``, called by the arbiter before it stops the
    workers: ``TrellisGunicorn.run``), so that its leave, which deregisters the node's
    services and stops their sidecars, still finds the server. It runs in its own process
    group, so a Ctrl-C in the terminal reaches only the dev command, which then stops it in
    that order (dev's workers ignore SIGINT for the same reason). If the dev command dies, the
    agent stops by itself (-exit-with-parent) and its sidecars with it (-parent-pid).
    """

    def __init__(
        self,
        settings: Settings,
        sock: socket.socket,
        server_url: str,
        config_dirs: tuple[str, ...],
    ):
        import subprocess

        self.url = f"http://{_addr(sock)}"
        self._stopped = False
        # gunicorn forks the workers inside ``serve``: each runs its ``finally`` with a copy
        # of this object, and must leave the agent (not its child) to the dev command.
        self._owner = os.getpid()
        args = [
            sys.executable,
            "-c",
            "import sys; from trellis.api.cli.main import main; sys.exit(main())",
            "agent",
            "-dev",
            *("-server", server_url, "-node", settings.node_name),
            *("-bind", settings.http_host, "-http-fd", str(sock.fileno())),
            "-exit-with-parent",
            *("-log-level", settings.log_level),
            *(a for d in config_dirs for a in ("-config-dir", d)),
        ]
        if settings.data_dir:
            args += ["-data-dir", os.path.join(settings.data_dir, "agent")]
        self.proc = subprocess.Popen(args, pass_fds=(sock.fileno(),), process_group=0)
        #: Set when the agent exited while dev ran: dev's API is gone, so dev stops too.
        self.died: str | None = None
        threading.Thread(target=self._watch, name="trellis-dev-agent", daemon=True).start()

    def _watch(self) -> None:
        # Popen.wait returns also when gunicorn's arbiter reaped the agent first (waitpid(-1)
        # claims every child; the status is then lost, and reads as 0).
        code = self.proc.wait()
        if self._stopped:
            return
        self.died = f"the node agent (dev's HTTP API) exited with status {code}"
        log.error("%s: stopping", self.died)
        os.kill(os.getpid(), signal.SIGTERM)  # the arbiter's own way to stop

    def stop(self) -> None:
        """Stop the agent (a graceful leave), once; waits for it."""
        import subprocess

        if self._stopped or os.getpid() != self._owner:
            return
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                log.warning("the node agent did not stop within 15s: killing it")
                self.proc.kill()
                self.proc.wait(5)


def _redact(url: str) -> str:
    """Never print a store password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":****@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def check_store(url: str) -> str | None:
    """Open the store and close it again, in a child process; the reason it failed, or None.

    The child runs the migrations and proves the store is reachable, as the master used to do
    itself. The master must not: psycopg chooses how it waits on its sockets when it is first
    imported, and is cooperative under gevent only if gevent has patched ``select`` by then
    (psycopg's documented gevent support). Imported in the master, before the gevent workers
    patch themselves, it would be inherited with its C wait, which blocks a worker's whole
    hub: the PostgreSQL follower parked in LISTEN, or any query, would stop every request of
    the worker. So the driver is first imported in the workers, after the patching, and
    nothing of psycopg's internals needs changing. (SQLite goes the same way, for one path.)

    The operator is at fault for what the message says (an unreachable or misconfigured
    store); an unexpected exception in the child is reported with its type, not a traceback.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report on the pipe, exit without running the parent's cleanup
        os.close(read_end)
        code = 0
        try:
            from trellis.api.store import open_store

            open_store(url).close()
        except (StoreUnavailable, ConfigError) as e:
            code = 1
            os.write(write_end, str(e).encode("utf-8", "replace")[:4096])
        except BaseException as e:  # whatever it is, the parent reports it
            code = 1
            os.write(write_end, f"{type(e).__name__}: {e}".encode("utf-8", "replace")[:4096])
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return message or f"the check ended with status {os.waitstatus_to_exitcode(status)}"


def _gunicorn_base():
    from gunicorn.app.base import BaseApplication

    return BaseApplication


class TrellisGunicorn(_gunicorn_base()):  # type: ignore[misc]
    """gunicorn, configured from ``Settings`` rather than from its own command line."""

    def __init__(
        self,
        settings: Settings,
        http: socket.socket,
        dns_socks: tuple[socket.socket, socket.socket] | None,
        *,
        agent: DevAgent | None = None,
    ) -> None:
        self.settings = settings
        self.http = http
        self.dns_socks = dns_socks
        self.agent = agent
        super().__init__()

    def run(self) -> None:
        """gunicorn's ``run``, with an arbiter that stops dev's node agent before the
        workers (see ``DevAgent``): every way the arbiter stops goes through ``stop``."""
        from gunicorn.arbiter import Arbiter

        agent = self.agent
        if agent is None:
            super().run()
            return

        class DevArbiter(Arbiter):  # type: ignore[misc]
            def stop(self, graceful: bool = True) -> None:
                agent.stop()
                super().stop(graceful)

        try:
            DevArbiter(self).run()
        except RuntimeError as e:  # as BaseApplication.run reports it
            print(f"\nError: {e}\n", file=sys.stderr, flush=True)
            sys.exit(1)

    def load_config(self) -> None:
        s = self.settings
        cfg = {
            "bind": [f"fd://{self.http.fileno()}"],
            "workers": s.workers,
            # gevent means Trellis's gevent worker (api/gworker.py): one send per response.
            "worker_class": (
                "trellis.api.gworker.TrellisGeventWorker"
                if s.worker_class == "gevent"
                else s.worker_class
            ),
            "worker_connections": s.worker_connections,
            "threads": s.threads,
            # Blocking queries hold a request for up to max_wait; the gevent and gthread
            # workers keep heart-beating meanwhile, so this only catches a stuck worker.
            "timeout": 60,
            "graceful_timeout": 5,
            # Whole seconds (gunicorn's setting is an int, and 0 would turn keep-alive off).
            "keepalive": max(1, math.ceil(s.http_idle_timeout)),
            "loglevel": s.log_level,
            "accesslog": None,
            "preload_app": False,
            "proc_name": "trellis-server",
            # Not gunicorn's own reuse_port: it would bind each worker to the configured
            # address, and Trellis hands gunicorn an already bound socket (port 0 resolved);
            # _when_ready and _post_fork do the same with that socket's address.
            "when_ready": self._when_ready,
            "post_fork": self._post_fork,
            "post_worker_init": self._post_worker_init,
            "worker_exit": self._worker_exit,
            "limit_request_line": 8190,
            # gunicorn's control socket lives at one fixed path per user; several Trellis
            # servers on one host would fight over it, and Trellis does not use it.
            "control_socket_disable": True,
        }
        for k, v in cfg.items():
            self.cfg.set(k, v)

    def load(self):
        # Runs in each worker, after the fork (and after gevent has monkey-patched it).
        from trellis.api.app import create_app

        monkey = sys.modules.get("gevent.monkey")
        if "psycopg" in sys.modules and monkey and monkey.is_module_patched("select"):
            # See check_store: a psycopg imported before the patching waits in C.
            log.error(
                "psycopg was imported before gevent patched this worker: PostgreSQL queries"
                " will block the whole worker while they wait (a bug in Trellis)"
            )
        return create_app(self.settings)

    def _when_ready(self, arbiter) -> None:
        """Take the master's socket out of the kernel's accept balancing.

        With one listening socket shared by every worker, the worker that happens to be
        awake accepts most connections (a 30/70 split was measured), and the busier worker
        sets every latency percentile. So each worker listens on its own SO_REUSEPORT socket
        (``_post_fork``) and the kernel hashes connections over them. The master's socket
        stays bound, which keeps the port reserved, but is shut down, which removes it from
        the balancing: nobody accepts on it.
        """
        for listener in arbiter.LISTENERS:
            listener.sock.shutdown(socket.SHUT_RDWR)

    def _post_fork(self, arbiter, worker) -> None:
        from gunicorn.sock import TCP6Socket, TCPSocket

        own = []
        for listener in arbiter.LISTENERS:
            addr = listener.sock.getsockname()
            family = listener.sock.family
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
            sock.listen(2048)
            kind = TCP6Socket if family == socket.AF_INET6 else TCPSocket
            own.append(kind(addr, arbiter.cfg, arbiter.log, fd=sock.detach()))
        worker.sockets = own

    def _post_worker_init(self, worker) -> None:
        if self.agent is not None:
            # Ctrl-C reaches the whole foreground group: dev's workers keep serving until the
            # arbiter has stopped the agent (whose leave needs them) and then stops them.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.dns_socks is None:
            return
        from trellis.api.acl.cache import dns_authorizer, dns_query_authorizer
        from trellis.api.dns import DNSServer

        app = worker.wsgi
        svc = app.extensions["trellis"]
        store = svc.store
        # The sockets were made in the master, before the gevent worker monkey-patched this
        # process: a plain socket's blocking recvfrom()/accept() would stall the whole gevent
        # hub (every HTTP request). Re-wrap the inherited fds in the (now patched) socket class,
        # as gunicorn does for its own listeners; under gthread/sync this is a no-op re-wrap.
        udp, tcp = (
            socket.socket(s.family, s.type, s.proto, fileno=s.detach()) for s in self.dns_socks
        )
        authorizer = dns_authorizer(svc.settings.acl_enabled, svc.acls, svc.settings.acl_dns_token)
        by_hash = dns_query_authorizer(svc.settings.acl_enabled, svc.acls)
        server = DNSServer(
            store, self.settings, udp, tcp, authorizer=authorizer, query_authorizer=by_hash
        )
        app.extensions["trellis-dns"] = server
        threading.Thread(target=server.serve_forever, name="trellis-dns", daemon=True).start()

    def _worker_exit(self, arbiter, worker) -> None:
        app = getattr(worker, "wsgi", None)
        if app is None:
            return
        # The DNS server is not closed here: its threads are daemons and end with the process,
        # and its sockets are shared with the master and the other workers, which keep serving.
        # (DNSServer.close() no longer shuts the shared sockets down, but waiting for its
        # threads would only slow a worker's exit.)
        svc = app.extensions.get("trellis")
        if svc is not None:
            svc.close()
