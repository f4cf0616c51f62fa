"""Helpers for data-plane tests with real processes: ``trellis connect proxy`` subprocesses,
a small echo app, and free ports.

Every process a test starts is a ``ProxyProcess`` (or a ``TrellisProcess``) that the test's
fixture stops by PID, also when the test fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

from tests.support import TRELLIS


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


class ProxyProcess:
    """A real ``trellis connect proxy`` subprocess. ``start`` waits for its banner (or its
    exit) and reads where it listens from it."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.args = [TRELLIS, "connect", "proxy", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.listening: dict[str, tuple[str, int]] = {}
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> ProxyProcess:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait and not self._ready.wait(timeout):
            self.stop()
            raise AssertionError("the proxy did not start:\n" + self.output())
        if wait and self.proc.poll() is not None and not self.listening:
            raise AssertionError("the proxy exited:\n" + self.output())
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            m = re.match(r"\s+Upstream: (\S+) => (\S*):(\d+)$", line)
            if m:
                self.listening[m.group(1)] = (m.group(2) or "127.0.0.1", int(m.group(3)))
            m = re.match(r"\s+Public listener: (\S+):(\d+) =>", line)
            if m:
                self.listening["public"] = (m.group(1), int(m.group(2)))
            if "Log data will now stream" in line:
                self._ready.set()
        self._ready.set()

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if rx.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}:\n" + self.output())

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


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
