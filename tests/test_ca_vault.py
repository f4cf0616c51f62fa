"""The Vault CA provider (api/ca/vault.py) against a real OpenBao dev server.

Every test here talks to a real ``bao server -dev`` (tests/vault_fixtures.py); nothing is
mocked. Each test works in its own mount paths. Certificates are judged with the same pure
policy the sidecar uses (``trellis.proxy.x509.verify_peer``) and, independently, with ``openssl
verify``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import vault_fixtures
from tests.ca_support import leaf_and_chain, service_csr
from tests.vault_fixtures import MountPaths, start_bao
from trellis.api.ca.provider import CAOptions, ProviderError
from trellis.api.ca.vault import MOUNT_MARK, VaultProvider, parse_config
from trellis.proxy import spiffe
from trellis.proxy import x509 as px

# The fixtures this module uses: a session-wide OpenBao dev server, fresh mount paths per test.
openbao = vault_fixtures.openbao
vault_paths = vault_fixtures.vault_paths

pytestmark = pytest.mark.integration

#: urllib3 warns on every request made with TLSSkipVerify; the provider has already said why
#: that is dangerous (tested below), so tests that use it on purpose ignore just that warning.
insecure_on_purpose = pytest.mark.filterwarnings(
    "ignore::urllib3.exceptions.InsecureRequestWarning"
)

TD = "11111111-2222-3333-4444-555555555555.trellis"
DC = "dc1"
LEAF_TTL = dt.timedelta(hours=2)


def options(**kw) -> CAOptions:
    base = dict(
        trust_domain=TD,
        datacenter=DC,
        leaf_ttl=dt.timedelta(hours=72),
        intermediate_ttl=dt.timedelta(days=365),
        # Longer than Vault's default mount maximum (768h): proves max_lease_ttl is set.
        root_ttl=dt.timedelta(days=3650),
        key_type="ec",
        key_bits=256,
    )
    base.update(kw)
    return CAOptions(**base)


def vault_config(server, paths: MountPaths, **extra) -> dict:
    return {
        "Address": server.address,
        "Token": server.token,
        "RootPKIPath": paths.root,
        "IntermediatePKIPath": paths.intermediate,
        **extra,
    }


def provider(server, paths: MountPaths, opts: CAOptions | None = None, **extra) -> VaultProvider:
    p = VaultProvider()
    p.configure(opts or options(), vault_config(server, paths, **extra))
    return p


def csr_for(
    service: str = "web", *, td: str = TD, dc: str = DC, ns: str = "default", key=None
) -> tuple[str, px.CSRInfo]:
    """A CSR and the CSRInfo ``check_csr`` would give for it, built by hand so that tests
    can also make ones the policy would refuse (to show Vault's role refuses them too)."""
    key = key or px.generate_key()
    identity = spiffe.ServiceID(td, ns, dc, service)
    csr = px.build_csr(key, identity)
    kt, bits = px.key_description(key.public_key())
    info = px.CSRInfo(identity, key.public_key(), kt, bits)
    return csr.public_bytes(serialization.Encoding.PEM).decode(), info


def checked_csr(service: str = "web", key=None) -> tuple[str, px.CSRInfo]:
    key = key or px.generate_key()
    csr = px.build_csr(key, spiffe.service_id(TD, DC, service))
    info = px.check_csr(csr, trust_domain=TD, datacenter=DC)
    return csr.public_bytes(serialization.Encoding.PEM).decode(), info


def openssl_verify(
    tmp_path: Path, root, leaf, untrusted, purpose: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "root.pem").write_text(px.cert_pem(root))
    (tmp_path / "leaf.pem").write_text(px.cert_pem(leaf))
    (tmp_path / "untrusted.pem").write_text("".join(px.cert_pem(c) for c in untrusted))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def mounts(server) -> set[str]:
    return {k.rstrip("/") for k in server.client().sys.list_mounted_secrets_engines()["data"]}


def issuers(server, mount: str) -> dict:
    r = server.client().list(f"{mount}/issuers")
    return {} if r is None else r["data"]["key_info"]


def keys(server, mount: str) -> dict:
    r = server.client().list(f"{mount}/keys")
    return {} if r is None else r["data"]["key_info"]


def roles(server, mount: str) -> list[str]:
    r = server.client().list(f"{mount}/roles")
    return [] if r is None else r["data"]["keys"]


# -- configuration ---------------------------------------------------------------------------

GOOD = {"Address": "http://127.0.0.1:8200", "Token": "s.secret-token"}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"Address": None}, "Address is required"),
        ({"Address": "vault:8200"}, "must be an http:// or https:// URL"),
        ({"Address": "ftp://vault:8200"}, "must be an http:// or https:// URL"),
        ({"Address": 8200}, "Address must be a string"),
        ({"Address": "https://user:pw@vault:8200"}, "must not carry credentials"),
        ({"Address": "https://vault:8200/v1?x=1"}, "no path, query or fragment"),
        ({"Address": "https://vault:99999"}, "invalid port"),
        ({"Token": None}, "Token is required"),
        ({"Token": ""}, "Token is required"),
        ({"Token": 1234}, "Token must be a string"),
        ({"Token": "s.secret-token\n"}, "whitespace or control characters"),
        ({"RootPKIPath": "../sys"}, "RootPKIPath"),
        ({"IntermediatePKIPath": "a b"}, "IntermediatePKIPath"),
        ({"RootPKIPath": 7}, "RootPKIPath must be a string"),
        ({"RootPKIPath": "pki", "IntermediatePKIPath": "pki/"}, "must differ"),
        ({"RootPKIPath": "pki", "IntermediatePKIPath": "pki/int"}, "must not nest"),
        ({"TLSSkipVerify": "yes"}, "TLSSkipVerify must be true or false"),
        ({"CAFile": "/nonexistent/ca.pem"}, "CAFile"),
        ({"CAPath": "/nonexistent/dir"}, "CAPath"),
        ({"CertFile": "/etc/hostname"}, "CertFile and KeyFile go together"),
        ({"AuthMethod": {"Type": "kubernetes"}}, "not supported yet"),
        ({"AuthMethod": {"Type": "approle", "Params": {}}}, "not supported yet"),
        ({"AuthMethod": "token"}, "AuthMethod must be an object"),
        ({"Namespace": 5}, "Namespace must be a string"),
    ],
)
def test_configure_refuses_bad_settings(change, needle):
    p = VaultProvider()
    with pytest.raises(ProviderError) as e:
        p.configure(options(), {**GOOD, **change})
    assert needle in e.value.message
    assert e.value.retryable is False
    assert "s.secret-token" not in e.value.message


def test_configure_refuses_a_non_mapping():
    with pytest.raises(ProviderError, match="must be an object"):
        VaultProvider().configure(options(), ["Address"])  # type: ignore[arg-type]


def test_configure_defaults_and_accepts_token_auth():
    settings, token = parse_config({**GOOD, "AuthMethod": {"Type": "token"}, "LeafCertTTL": "1h"})
    assert (settings.root_path, settings.intermediate_path) == ("trellis-root", "trellis-int")
    assert settings.address == "http://127.0.0.1:8200"
    assert token == "s.secret-token"
    assert "secret" not in repr(settings)
    settings, _ = parse_config({**GOOD, "RootPKIPath": "/connect-root/"})
    assert settings.root_path == "connect-root"


def test_configure_makes_no_request(dead_url):
    # Nothing listens there; configure must still succeed (it only checks and builds).
    p = VaultProvider()
    p.configure(options(), {**GOOD, "Address": dead_url})
    assert "secret" not in repr(p)


def test_tls_skip_verify_warns_why(caplog):
    caplog.set_level(logging.WARNING, logger="trellis.ca.vault")
    VaultProvider().configure(options(), {**GOOD, "Address": "https://vault:8200"})
    assert not caplog.records
    VaultProvider().configure(
        options(), {**GOOD, "Address": "https://vault:8200", "TLSSkipVerify": True}
    )
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "TLSSkipVerify" in record.getMessage()
    assert "impersonate Vault" in record.getMessage()


# -- generate_root and signing ---------------------------------------------------------------


def test_generate_root_makes_a_spiffe_root_and_intermediate(openbao, vault_paths):
    p = provider(openbao, vault_paths)
    before = dt.datetime.now(dt.UTC)
    material = p.generate_root()
    root, (intermediate,) = material.cert, material.signing_chain

    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert uri_sans(root) == [f"spiffe://{TD}"]
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cn = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn.startswith("Trellis Root CA ")
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    # 10 years, not cut to the mount's default 768h maximum.
    assert root.not_valid_after_utc > before + dt.timedelta(days=3649)

    intermediate.verify_directly_issued_by(root)
    bc = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert uri_sans(intermediate) == [f"spiffe://{TD}"]
    assert intermediate.not_valid_after_utc > before + dt.timedelta(days=364)

    state = material.state
    json.dumps(dict(state))  # plain, storable data
    assert state["root_mount"] == vault_paths.root
    assert state["intermediate_mount"] == vault_paths.intermediate
    assert state["root_issuer_id"] in issuers(openbao, vault_paths.root)
    assert state["intermediate_issuer_id"] in issuers(openbao, vault_paths.intermediate)
    assert state["role"] in roles(openbao, vault_paths.intermediate)
    assert {vault_paths.root, vault_paths.intermediate} <= mounts(openbao)
    tuned = openbao.client().sys.read_mount_configuration(vault_paths.root)["data"]
    assert tuned["max_lease_ttl"] == int(dt.timedelta(days=3650).total_seconds())


def test_signed_leaf_verifies_and_has_the_svid_profile(openbao, vault_paths, tmp_path):
    p = provider(openbao, vault_paths)
    material = p.generate_root()
    csr_pem, info = checked_csr("web")
    leaf, chain = p.sign_leaf(csr_pem, info, LEAF_TTL)
    assert chain == material.signing_chain

    identity = px.verify_peer([leaf, *chain], {TD: [material.cert]}, expected_service="web")
    assert identity == info.identity
    for purpose in ("sslclient", "sslserver"):
        done = openssl_verify(tmp_path, material.cert, leaf, chain, purpose)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip().endswith(": OK")

    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [info.identity.uri]
    assert len(list(san.value)) == 1  # no DNS, IP or e-mail names either
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    # The built-in provider's profile: digitalSignature only.
    assert not ku.value.key_agreement and not ku.value.key_encipherment
    # Vault back-dates by 30 s: the lifetime is the TTL plus that.
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert abs(lifetime - (LEAF_TTL + dt.timedelta(seconds=30))) <= dt.timedelta(seconds=2)
    assert abs(leaf.not_valid_after_utc - (dt.datetime.now(dt.UTC) + LEAF_TTL)) < dt.timedelta(
        seconds=30
    )


def test_rsa_options_and_rsa_csrs(openbao, vault_paths):
    p = provider(openbao, vault_paths, options(key_type="rsa", key_bits=2048))
    material = p.generate_root()
    for cert in (material.cert, *material.signing_chain):
        assert isinstance(cert.public_key(), rsa.RSAPublicKey)
        assert cert.public_key().key_size == 2048
    csr_pem, info = checked_csr("db", key=px.generate_key("rsa", 2048))
    leaf, chain = p.sign_leaf(csr_pem, info, LEAF_TTL)
    assert px.verify_peer([leaf, *chain], {TD: [material.cert]}).service == "db"
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment and not ku.key_agreement


@pytest.mark.parametrize(
    "make",
    [
        lambda: csr_for("web", td="evil.example"),
        lambda: csr_for("web", dc="dc2"),
        lambda: csr_for("web", ns="other"),
    ],
    ids=["foreign-trust-domain", "other-datacenter", "other-namespace"],
)
def test_the_vault_role_refuses_identities_outside_the_mesh(openbao, vault_paths, make):
    """check_csr is bypassed on purpose: Vault's own role must refuse too."""
    p = provider(openbao, vault_paths)
    p.generate_root()
    csr_pem, info = make()
    with pytest.raises(ProviderError) as e:
        p.sign_leaf(csr_pem, info, LEAF_TTL)
    assert e.value.retryable is False
    assert "not valid for this role" in e.value.message
    assert openbao.address in e.value.message


def test_a_leaf_with_two_uri_sans_is_never_returned(openbao, vault_paths):
    """CVE-2022-40716's CSR, slipped past check_csr: whatever Vault does with it, the
    provider must not hand back a certificate naming two services."""
    p = provider(openbao, vault_paths)
    p.generate_root()
    key = px.generate_key()
    web = spiffe.service_id(TD, DC, "web")
    db = spiffe.service_id(TD, DC, "db")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(web.uri), x509.UniformResourceIdentifier(db.uri)]
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    info = px.CSRInfo(web, key.public_key(), "ec", 256)
    with pytest.raises(ProviderError) as e:
        p.sign_leaf(csr.public_bytes(serialization.Encoding.PEM).decode(), info, LEAF_TTL)
    assert e.value.retryable is False
    # OpenBao signs it (both names are allowed by the role); the provider's own check of the
    # returned leaf is what stops it.
    assert "2 URI SANs" in e.value.message


def test_a_csr_whose_key_is_not_the_checked_one_is_refused(openbao, vault_paths):
    p = provider(openbao, vault_paths)
    p.generate_root()
    csr_pem, _ = checked_csr("web")
    _, other_info = checked_csr("web")
    with pytest.raises(ProviderError, match="the CSR's key is not the key its check named"):
        p.sign_leaf(csr_pem, other_info, LEAF_TTL)


def test_signing_before_any_root_is_an_error(openbao, vault_paths):
    p = provider(openbao, vault_paths)
    csr_pem, info = checked_csr()
    with pytest.raises(ProviderError, match="no root yet"):
        p.sign_leaf(csr_pem, info, LEAF_TTL)


# -- rotation, cross-signing, cleanup --------------------------------------------------------


def test_rotation_cross_signs_so_old_root_trust_still_works(openbao, vault_paths, tmp_path):
    p = provider(openbao, vault_paths)
    old = p.generate_root()
    old_leaf, old_chain = p.sign_leaf(*checked_csr("web"), LEAF_TTL)
    new = p.generate_root()
    assert px.fingerprint(new.cert) != px.fingerprint(old.cert)
    assert new.state["root_issuer_id"] != old.state["root_issuer_id"]
    assert new.state["root_mount"] == old.state["root_mount"]  # a new issuer, same mount
    assert new.cert.public_key() != old.cert.public_key()

    cross = p.cross_sign(new.cert)
    cross.verify_directly_issued_by(old.cert)
    assert cross.subject == new.cert.subject
    assert cross.public_key() == new.cert.public_key()

    leaf, chain = p.sign_leaf(*checked_csr("web"), LEAF_TTL)
    chain[0].verify_directly_issued_by(new.cert)  # signed by the NEW generation
    # A peer that only knows the old root accepts it through the cross-signed certificate...
    px.verify_peer([leaf, *chain, cross], {TD: [old.cert]})
    done = openssl_verify(tmp_path, old.cert, leaf, [*chain, cross], "sslclient")
    assert done.returncode == 0, done.stdout + done.stderr
    # ... and not without it, so the cross-signature is what does it.
    with pytest.raises(px.PeerRejected):
        px.verify_peer([leaf, *chain], {TD: [old.cert]})
    # Peers that know the new root, and leaves of the old root, still verify.
    px.verify_peer([leaf, *chain], {TD: [new.cert]})
    px.verify_peer([old_leaf, *old_chain], {TD: [old.cert, new.cert]})


def test_cleanup_releases_an_old_generation_only(openbao, vault_paths):
    p = provider(openbao, vault_paths)
    old = p.generate_root()
    new = p.generate_root()
    p.cleanup(old.state)
    p.cleanup(old.state)  # idempotent
    root_issuers = issuers(openbao, vault_paths.root)
    int_issuers = issuers(openbao, vault_paths.intermediate)
    assert old.state["root_issuer_id"] not in root_issuers
    assert old.state["intermediate_issuer_id"] not in int_issuers
    assert set(root_issuers) == {new.state["root_issuer_id"]}
    assert set(int_issuers) == {new.state["intermediate_issuer_id"]}
    assert len(keys(openbao, vault_paths.root)) == len(keys(openbao, vault_paths.intermediate)) == 1
    assert roles(openbao, vault_paths.intermediate) == [new.state["role"]]
    assert {vault_paths.root, vault_paths.intermediate} <= mounts(openbao)  # still in use
    leaf, chain = p.sign_leaf(*checked_csr("web"), LEAF_TTL)
    px.verify_peer([leaf, *chain], {TD: [new.cert]})

    # The manager drops a generation it has just made (lost race, failed rotation) through the
    # provider that made it: that provider then has no root, and the mounts it enabled go.
    p.cleanup(new.state)
    assert not {vault_paths.root, vault_paths.intermediate} & mounts(openbao)
    with pytest.raises(ProviderError, match="no root yet"):
        p.sign_leaf(*checked_csr("web"), LEAF_TTL)


def test_an_operator_root_is_reused_and_never_deleted(openbao, vault_paths):
    admin = openbao.client()
    admin.sys.enable_secrets_engine(
        "pki", path=vault_paths.root, config={"max_lease_ttl": "87600h"}
    )
    admin.write_data(
        f"{vault_paths.root}/root/generate/internal",
        data={"common_name": "Operator Root", "ttl": "87600h", "issuer_name": "operator-root"},
    )
    op_id = next(iter(issuers(openbao, vault_paths.root)))
    op_pem = admin.read(f"{vault_paths.root}/issuer/{op_id}")["data"]["certificate"]

    p = provider(openbao, vault_paths)
    first = p.generate_root()
    assert px.cert_pem(first.cert).strip() == op_pem.strip()
    assert first.state["root_owned"] is False
    leaf, chain = p.sign_leaf(*checked_csr("web"), LEAF_TTL)
    px.verify_peer([leaf, *chain], {TD: [first.cert]})

    second = p.generate_root()  # a rotation makes a root of ours next to the operator's
    assert px.fingerprint(second.cert) != px.fingerprint(first.cert)
    p.cross_sign(second.cert).verify_directly_issued_by(first.cert)

    provider(openbao, vault_paths).cleanup(first.state)
    assert op_id in issuers(openbao, vault_paths.root)  # the operator's root stays
    assert first.state["intermediate_issuer_id"] not in issuers(openbao, vault_paths.intermediate)
    provider(openbao, vault_paths).cleanup(second.state)
    assert set(issuers(openbao, vault_paths.root)) == {op_id}
    assert vault_paths.root in mounts(openbao)  # not ours: never disabled
    assert vault_paths.intermediate not in mounts(openbao)  # ours, and now empty


def test_cross_signing_a_builtin_root(openbao, vault_paths):
    p = provider(openbao, vault_paths)
    vault_root = p.generate_root().cert
    key = px.generate_key()
    builtin = px.build_ca(
        public_key=key.public_key(),
        trust_domain=TD,
        common_name="Trellis Built-in Root",
        signer_key=key,
        signer=None,
        ttl=dt.timedelta(days=3650),
    )
    cross = p.cross_sign(builtin)
    cross.verify_directly_issued_by(vault_root)
    _, info = checked_csr("api")
    leaf = px.build_leaf(info, issuer=builtin, issuer_key=key, ttl=LEAF_TTL)
    px.verify_peer([leaf, cross], {TD: [vault_root]})
    with pytest.raises(px.PeerRejected):
        px.verify_peer([leaf], {TD: [vault_root]})


def test_cross_sign_refuses_what_it_must_not_vouch_for(openbao, vault_paths):
    p = provider(openbao, vault_paths)
    material = p.generate_root()
    with pytest.raises(ProviderError, match="self-issued"):
        p.cross_sign(material.signing_chain[0])
    key = px.generate_key()
    foreign = px.build_ca(
        public_key=key.public_key(),
        trust_domain="other.trellis",
        common_name="Someone Else's Root",
        signer_key=key,
        signer=None,
        ttl=dt.timedelta(days=365),
    )
    with pytest.raises(ProviderError, match="trust domain"):
        p.cross_sign(foreign)
    fresh = provider(openbao, vault_paths)
    with pytest.raises(ProviderError, match="no \\(other\\) root"):
        fresh.cross_sign(material.cert)


# -- another replica -------------------------------------------------------------------------


def test_load_root_on_another_replica_signs_with_the_same_root(openbao, vault_paths):
    first = provider(openbao, vault_paths)
    material = first.generate_root()
    replica = provider(openbao, vault_paths)
    replica.load_root(material.cert, material.state)
    leaf, chain = replica.sign_leaf(*checked_csr("web"), LEAF_TTL)
    assert chain == material.signing_chain
    px.verify_peer([leaf, *chain], {TD: [material.cert]})
    # The replica can cross-sign a later root with the loaded one.
    later = first.generate_root()
    replica.cross_sign(later.cert).verify_directly_issued_by(material.cert)


def test_load_root_refuses_a_mismatch(openbao, vault_paths):
    p = provider(openbao, vault_paths)
    a = p.generate_root()
    b = p.generate_root()
    replica = provider(openbao, vault_paths)
    with pytest.raises(ProviderError, match="not the root this state belongs to"):
        replica.load_root(a.cert, b.state)
    with pytest.raises(ProviderError, match="is not in") as e:
        replica.load_root(a.cert, {**a.state, "root_issuer_id": "0000-missing"})
    assert e.value.retryable is False
    with pytest.raises(ProviderError, match="lacks 'role'"):
        replica.load_root(a.cert, {k: v for k, v in a.state.items() if k != "role"})
    p.cleanup(a.state)
    with pytest.raises(ProviderError, match="is not in"):
        replica.load_root(a.cert, a.state)
    with pytest.raises(ProviderError, match="no root yet"):
        replica.sign_leaf(*checked_csr(), LEAF_TTL)


def test_a_namespace_keeps_the_mounts_there(openbao, vault_paths):
    namespace = "ns-" + vault_paths.root
    openbao.client().write_data(f"sys/namespaces/{namespace}", data={})
    p = provider(openbao, vault_paths, Namespace=namespace)
    old = p.generate_root()
    assert old.state["namespace"] == namespace
    inside = hvac.Client(url=openbao.address, token=openbao.token, namespace=namespace)
    inside_mounts = {k.rstrip("/") for k in inside.sys.list_mounted_secrets_engines()["data"]}
    assert {vault_paths.root, vault_paths.intermediate} <= inside_mounts
    assert not {vault_paths.root, vault_paths.intermediate} & mounts(openbao)
    leaf, chain = p.sign_leaf(*checked_csr(), LEAF_TTL)
    px.verify_peer([leaf, *chain], {TD: [old.cert]})

    # The operator moves the CA out of the namespace: the old root is still found where it is.
    moved = provider(openbao, vault_paths)
    moved.load_root(old.cert, old.state)
    new = moved.generate_root()
    assert new.state["namespace"] == ""
    moved.cross_sign(new.cert).verify_directly_issued_by(old.cert)
    moved.cleanup(old.state)
    assert not {k.rstrip("/") for k in inside.sys.list_mounted_secrets_engines()["data"]} & {
        vault_paths.root,
        vault_paths.intermediate,
    }
    assert {vault_paths.root, vault_paths.intermediate} <= mounts(openbao)


def test_the_ca_manager_switches_builtin_to_vault_and_back(openbao, vault_paths, tmp_path):
    """End to end through the CA manager: after each switch (built-in -> Vault -> Vault with a
    new key type -> built-in) a new leaf verifies against the roots, and against the root
    that was active before the switch alone (the cross-signature); pruning the old roots
    releases the Vault mounts."""
    from trellis.api.ca.manager import CAManager
    from trellis.api.ca.secrets import Sealer
    from trellis.api.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'ca.db'}")
    try:
        manager = CAManager(store, datacenter=DC, sealer=Sealer(os.urandom(32)))
        manager.ensure_initialized()
        td = manager.trust_domain
        vault = vault_config(openbao, vault_paths)

        def new_leaf() -> list[x509.Certificate]:
            key = px.generate_key()
            csr = px.build_csr(key, spiffe.service_id(td, DC, "web"))
            pem = csr.public_bytes(serialization.Encoding.PEM).decode()
            signed = manager.sign_csr(pem, lambda _service: True)
            chain = [signed.cert, *signed.chain]
            px.verify_peer(chain, {td: manager.root_certs()})
            return chain

        def active_root() -> x509.Certificate:
            view, _ = manager.roots_view()
            (active,) = [r for r in view["Roots"] if r["Active"]]
            return px.load_certs(active["RootCert"])[0]

        new_leaf()
        for body in (
            {"Provider": "vault", "Config": vault},
            {
                "Provider": "vault",
                "Config": {**vault, "PrivateKeyType": "rsa", "PrivateKeyBits": 2048},
            },
            {"Provider": "consul", "Config": {}},
        ):
            old_root = active_root()
            manager.set_config(body)
            assert active_root() != old_root
            chain = new_leaf()
            px.verify_peer(chain, {td: [old_root]})  # through the cross-signed new root
        assert {vault_paths.root, vault_paths.intermediate} <= mounts(openbao)
        assert manager.prune(now=time.time() + 10 * 365 * 86400) == 3
        assert not {vault_paths.root, vault_paths.intermediate} & mounts(openbao)
    finally:
        store.close()


# -- failures --------------------------------------------------------------------------------


def test_vault_down_is_retryable_and_quick(tmp_path, vault_paths):
    spare = start_bao(tmp_path / "spare")
    try:
        p = provider(spare, vault_paths)
        p.generate_root()
        csr_pem, info = checked_csr()
        p.sign_leaf(csr_pem, info, LEAF_TTL)
    finally:
        spare.stop()
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as e:
        p.sign_leaf(csr_pem, info, LEAF_TTL)
    assert time.monotonic() - t0 < 5
    assert e.value.retryable is True
    assert spare.address in e.value.message
    assert spare.token not in e.value.message


def test_nothing_listening_is_retryable(vault_paths, dead_url):
    p = VaultProvider()
    p.configure(options(), {**GOOD, "Address": dead_url})
    t0 = time.monotonic()
    with pytest.raises(ProviderError, match="cannot reach Vault") as e:
        p.generate_root()
    assert time.monotonic() - t0 < 5
    assert e.value.retryable is True


def test_proxy_settings_in_the_environment_are_ignored(openbao, vault_paths, monkeypatch, dead_url):
    """The configuration decides where the token goes, not HTTP(S)_PROXY: here the proxy is a
    closed port, so going through it would fail."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    provider(openbao, vault_paths).generate_root()


def test_a_bad_token_is_not_retryable(openbao, vault_paths):
    p = VaultProvider()
    p.configure(options(), vault_config(openbao, vault_paths, Token="not-a-real-token"))
    with pytest.raises(ProviderError, match="permission denied") as e:
        p.generate_root()
    assert e.value.retryable is False
    assert "not-a-real-token" not in e.value.message
    assert not {vault_paths.root, vault_paths.intermediate} & mounts(openbao)


def _token_that_cannot_create_roles(server, paths: MountPaths) -> str:
    admin = server.client()
    name = f"no-roles-{paths.root}"
    rules = f"""
path "sys/mounts" {{ capabilities = ["read"] }}
path "sys/mounts/*" {{ capabilities = ["create", "read", "update", "delete", "sudo"] }}
path "{paths.root}/*" {{ capabilities = ["create", "read", "update", "delete", "list"] }}
path "{paths.intermediate}/*" {{ capabilities = ["create", "read", "update", "delete", "list"] }}
path "{paths.intermediate}/roles/*" {{ capabilities = ["deny"] }}
"""
    admin.sys.create_or_update_policy(name=name, policy=rules)
    return admin.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]


def test_a_failed_generate_root_leaves_nothing_behind(openbao, vault_paths):
    token = _token_that_cannot_create_roles(openbao, vault_paths)
    before = mounts(openbao)
    p = provider(openbao, vault_paths, Token=token)
    with pytest.raises(ProviderError, match="create role") as e:
        p.generate_root()  # fails at the last step, after mounts, root and intermediate
    assert e.value.retryable is False
    assert mounts(openbao) == before  # the mounts it enabled are gone again

    # Set up again on the same server and paths, now allowed to: no leftovers trip it up.
    material = provider(openbao, vault_paths).generate_root()
    assert {vault_paths.root, vault_paths.intermediate} <= mounts(openbao)
    assert len(issuers(openbao, vault_paths.root)) == 1
    assert len(issuers(openbao, vault_paths.intermediate)) == 1
    assert material.state["mounts_created"] == [vault_paths.root, vault_paths.intermediate]


def test_a_failed_generate_root_keeps_existing_mounts_but_removes_its_issuers(openbao, vault_paths):
    admin = openbao.client()
    for path in (vault_paths.root, vault_paths.intermediate):
        admin.sys.enable_secrets_engine("pki", path=path, description="operator's")
    token = _token_that_cannot_create_roles(openbao, vault_paths)
    with pytest.raises(ProviderError):
        provider(openbao, vault_paths, Token=token).generate_root()
    for path in (vault_paths.root, vault_paths.intermediate):
        assert path in mounts(openbao)
        assert issuers(openbao, path) == {}
        assert keys(openbao, path) == {}
    assert roles(openbao, vault_paths.intermediate) == []
    # The operator's mounts had the default 768h maximum: it was raised for the 10-year root.
    material = provider(openbao, vault_paths).generate_root()
    assert material.cert.not_valid_after_utc - material.cert.not_valid_before_utc > dt.timedelta(
        days=3649
    )
    assert material.state["mounts_created"] == []
    mount = openbao.client().sys.list_mounted_secrets_engines()["data"][vault_paths.root + "/"]
    assert mount["description"] != MOUNT_MARK
    # Emptied by cleanup, the operator's mounts still stay: only marked mounts are disabled.
    provider(openbao, vault_paths).cleanup(material.state)
    for path in (vault_paths.root, vault_paths.intermediate):
        assert path in mounts(openbao)
        assert issuers(openbao, path) == {}


def test_two_setups_on_the_same_paths_do_not_collide(openbao, vault_paths):
    a = provider(openbao, vault_paths).generate_root()
    b = provider(openbao, vault_paths).generate_root()
    assert px.fingerprint(a.cert) != px.fingerprint(b.cert)
    assert len(issuers(openbao, vault_paths.root)) == 2


def test_replicas_setting_up_at_once_all_succeed(openbao, vault_paths):
    """Several set-ups race to enable the same fresh mounts; none may fail or undo another's."""
    providers = [provider(openbao, vault_paths) for _ in range(4)]
    barrier = threading.Barrier(len(providers))
    results: list = [None] * len(providers)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = providers[i].generate_root()
        except ProviderError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(providers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(not isinstance(r, ProviderError) and r is not None for r in results), results
    assert len({px.fingerprint(r.cert) for r in results}) == len(providers)
    for p, r in zip(providers, results, strict=True):
        leaf, chain = p.sign_leaf(*checked_csr(), LEAF_TTL)
        px.verify_peer([leaf, *chain], {TD: [r.cert]})


# -- configuration through the API: checked against Vault, recoverable (issue 9, item 5) --------

CONFIG = "/v1/connect/ca/configuration"
SIGN = "/v1/connect/ca/sign"
BAD_TOKEN = "not-a-real-token-7f3a"


def child_token(server, *, policies: tuple[str, ...] = ("root",)) -> str:
    """A token of its own (revoking it leaves the session's root token alone)."""
    created = server.client().auth.token.create(policies=list(policies), ttl="30m")
    return created["auth"]["client_token"]


def read_only_token(server, paths: MountPaths) -> str:
    """A token that can read the CA's mounts (and itself) but not sign with them."""
    name = f"read-only-{paths.root}"
    rules = f"""
path "sys/mounts" {{ capabilities = ["read"] }}
path "{paths.root}/*" {{ capabilities = ["read", "list"] }}
path "{paths.intermediate}/*" {{ capabilities = ["read", "list"] }}
"""
    server.client().sys.create_or_update_policy(name=name, policy=rules)
    return child_token(server, policies=(name,))


def put_vault(c, server, paths: MountPaths, **extra):
    return c.put(CONFIG, json={"Provider": "vault", "Config": vault_config(server, paths, **extra)})


def api_ok(resp, status: int = 200):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    return resp


def api_sign(c):
    td = c.get("/v1/connect/ca/roots").get_json()["TrustDomain"]
    return c.post(SIGN, json={"CSR": service_csr(td, "web")})


def api_state(c) -> tuple[dict, dict]:
    return api_ok(c.get(CONFIG)).get_json(), api_ok(c.get("/v1/connect/ca/roots")).get_json()


def active_root(c) -> x509.Certificate:
    roots = c.get("/v1/connect/ca/roots").get_json()
    [active] = [r for r in roots["Roots"] if r["Active"]]
    return px.load_certs(active["RootCert"])[0]


def test_a_token_vault_refuses_is_a_400_that_says_what_vault_answered(
    app_client, openbao, vault_paths
):
    c = app_client
    before, mounts_before = api_state(c), mounts(openbao)
    # Switching to Vault with a bad token: it was a 503 "could not make a root".
    r = put_vault(c, openbao, vault_paths, Token=BAD_TOKEN)
    error = assert_api_error(r, 400, "permission denied")
    assert "auth/token/lookup-self" in error
    assert api_state(c) == before
    assert mounts(openbao) == mounts_before

    api_ok(put_vault(c, openbao, vault_paths, Token=child_token(openbao)))
    on_vault = api_state(c)
    api_ok(api_sign(c))
    # A bad token for the Vault in use: it was a 200, and then every CSR a 503.
    r = put_vault(c, openbao, vault_paths, Token=BAD_TOKEN)
    assert_api_error(r, 400, "permission denied")
    # A token Vault knows but that may not sign leaves with the CA's role.
    r = put_vault(c, openbao, vault_paths, Token=read_only_token(openbao, vault_paths))
    error = assert_api_error(r, 400, "the token may not sign leaves")
    assert f"{vault_paths.intermediate}/sign/trellis-leaf-" in error
    assert api_state(c) == on_vault
    api_ok(api_sign(c))


def test_the_vault_configuration_reads_back_as_written(app_client, openbao, vault_paths):
    """As the built-in provider's: the durations were read back as ``72h0m0s``."""
    c = app_client
    api_ok(put_vault(c, openbao, vault_paths, LeafCertTTL="72h", IntermediateCertTTL="9000h"))
    cfg = api_ok(c.get(CONFIG)).get_json()
    assert cfg["Provider"] == "vault"
    assert (cfg["Config"]["LeafCertTTL"], cfg["Config"]["IntermediateCertTTL"]) == ("72h", "9000h")
    assert cfg["Config"]["RootCertTTL"] == "87600h"  # Consul's default, spelt as Consul's
    assert "Token" not in cfg["Config"]
    api_ok(api_sign(c))


def assert_api_error(resp, status: int, contains: str) -> str:
    body = resp.get_json()
    assert (resp.status_code, body["status"]) == (status, status), body
    assert contains in body["error"], body
    assert BAD_TOKEN not in body["error"]
    return str(body["error"])


def on_vault_with_a_revoked_token(c, server, paths: MountPaths) -> tuple[str, x509.Certificate]:
    """Switch the CA to Vault with a token of its own, sign once, revoke the token; return the
    trust domain and the Vault root."""
    token = child_token(server)
    api_ok(put_vault(c, server, paths, Token=token))
    api_ok(api_sign(c))
    server.client().auth.token.revoke(token)
    return c.get("/v1/connect/ca/roots").get_json()["TrustDomain"], active_root(c)


def test_a_revoked_token_is_recovered_by_a_plain_configuration_change(
    app_client, openbao, vault_paths
):
    c = app_client
    td, vault_root = on_vault_with_a_revoked_token(c, openbao, vault_paths)

    # Every CSR fails, and says what to do.
    r = api_sign(c)
    error = assert_api_error(r, 503, "permission denied")
    assert "PUT /v1/connect/ca/configuration" in error
    # Back to the built-in CA: the new root cannot be cross-signed (its key is in Vault, out of
    # reach): refused, saying why and both ways out.
    before = api_state(c)
    r = c.put(CONFIG, json={"Provider": "consul", "Config": {}})
    error = assert_api_error(r, 400, "permission denied")
    for words in ("cross-signed with the current root's key", "Token", "ForceWithoutCrossSigning"):
        assert words in error
    assert api_state(c) == before

    # Way out 1: a working token for the same Vault, no new root; then the switch cross-signs.
    api_ok(put_vault(c, openbao, vault_paths, Token=child_token(openbao)))
    assert api_state(c)[1] == before[1]
    api_ok(api_sign(c))
    api_ok(c.put(CONFIG, json={"Provider": "consul", "Config": {}}))
    leaf, chain = leaf_and_chain(api_ok(api_sign(c)).get_json())
    assert active_root(c) != vault_root
    px.verify_peer([leaf, *chain], {td: [vault_root]})  # through the cross-signed new root


def test_a_new_token_in_a_rotating_change_cross_signs_and_force_still_works(
    app_client, openbao, vault_paths
):
    c = app_client
    td, vault_root = on_vault_with_a_revoked_token(c, openbao, vault_paths)
    # A new token and a new key type at once: the new token reaches the old root to
    # cross-sign the new one (it was a 503: the old provider was tried with the dead token).
    second = child_token(openbao)
    api_ok(put_vault(c, openbao, vault_paths, Token=second, PrivateKeyType="rsa",
                     PrivateKeyBits=2048))  # fmt: skip
    rsa_root = active_root(c)
    assert isinstance(rsa_root.public_key(), rsa.RSAPublicKey)
    leaf, chain = leaf_and_chain(api_ok(api_sign(c)).get_json())
    px.verify_peer([leaf, *chain], {td: [vault_root]})
    # Way out 2, as the refusal says: forced, without cross-signing.
    openbao.client().auth.token.revoke(second)
    api_ok(c.put(CONFIG, json={"Provider": "consul", "ForceWithoutCrossSigning": True}))
    leaf, chain = leaf_and_chain(api_ok(api_sign(c)).get_json())
    assert chain == []
    px.verify_peer([leaf], {td: [active_root(c)]})


# -- secrets ---------------------------------------------------------------------------------


def test_the_token_never_shows(openbao, vault_paths, caplog):
    caplog.set_level(logging.DEBUG)
    p = provider(openbao, vault_paths, TLSSkipVerify=True)
    old = p.generate_root()
    new = p.generate_root()
    p.cross_sign(new.cert)
    p.sign_leaf(*checked_csr(), LEAF_TTL)
    with pytest.raises(ProviderError) as refused:
        p.sign_leaf(*csr_for(td="evil.example"), LEAF_TTL)
    p.cleanup(old.state)
    visible = [
        str(old.state),
        repr(dict(old.state)),
        json.dumps(dict(new.state)),
        repr(p),
        str(p.__dict__.get("_settings")),
        refused.value.message,
        *(r.getMessage() for r in caplog.records),
    ]
    assert caplog.records  # the provider and the HTTP stack did log something
    for text in visible:
        assert openbao.token not in text


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openbao_tls(tmp_path_factory):
    server = start_bao(tmp_path_factory.mktemp("openbao-tls"), tls=True)
    yield server
    server.stop()


def test_tls_with_ca_file_and_server_name(openbao_tls, vault_paths):
    p = provider(openbao_tls, vault_paths, CAFile=openbao_tls.ca_file)
    material = p.generate_root()
    leaf, chain = p.sign_leaf(*checked_csr(), LEAF_TTL)
    px.verify_peer([leaf, *chain], {TD: [material.cert]})

    named = provider(
        openbao_tls, vault_paths, CAFile=openbao_tls.ca_file, TLSServerName="localhost"
    )
    named.load_root(material.cert, material.state)

    wrong = provider(
        openbao_tls, vault_paths, CAFile=openbao_tls.ca_file, TLSServerName="wrong.invalid"
    )
    with pytest.raises(ProviderError, match="TLS") as e:
        wrong.load_root(material.cert, material.state)
    assert e.value.retryable is False


@insecure_on_purpose
def test_tls_without_the_ca_is_refused_unless_skip_verify(openbao_tls, vault_paths):
    untrusting = provider(openbao_tls, vault_paths)
    with pytest.raises(ProviderError, match="TLS") as e:
        untrusting.generate_root()
    assert e.value.retryable is False
    assert vault_paths.root not in mounts(openbao_tls)
    provider(openbao_tls, vault_paths, TLSSkipVerify=True).generate_root()


ENV_IGNORED = """
import datetime as dt, json, sys
import hvac
from trellis.api.ca.provider import CAOptions
from trellis.api.ca.vault import VaultProvider

address, token, ca_file, root, intermediate = sys.argv[1:6]
# The control: hvac's own defaults do pick the client certificate up from this environment
# (a missing file here), so the provider's success below is not for want of one.
try:
    hvac.Client(url=address, token=token, verify=ca_file).sys.read_health_status(method="GET")
except OSError as e:
    control = str(e)
else:
    control = ""
p = VaultProvider()
p.configure(
    CAOptions(
        trust_domain=sys.argv[6], datacenter="dc1", leaf_ttl=dt.timedelta(hours=72),
        intermediate_ttl=dt.timedelta(days=365), root_ttl=dt.timedelta(days=3650),
        key_type="ec", key_bits=256,
    ),
    {"Address": address, "Token": token, "CAFile": ca_file,
     "RootPKIPath": root, "IntermediatePKIPath": intermediate},
)
material = p.generate_root()
print(json.dumps({"control": control, "root": material.cert.subject.rfc4514_string()}))
"""


def test_vault_client_settings_from_the_environment_are_ignored(openbao_tls, vault_paths, tmp_path):
    """The configuration decides which client certificate goes to Vault, not hvac's
    VAULT_CLIENT_CERT/VAULT_CLIENT_KEY (read from the environment when hvac is imported, so
    the provider runs in a process of its own here). A certificate that leaked in would be
    sent to the server (here: a missing file, so every request would fail)."""
    env = {
        **os.environ,
        "VAULT_CLIENT_CERT": str(tmp_path / "no-such-client.pem"),
        "VAULT_CLIENT_KEY": str(tmp_path / "no-such-client.key"),
        "VAULT_CACERT": str(tmp_path / "no-such-ca.pem"),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            ENV_IGNORED,
            openbao_tls.address,
            openbao_tls.token,
            str(openbao_tls.ca_file),
            vault_paths.root,
            vault_paths.intermediate,
            TD,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "no-such-client.pem" in got["control"], got
    assert vault_paths.root in mounts(openbao_tls)
