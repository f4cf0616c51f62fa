"""Leaves carry Key Usage digitalSignature alone, and that is all mutual TLS needs
(issue 9, item 12).

EC leaves used to carry keyAgreement (and RSA leaves keyEncipherment) while the README lists
digitalSignature only. SPIFFE's X509-SVID makes digitalSignature a MUST and the other two MAY;
TLS 1.3, and TLS 1.2's ECDHE suites, use the certificate's key only to sign the handshake (the
key exchange is ephemeral), so the two extra usages would only serve TLS 1.2's static key
exchanges, which the mesh does not offer. Decision: digitalSignature only, on both providers
(the Vault role's ``key_usage`` too; tests/test_ca_vault.py). Here: the profile, and real
mutual-TLS handshakes (OpenSSL through ``ssl``, memory BIOs) between such leaves.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from trellis.proxy import spiffe
from trellis.proxy import x509 as px

TD = "11111111-2222-3333-4444-555555555555.consul"
ROOT_KEY = px.generate_key()
ROOT = px.build_ca(
    public_key=ROOT_KEY.public_key(),
    trust_domain=TD,
    common_name="Trellis test root",
    signer_key=ROOT_KEY,
    signer=None,
    ttl=dt.timedelta(days=1),
)
ONLY_DIGITAL_SIGNATURE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _leaf(service: str, key_type: str) -> tuple[x509.Certificate, px.PrivateKey]:
    key = px.generate_key(key_type, 256 if key_type == "ec" else 2048)
    csr = px.build_csr(key, spiffe.service_id(TD, "dc1", service))
    info = px.check_csr(csr, trust_domain=TD)
    leaf = px.build_leaf(info, issuer=ROOT, issuer_key=ROOT_KEY, ttl=dt.timedelta(hours=1))
    return leaf, key


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_a_leaf_has_key_usage_digital_signature_only(key_type: str) -> None:
    leaf, _ = _leaf("web", key_type)
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value == ONLY_DIGITAL_SIGNATURE


def _context(side: int, leaf, key, tmp_path: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    # Hostname checking is off because the peer is judged by its SPIFFE URI SAN (verify_peer
    # below), as the sidecar does; chain verification (and OpenSSL's purpose and key usage
    # checks of each leaf) stays on, both ways.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ctx.maximum_version = version
    name = "server" if side == ssl.PROTOCOL_TLS_SERVER else "client"
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_text(px.cert_pem(leaf))
    key_file.write_text(px.key_pem(key))
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cadata=px.cert_pem(ROOT))
    return ctx


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, pipes) -> None:
    c_in, c_out, s_in, s_out = pipes
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, obj in (("client", client), ("server", server)):
            if done[side]:
                continue
            try:
                obj.do_handshake()
                done[side] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize(
    ("server_key", "client_key"), [("ec", "ec"), ("rsa", "rsa"), ("ec", "rsa")]
)
def test_mutual_tls_works_with_digital_signature_only(
    tmp_path: Path, version: ssl.TLSVersion, server_key: str, client_key: str
) -> None:
    server_leaf, server_private = _leaf("db", server_key)
    client_leaf, client_private = _leaf("web", client_key)
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, server_leaf, server_private, tmp_path, version)
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, client_leaf, client_private, tmp_path, version)
    pipes = (ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO())
    c_in, c_out, s_in, s_out = pipes
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)

    _handshake(client, server, pipes)

    assert (
        client.version()
        == server.version()
        == {
            ssl.TLSVersion.TLSv1_3: "TLSv1.3",
            ssl.TLSVersion.TLSv1_2: "TLSv1.2",
        }[version]
    )
    if version == ssl.TLSVersion.TLSv1_2:
        assert client.cipher()[0].startswith("ECDHE-")  # ephemeral: the key only signs
    seen_by_client = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
    seen_by_server = x509.load_der_x509_certificate(server.getpeercert(binary_form=True))
    assert px.verify_peer([seen_by_client], {TD: [ROOT]}).service == "db"
    assert px.verify_peer([seen_by_server], {TD: [ROOT]}).service == "web"
