"""A native (SDK) echo server for tests: TLS with ``Service.server_ssl_context()``, then
``Service.authorize`` on each connection; an allowed peer gets its bytes back upper-cased, a
denied one is closed before a byte is read. One thread per connection; ``close`` stops it."""

from __future__ import annotations

import socket
import ssl
import threading

from trellis.connect import Service


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
