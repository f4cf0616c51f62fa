"""``trellis terraform mirror DIR``: a filesystem mirror holding this provider, and the
Terraform CLI configuration that installs from it.

The mirror uses Terraform's packed layout::

    DIR/trellis.invalid/trellis/trellis/terraform-provider-trellis_0.1.0_linux_amd64.zip

The zip holds one file, ``terraform-provider-trellis_v0.1.0``: a two-line shell script that
runs this installation's provider (``python -m trellis.terraform`` with the interpreter that
runs ``trellis``). The zip is written byte for byte the same each time for the same
installation (fixed timestamps and modes), so running the command again does not invalidate
the hashes ``terraform init`` recorded in a lock file.

The configuration printed includes the mirror for the provider's source address, excludes that
address from direct (network) installation, and turns Terraform's version check off
(``disable_checkpoint``), so no Terraform command that uses it goes to the network.
"""

from __future__ import annotations

import io
import os
import platform
import shlex
import sys
import zipfile
from pathlib import Path

from trellis.terraform.provider import HOSTNAME, NAMESPACE, SOURCE, TYPE, VERSION

EXECUTABLE = f"terraform-provider-{TYPE}"
#: Terraform's names for this machine's architecture.
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def target_platform() -> str:
    """``linux_amd64``: the platform Terraform looks for in a mirror on this machine."""
    system = sys.platform if sys.platform != "linux2" else "linux"
    machine = platform.machine().lower()
    return f"{system}_{_ARCH.get(machine, machine)}"


def launcher(python: str = sys.executable) -> bytes:
    """The provider executable: a shell script that runs this installation's provider."""
    return (
        "#!/bin/sh\n"
        f"# Trellis Terraform provider {VERSION} ({SOURCE}), written by `trellis terraform "
        "mirror`.\n"
        f'exec {shlex.quote(python)} -m trellis.terraform "$@"\n'
    ).encode()


def package(python: str = sys.executable) -> bytes:
    """The provider's zip, as Terraform's packed mirror layout holds it (deterministic)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo(f"{EXECUTABLE}_v{VERSION}", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = (0o100755 & 0xFFFF) << 16  # a regular, executable file
        info.create_system = 3  # Unix, so that the mode above is read
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, launcher(python))
    return buf.getvalue()


def write_mirror(directory: Path, python: str = sys.executable) -> Path:
    """Write (or replace) the provider's package in the mirror ``directory``; its path."""
    where = directory / HOSTNAME / NAMESPACE / TYPE
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{EXECUTABLE}_{VERSION}_{target_platform()}.zip"
    tmp = path.with_suffix(".zip.tmp")
    tmp.write_bytes(package(python))
    os.replace(tmp, path)
    return path


def _hcl_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "$${") + '"'


def cli_config(directory: Path) -> str:
    """The Terraform CLI configuration (a ``.tfrc`` file) that installs from the mirror."""
    return (
        "# Terraform CLI configuration for the Trellis provider: point TF_CLI_CONFIG_FILE at\n"
        "# this file. No terraform command that uses it contacts the network.\n"
        "disable_checkpoint = true\n"
        "\n"
        "provider_installation {\n"
        "  filesystem_mirror {\n"
        f"    path    = {_hcl_string(str(directory.resolve()))}\n"
        f"    include = [{_hcl_string(SOURCE)}]\n"
        "  }\n"
        "  direct {\n"
        f"    exclude = [{_hcl_string(SOURCE)}]\n"
        "  }\n"
        "}\n"
    )


def required_providers() -> str:
    """The ``terraform`` block a configuration uses the provider with."""
    return (
        "terraform {\n"
        "  required_providers {\n"
        f'    trellis = {{ source = "{SOURCE}", version = "{VERSION}" }}\n'
        "  }\n"
        "}\n"
    )
