"""The installed package: one ``trellis`` namespace, nothing generic at the top level.

The repository keeps its folders (``api/``, ``proxy/``); setup.cfg maps them to
``trellis.api`` and ``trellis.proxy``. These tests build the real wheel (offline, with the
test environment's setuptools), install it into a fresh virtual environment and look at what
a user's environment gets, run a native app (``trellis.connect``) from there against the
installed ``trellis dev``, and check that no code of the repository imports the folders by
their bare names (which would work in a checkout and break once installed).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.connect_support import HEAVY

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "api": "trellis/api",
    "proxy": "trellis/proxy",
    "terraform": "trellis/terraform",
    "connect": "trellis/connect",
}


def _run(*cmd: str | Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{cmd}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (so the checkout gets no build/ or
    egg-info), without build isolation: the suite downloads nothing."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in FOLDERS:
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md", "openapi.yaml"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--no-index", "-q", "-w", out, ".", cwd=src,
    )  # fmt: skip
    (whl,) = out.glob("trellis_mesh-*.whl")
    return whl


def test_wheel_holds_one_top_level_name_and_every_module(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"trellis"}, sorted(top)
    # Every module of the folders is in the wheel, under its namespaced name: a subpackage
    # left out of setup.cfg's explicit list would be missing here.
    for folder, target in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            assert f"{target}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    # No __init__ in trellis/: it is a namespace package, so trellis.connect (the SDK) and
    # other distributions may add to it.
    assert "trellis/__init__.py" not in names
    # The SDK is typed: its marker ships, so a user's type checker reads its annotations.
    assert "trellis/connect/py.typed" in names
    # The OpenAPI contract ships as a file (api/openapi.yaml is a symlink in the checkout).
    spec = zipfile.ZipFile(wheel).read("trellis/api/openapi.yaml")
    assert spec == (ROOT / "openapi.yaml").read_bytes()


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel installed (no dependencies from the index).

    The dependencies come from this test environment's site-packages through a .pth line; a
    .pth line adds a directory to sys.path without processing the .pth files inside it, so the
    checkout's editable install (a .pth and an import hook there) is not visible."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run(sys.executable, "-m", "venv", venv, cwd=venv.parent)
    py = venv / "bin" / "python"
    before = set(_site_packages(py).iterdir())
    _run(py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=venv.parent)
    site = _site_packages(py)
    added = {p.name for p in set(site.iterdir()) - before}
    assert {n for n in added if not n.endswith(".dist-info")} == {"trellis"}, sorted(added)
    (site / "zz-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _site_packages(py: Path) -> Path:
    r = _run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=py.parent)
    return Path(r.stdout.strip())


def test_installed_package_imports_as_trellis_only(fresh_env: Path, tmp_path: Path):
    py = fresh_env / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import importlib.util, trellis.api.app, trellis.proxy.authz, trellis.api.cli.main\n"
        "print(trellis.api.app.__file__)\n"
        "print(importlib.util.find_spec('api'), importlib.util.find_spec('proxy'))\n"
    )
    r = _run(py, "-c", code, cwd=tmp_path, env=env)
    app_file, bare = r.stdout.splitlines()
    assert app_file.startswith(str(fresh_env)), app_file  # the installed copy, not the checkout
    assert bare == "None None"  # no generic top-level api or proxy
    r = _run(fresh_env / "bin" / "trellis", "--version", cwd=tmp_path, env=env)
    assert r.stdout.startswith("Trellis v"), r.stdout
    # The Terraform provider's executable is installed with the package.
    r = _run(
        py, "-c", "import trellis.terraform.provider as p; print(p.__file__)", cwd=tmp_path, env=env
    )
    assert r.stdout.startswith(str(fresh_env)), r.stdout
    assert (fresh_env / "bin" / "terraform-provider-trellis").exists()


def _bare_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        found += [
            f"{path.relative_to(ROOT)}:{node.lineno}: {m}"
            for m in mods
            if m.split(".")[0] in FOLDERS
        ]
    return found


def test_no_code_imports_the_folders_by_their_bare_names():
    # In a checkout, `import api` works (the folder is on sys.path when pytest runs from the
    # root) and would load a second copy of a module beside trellis.api's; installed, it fails.
    bad = [
        hit
        for folder in ("api", "proxy", "terraform", "tests", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for hit in _bare_imports(path)
    ]
    assert bad == []


# A native app as a user writes one, run by the fresh environment's interpreter from a temp
# dir: "db" serves with server_ssl_context() and authorize() on a thread, registers itself as
# Connect-native, and "web" calls it with connect(). It prints what it saw and where its
# modules came from; the test judges.
NATIVE_APP = """\
import json, socket, ssl, sys, threading, urllib.request

import trellis
import trellis.connect
from trellis.connect import Service

url = sys.argv[1]
with Service("db", address=url) as db, Service("web", address=url) as web:
    db.ready(timeout=30)
    web.ready(timeout=30)
    ctx = db.server_ssl_context()
    listener = socket.create_server(("127.0.0.1", 0))
    decisions = []

    def serve():
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    decision = db.authorize(conn)
                    decisions.append(decision.reason)
                    if decision.allowed:
                        conn.sendall(conn.recv(100).upper())
            except (OSError, ssl.SSLError) as e:
                decisions.append(repr(e))
            finally:
                raw.close()

    threading.Thread(target=serve, daemon=True).start()
    body = {
        "Name": "db", "Address": "127.0.0.1", "Port": listener.getsockname()[1],
        "Connect": {"Native": True}, "Check": {"TTL": "1h", "Status": "passing"},
    }
    req = urllib.request.Request(
        url + "/v1/agent/service/register", data=json.dumps(body).encode(), method="PUT"
    )
    urllib.request.urlopen(req, timeout=10).close()
    with web.connect("db", timeout=30) as sock:
        sock.sendall(b"hello from the wheel")
        echo = sock.recv(100).decode()
    listener.close()

print(json.dumps({
    "echo": echo,
    "decisions": decisions,
    "connect_file": trellis.connect.__file__,
    "trellis_path": list(trellis.__path__),
    "sys_path": sys.path,
    "modules": sorted(sys.modules),
}))
"""


@pytest.mark.integration
def test_a_native_app_runs_from_the_installed_wheel(fresh_env: Path, tmp_path: Path):
    """The wheel's SDK, in a fresh environment and run from outside the checkout, makes a real
    native pair work through ``trellis dev`` (itself the wheel's ``trellis`` command)."""
    from tests.support import TrellisProcess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "native_app.py").write_text(NATIVE_APP)
    dev = TrellisProcess(
        ["dev", "-http-port", "0", "-dns-port", "-1", "-data-dir", str(tmp_path / "data")],
        env=env,
    )
    dev.args[0] = str(fresh_env / "bin" / "trellis")  # the installed command, not the checkout's
    dev.start()
    try:
        r = _run(fresh_env / "bin" / "python", "native_app.py", dev.url, cwd=app_dir, env=env)
    finally:
        dev.stop()
    got = json.loads(r.stdout)
    assert got["echo"] == "HELLO FROM THE WHEEL", (got, dev.output())
    assert got["decisions"] == ["Default behavior configured by ACLs (allow)"]
    # The SDK, and the whole trellis namespace, came from the fresh environment...
    assert Path(got["connect_file"]).is_relative_to(fresh_env), got["connect_file"]
    assert got["trellis_path"] and all(
        Path(p).is_relative_to(fresh_env) for p in got["trellis_path"]
    )
    # ...and nothing of the checkout was on the path: only the app's dir, the interpreter's
    # own, the fresh environment and the test environment's site-packages (the dependencies,
    # through the .pth line; see fresh_env).
    deps = Path(sysconfig.get_paths()["purelib"])
    sources = [
        p for p in got["sys_path"]
        if p and Path(p).resolve().is_relative_to(ROOT) and Path(p).resolve() != deps.resolve()
    ]  # fmt: skip
    assert sources == [], sources
    # And the app paid for no control plane.
    pulled = [m for m in got["modules"] if m.split(".")[0] in HEAVY or m.startswith("trellis.api")]
    assert pulled == [], pulled


# The example client: "web" calls the example backend with connect() and prints the answer and
# where trellis.connect came from.
EXAMPLE_CLIENT = """\
import json, sys

import trellis.connect
from trellis.connect import Service

with Service("web", address=sys.argv[1]) as web:
    web.ready(timeout=30)
    with web.connect("backend", timeout=30) as sock:
        sock.sendall(b"hello from the wheel\\n")
        answer = b""
        while not answer.endswith(b"\\n"):
            data = sock.recv(100)
            if not data:
                break
            answer += data
print(json.dumps({"answer": answer.decode(), "connect_file": trellis.connect.__file__}))
"""


@pytest.mark.integration
def test_an_example_app_runs_from_the_installed_wheel(fresh_env: Path, tmp_path: Path):
    """examples/trio-backend, copied out of the checkout and run by the fresh environment's
    Python, serves a native client through ``trellis dev`` (the wheel's command)."""
    from tests.support import TrellisProcess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(ROOT / "examples" / "trio-backend" / "backend.py", app_dir / "backend.py")
    (app_dir / "client.py").write_text(EXAMPLE_CLIENT)
    dev = TrellisProcess(
        ["dev", "-http-port", "0", "-dns-port", "-1", "-data-dir", str(tmp_path / "data")],
        env=env,
    )
    dev.args[0] = str(fresh_env / "bin" / "trellis")
    dev.start()
    backend = None
    try:
        backend = subprocess.Popen(
            [str(fresh_env / "bin" / "python"), "backend.py", "-register", "-http-addr", dev.url],
            cwd=app_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert backend.stdout is not None
        lines = []
        for line in backend.stdout:  # ends when the backend exits (a failure)
            lines.append(line)
            if "registered as" in line:
                break
        assert any("registered as" in x for x in lines), "".join(lines)
        r = _run(fresh_env / "bin" / "python", "client.py", dev.url, cwd=app_dir, env=env)
        got = json.loads(r.stdout)
        assert got["answer"] == "backend: HELLO FROM THE WHEEL\n", got
        assert Path(got["connect_file"]).is_relative_to(fresh_env), got["connect_file"]
    finally:
        if backend is not None:
            backend.terminate()
            try:
                backend.wait(timeout=20)
            except subprocess.TimeoutExpired:
                backend.kill()
                backend.wait(timeout=10)
            if backend.stdout is not None:
                backend.stdout.close()
        dev.stop()
