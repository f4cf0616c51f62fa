"""The in-process CLI runner shared by the CLI test modules (``run_cli``, and ``cli`` against
the real server)."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import pytest

from trellis.api.cli.main import run


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys, argv: tuple[str, ...], *, env: dict[str, str], stdin: str = "") -> Result:
    """Run ``trellis ARGV`` in-process with this environment and standard input; stdout and
    stderr are those pytest captures (``capsys``), read back into the Result."""
    code = run(
        list(argv),
        env=env,
        stdin=io.StringIO(stdin),
        stdout=sys.stdout,
        stderr=sys.stderr,
    )
    out, err = capsys.readouterr()
    return Result(code, out, err)


@pytest.fixture
def cli(capsys, request):
    """Run ``trellis ARGS`` in-process against the real server (started on first use)."""

    def call(*argv: str, addr: str | None = None) -> Result:
        if addr is None:
            addr = request.getfixturevalue("trellis_server").url
        return run_cli(capsys, argv, env={"TRELLIS_HTTP_ADDR": addr})

    return call
