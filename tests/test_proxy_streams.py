"""Mutual TLS, identity and authorization on in-memory streams: no sockets.

Each case runs a real TLS handshake between two snapshots' contexts over
``trio.testing.memory_stream_pair`` and asks the same questions the sidecar asks
(``Snapshot.admit`` on the server side, ``Snapshot.check_upstream`` on the client side), through
``trellis.proxy.streams``. The certificate cases cover what a verifier must refuse: no client
certificate, self-signed, another trust domain, a leaf signed by a leaf, expired, two URI SANs.
"""

from __future__ import annotations

import datetime as dt

import pytest
import trio
import trio.testing

from tests.mesh_support import DC, MeshCA, snapshot
from trellis.proxy import streams, tls
from trellis.proxy.snapshot import ConnTable

pytestmark = pytest.mark.filterwarnings("ignore::trio.TrioDeprecationWarning")


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


async def _exchange(server_snap, client_snap, destination="db"):
    """Handshake both ways; returns (admission or server error, client stream or error)."""
    a, b = trio.testing.memory_stream_pair()
    result: dict = {}

    async def server():
        try:
            result["stream"], result["admission"] = await streams.accept(a, server_snap)
        except trio.BrokenResourceError as e:
            result["server_error"] = e

    async def client():
        try:
            result["client"] = await streams.dial(b, client_snap, destination)
        except (trio.BrokenResourceError, streams.PeerRefused) as e:
            result["client_error"] = e

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(server)
            n.start_soon(client)
    return result


def test_allowed_by_intention_relays_bytes_both_ways(ca):
    server_snap = snapshot(ca, "db", intentions=[("web", "db", "allow")])
    client_snap = snapshot(ca, "web")

    async def main():
        r = await _exchange(server_snap, client_snap)
        adm = r["admission"]
        assert adm.allowed and adm.reason == "Matched intention: web => db (allow)"
        assert adm.source.uri == ca.uri("web")
        app_side, app = trio.testing.memory_stream_pair()

        async def echo_app():
            while data := await app.receive_some(1024):
                await app.send_all(data.upper())

        async with trio.open_nursery() as n:
            n.start_soon(streams.relay, r["stream"], app_side)
            n.start_soon(echo_app)
            await r["client"].send_all(b"hello mesh")
            got = b""
            while len(got) < 10:
                got += await r["client"].receive_some(100)
            assert got == b"HELLO MESH"
            n.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize(
    ("intentions", "default", "reason"),
    [
        ([("web", "db", "deny")], True, "Matched intention: web => db (deny)"),
        ([("*", "db", "deny"), ("web", "*", "allow")], True, "Matched intention: * => db (deny)"),
        ([], False, "Default behavior configured by ACLs (deny)"),
        ([("api", "db", "allow")], False, "Default behavior configured by ACLs (deny)"),
    ],
    ids=["deny-intention", "wildcard-deny", "default-deny", "other-source-allowed"],
)
def test_denied_peers_are_not_admitted(ca, intentions, default, reason):
    server_snap = snapshot(ca, "db", intentions=intentions, default_allow=default)

    async def main():
        r = await _exchange(server_snap, snapshot(ca, "web"))
        assert r["admission"].allowed is False
        assert r["admission"].reason == reason
        assert r["admission"].source.uri == ca.uri("web")  # who was refused, for the log

    trio.run(main)


def test_no_client_certificate_fails_the_handshake(ca):
    import ssl

    server_snap = snapshot(ca, "db", default_allow=True)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.root_pem)

    async def main():
        a, b = trio.testing.memory_stream_pair()
        out: dict = {}

        async def server():
            try:
                await streams.accept(a, server_snap)
            except trio.BrokenResourceError as e:
                out["server"] = e

        async def client():
            s = trio.SSLStream(b, bare, server_hostname=None)
            try:
                await s.do_handshake()
                await s.send_all(b"x")
                await s.receive_some(10)  # TLS 1.3: the refusal arrives after the client's
            except trio.BrokenResourceError:  # Finished
                pass

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(server)
                n.start_soon(client)
        assert "server" in out
        assert "certificate" in str(out["server"].__cause__).lower()

    trio.run(main)


def _client_with(ca: MeshCA, issued) -> object:
    return snapshot(ca, "web", issued=issued)


@pytest.mark.parametrize(
    "case", ["self-signed", "foreign-trust-domain", "leaf-signed-by-leaf", "expired"]
)
def test_unverifiable_client_certificates_fail_the_handshake(ca, case):
    other = MeshCA("0f0f0f0f-0000-4000-8000-000000000000.trellis")
    now = dt.datetime.now(dt.UTC)
    if case == "self-signed":
        issued = ca.odd_leaf([ca.uri("web")], self_signed=True)
    elif case == "foreign-trust-domain":
        issued = other.leaf("web")
    elif case == "leaf-signed-by-leaf":
        issued = ca.odd_leaf([ca.uri("web")], signer=ca.leaf("api"))
    else:
        issued = ca.odd_leaf(
            [ca.uri("web")],
            not_before=now - dt.timedelta(hours=3),
            not_after=now - dt.timedelta(hours=1),
        )
    server_snap = snapshot(ca, "db", default_allow=True)
    # The client trusts the server's CA, so only the server's verdict is under test.
    client_snap = snapshot(
        other if case == "foreign-trust-domain" else ca, "web", issued=issued, trusted=[ca]
    )

    async def main():
        r = await _exchange(server_snap, client_snap)
        assert "admission" not in r, r
        assert "server_error" in r

    trio.run(main)


def test_two_uri_sans_are_refused_after_the_chain_verifies(ca):
    issued = ca.odd_leaf([ca.uri("web"), ca.uri("db")])
    server_snap = snapshot(ca, "db", default_allow=True)

    async def main():
        r = await _exchange(server_snap, snapshot(ca, "web", issued=issued))
        adm = r["admission"]
        assert adm.allowed is False and adm.source is None
        assert "2 URI SANs" in adm.reason

    trio.run(main)


def test_a_root_shared_with_another_trust_domain_does_not_admit_its_services(ca):
    # A leaf that chains to our root but names another trust domain (SPIFFE trust-domain
    # spec 5.2): the chain verifies, the decision must still refuse it.
    foreign = ca.odd_leaf(["spiffe://elsewhere.trellis/ns/default/dc/dc1/svc/web"])
    server_snap = snapshot(ca, "db", default_allow=True)

    async def main():
        r = await _exchange(server_snap, snapshot(ca, "web", issued=foreign))
        assert r["admission"].allowed is False
        assert "trust domain" in r["admission"].reason

    trio.run(main)


def test_wrong_upstream_identity_gets_no_byte(ca):
    # The client dials "db" but the server presents "web" (CVE-2021-32574).
    impostor = snapshot(ca, "web", default_allow=True)
    client_snap = snapshot(ca, "api")

    async def main():
        a, b = trio.testing.memory_stream_pair()
        out: dict = {}

        async def server():
            s, _ = await streams.accept(a, impostor)
            try:
                out["received"] = await s.receive_some(100)
            except trio.BrokenResourceError:
                out["received"] = b""

        async def client():
            with pytest.raises(streams.PeerRefused, match=r"expected .*/svc/db"):
                await streams.dial(b, client_snap, "db")

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(server)
                n.start_soon(client)
        assert out["received"] == b""

    trio.run(main)


def test_a_deny_arriving_mid_connection_closes_it(ca):
    server_snap = snapshot(ca, "db", intentions=[("web", "db", "allow")])
    table = ConnTable()

    async def main():
        r = await _exchange(server_snap, snapshot(ca, "web"))
        adm = r["admission"]
        assert adm.allowed
        table.add(1, adm.source)
        app_side, app = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as n:
            scope = trio.CancelScope()

            async def connection():
                with scope:
                    await streams.relay(r["stream"], app_side)

            n.start_soon(connection)
            await r["client"].send_all(b"before")
            assert await app.receive_some(100) == b"before"
            # The intentions change: the table re-decides under the new snapshot.
            flipped = snapshot(ca, "db", intentions=[("web", "db", "deny")])
            denied = table.redecide(flipped.decide)
            assert [(i, d.reason) for i, d in denied] == [
                (1, "Matched intention: web => db (deny)")
            ]
            scope.cancel()  # what the sidecar does to a denied connection
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
            await r["client"].send_all(b"after")
            await r["client"].receive_some(100)

    trio.run(main)


def test_peer_verdicts_are_cached_per_leaf(ca):
    cache = tls.PeerCache()
    issued = ca.leaf("web")
    from cryptography.hazmat.primitives.serialization import Encoding

    der = issued.cert.public_bytes(Encoding.DER)
    first = cache.verdict(der)
    assert first.identity is not None and first.identity.service == "web"
    assert cache.verdict(der) is first
    assert cache.verdict(None).identity is None
    assert DC == first.identity.datacenter
