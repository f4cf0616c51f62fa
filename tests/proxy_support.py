"""Helpers for data-plane tests with real processes: ``trellis connect proxy`` subprocesses,
a small echo app, and free ports.

Every process a test starts is a ``ProxyProcess`` (or a ``TrellisProcess``) that the test's
fixture stops by PID, also when the test fails.
"""

from __future__ import annotations

import re
import socket
import threading

from tests.support import OutputProcess


def free_port() -> int:
    """A port that was free a moment ago (for registrations, which need a real port before
    the proxy binds it; a clash shows as the proxy's one-line bind error)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EchoApp:
    """A local app on 127.0.0.1 (port 0) that echoes what it receives, upper-cased when
    ``upper`` (so a test can tell the app answered), one thread per connection."""

    def __init__(self, *, upper: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.upper = upper
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(c)
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        try:
            while data := c.recv(65536):
                c.sendall(data.upper() if self.upper else data)
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass


class ProxyProcess(OutputProcess):
    """A real ``trellis connect proxy`` subprocess. ``start`` waits for its banner (or its
    exit) and reads where it listens from it."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        super().__init__(["connect", "proxy", *args], env=env)
        self.listening: dict[str, tuple[str, int]] = {}

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> ProxyProcess:
        self._spawn()
        assert self.proc is not None
        if wait and not self._ready.wait(timeout):
            self.stop()
            raise AssertionError("the proxy did not start:\n" + self.output())
        if wait and self.proc.poll() is not None and not self.listening:
            raise AssertionError("the proxy exited:\n" + self.output())
        return self

    def _line(self, line: str) -> None:
        m = re.match(r"\s+Upstream: (\S+) => (\S*):(\d+)$", line)
        if m:
            self.listening[m.group(1)] = (m.group(2) or "127.0.0.1", int(m.group(3)))
        m = re.match(r"\s+Public listener: (\S+):(\d+) =>", line)
        if m:
            self.listening["public"] = (m.group(1), int(m.group(2)))
        if "Log data will now stream" in line:
            self._ready.set()


def exchange(sock: socket.socket, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read as many bytes back (fewer, b"" at the least, if the connection
    ends first)."""
    sock.settimeout(timeout)
    got = b""
    try:
        sock.sendall(data)
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed by the other side with our bytes unread: a close all the same
    return got
