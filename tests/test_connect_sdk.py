"""The native SDK's core, in process: the switching server context (rotation with no restart)
and ``authorize``, over in-memory streams with real certificates (tests/mesh_support.py), and
what importing ``trellis.connect`` costs."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.serialization import Encoding

from tests.connect_support import HEAVY, importtime_rows
from tests.mesh_support import MeshCA, snapshot
from trellis.connect import Decision, Outcome
from trellis.connect._state import Current
from trellis.connect._switch import switching_context
from trellis.proxy.snapshot import Snapshot

pytestmark = pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


@pytest.fixture(scope="module")
def other_ca() -> MeshCA:
    return MeshCA()  # the same trust domain, another key: a root rotation


async def _handshake(server_ctx: ssl.SSLContext, client: Snapshot | ssl.SSLContext) -> dict:
    """One handshake over an in-memory stream pair; what each side saw (or its error)."""
    a, b = trio.testing.memory_stream_pair()
    server = trio.SSLStream(a, server_ctx, server_side=True)
    # server_hostname=None: no SNI at all, so the switch must run without one.
    client_ctx = client if isinstance(client, ssl.SSLContext) else client.tls.client
    client = trio.SSLStream(b, client_ctx, server_hostname=None)
    out: dict = {}

    async def side(name: str, s: trio.SSLStream) -> None:
        try:
            await s.do_handshake()
            out[name] = s
            # TLS 1.3: a server's refusal of the client certificate arrives after the
            # client's Finished; one exchange makes it show on the client side too.
            if name == "client":
                await s.send_all(b"x")
                out["echo"] = await s.receive_some(1)
            else:
                await s.send_all(await s.receive_some(1))
        except trio.BrokenResourceError as e:
            out[name + "_error"] = e
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(s)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(side, "server", server)
            n.start_soon(side, "client", client)
    return out


def _leaf_der(snap: Snapshot) -> bytes:
    from trellis.proxy import der

    return der.pem_certificates(snap.leaf.cert_pem)[0]


def test_the_switch_serves_each_new_handshake_with_the_current_snapshot(ca, other_ca):
    current = Current()
    ctx = switching_context(current.server_context)
    first = snapshot(ca, "db", default_allow=True)
    rotated = snapshot(other_ca, "db", default_allow=True)
    web_old, web_new = snapshot(ca, "web"), snapshot(other_ca, "web")

    async def main() -> None:
        # Nothing published yet: the handshake is refused, not served with nothing.
        out = await _handshake(ctx, web_old)
        assert "server" not in out and "server_error" in out

        current.publish(first)
        out = await _handshake(ctx, web_old)
        assert out["echo"] == b"x"
        assert out["client"].getpeercert(binary_form=True) == _leaf_der(first)
        assert out["server"].getpeercert(binary_form=True) == _leaf_der(web_old)

        # A rotation: the same context object now presents the new leaf and trusts only the
        # new roots. A client of the old roots cannot complete; one of the new roots can.
        current.publish(rotated)
        out = await _handshake(ctx, web_old)
        assert "echo" not in out and "server_error" in out
        out = await _handshake(ctx, web_new)
        assert out["echo"] == b"x"
        assert out["client"].getpeercert(binary_form=True) == _leaf_der(rotated)

    trio.run(main)


def test_the_switch_requires_a_client_certificate(ca):
    current = Current()
    current.publish(snapshot(ca, "db", default_allow=True))
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.root_pem)
    out = trio.run(_handshake, switching_context(current.server_context), bare)
    assert "echo" not in out and "server_error" in out
    assert "certificate" in str(out["server_error"].__cause__).lower()


def test_the_switch_refuses_to_serve_an_expired_leaf(ca):
    import datetime as dt

    current = Current()
    stale = ca.odd_leaf(
        [ca.uri("db")],
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2),
        not_after=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
    )
    current.publish(snapshot(ca, "db", issued=stale, default_allow=True))
    assert current.server_context() is None


def _authorize_live(current: Current, client_snap: Snapshot) -> Decision:
    """authorize() on the server side of a real handshake (a trio.SSLStream)."""
    ctx = switching_context(current.server_context)
    out = trio.run(_handshake, ctx, client_snap)
    return current.authorize(out["server"])


@pytest.mark.parametrize(
    ("intentions", "default", "allowed", "reason"),
    [
        ([("web", "db", "allow")], False, True, "Matched intention: web => db (allow)"),
        ([("web", "db", "deny")], True, False, "Matched intention: web => db (deny)"),
        ([], False, False, "Default behavior configured by ACLs (deny)"),
        ([], True, True, "Default behavior configured by ACLs (allow)"),
    ],
    ids=["allow", "deny", "default-deny", "default-allow"],
)
def test_authorize_decides_a_live_peer_by_the_current_intentions(
    ca, intentions, default, allowed, reason
):
    current = Current()
    current.publish(snapshot(ca, "db", intentions=intentions, default_allow=default))
    d = _authorize_live(current, snapshot(ca, "web"))
    assert (d.allowed, d.reason) == (allowed, reason)


def test_authorize_follows_new_intentions_and_a_removed_root(ca, other_ca):
    current = Current()
    both = snapshot(ca, "db", default_allow=True, trusted=[other_ca])
    current.publish(both)
    ctx = switching_context(current.server_context)
    out = trio.run(_handshake, ctx, snapshot(other_ca, "web", trusted=[ca]))
    peer = out["server"]
    assert current.authorize(peer).allowed is True
    # The same open connection, decided again under new intentions.
    current.publish(snapshot(ca, "db", intentions=[("web", "db", "deny")], trusted=[other_ca]))
    assert current.authorize(peer).reason == "Matched intention: web => db (deny)"
    # The same open connection, decided again after its root left the bundle: refused.
    current.publish(snapshot(ca, "db", issued=None, default_allow=True))
    d = current.authorize(peer)
    assert d.allowed is False and d.outcome is Outcome.INVALID_PEER
    assert "no longer trusted" in d.reason


def test_authorize_verifies_a_der_chain_in_full(ca, other_ca):
    current = Current()
    current.publish(snapshot(ca, "db", intentions=[("web", "db", "allow")]))
    web = ca.leaf("web")
    assert current.authorize(web.cert.public_bytes(Encoding.DER)).allowed is True
    assert current.authorize([web.cert.public_bytes(Encoding.DER)]).allowed is True
    # The same identity, signed by a key the roots do not hold: refused, whatever it says.
    forged = other_ca.leaf("web").cert.public_bytes(Encoding.DER)
    d = current.authorize(forged)
    assert d.allowed is False and d.outcome is Outcome.INVALID_PEER
    assert "does not verify" in d.reason
    for junk in (b"", b"\x30\x03\x02\x01\x00", [], [b"not der"]):
        d = current.authorize(junk)
        assert d.allowed is False and d.outcome is Outcome.INVALID_PEER, junk


def test_authorize_denies_everyone_before_the_first_snapshot(ca):
    current = Current()
    d = current.authorize(ca.leaf("web").cert.public_bytes(Encoding.DER))
    assert d.allowed is False and d.reason == "Default behavior configured by ACLs (deny)"


def test_importing_the_sdk_pulls_in_no_control_plane():
    code = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import trellis.connect\n"
        "t = time.perf_counter() - t\n"
        # VmHWM, not getrusage's ru_maxrss: Linux carries the latter over exec from the
        # forking parent, so under a big pytest process it reads the parent's figure.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "rss = int(hwm.split()[1])\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'seconds': t, 'rss_kb': rss}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    pulled = [m for m in got["modules"] if m.split(".")[0] in HEAVY or m.startswith("trellis.api")]
    assert pulled == []
    # Figures for the record (README "Native apps", bench/connect_import.py): generous bounds,
    # not a benchmark.
    assert got["rss_kb"] < 80_000, got["rss_kb"]


def test_import_time_as_python_reports_it():
    """``-X importtime``: what the interpreter itself counts for ``import trellis.connect``
    (the cumulative time of that line), and that no module it lists is a heavy one."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import trellis.connect"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    rows = importtime_rows(r.stderr)
    listed = {name for name, _, _ in rows}
    assert "trellis.connect._service" in listed and "trio" in listed  # the parse read it all
    assert [m for m in listed if m.split(".")[0] in HEAVY or m.startswith("trellis.api")] == []
    (total_us,) = [cum for name, _, cum in rows if name == "trellis.connect"]
    assert total_us < 2_000_000, total_us  # some 150 ms on the lead's machine; a loose bound


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"address": "ftp://127.0.0.1:1"}, "ConnectError", "must look like http://HOST:PORT"),
        ({"address": "http://127.0.0.1:99999"}, "ConnectError", "out of range"),
        ({"address": "https://127.0.0.1:1", "ca_file": "/nonexistent"}, "ConnectError", "TLS"),
        ({"name": "*"}, "ValueError", "not '\\*'"),
        ({"name": "we b"}, "ValueError", "is not valid"),
    ],
)
def test_unusable_arguments_are_refused_at_once(kwargs, error, match):
    import trellis.connect

    name = kwargs.pop("name", "web")
    with pytest.raises(getattr(trellis.connect, error, ValueError), match=match):
        trellis.connect.Service(name, **kwargs)
