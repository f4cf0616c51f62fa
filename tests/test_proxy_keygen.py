"""proxy/keygen.py: the key and CSR made by a real child process (``python -m
trellis.proxy.keygen``) so that ``trellis connect proxy`` never imports ``cryptography``; its
failures as clear errors; and the follower asking for a CSR once per identity, with one key."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import trio
from cryptography import x509

from trellis.proxy import keygen, spiffe
from trellis.proxy import x509 as px
from trellis.proxy.config import ProxyConfig
from trellis.proxy.follower import Follower, FollowerError

from .mesh_support import DC, MeshCA
from .test_proxy_expiry import Earliest
from .test_proxy_follower import CONFIG, ControlPlane, _until

TD = "5e1f0000-0000-4000-8000-0000000000aa.trellis"
WEB = spiffe.service_id(TD, DC, "web")


def _run(source: keygen.KeySource, spiffe_id: str, key_pem: str | None = None) -> keygen.KeyAndCSR:
    async def main() -> keygen.KeyAndCSR:
        return await source.key_and_csr(spiffe_id, key_pem)

    return trio.run(main)


def _public(key_pem: str) -> bytes:
    return px.key_id(px.load_key(key_pem).public_key())  # type: ignore[arg-type]


def test_the_child_makes_a_p256_key_and_a_csr_the_ca_accepts():
    made = _run(keygen.ChildKeys(), WEB.uri)
    key = px.load_key(made.key_pem)
    assert px.key_description(key) == ("ec", 256)
    csr = px.load_csr(made.csr_pem)
    info = px.check_csr(csr, trust_domain=TD, datacenter=DC)
    assert info.identity == WEB
    assert px.key_id(info.public_key) == _public(made.key_pem)
    assert "PRIVATE" not in repr(made)  # the key is never in a repr, hence never in a log


def test_given_its_key_the_child_makes_a_csr_for_a_new_identity_with_that_key():
    first = _run(keygen.ChildKeys(), WEB.uri)
    other = spiffe.service_id("0be0be00-0000-4000-8000-0000000000bb.trellis", DC, "web")
    again = _run(keygen.ChildKeys(), other.uri, first.key_pem)
    assert again.key_pem == first.key_pem
    info = px.check_csr(px.load_csr(again.csr_pem), trust_domain=other.trust_domain)
    assert info.identity == other
    assert px.key_id(info.public_key) == _public(first.key_pem)


def test_in_process_and_child_sources_answer_alike():
    made = _run(keygen.InProcessKeys(), WEB.uri)
    assert px.check_csr(px.load_csr(made.csr_pem), trust_domain=TD).identity == WEB
    with pytest.raises(keygen.KeygenError, match="not a service identity"):
        _run(keygen.InProcessKeys(), f"spiffe://{TD}/agent/x")


@pytest.mark.parametrize(
    ("command", "spiffe_id", "key_pem", "words"),
    [
        (None, "spiffe://td/x", None, r"status 1: .*SpiffeIDError: not a service identity"),
        (
            None,
            WEB.uri,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
            "status 1: .*Could not deserialize key data",
        ),
        ([sys.executable, "-c", "raise SystemExit(3)"], WEB.uri, None, "status 3: no message"),
        ([sys.executable, "-c", "print('hello')"], WEB.uri, None, "not a key and a CSR"),
        (["/nonexistent/python"], WEB.uri, None, "cannot run the key generator"),
    ],
)
def test_a_failing_child_is_one_clear_error_that_never_quotes_the_key(
    command, spiffe_id, key_pem, words
):
    with pytest.raises(keygen.KeygenError, match=words) as e:
        _run(keygen.ChildKeys(command=command), spiffe_id, key_pem)
    assert "Traceback" not in str(e.value)
    assert "c2VjcmV0" not in str(e.value)


def test_a_child_that_does_not_answer_is_timed_out_and_ended():
    hang = [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(120)"]
    source = keygen.ChildKeys(command=hang, timeout=1.0)

    async def main() -> float:
        start = trio.current_time()
        with pytest.raises(keygen.KeygenError, match=r"did not answer within 1 s"):
            await source.key_and_csr(WEB.uri, None)
        return trio.current_time() - start

    # trio.run_process kills the child when cancelled: the call returns, the child is gone.
    assert trio.run(main) < 10


class Recording:
    """A key source that remembers what it was asked (and answers with a real child)."""

    def __init__(self, inner: keygen.KeySource) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str | None]] = []
        self.made: list[keygen.KeyAndCSR] = []

    async def key_and_csr(self, spiffe_id: str, key_pem: str | None) -> keygen.KeyAndCSR:
        self.calls.append((spiffe_id, key_pem))
        made = await self.inner.key_and_csr(spiffe_id, key_pem)
        self.made.append(made)
        return made


class Rotated(MeshCA):
    """A new CA that the control plane announces as the active root."""

    def roots_json(self, *extra: MeshCA) -> dict[str, Any]:
        doc = super().roots_json(*extra)
        doc["ActiveRootID"] = f"root-{id(self)}"
        return doc


def _leaf_key(snap: Any) -> bytes:
    cert = x509.load_pem_x509_certificate(snap.leaf.cert_pem.encode())
    return px.key_id(cert.public_key())  # type: ignore[arg-type]


def test_the_follower_asks_once_per_identity_and_keeps_its_key():
    first_ca = MeshCA(TD)
    cp = ControlPlane(first_ca)
    keys = Recording(keygen.ChildKeys())
    config = ProxyConfig(service="db")

    def issued_by(ca: MeshCA) -> Any:
        return lambda: (
            f.snapshot is not None
            and f.snapshot.leaf is not None
            and f.snapshot.leaf.issuer_key_id == px.key_id(ca.root.public_key()).hex()
        )

    async def main() -> None:
        nonlocal f
        f = Follower(cp, config=config, wait=5, rng=Earliest(), keys=keys)  # type: ignore[arg-type]
        async with trio.open_nursery() as n:
            n.start_soon(f.run)
            await _until(issued_by(first_ca), 30)
            key = _leaf_key(f.snapshot)
            # A new root in the same trust domain: a new leaf, the same CSR.
            same_domain = Rotated(TD)
            cp.change(ca=same_domain)
            await _until(issued_by(same_domain), 30)
            assert len(keys.calls) == 1
            assert _leaf_key(f.snapshot) == key
            # A new trust domain: a new CSR, made with the key the follower already has.
            other = Rotated("0be0be00-0000-4000-8000-0000000000bb.trellis")
            cp.change(ca=other)
            await _until(issued_by(other), 30)
            assert f.snapshot.identity.trust_domain == other.trust_domain
            assert _leaf_key(f.snapshot) == key
            n.cancel_scope.cancel()

    f: Follower | None = None
    trio.run(main)
    assert [uri for uri, _ in keys.calls] == [
        spiffe.service_id(TD, DC, "db").uri,
        spiffe.service_id("0be0be00-0000-4000-8000-0000000000bb.trellis", DC, "db").uri,
    ]
    assert keys.calls[0][1] is None
    assert keys.calls[1][1] == keys.made[0].key_pem


def test_a_key_source_that_fails_ends_the_follower_with_a_clear_error():
    cp = ControlPlane(MeshCA(TD))
    broken = keygen.ChildKeys(command=[sys.executable, "-c", "raise SystemExit('no entropy')"])

    async def main() -> None:
        f = Follower(cp, config=CONFIG, wait=5, keys=broken)  # type: ignore[arg-type]
        await f.run()

    # Raised in the follower's leaf task, so it comes in trio's group; proxy/run.py reports
    # the FollowerError of a group on one line ("Error: ..."), with no traceback.
    with pytest.raises(BaseExceptionGroup) as e:
        trio.run(main)
    fatal, rest = e.value.split(FollowerError)
    assert rest is None
    assert fatal is not None
    assert [str(x) for x in fatal.exceptions] == [
        "the key generator exited with status 1: no entropy"
    ]
