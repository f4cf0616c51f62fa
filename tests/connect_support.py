"""A native (SDK) echo server for tests: TLS with ``Service.server_ssl_context()``, then
``Service.authorize`` on each connection; an allowed peer gets its bytes back upper-cased, a
denied one is closed before a byte is read. One thread per connection; ``close`` stops it."""

from __future__ import annotations

import socket
import ssl
import threading

from trellis.connect import Service

#: What ``import trellis.connect`` must not load (top-level package names): the control plane's
#: web stack, its stores and secrets, and ``cryptography`` (whose key work runs in a child).
#: ``trellis.api`` is checked beside these.
HEAVY = frozenset(
    {"flask", "werkzeug", "gunicorn", "gevent", "marshmallow", "hvac", "psycopg", "cryptography"}
)


def importtime_rows(stderr: str) -> list[tuple[str, int, int]]:
    """``(module, self_us, cumulative_us)`` for each line ``python -X importtime`` wrote."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        if own.strip().isdigit():  # not the header line
            rows.append((name.strip(), int(own), int(cumulative)))
    return rows


class NativeEcho:
    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.ctx = svc.server_ssl_context()
        self.refused: list[str] = []
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as c:
                decision = self.svc.authorize(c)
                if not decision.allowed:
                    self.refused.append(decision.reason)
                    return
                while data := c.recv(65536):
                    c.sendall(data.upper())
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()

    def close(self) -> None:
        self.sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self._thread.join(5)


class NativeHTTP:
    """A native HTTP server (``http.server``, TLS by ``server_ssl_context()``): 403 for a
    peer ``authorize`` denies, otherwise 200 with the method, path and body read back."""

    def __init__(self, svc: Service) -> None:
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                decision = svc.authorize(self.request)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if decision.allowed:
                    status, out = (
                        200,
                        b"%s %s %s" % (self.command.encode(), self.path.encode(), body),
                    )
                else:
                    status, out = 403, decision.reason.encode()
                outer.requests += 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):  # the handshake in the connection's own thread
                sock, addr = self.socket.accept()
                return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

            def finish_request(self, request, client_address):
                try:
                    request.settimeout(10)
                    request.do_handshake()
                except (OSError, ssl.SSLError):
                    return
                super().finish_request(request, client_address)

        ctx = svc.server_ssl_context()
        self.requests = 0
        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
