"""Switching the Connect CA provider, both ways, on a real ``trellis server`` and a real OpenBao.

Everything goes through the real HTTP API of a ``trellis server`` subprocess (two gunicorn
workers, SQLite) and the real CLI (``trellis ca set-config -config-file F`` as a subprocess);
the Vault side is a real OpenBao dev server (tests/vault_fixtures.py). Nothing is mocked.

A switch is a rotation: the new provider's root becomes active and the old root cross-signs
it, so a leaf of the new root verifies for a peer that trusts only the old root (given the
chain the CA sends), while leaves of the old root keep verifying against the bundle. Peers are
judged with the sidecar's own check (``trellis.proxy.x509.verify_peer``) and, independently, with
``openssl verify``.

Each worker caches the CA documents and hears of the other worker's writes from its store
follower a few milliseconds later, so right after a switch the tests wait (bounded) until
several reads in a row agree before they sign with the new provider.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tests import vault_fixtures
from tests.ca_support import certs, leaf_and_chain, openssl_ok, peer_ok, service_csr
from tests.support import TRELLIS, TrellisProcess, server_args
from tests.vault_fixtures import MountPaths, start_bao
from trellis.proxy import x509 as px

openbao = vault_fixtures.openbao
vault_paths = vault_fixtures.vault_paths

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    """A real ``trellis server`` with two workers, DNS off, on a free HTTP port."""
    p = TrellisProcess(server_args(tmp_path / "data", workers=2, node="ca-switch")).start()
    yield p
    p.stop()


# -- helpers -----------------------------------------------------------------------------------


def get(server: TrellisProcess, path: str) -> httpx.Response:
    # A new connection each time, so that the requests spread over both workers.
    r = httpx.get(server.url + path, timeout=30)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r


def roots(server: TrellisProcess) -> dict:
    return get(server, "/v1/connect/ca/roots").json()


def settled_roots(server: TrellisProcess, check, timeout: float = 5.0) -> dict:
    """The roots once ten reads in a row (over both workers) pass ``check``."""
    deadline = time.monotonic() + timeout
    good, body = 0, {}
    while good < 10:
        body = roots(server)
        good = good + 1 if check(body) else 0
        if time.monotonic() > deadline:
            raise AssertionError(f"the roots never settled: {json.dumps(body)[:2000]}")
        time.sleep(0.01)
    return body


def sign(server: TrellisProcess, service: str) -> dict:
    r = httpx.post(
        server.url + "/v1/connect/ca/sign",
        json={"CSR": service_csr(roots(server)["TrustDomain"], service)},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()


def cli_set_config(server: TrellisProcess, tmp_path: Path, body: dict, name: str):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(body))
    return subprocess.run(
        [TRELLIS, "ca", "set-config", "-config-file", str(path), "-http-addr", server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )


def vault_body(bao, paths: MountPaths) -> dict:
    return {
        "Provider": "vault",
        "Config": {
            "Address": bao.address,
            "Token": bao.token,
            "RootPKIPath": paths.root,
            "IntermediatePKIPath": paths.intermediate,
        },
    }


def by_id(body: dict) -> dict[str, dict]:
    return {r["ID"]: r for r in body["Roots"]}


def cert_of(root: dict) -> x509.Certificate:
    return certs(root["RootCert"])[0]


def cross_signed(root: dict, new: x509.Certificate, old: x509.Certificate) -> x509.Certificate:
    """The certificate in the active root's IntermediateCerts that has ``new``'s subject and
    key and is signed by ``old``; fails if there is none."""
    found = []
    for pem in root["IntermediateCerts"]:
        for c in certs(pem):
            if c.subject != new.subject or c.public_key() != new.public_key():
                continue
            try:
                c.verify_directly_issued_by(old)
            except (ValueError, TypeError, InvalidSignature):
                continue
            found.append(c)
    assert len(found) == 1, f"no single cross-signed certificate in {root['IntermediateCerts']}"
    return found[0]


def vault_root_certs(bao, mount: str) -> set[str]:
    """Fingerprints of every issuer certificate in an OpenBao PKI mount."""
    client = bao.client()
    listed = client.list(f"{mount}/issuers")
    out = set()
    for issuer_id in (listed or {}).get("data", {}).get("keys", []):
        pem = client.read(f"{mount}/issuer/{issuer_id}")["data"]["certificate"]
        out.add(px.fingerprint(certs(pem)[0]))
    return out


def no_secret(server: TrellisProcess, token: str) -> None:
    """The token is in no configuration body (raw, pretty), no roots body, no server log line."""
    for path in (
        "/v1/connect/ca/configuration",
        "/v1/connect/ca/configuration?pretty",
        "/v1/connect/ca/roots",
    ):
        raw = get(server, path).content
        assert token.encode() not in raw, path
        assert b'"Token"' not in raw, path
    assert token not in "\n".join(server.lines)


def comparable(body: dict) -> dict:
    """A roots body without the indexes (they move with any write to the store)."""
    return {
        **body,
        "Roots": [
            {k: v for k, v in r.items() if k not in ("CreateIndex", "ModifyIndex")}
            for r in body["Roots"]
        ],
    }


# -- the switch, both ways -----------------------------------------------------------------


def test_switch_to_vault_and_back_keeps_every_leaf_verifiable(
    server, openbao, vault_paths, tmp_path
):
    before = roots(server)
    td = before["TrustDomain"]
    assert len(before["Roots"]) == 1
    builtin_id = before["ActiveRootID"]
    builtin_root = cert_of(by_id(before)[builtin_id])
    assert by_id(before)[builtin_id]["IntermediateCerts"] == []

    # A leaf from the built-in CA.
    old = sign(server, "web")
    assert old["RootID"] == builtin_id
    old_leaf, old_chain = leaf_and_chain(old)
    assert peer_ok(old_leaf, old_chain, [builtin_root], td)

    # -- builtin -> vault, with the CLI --------------------------------------------------------
    done = cli_set_config(server, tmp_path, vault_body(openbao, vault_paths), "vault")
    assert done.returncode == 0, done.stderr
    assert "Configuration updated!" in done.stdout
    assert openbao.token not in done.stdout + done.stderr

    after = settled_roots(server, lambda b: b["ActiveRootID"] != builtin_id)
    assert set(by_id(after)) == {builtin_id, after["ActiveRootID"]}
    assert after["Sequence"] == before["Sequence"] + 1
    assert [r["ID"] for r in after["Roots"] if r["Active"]] == [after["ActiveRootID"]]
    vault_rec = by_id(after)[after["ActiveRootID"]]
    vault_root = cert_of(vault_rec)
    # The new active root is the one in OpenBao's root mount, not one Trellis made.
    assert px.fingerprint(vault_root) in vault_root_certs(openbao, vault_paths.root)
    # The old built-in root is unchanged and still trusted.
    assert by_id(after)[builtin_id]["RootCert"] == by_id(before)[builtin_id]["RootCert"]
    cross = cross_signed(vault_rec, vault_root, builtin_root)
    assert cross.issuer == builtin_root.subject

    new = sign(server, "api")
    assert new["RootID"] == vault_rec["ID"]
    leaf, chain = leaf_and_chain(new)
    # Signed by OpenBao's intermediate (in the chain, issued by the Vault root), not by a root.
    assert leaf.issuer not in (builtin_root.subject, vault_root.subject)
    assert any(c.issuer == vault_root.subject and c.subject == leaf.issuer for c in chain)
    assert px.fingerprint(cross) in {px.fingerprint(c) for c in chain}
    # A peer that still trusts only the old root accepts it (through the cross-signed cert)...
    assert peer_ok(leaf, chain, [builtin_root], td)
    assert openssl_ok(tmp_path / "v-old", leaf, chain, [builtin_root])
    # ...and only through it: without the cross-signed certificate, the old root does not.
    without_cross = [c for c in chain if px.fingerprint(c) != px.fingerprint(cross)]
    assert not peer_ok(leaf, without_cross, [builtin_root], td)
    # A peer with the new root, or with the whole bundle, accepts it too.
    assert peer_ok(leaf, chain, [vault_root], td)
    assert openssl_ok(tmp_path / "v-new", leaf, chain, [vault_root])
    bundle = [cert_of(r) for r in after["Roots"]]
    assert peer_ok(leaf, chain, bundle, td)
    # The leaf from before the switch still verifies against the bundle.
    assert peer_ok(old_leaf, old_chain, bundle, td)
    assert openssl_ok(tmp_path / "b-bundle", old_leaf, old_chain, bundle)

    config = get(server, "/v1/connect/ca/configuration").json()
    assert config["Provider"] == "vault"
    assert config["Config"]["Address"] == openbao.address
    no_secret(server, openbao.token)
    shown = subprocess.run(
        [TRELLIS, "ca", "get-config", "-http-addr", server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert openbao.token not in shown.stdout and '"vault"' in shown.stdout

    # -- vault -> builtin, with the CLI: the Vault root cross-signs the new built-in root -------
    done = cli_set_config(server, tmp_path, {"Provider": "builtin", "Config": {}}, "builtin")
    assert done.returncode == 0, done.stderr
    back = settled_roots(server, lambda b: b["ActiveRootID"] not in (builtin_id, vault_rec["ID"]))
    new_builtin_id = back["ActiveRootID"]
    # Nothing was pruned (every old leaf is still alive): all three roots are trusted.
    assert set(by_id(back)) == {builtin_id, vault_rec["ID"], new_builtin_id}
    assert back["Sequence"] == after["Sequence"] + 1
    nb_rec = by_id(back)[new_builtin_id]
    nb_root = cert_of(nb_rec)
    assert px.fingerprint(nb_root) not in vault_root_certs(openbao, vault_paths.root)
    back_cross = cross_signed(nb_rec, nb_root, vault_root)
    assert back_cross.issuer == vault_root.subject

    third = sign(server, "db")
    assert third["RootID"] == new_builtin_id
    leaf3, chain3 = leaf_and_chain(third)
    assert leaf3.issuer == nb_root.subject
    # Trusted by a peer that knows only the Vault root, through the cross-signed certificate.
    assert peer_ok(leaf3, chain3, [vault_root], td)
    assert openssl_ok(tmp_path / "n-vault", leaf3, chain3, [vault_root])
    assert not peer_ok(leaf3, [], [vault_root], td)
    assert peer_ok(leaf3, chain3, [nb_root], td)
    bundle = [cert_of(r) for r in back["Roots"]]
    # Every leaf issued so far verifies against the bundle.
    for lf, ch in ((leaf3, chain3), (leaf, chain), (old_leaf, old_chain)):
        assert peer_ok(lf, ch, bundle, td)

    config = get(server, "/v1/connect/ca/configuration").json()
    assert config["Provider"] == "builtin"
    assert not {"Address", "Token", "RootPKIPath"} & set(config["Config"])
    no_secret(server, openbao.token)


# -- Vault down during a switch ----------------------------------------------------------------


def test_switch_to_a_vault_that_is_down_fails_and_changes_nothing(server, tmp_path):
    bao = start_bao(tmp_path / "bao")
    try:
        body = vault_body(bao, MountPaths(root="down-root", intermediate="down-int"))
        # Vault was there a moment ago, at this very address; now it is gone.
        bao.stop()
        assert bao.proc.poll() is not None
    finally:
        bao.stop()

    before = roots(server)
    assert len(before["Roots"]) == 1

    r = httpx.put(server.url + "/v1/connect/ca/configuration", json=body, timeout=60)
    assert 400 <= r.status_code < 600, r.text
    error = r.json()["error"]
    assert bao.address in error and "cannot reach Vault" in error, error
    assert bao.token not in r.text

    done = cli_set_config(server, tmp_path, body, "vault-down")
    assert done.returncode == 1
    assert "Failed to set the CA configuration" in done.stderr
    assert bao.address in done.stderr
    assert bao.token not in done.stdout + done.stderr

    # Nothing changed, on either worker, and the CA still signs with the built-in root.
    for _ in range(10):
        assert comparable(roots(server)) == comparable(before)
        assert get(server, "/v1/connect/ca/configuration").json()["Provider"] == "builtin"
    issued = sign(server, "web")
    assert issued["RootID"] == before["ActiveRootID"]
    leaf, chain = leaf_and_chain(issued)
    assert peer_ok(leaf, chain, [cert_of(before["Roots"][0])], before["TrustDomain"])
    no_secret(server, bao.token)


def _vault_then_dead(server: TrellisProcess, tmp_path: Path, name: str) -> tuple[dict, str]:
    """Switch to a dedicated OpenBao, sign once with it, then stop it (by PID). Returns the
    roots while Vault was active and Vault's (now dead) address."""
    bao = start_bao(tmp_path / "bao")
    try:
        first = roots(server)["ActiveRootID"]
        paths = MountPaths(root=f"{name}-root", intermediate=f"{name}-int")
        done = cli_set_config(server, tmp_path, vault_body(bao, paths), "vault")
        assert done.returncode == 0, done.stderr
        on_vault = settled_roots(server, lambda b: b["ActiveRootID"] != first)
        assert len(on_vault["Roots"]) == 2
        assert sign(server, "web")["RootID"] == on_vault["ActiveRootID"]
    finally:
        bao.stop()
    assert bao.proc.poll() is not None
    return on_vault, bao.address


def test_switch_away_from_a_vault_that_went_down_is_refused(server, tmp_path):
    """Vault is the active provider and dies: a switch back to builtin cannot be cross-signed,
    so it is refused, clearly, and nothing changes; signing fails with a clear 503."""
    on_vault, address = _vault_then_dead(server, tmp_path, "gone")

    r = httpx.put(
        server.url + "/v1/connect/ca/configuration",
        json={"Provider": "builtin", "Config": {}},
        timeout=60,
    )
    assert 400 <= r.status_code < 600, r.text
    # Either "could not cross-sign" (a worker that had loaded the Vault provider) or "cannot
    # load the active root" (one that had not): both name the Vault that is down.
    assert address in r.json()["error"] and "cannot reach Vault" in r.json()["error"], r.text
    done = cli_set_config(server, tmp_path, {"Provider": "builtin", "Config": {}}, "builtin")
    assert done.returncode == 1 and address in done.stderr, done.stderr
    for _ in range(10):
        assert comparable(roots(server)) == comparable(on_vault)
        assert get(server, "/v1/connect/ca/configuration").json()["Provider"] == "vault"

    for _ in range(4):  # whichever worker answers
        csr = service_csr(on_vault["TrustDomain"], "web")
        r = httpx.post(server.url + "/v1/connect/ca/sign", json={"CSR": csr}, timeout=60)
        assert r.status_code == 503, r.text
        assert address in r.json()["error"], r.text


def test_forced_switch_away_from_a_dead_vault_after_a_restart(server, tmp_path):
    """The way out of a dead Vault: ForceWithoutCrossSigning, on a freshly started server."""
    on_vault, _address = _vault_then_dead(server, tmp_path, "dead")
    server.stop()
    again = TrellisProcess(server.args[1:]).start()
    try:
        assert comparable(roots(again)) == comparable(on_vault)
        forced = {"Provider": "builtin", "Config": {}, "ForceWithoutCrossSigning": True}
        r = httpx.put(again.url + "/v1/connect/ca/configuration", json=forced, timeout=60)
        assert r.status_code == 200, r.text
        recovered = settled_roots(again, lambda b: len(b["Roots"]) == 3)
        new_id = recovered["ActiveRootID"]
        assert new_id not in {x["ID"] for x in on_vault["Roots"]}
        # No Vault to cross-sign: the new root has no cross-signed certificate.
        assert by_id(recovered)[new_id]["IntermediateCerts"] == []
        issued = sign(again, "web")
        assert issued["RootID"] == new_id
        leaf, chain = leaf_and_chain(issued)
        new_root = cert_of(by_id(recovered)[new_id])
        assert peer_ok(leaf, chain, [new_root], recovered["TrustDomain"])
    finally:
        again.stop()
