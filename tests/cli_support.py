"""The in-process CLI runner shared by the CLI test modules that talk to a real server."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import pytest

from trellis.api.cli.main import run
from trellis.proxy.client import Client


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, request):
    """Run ``trellis ARGS`` in-process against the real server (started on first use)."""

    def call(*argv: str, addr: str | None = None) -> Result:
        if addr is None:
            addr = request.getfixturevalue("trellis_server").url
        code = run(
            list(argv),
            env={"TRELLIS_HTTP_ADDR": addr},
            stdin=io.StringIO(""),
            stdout=sys.stdout,
            stderr=sys.stderr,
        )
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


@pytest.fixture
def api(trellis_server):
    with Client(trellis_server.url) as c:
        yield c
