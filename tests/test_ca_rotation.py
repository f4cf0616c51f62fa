"""CA root rotation: which leaves a sidecar accepts while the roots change, and pruning.

During a rotation a sidecar may hold any of three trust bundles: the old root only (it has
not fetched the new roots yet), old + new, or (after pruning) the new root only. A leaf issued
before the rotation must verify with the first two and must not verify with the new root
alone; a leaf issued after it carries the new root cross-signed by the old one, so it verifies
with all three. Each case is judged twice: by ``trellis.proxy.x509.verify_peer`` (what the sidecar
runs) and by ``openssl verify`` (an independent implementation).
"""

from __future__ import annotations

import os
import time

import pytest

from tests import api_fixtures
from tests.ca_support import (
    DC,
    certs,
    leaf_and_chain,
    openssl_ok,
    peer_ok,
    root_by_id,
    service_csr,
)
from trellis.api.ca.manager import CAManager
from trellis.api.ca.provider import ProviderError
from trellis.api.ca.secrets import Sealer
from trellis.api.errors import BadRequest
from trellis.api.store import open_store

client = api_fixtures.client
make_client = api_fixtures.make_client

ROOTS = "/v1/connect/ca/roots"


def ok(resp, status: int = 200):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    return resp


def roots_of(c) -> dict:
    return ok(c.get(ROOTS)).get_json()


def issue(c, service: str):
    td = roots_of(c)["TrustDomain"]
    body = ok(c.post("/v1/connect/ca/sign", json={"CSR": service_csr(td, service)})).get_json()
    return leaf_and_chain(body)


def accepted(tmp_path, name, leaf, chain, bundle, td) -> bool:
    """Whether a sidecar trusting ``bundle`` accepts the peer; both judges must agree."""
    by_python = peer_ok(leaf, chain, bundle, td)
    by_openssl = openssl_ok(tmp_path / name, leaf, chain, bundle)
    assert by_python == by_openssl, (name, by_python, by_openssl)
    return by_python


def test_leaves_verify_against_every_bundle_a_sidecar_holds_during_rotation(client, tmp_path):
    before = roots_of(client)
    td = before["TrustDomain"]
    old_leaf, old_chain = issue(client, "web")
    assert old_chain == []
    rotated = ok(client.post("/v1/connect/ca/rotate")).get_json()
    new_leaf, new_chain = issue(client, "db")
    by_id = root_by_id(rotated)
    old_root = by_id[before["ActiveRootID"]]
    new_root = by_id[rotated["ActiveRootID"]]
    # The new leaf is signed by the new root and sent with the new root cross-signed by the old.
    new_leaf.verify_directly_issued_by(new_root)
    [cross] = new_chain
    cross.verify_directly_issued_by(old_root)
    assert cross.public_key() == new_root.public_key()

    bundles = {"old": [old_root], "old+new": [old_root, new_root], "new": [new_root]}
    got = {
        (leaf_name, bundle_name): accepted(
            tmp_path, f"{leaf_name}-{bundle_name}", leaf, chain, bundle, td
        )
        for leaf_name, leaf, chain in (
            ("old-leaf", old_leaf, old_chain),
            ("new-leaf", new_leaf, new_chain),
        )
        for bundle_name, bundle in bundles.items()
    }
    assert got == {
        ("old-leaf", "old"): True,
        ("old-leaf", "old+new"): True,
        ("old-leaf", "new"): False,  # the new root alone never vouches for the old leaves
        ("new-leaf", "old"): True,  # through the cross-signed certificate
        ("new-leaf", "old+new"): True,
        ("new-leaf", "new"): True,
    }
    # Without the cross-signed certificate, a sidecar still on the old root refuses the new leaf:
    # the chain sent with the leaf is what makes the rotation seamless.
    assert not accepted(tmp_path, "new-leaf-bare", new_leaf, [], [old_root], td)
    # The bundle the server serves after the rotation is old + new.
    served = certs(ok(client.get(f"{ROOTS}?pem=true")).get_data(as_text=True))
    assert [c.fingerprint(_sha256()) for c in served] == [
        c.fingerprint(_sha256()) for c in (old_root, new_root)
    ]


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _manager(app_client) -> CAManager:
    return app_client.application.extensions["trellis"].ca


def _stored_roots(app_client) -> dict:
    return app_client.application.extensions["trellis"].store.system_get("ca/roots")[0]


def _key_doc(app_client, root: dict):
    store = app_client.application.extensions["trellis"].store
    return store.system_get("ca/keys/" + root["ProviderState"]["KeyID"])


def test_pruning_waits_for_every_old_leaf_to_expire(app_client, tmp_path):
    c = app_client
    ca = _manager(c)
    old_leaf, old_chain = issue(c, "web")
    ok(c.post("/v1/connect/ca/rotate"))
    stored = _stored_roots(c)
    old, new = stored["Roots"]
    assert old["RotatedOutAt"] is not None and new["RotatedOutAt"] is None
    assert _key_doc(c, old) is not None and _key_doc(c, new) is not None
    grace = 2 * ca.leaf_ttl().total_seconds()
    assert grace == 2 * 72 * 3600
    seq = roots_of(c)["Sequence"]

    # Before every old leaf has expired: nothing goes.
    for now in (time.time(), old["RotatedOutAt"] + grace - 1):
        assert ca.prune(now=now) == 0
        assert [r["ID"] for r in roots_of(c)["Roots"]] == [old["ID"], new["ID"]]
        assert _key_doc(c, old) is not None
    assert roots_of(c)["Sequence"] == seq

    # After: the old root and its sealed key are gone; the new one stays and still signs.
    assert ca.prune(now=old["RotatedOutAt"] + grace + 1) == 1
    after = roots_of(c)
    assert [r["ID"] for r in after["Roots"]] == [new["ID"]]
    assert after["ActiveRootID"] == new["ID"] and after["Sequence"] == seq + 1
    assert _key_doc(c, old) is None
    assert _key_doc(c, new) is not None
    assert ca.prune(now=old["RotatedOutAt"] + 10 * grace) == 0  # the active root never goes
    new_leaf, new_chain = issue(c, "web")
    bundle = list(root_by_id(after).values())
    td = after["TrustDomain"]
    assert accepted(tmp_path, "new", new_leaf, new_chain, bundle, td)
    assert not accepted(tmp_path, "old", old_leaf, old_chain, bundle, td)


def test_two_rotations_keep_three_roots_until_pruned(app_client, tmp_path):
    c = app_client
    ca = _manager(c)
    first = roots_of(c)
    leaves = [issue(c, "web")]
    ok(c.post("/v1/connect/ca/rotate"))
    leaves.append(issue(c, "web"))
    ok(c.post("/v1/connect/ca/rotate"))
    leaves.append(issue(c, "web"))
    roots = roots_of(c)
    assert len(roots["Roots"]) == 3 and roots["Sequence"] == first["Sequence"] + 2
    assert [r["Active"] for r in roots["Roots"]] == [False, False, True]
    a, b, cc = (certs(r["RootCert"])[0] for r in roots["Roots"])
    # Each new root is cross-signed by the one it replaced.
    for older, newer, record in ((a, b, roots["Roots"][1]), (b, cc, roots["Roots"][2])):
        [cross] = certs("".join(record["IntermediateCerts"]))
        cross.verify_directly_issued_by(older)
        assert cross.public_key() == newer.public_key()
    td = roots["TrustDomain"]
    # Every leaf verifies against the full served bundle.
    for i, (leaf, chain) in enumerate(leaves):
        assert accepted(tmp_path, f"leaf{i}", leaf, chain, [a, b, cc], td)

    stored = _stored_roots(c)["Roots"]
    out_a, out_b = stored[0]["RotatedOutAt"], stored[1]["RotatedOutAt"]
    assert out_a < out_b
    grace = 2 * ca.leaf_ttl().total_seconds()
    assert ca.prune(now=out_a + grace - 1) == 0
    assert len(roots_of(c)["Roots"]) == 3
    assert ca.prune(now=out_a + grace) == 1  # the first root's leaves have all expired
    assert [r["ID"] for r in roots_of(c)["Roots"]] == [r["ID"] for r in roots["Roots"][1:]]
    assert ca.prune(now=out_b + grace + 1) == 1
    assert [r["ID"] for r in roots_of(c)["Roots"]] == [roots["ActiveRootID"]]
    assert all(_key_doc(c, r) is None for r in stored[:2])


# -- providers that cannot cross-sign (injected into a CAManager on a real SQLite store) ----------


class _Provider:
    """The built-in provider with cross-signing taken away (``mode="unsupported"``: it says
    it cannot; ``mode="fails"``: it says it can, then fails). Records the keys it made."""

    def __init__(self, inner, mode: str, made: list[str]) -> None:
        self._inner = inner
        self._mode = mode
        self._made = made

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def generate_root(self):
        material = self._inner.generate_root()
        self._made.append(material.state["KeyID"])
        return material

    def supports_cross_signing(self) -> bool:
        return self._mode != "unsupported"

    def cross_sign(self, new_root):
        raise ProviderError("cross-signing is switched off in this test")


@pytest.fixture
def make_manager(tmp_path):
    stores = []

    def make(mode: str) -> tuple[CAManager, list[str]]:
        store = open_store(f"sqlite:///{tmp_path / f'{mode}.db'}")
        stores.append(store)
        made: list[str] = []
        holder: list[CAManager] = []
        manager = CAManager(
            store,
            datacenter=DC,
            sealer=Sealer(os.urandom(32)),
            provider_factory=lambda name: _Provider(holder[0]._default_factory(name), mode, made),
        )
        holder.append(manager)
        manager.ensure_initialized()
        return manager, made

    yield make
    for s in stores:
        s.close()


def _sign(manager: CAManager, service: str):
    signed = manager.sign_csr(service_csr(manager.trust_domain, service), lambda s: True)
    return signed.cert, list(signed.chain)


@pytest.mark.parametrize("mode", ["unsupported", "fails"])
def test_rotation_without_cross_signing_needs_force(make_manager, tmp_path, mode):
    manager, made = make_manager(mode)
    store = manager.store
    before = store.system_get("ca/roots")
    old_leaf, old_chain = _sign(manager, "web")
    with pytest.raises(BadRequest, match="ForceWithoutCrossSigning"):
        manager.rotate()
    assert store.system_get("ca/roots") == before  # nothing changed
    if mode == "fails":
        # A root was made for the attempt; its key was cleaned up again.
        assert len(made) == 2
        assert store.system_get("ca/keys/" + made[1]) is None
    else:
        assert len(made) == 1  # refused before anything was made
    assert store.system_get("ca/keys/" + made[0]) is not None

    manager.rotate(force=True)
    roots, _ = manager.roots_view()
    old, new = roots["Roots"]
    assert new["Active"] and new["IntermediateCerts"] == []  # no cross-signed certificate
    assert roots["Sequence"] == before[0]["Sequence"] + 1
    new_leaf, new_chain = _sign(manager, "db")
    assert new_chain == []
    old_root, new_root = certs(old["RootCert"])[0], certs(new["RootCert"])[0]
    td = manager.trust_domain
    # Without cross-signing, a sidecar on the old root refuses new leaves until it fetches
    # the new root: that is the price of forcing.
    assert not accepted(tmp_path, "new-old", new_leaf, new_chain, [old_root], td)
    assert accepted(tmp_path, "new-both", new_leaf, new_chain, [old_root, new_root], td)
    assert accepted(tmp_path, "old-both", old_leaf, old_chain, [old_root, new_root], td)
    assert not accepted(tmp_path, "old-new", old_leaf, old_chain, [new_root], td)


def test_a_provider_switch_by_configuration_also_refuses_without_cross_signing(make_manager):
    manager, _ = make_manager("unsupported")
    before = manager.store.system_get("ca/roots")
    body = {"Provider": "consul", "Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 2048}}
    with pytest.raises(BadRequest, match="cannot cross-sign"):
        manager.set_config(body)
    assert manager.store.system_get("ca/roots") == before
    manager.set_config({**body, "ForceWithoutCrossSigning": True})
    roots, _ = manager.roots_view()
    assert [r["PrivateKeyType"] for r in roots["Roots"]] == ["ec", "rsa"]
