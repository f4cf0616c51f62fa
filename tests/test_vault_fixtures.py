"""The OpenBao fixture itself: the server binds its own port, and only our server counts.

The fixture used to pick a free port, release it and start the server on it: in between,
another process (another test run on the machine, another OpenBao) could take it, and the
readiness check, which asked only for ``/v1/sys/health``, would then have accepted whatever
server answered there.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit

import pytest

from tests import vault_fixtures
from tests.vault_fixtures import _ready, listening_ports

openbao = vault_fixtures.openbao

pytestmark = pytest.mark.integration


def test_the_server_listens_on_a_port_it_bound_itself(openbao):
    port = urlsplit(openbao.address).port
    assert port in listening_ports(openbao.pid)
    assert "127.0.0.1:0" in " ".join(openbao.proc.args)  # never a port chosen for it


def test_readiness_means_our_server_not_just_a_healthy_one(openbao):
    """Another OpenBao, healthy, at the address: not ours, since it refuses our token."""
    assert _ready(openbao)
    someone_elses = dataclasses.replace(openbao, token="t-" + "0" * 32)
    assert not _ready(someone_elses)


def test_listening_ports_of_a_process_without_sockets_is_empty(tmp_path):
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert listening_ports(p.pid) == []
    finally:
        p.communicate(timeout=10)
