"""The Connect CA endpoints, in-process: roots, configuration, CSR signing and agent leaves.

Every response is checked against openapi.yaml (``app_client`` and ``client`` both validate);
the tests that matter on both stores use ``client`` (SQLite and PostgreSQL), the others
``app_client``. Blocking reads run in a thread and are known to be parked before the write
that should wake them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests import api_fixtures
from tests.api_fixtures import InThread, assert_error, index_of, parked, wait_until
from tests.ca_support import (
    COLON_HEX,
    DC,
    RFC3339,
    GatedProvider,
    certs,
    custom_csr,
    leaf_and_chain,
    peer_ok,
    root_by_id,
    service_csr,
    to_pem,
)
from trellis.api.ca.manager import CAManager
from trellis.api.ca.secrets import Sealer
from trellis.api.errors import BadRequest, ConfigError, PermissionDenied, TooManyRequests
from trellis.api.settings import Settings, validate
from trellis.api.store import open_store
from trellis.proxy import spiffe
from trellis.proxy import x509 as px

client = api_fixtures.client
make_client = api_fixtures.make_client

ROOTS = "/v1/connect/ca/roots"
AGENT_ROOTS = "/v1/agent/connect/ca/roots"
CONFIG = "/v1/connect/ca/configuration"
SIGN = "/v1/connect/ca/sign"
ROTATE = "/v1/connect/ca/rotate"
#: A blocking query woken by a CA change must answer within this long of the change.
PROMPT = 1.0

DEFAULT_CONFIG = {
    "LeafCertTTL": "72h",
    "IntermediateCertTTL": "8760h",
    "RootCertTTL": "87600h",
    "PrivateKeyType": "ec",
    "PrivateKeyBits": 256,
    "CSRMaxPerSecond": 50,
    "CSRMaxConcurrent": 0,
}


def ok(resp, status: int = 200):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    return resp


def roots_of(c) -> dict:
    return ok(c.get(ROOTS)).get_json()


def config_of(c) -> dict:
    return ok(c.get(CONFIG)).get_json()


def put_config(c, config: dict | None = None, provider: str = "consul", **extra):
    return c.put(CONFIG, json={"Provider": provider, "Config": config or {}, **extra})


def sign(c, service: str = "web", key=None) -> dict:
    td = roots_of(c)["TrustDomain"]
    return ok(c.post(SIGN, json={"CSR": service_csr(td, service, key)})).get_json()


def block(c, url: str) -> InThread:
    """Start the blocking GET ``url``; return once it is parked on the change feed."""
    q = InThread(lambda: c.get(url)).start()
    wait_until(lambda: parked(c) >= 1 or q.done(), timeout=10)
    assert not q.done(), f"{url} answered at once: {q.result().status_code}"
    return q


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


# -- roots --------------------------------------------------------------------------------------


def test_roots_shape_pem_and_agent_roots(client):
    resp = ok(client.get(ROOTS))
    body = resp.get_json()
    assert set(body) == {"ActiveRootID", "TrustDomain", "Sequence", "Roots"}
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.trellis",
        body["TrustDomain"],
    ), body["TrustDomain"]
    assert body["Sequence"] == 1
    [root] = body["Roots"]
    cert = certs(root["RootCert"])[0]
    key_id = px.colon_hex(px.key_id(cert.public_key()))
    assert re.fullmatch(COLON_HEX, root["ID"]) and len(root["ID"]) == 59  # 20 bytes (SHA-1)
    assert root["ID"] == body["ActiveRootID"] == key_id
    assert root["SigningKeyID"] == key_id  # the built-in root signs leaves itself
    assert root["SerialNumber"] == px.serial_hex(cert.serial_number)
    assert re.fullmatch(r"Trellis CA [0-9a-f]{8}", root["Name"])
    assert re.fullmatch(RFC3339, root["NotBefore"]) and re.fullmatch(RFC3339, root["NotAfter"])
    assert parse_time(root["NotBefore"]) == cert.not_valid_before_utc
    assert parse_time(root["NotAfter"]) == cert.not_valid_after_utc
    assert (root["IntermediateCerts"], root["Active"]) == ([], True)
    assert (root["PrivateKeyType"], root["PrivateKeyBits"]) == ("ec", 256)
    assert root["ExternalTrustDomain"] == body["TrustDomain"]
    # The root is a CA whose one URI SAN is the trust domain's signing ID.
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{body['TrustDomain']}"
    ]
    assert index_of(resp) >= 1 and root["ModifyIndex"] == index_of(resp)
    # No internal or secret field of the stored record leaks.
    assert not {"ProviderState", "ProviderConfig", "RotatedOutAt", "Provider"} & set(root)

    agent = ok(client.get(AGENT_ROOTS))
    assert agent.get_data() == resp.get_data()
    assert index_of(agent) == index_of(resp)

    for url in (f"{ROOTS}?pem=true", f"{AGENT_ROOTS}?pem"):
        pem = ok(client.get(url))
        assert pem.mimetype == "application/pem-certificate-chain"
        assert pem.get_data(as_text=True) == root["RootCert"]
        assert index_of(pem) == index_of(resp)
    assert ok(client.get(f"{ROOTS}?pem=false")).mimetype == "application/json"
    assert_error(client.get(f"{ROOTS}?pem=maybe"), 400, "bad_request", "pem")


def test_rotation_wakes_blocking_roots_reads_and_sequence_rises(client):
    before = roots_of(client)
    idx = index_of(client.get(ROOTS))
    cluster = InThread(lambda: client.get(f"{ROOTS}?index={idx}&wait=10s")).start()
    agent = InThread(lambda: client.get(f"{AGENT_ROOTS}?index={idx}&wait=10s")).start()
    wait_until(lambda: parked(client) >= 2 or cluster.done() or agent.done(), timeout=10)
    assert not cluster.done() and not agent.done()
    t0 = time.monotonic()
    rotated = ok(client.post(ROTATE)).get_json()
    for q in (cluster, agent):
        r = ok(q.result())
        assert time.monotonic() - t0 < PROMPT
        assert index_of(r) > idx
        assert r.get_json() == rotated
    assert rotated["Sequence"] == before["Sequence"] + 1
    assert rotated["ActiveRootID"] != before["ActiveRootID"]
    assert [r["ID"] for r in rotated["Roots"]] == [before["ActiveRootID"], rotated["ActiveRootID"]]
    assert [r["Active"] for r in rotated["Roots"]] == [False, True]
    assert len(certs(ok(client.get(f"{ROOTS}?pem=true")).get_data(as_text=True))) == 2


def test_a_write_elsewhere_does_not_wake_a_roots_read(app_client):
    idx = index_of(app_client.get(ROOTS))
    q = block(app_client, f"{ROOTS}?index={idx}&wait=600ms")
    ok(app_client.put("/v1/kv/unrelated", data=b"x"))
    r = ok(q.result())
    assert q.elapsed >= 0.55
    assert index_of(r) == idx


def test_sequence_rises_on_every_change_of_the_roots(app_client):
    seq = [roots_of(app_client)["Sequence"]]
    ok(app_client.post(ROTATE))
    seq.append(roots_of(app_client)["Sequence"])
    ok(put_config(app_client, {"LeafCertTTL": "24h"}))  # no new root: no new sequence
    seq.append(roots_of(app_client)["Sequence"])
    ok(put_config(app_client, {"PrivateKeyType": "ec", "PrivateKeyBits": 384}))
    seq.append(roots_of(app_client)["Sequence"])
    ca = app_client.application.extensions["trellis"].ca
    assert ca.prune(now=time.time() + 10 * 365 * 86400) == 2
    seq.append(roots_of(app_client)["Sequence"])
    assert seq == [1, 2, 2, 3, 4]


# -- configuration ------------------------------------------------------------------------------


def test_default_configuration(app_client):
    resp = ok(app_client.get(CONFIG))
    body = resp.get_json()
    assert body == {
        "Provider": "builtin",
        "Config": DEFAULT_CONFIG,
        "State": None,
        "ForceWithoutCrossSigning": False,
        "CreateIndex": index_of(resp),
        "ModifyIndex": index_of(resp),
    }


def test_consul_alias_and_a_ttl_only_change_does_not_rotate(client):
    before = roots_of(client)
    r = ok(put_config(client, {"LeafCertTTL": "24h", "CSRMaxPerSecond": 10}, provider="consul"))
    assert r.get_json() is True
    cfg = config_of(client)
    assert cfg["Provider"] == "consul"
    assert cfg["Config"] == {**DEFAULT_CONFIG, "LeafCertTTL": "24h", "CSRMaxPerSecond": 10}
    assert roots_of(client) == before  # same ActiveRootID, same Sequence, one root
    # A PUT replaces the whole configuration: what it leaves out returns to its default.
    ok(put_config(client, {}, provider="builtin"))
    assert config_of(client)["Config"] == DEFAULT_CONFIG
    assert roots_of(client) == before


def test_the_configuration_reads_back_as_written(client):
    """Consul keeps the configuration as it was written, and its clients (Terraform's plan,
    py-consul's tests) compare what they read with what they wrote: the provider's name was
    read back as ``builtin`` and every duration as Go's canonical ``72h0m0s``."""
    before = roots_of(client)
    written = {"LeafCertTTL": "72h", "IntermediateCertTTL": "9000h", "RootCertTTL": "90000h"}
    ok(put_config(client, written, provider="consul"))
    cfg = config_of(client)
    assert cfg["Provider"] == "consul"
    assert cfg["Config"] == {**DEFAULT_CONFIG, **written}
    # Spelt otherwise, read back otherwise; the meaning is checked as before.
    ok(put_config(client, {"LeafCertTTL": "4320m", "RootCertTTL": 360000000}, provider="builtin"))
    cfg = config_of(client)
    assert cfg["Provider"] == "builtin"
    assert (cfg["Config"]["LeafCertTTL"], cfg["Config"]["RootCertTTL"]) == ("4320m", 360000000)
    assert roots_of(client) == before
    # A rotation keeps the name it was given, as it keeps the rest of the configuration.
    ok(put_config(client, {"LeafCertTTL": "72h"}, provider="consul"))
    ok(client.post(ROTATE, json={}))
    assert config_of(client)["Provider"] == "consul"
    assert roots_of(client)["ActiveRootID"] != before["ActiveRootID"]
    assert_error(put_config(client, {"LeafCertTTL": "30m"}), 400, "bad_request", "LeafCertTTL")


def test_consul_go_client_bodies_and_a_read_configuration_are_accepted(app_client):
    """Consul's Go client (api.CAConfig, no omitempty) sends State null and the indexes zero;
    they were refused as unknown fields, so its CASetConfig (and ``consul connect ca
    set-config``) always failed. A configuration read back is accepted as it is, too."""
    before = roots_of(app_client)
    go_body = {
        "Provider": "consul",
        "Config": {"LeafCertTTL": "24h"},
        "State": None,
        "ForceWithoutCrossSigning": False,
        "CreateIndex": 0,
        "ModifyIndex": 0,
    }
    ok(app_client.put(CONFIG, json=go_body))
    read = config_of(app_client)
    assert read["Config"]["LeafCertTTL"] == "24h"
    ok(app_client.put(CONFIG, json=read))
    assert config_of(app_client)["Config"] == read["Config"]
    assert roots_of(app_client) == before


def test_a_key_type_change_rotates_with_a_cross_signed_root(client):
    before = roots_of(client)
    ok(put_config(client, {"PrivateKeyType": "rsa", "PrivateKeyBits": 2048}))
    after = roots_of(client)
    assert after["ActiveRootID"] != before["ActiveRootID"]
    assert after["Sequence"] == before["Sequence"] + 1
    old, new = after["Roots"]
    assert (old["ID"], old["Active"]) == (before["ActiveRootID"], False)
    assert (new["ID"], new["Active"]) == (after["ActiveRootID"], True)
    assert (new["PrivateKeyType"], new["PrivateKeyBits"]) == ("rsa", 2048)
    old_cert, new_cert = certs(old["RootCert"])[0], certs(new["RootCert"])[0]
    assert isinstance(new_cert.public_key(), rsa.RSAPublicKey)
    [cross] = [c for pem in new["IntermediateCerts"] for c in certs(pem)]
    # The new root's subject and key, issued by the old root.
    assert cross.subject == new_cert.subject
    assert cross.public_key() == new_cert.public_key()
    assert cross.issuer == old_cert.subject
    cross.verify_directly_issued_by(old_cert)
    assert cross.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cfg = config_of(client)["Config"]
    assert (cfg["PrivateKeyType"], cfg["PrivateKeyBits"]) == ("rsa", 2048)
    # Leaves are now signed by the RSA root.
    leaf, chain = leaf_and_chain(sign(client))
    leaf.verify_directly_issued_by(new_cert)
    assert [px.fingerprint(c) for c in chain] == [px.fingerprint(cross)]


def test_the_configuration_never_returns_a_secret(app_client):
    c = app_client
    td = roots_of(c)["TrustDomain"]
    key = px.generate_key()
    root = px.build_ca(
        public_key=key.public_key(),
        trust_domain=td,
        common_name="Operator Root",
        signer_key=key,
        signer=None,
        ttl=dt.timedelta(days=3650),
    )
    key_pem, root_pem = px.key_pem(key), px.cert_pem(root)
    # The key's base64 lines: none of them may appear anywhere, in any form.
    secret_lines = [ln for ln in key_pem.splitlines() if not ln.startswith("-----")]
    ok(put_config(c, {"PrivateKey": key_pem, "RootCert": root_pem}))
    roots = roots_of(c)
    active = next(r for r in roots["Roots"] if r["Active"])
    assert (active["RootCert"], active["Name"]) == (root_pem, "Operator Root")

    cfg = ok(c.get(CONFIG))
    assert "PrivateKey" not in cfg.get_json()["Config"]
    assert cfg.get_json()["Config"]["RootCert"] == root_pem
    idx = index_of(cfg)
    bodies = [
        cfg,
        ok(c.get(f"{CONFIG}?pretty")),
        ok(c.get(f"{CONFIG}?index={idx}&wait=10ms")),
        ok(c.get(ROOTS)),
        ok(c.get(f"{ROOTS}?pem=true")),
        ok(c.get(AGENT_ROOTS)),
        ok(c.get("/v1/agent/connect/ca/leaf/web")),
    ]
    for resp in bodies:
        text = resp.get_data(as_text=True)
        for line in secret_lines:
            assert line not in text, resp.request.path
    # At rest, too: the key is sealed in every CA document of the store.
    store = c.application.extensions["trellis"].store
    docs = json.dumps(store.system_get("ca/config")) + json.dumps(store.system_get("ca/roots"))
    for line in secret_lines:
        assert line not in docs
    # And the operator's root signs: a new leaf chains to it.
    leaf, _ = leaf_and_chain(sign(c))
    leaf.verify_directly_issued_by(root)


def test_a_custom_root_of_another_trust_domain_is_refused(app_client):
    before = (config_of(app_client), roots_of(app_client))
    key = px.generate_key()
    root = px.build_ca(
        public_key=key.public_key(),
        trust_domain="11111111-2222-3333-4444-555555555555.trellis",
        common_name="Foreign",
        signer_key=key,
        signer=None,
        ttl=dt.timedelta(days=3650),
    )
    r = put_config(app_client, {"PrivateKey": px.key_pem(key), "RootCert": px.cert_pem(root)})
    body = assert_error(r, 400, "bad_request", "RootCert must carry exactly the URI SAN")
    assert "PRIVATE KEY" not in body["error"]
    r = put_config(app_client, {"PrivateKey": px.key_pem(key), "RootCert": "not a cert"})
    assert_error(r, 400, "bad_request", "do not parse")
    assert (config_of(app_client), roots_of(app_client)) == before


BAD_CONFIGS = [
    ({"Provider": "consul", "Config": {"LeafCertTTL": "30m"}}, "LeafCertTTL: must be between 1h"),
    ({"Provider": "consul", "Config": {"LeafCertTTL": "8761h"}}, "LeafCertTTL: must be between"),
    ({"Provider": "consul", "Config": {"LeafCertTTL": "soon"}}, "Config.LeafCertTTL"),
    ({"Provider": "consul", "Config": {"LeafCertTTL": 72}}, "Config.LeafCertTTL"),
    (
        {"Provider": "consul", "Config": {"IntermediateCertTTL": "100h"}},
        "IntermediateCertTTL: must be at least 3 x LeafCertTTL",
    ),
    (
        {"Provider": "consul", "Config": {"RootCertTTL": "9000h", "IntermediateCertTTL": "9999h"}},
        "RootCertTTL: must be at least IntermediateCertTTL",
    ),
    ({"Provider": "consul", "Config": {"PrivateKeyType": "dsa"}}, "PrivateKeyType: must be ec"),
    (
        {"Provider": "consul", "Config": {"PrivateKeyBits": 224}},
        "PrivateKeyBits: must be one of 256, 384, 521 for ec",
    ),
    (
        {"Provider": "consul", "Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 1024}},
        "PrivateKeyBits: must be one of 2048, 3072, 4096 for rsa",
    ),
    (
        {"Provider": "consul", "Config": {"PrivateKeyType": "rsa"}},  # 256 bits of RSA
        "PrivateKeyBits: must be one of 2048, 3072, 4096 for rsa",
    ),
    ({"Provider": "consul", "Config": {"PrivateKeyBits": "256"}}, "Config.PrivateKeyBits"),
    ({"Provider": "consul", "Config": {"PrivateKeyBits": True}}, "Config.PrivateKeyBits"),
    ({"Provider": "consul", "Config": {"CSRMaxPerSecond": "fast"}}, "CSRMaxPerSecond: must be"),
    ({"Provider": "consul", "Config": {"CSRMaxPerSecond": -1}}, "CSRMaxPerSecond: must be"),
    ({"Provider": "consul", "Config": {"CSRMaxConcurrent": 1.5}}, "CSRMaxConcurrent: Not a valid"),
    ({"Provider": "consul", "Config": {"CSRMaxConcurrent": -1}}, "CSRMaxConcurrent: must be"),
    (
        {"Provider": "consul", "Config": {"Colour": "red"}},
        "Config.Colour: is not a setting of the builtin provider",
    ),
    (
        {"Provider": "consul", "Config": {"Address": "http://127.0.0.1:8200"}},
        "Config.Address: is not a setting of the builtin provider",
    ),
    ({"Provider": "consul", "Config": {"RootCert": 5}}, "Config.RootCert: Not a valid string."),
    (
        {"Provider": "consul", "Config": {"PrivateKey": "x"}},
        "PrivateKey and RootCert must be given together",
    ),
    ({"Provider": "consul", "Config": []}, "Config: must be an object"),
    ({"Provider": "consul", "Config": ""}, "Config: must be an object"),
    ({"Provider": "consul", "Config": "x"}, "Config: must be an object"),
    ({"Provider": "consul", "Colour": "red"}, "Colour: Unknown field."),
    ({"Config": {}}, "Provider: is required"),
    ({"Provider": ""}, "Provider: is required"),
    ({"Provider": "aws-pca"}, "Provider: must be builtin (alias consul) or vault"),
    ({"Provider": "consul", "ForceWithoutCrossSigning": "yes"}, "ForceWithoutCrossSigning: must"),
    ({"Provider": "vault", "Config": {}}, "Config.Address: is required for the vault provider"),
    (
        {"Provider": "vault", "Config": {"Address": "http://127.0.0.1:8200"}},
        "Config.Token: is required for the vault provider",
    ),
    (
        {"Provider": "vault", "Config": {"Address": 8200, "Token": "t"}},
        "Config.Address: Not a valid string.",
    ),
    (
        {"Provider": "vault", "Config": {"Address": "a", "Token": "t", "TLSSkipVerify": "yes"}},
        "Config.TLSSkipVerify: must be true or false",
    ),
    (["Provider", "consul"], "request body must be a JSON object"),
]


def test_configuration_errors_are_400_with_a_clear_message_and_change_nothing(app_client):
    c = app_client
    before = (config_of(c), roots_of(c))
    for body, message in BAD_CONFIGS:
        r = c.put(CONFIG, json=body)
        assert r.status_code == 400, (body, r.status_code, r.get_data(as_text=True))
        got = assert_error(r, 400, "bad_request")
        assert message in got["error"], (body, got["error"])
    r = c.put(CONFIG, data=b"{nope", content_type="application/json")
    assert_error(r, 400, "bad_request", "not valid JSON")
    assert_error(c.put(CONFIG), 400, "bad_request", "empty")
    assert (config_of(c), roots_of(c)) == before


def test_a_ttl_change_wakes_a_blocking_configuration_read(app_client):
    resp = ok(app_client.get(CONFIG))
    idx = index_of(resp)
    q = block(app_client, f"{CONFIG}?index={idx}&wait=10s")
    t0 = time.monotonic()
    ok(put_config(app_client, {"LeafCertTTL": "12h"}))
    r = ok(q.result())
    assert time.monotonic() - t0 < PROMPT
    assert index_of(r) > idx
    assert r.get_json()["Config"]["LeafCertTTL"] == "12h"


def test_rotate_body_errors(app_client):
    before = roots_of(app_client)
    assert_error(app_client.post(ROTATE, json={"Colour": 1}), 400, "bad_request", "Colour")
    assert_error(
        app_client.post(ROTATE, json={"ForceWithoutCrossSigning": "yes"}),
        400,
        "bad_request",
        "ForceWithoutCrossSigning: must be true or false",
    )
    assert_error(app_client.post(ROTATE, json=[1]), 400, "bad_request", "JSON object")
    assert roots_of(app_client) == before
    # Forcing is allowed when the provider can cross-sign; it still cross-signs.
    after = ok(app_client.post(ROTATE, json={"ForceWithoutCrossSigning": True})).get_json()
    assert len(after["Roots"]) == 2
    assert len(after["Roots"][1]["IntermediateCerts"]) == 1


# -- signing ------------------------------------------------------------------------------------


def test_sign_a_good_csr(client):
    roots = roots_of(client)
    td = roots["TrustDomain"]
    key = px.generate_key("ec", 384)
    issued = sign(client, "web", key)
    assert set(issued) == {
        "SerialNumber",
        "CertPEM",
        "PrivateKeyPEM",
        "Service",
        "ServiceURI",
        "RootID",
        "ValidAfter",
        "ValidBefore",
        "Namespace",
        "CreateIndex",
        "ModifyIndex",
    }
    uri = f"spiffe://{td}/ns/default/dc/{DC}/svc/web"
    assert (issued["Service"], issued["ServiceURI"], issued["Namespace"]) == ("web", uri, "default")
    assert issued["PrivateKeyPEM"] == ""  # the key never left us
    assert issued["RootID"] == roots["ActiveRootID"]
    leaf, chain = leaf_and_chain(issued)
    assert chain == []  # the built-in root signs leaves directly
    assert leaf.public_key() == key.public_key()
    assert issued["SerialNumber"] == px.serial_hex(leaf.serial_number)
    assert parse_time(issued["ValidAfter"]) == leaf.not_valid_before_utc
    assert parse_time(issued["ValidBefore"]) == leaf.not_valid_after_utc
    life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert abs(life - 72 * 3600) <= 120  # LeafCertTTL, plus the back-dating for clock skew
    # The CA's profile, whatever the CSR asked.
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    root = root_by_id(roots)[roots["ActiveRootID"]]
    assert px.verify_peer([leaf], {td: [root]}, expected_service="web").service == "web"

    # The lifetime follows LeafCertTTL.
    ok(put_config(client, {"LeafCertTTL": "24h"}))
    leaf, _ = leaf_and_chain(sign(client, "db"))
    life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert abs(life - 24 * 3600) <= 120


def _bad_csrs(td: str) -> list[tuple[str, object, str]]:
    """(why, request body, what the error says): CSRs and bodies the CA must refuse."""
    key = px.generate_key()
    web = f"spiffe://{td}/ns/default/dc/{DC}/svc/web"
    good = service_csr(td, "web", key)
    der_tampered = bytearray(px.load_csr(good).public_bytes(_der()))
    der_tampered[-1] ^= 0x01  # a bit of the signature
    tampered = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der_tampered)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    p224 = ec.generate_private_key(ec.SECP224R1())
    cert_pem = px.cert_pem(
        px.build_ca(
            public_key=key.public_key(),
            trust_domain=td,
            common_name="x",
            signer_key=key,
            signer=None,
            ttl=dt.timedelta(days=1),
        )
    )
    csr = lambda *a, **kw: {"CSR": custom_csr(*a, **kw)}  # noqa: E731
    return [
        (
            "two URI SANs (CVE-2022-40716)",
            csr(key, [web, f"spiffe://{td}/ns/default/dc/{DC}/svc/db"]),
            "exactly one URI SAN, it names 2",
        ),
        ("no URI SAN, only a DNS name", csr(key, dns=["web.example"]), "it names 0"),
        (
            "a foreign trust domain",
            csr(key, [f"spiffe://evil.trellis/ns/default/dc/{DC}/svc/web"]),
            "trust domain 'evil.trellis'",
        ),
        (
            "another datacenter",
            csr(key, [f"spiffe://{td}/ns/default/dc/dc9/svc/web"]),
            "datacenter 'dc9'",
        ),
        (
            "another namespace",
            csr(key, [f"spiffe://{td}/ns/other/dc/{DC}/svc/web"]),
            "namespace 'other'",
        ),
        ("the CA's own identity", csr(key, [f"spiffe://{td}"]), "not a service identity"),
        (
            "a path trick",
            csr(key, [f"spiffe://{td}/ns/default/dc/{DC}/svc/../web"]),
            "not a service identity",
        ),
        ("a CA certificate", csr(key, [web], ca=True), "may not ask for a CA certificate"),
        ("certificate signing", csr(key, [web], key_cert_sign=True), "certificate or CRL"),
        ("a bad signature", {"CSR": tampered}, "signature does not verify"),
        ("a weak key (RSA-1024)", csr(weak, [web]), "RSA-1024 is not allowed"),
        ("a weak curve (P-224)", csr(p224, [web]), "EC curve secp224r1 is not allowed"),
        (
            "an Ed25519 key",
            csr(ed25519.Ed25519PrivateKey.generate(), [web]),
            "is not allowed (EC or RSA)",
        ),
        (
            "an oversize CSR",
            {"CSR": good.replace("-----END", "A" * 17000 + "\n-----END")},
            "larger than 16384 bytes",
        ),
        (
            "malformed PEM",
            {
                "CSR": "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS\n"
                "-----END CERTIFICATE REQUEST-----\n"
            },
            "CSR does not parse",
        ),
        ("not PEM", {"CSR": "hello"}, "exactly one PEM 'CERTIFICATE REQUEST' block"),
        ("two CSRs", {"CSR": good + service_csr(td, "db")}, "exactly one PEM"),
        ("a certificate, not a CSR", {"CSR": cert_pem}, "exactly one PEM"),
        ("a CSR behind a certificate", {"CSR": cert_pem + good}, "exactly one PEM"),
        ("no CSR field", {}, "CSR: is required (a PEM certificate request)"),
        ("an empty CSR", {"CSR": ""}, "CSR: is required (a PEM certificate request)"),
        ("a CSR that is not a string", {"CSR": [good]}, "CSR: is required"),
        ("an unknown field", {"CSR": good, "Service": "db"}, "Service: Unknown field."),
        ("not an object", [good], "must be a JSON object"),
    ]


def _der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def test_sign_refuses_every_bad_csr_and_issues_nothing(app_client):
    td = roots_of(app_client)["TrustDomain"]
    for why, body, message in _bad_csrs(td):
        r = app_client.post(SIGN, json=body)
        assert r.status_code == 400, (why, r.status_code, r.get_data(as_text=True)[:300])
        got = assert_error(r, 400, "bad_request")
        assert message in got["error"], (why, got["error"])
        assert "BEGIN CERTIFICATE-----" not in r.get_data(as_text=True), why
        assert set(got) == {"error", "code", "status"}, why
    # A form post is read as JSON whatever its Content-Type (as Consul does), and is not JSON.
    r = app_client.post(SIGN, data=b"CSR=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400
    assert "BEGIN CERTIFICATE-----" not in r.get_data(as_text=True)
    # The same CSR, done right, is signed: the refusals were about what was wrong.
    assert sign(app_client)["Service"] == "web"


def test_sign_rate_limit_answers_429_with_retry_after(app_client):
    ok(put_config(app_client, {"CSRMaxPerSecond": 1}))
    td = roots_of(app_client)["TrustDomain"]
    csrs = [service_csr(td, "web") for _ in range(3)]
    answers = [app_client.post(SIGN, json={"CSR": c}) for c in csrs]
    # The bucket starts full: the first is signed at once, then the limit bites.
    assert [a.status_code for a in answers] == [200, 429, 429]
    for a in answers[1:]:
        assert_error(a, 429, "too_many_requests", "rate limit")
        assert "BEGIN CERTIFICATE-----" not in a.get_data(as_text=True)
    wait = int(answers[1].headers["Retry-After"])
    assert 1 <= wait <= 2
    time.sleep(wait)  # the server said when to retry; then it signs again
    ok(app_client.post(SIGN, json={"CSR": csrs[1]}))
    # No limit at all with 0.
    ok(put_config(app_client, {"CSRMaxPerSecond": 0}))
    for c in csrs:
        ok(app_client.post(SIGN, json={"CSR": c}))


def test_a_fractional_rate_still_signs(app_client):
    ok(put_config(app_client, {"CSRMaxPerSecond": 0.5}))
    td = roots_of(app_client)["TrustDomain"]
    assert ok(app_client.post(SIGN, json={"CSR": service_csr(td, "web")}))
    r = app_client.post(SIGN, json={"CSR": service_csr(td, "web")})
    assert_error(r, 429, "too_many_requests")
    assert int(r.headers["Retry-After"]) == 2


# -- configuration values that used to be 500s (issue 9, item 10) ------------------------------

#: Raw JSON, so that values Python's json module reads as infinity or as a huge int get sent.
OUT_OF_RANGE = [
    ('{"PrivateKeyType": {}}', "Config.PrivateKeyType: Not a valid string."),  # unhashable
    ('{"PrivateKeyType": []}', "Config.PrivateKeyType: Not a valid string."),
    ('{"CSRMaxPerSecond": 5e-324}', "between 0.001 and 1,000,000"),  # overflowed on signing
    ('{"CSRMaxPerSecond": 1e-300}', "between 0.001 and 1,000,000"),  # 40-digit Retry-After
    ('{"CSRMaxPerSecond": 0.0009}', "between 0.001 and 1,000,000"),
    ('{"CSRMaxPerSecond": 1000001}', "between 0.001 and 1,000,000"),
    # Numbers beyond a double (1e400 parsed as infinity) are refused with the body as a whole.
    ('{"CSRMaxPerSecond": 1e400}', "1e400 is too large for a number"),
    ('{"CSRMaxPerSecond": 1' + "0" * 400 + "}", "is too large for a number"),
    ('{"CSRMaxPerSecond": 1' + "0" * 300 + "}", "between 0.001 and 1,000,000"),
    ('{"CSRMaxConcurrent": 100001}', "CSRMaxConcurrent: must be 0 (no limit) to 100,000"),
    ('{"CSRMaxConcurrent": 1' + "0" * 300 + "}", "CSRMaxConcurrent: must be 0 (no limit)"),
    ('{"PrivateKeyBits": 1' + "0" * 300 + "}", "PrivateKeyBits: must be one of 256, 384"),
    ('{"LeafCertTTL": 1e300}', "LeafCertTTL: invalid duration"),
    ('{"RootCertTTL": "876001h"}', "RootCertTTL: duration '876001h' is longer than 100 years"),
    ('{"LeafCertTTL": true}', "LeafCertTTL: must be a duration such as 72h"),
    ('{"LeafCertTTL": null}', "LeafCertTTL: must be a duration such as 72h"),
]


@pytest.mark.parametrize(("config", "message"), OUT_OF_RANGE)
def test_out_of_range_configuration_is_a_400_naming_the_field_and_range(
    app_client, config, message
):
    before = (config_of(app_client), roots_of(app_client))
    body = '{"Provider": "consul", "Config": ' + config + "}"
    r = app_client.put(CONFIG, data=body, content_type="application/json")
    assert_error(r, 400, "bad_request", message)
    assert (config_of(app_client), roots_of(app_client)) == before
    # And the CA still signs, one CSR after another (the tiny rate made the second a 500).
    sign(app_client)
    sign(app_client)


def test_the_lowest_rate_waits_at_most_1000_seconds(app_client):
    ok(put_config(app_client, {"CSRMaxPerSecond": 0.001}))
    sign(app_client)
    td = roots_of(app_client)["TrustDomain"]
    r = app_client.post(SIGN, json={"CSR": service_csr(td, "web")})
    assert_error(r, 429, "too_many_requests")
    assert 1 <= int(r.headers["Retry-After"]) <= 1000


# Values that have broken configuration code somewhere: wrong types, the edges of the ranges,
# numbers Python reads as infinity or cannot turn into a float.
CA_NASTY = st.sampled_from(
    [None, True, False, 0, -1, 1, 0.5, 5e-324, 1e-300, 0.001, 0.0009, 1_000_000, 1_000_001,
     2**63, 10**400, float("inf"), "", "x", "72h", "1h", "30m", "8760h", "8761h", "876000h",
     "100000000h", "1e9", "-1h", "\u0000", "ec", "rsa", "dsa", 224, 256, 384, 521, [], {},
     ["ec"], {"Type": "token"}]
)  # fmt: skip
CA_FIELDS = [
    "LeafCertTTL", "IntermediateCertTTL", "RootCertTTL", "PrivateKeyType", "PrivateKeyBits",
    "CSRMaxPerSecond", "CSRMaxConcurrent", "PrivateKey", "RootCert", "Address", "Token",
    "TLSSkipVerify", "AuthMethod",
]  # fmt: skip
CA_CONFIGS = st.dictionaries(st.sampled_from(CA_FIELDS), CA_NASTY, max_size=4)
CA_BODIES = st.fixed_dictionaries(
    # Not "vault": its accepted configurations would talk to whatever Address says.
    {"Provider": st.sampled_from(["consul", "builtin"])},
    optional={
        "Config": CA_CONFIGS | CA_CONFIGS | CA_NASTY,
        "ForceWithoutCrossSigning": CA_NASTY,
        "State": CA_NASTY,
        "CreateIndex": CA_NASTY,
    },
) | st.dictionaries(st.sampled_from(["Provider", "Config", "Colour", ""]), CA_NASTY, max_size=3)


def _ca_body(config: dict) -> dict:
    return {"Provider": "consul", "Config": config}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=CA_BODIES)
# The attacks of issue 9 (item 10), always tried first.
@example(body=_ca_body({"PrivateKeyType": {}}))
@example(body=_ca_body({"CSRMaxPerSecond": 5e-324}))
@example(body=_ca_body({"CSRMaxPerSecond": 1e-300}))
@example(body=_ca_body({"CSRMaxPerSecond": 10**400}))
def test_random_ca_configurations_never_500(app_client, body):
    """Fuzz PUT /v1/connect/ca/configuration: never a 500, and whatever it accepts leaves a CA
    that answers CSRs (signed, or 429 with a sane Retry-After) and a readable configuration."""
    # json.dumps writes infinity as Infinity (refused as not JSON) and 10**400 as digits.
    r = app_client.put(CONFIG, data=json.dumps(body), content_type="application/json")
    assert r.status_code in (200, 400), r.get_data(as_text=True)
    if r.status_code == 400:
        assert_error(r, 400, "bad_request")
    td = roots_of(app_client)["TrustDomain"]
    for _ in range(2):  # the second CSR meets the rate limit, if there is one
        signed = app_client.post(SIGN, json={"CSR": service_csr(td, "web")})
        assert signed.status_code in (200, 429), signed.get_data(as_text=True)
        if signed.status_code == 429:
            assert 1 <= int(signed.headers["Retry-After"]) <= 1000
    config_of(app_client)
    # Back to the defaults, so that one example's rate limit does not throttle the next.
    ok(put_config(app_client, {"CSRMaxPerSecond": 0}))


def test_csr_max_concurrent(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'ca.db'}")
    entered, gate = threading.Event(), threading.Event()
    holder: list[CAManager] = []
    manager = CAManager(
        store,
        datacenter=DC,
        sealer=Sealer(os.urandom(32)),
        provider_factory=lambda name: GatedProvider(
            holder[0]._default_factory(name), entered.set, gate
        ),
    )
    holder.append(manager)
    try:
        manager.ensure_initialized()
        manager.set_config({"Provider": "consul", "Config": {"CSRMaxConcurrent": 1}})
        td = manager.trust_domain
        slow = InThread(lambda: manager.sign_csr(service_csr(td, "web"), lambda s: True)).start()
        assert entered.wait(10)
        with pytest.raises(TooManyRequests) as e:
            manager.sign_csr(service_csr(td, "db"), lambda s: True)
        assert e.value.headers["Retry-After"] == "1"
        gate.set()
        assert slow.result().identity.service == "web"
        # The slot is free again; and with CSRMaxConcurrent set, CSRMaxPerSecond is not used.
        manager.set_config(
            {"Provider": "consul", "Config": {"CSRMaxConcurrent": 1, "CSRMaxPerSecond": 1}}
        )
        for service in ("a", "b", "c"):
            assert manager.sign_csr(service_csr(td, service), lambda s: True)
    finally:
        gate.set()
        store.close()


def test_the_acl_decision_is_made_on_the_checked_identity_before_signing(tmp_path):
    """``may_sign`` is the caller's ACL decision on the identity a CSR asks for (what its token
    may sign). The pure CSR policy (``px.check_csr``) neither calls it nor raises the API's
    errors: the manager asks it once the CSR has passed, before anything is signed. A CSR the
    policy refuses is a 400 whatever the caller may sign (and it is not asked); a good CSR for
    a service the caller may not sign is Consul's 403, as the ACL check words it everywhere."""
    store = open_store(f"sqlite:///{tmp_path / 'ca.db'}")
    try:
        manager = CAManager(store, datacenter=DC, sealer=Sealer(os.urandom(32)))
        manager.ensure_initialized()
        td = manager.trust_domain
        asked: list[str] = []

        def may_sign(service: str) -> bool:
            asked.append(service)
            return service == "web"

        assert manager.sign_csr(service_csr(td, "web"), may_sign).identity.service == "web"
        with pytest.raises(PermissionDenied) as denied:
            manager.sign_csr(service_csr(td, "db"), may_sign)
        assert denied.value.status == 403
        assert denied.value.message == (
            "Permission denied: token lacks permission 'service:write on 'db''"
        )
        assert asked == ["web", "db"]
        with pytest.raises(BadRequest, match="CSR refused: the URI SAN is in trust domain"):
            manager.sign_csr(service_csr("other.trellis", "db"), may_sign)
        assert asked == ["web", "db"], "asked about a CSR the policy refused"

        # An unknown token is refused by the caller's own check: it passes through unchanged.
        def unknown_token(service: str) -> bool:
            raise PermissionDenied("ACL not found")

        with pytest.raises(PermissionDenied, match="ACL not found"):
            manager.sign_csr(service_csr(td, "web"), unknown_token)
    finally:
        store.close()


def test_csr_max_concurrent_over_http(app_client):
    ok(put_config(app_client, {"CSRMaxConcurrent": 2}))
    assert config_of(app_client)["Config"]["CSRMaxConcurrent"] == 2
    for _ in range(3):  # one at a time: never over the limit
        sign(app_client)


# -- agent leaves -------------------------------------------------------------------------------

LEAF = "/v1/agent/connect/ca/leaf/"


def test_agent_leaf_shape_and_cache(client):
    roots = roots_of(client)
    td = roots["TrustDomain"]
    resp = ok(client.get(LEAF + "web"))
    leaf = resp.get_json()
    # Consul's fields, plus RootID.
    assert {
        "SerialNumber",
        "CertPEM",
        "PrivateKeyPEM",
        "Service",
        "ServiceURI",
        "ValidAfter",
        "ValidBefore",
        "CreateIndex",
        "ModifyIndex",
        "Namespace",
    } <= set(leaf)
    assert leaf["Service"] == "web"
    assert leaf["ServiceURI"] == f"spiffe://{td}/ns/default/dc/{DC}/svc/web"
    assert re.fullmatch(COLON_HEX, leaf["SerialNumber"])
    assert leaf["ModifyIndex"] == leaf["CreateIndex"] == index_of(resp)
    cert, chain = leaf_and_chain(leaf)
    key = px.load_key(leaf["PrivateKeyPEM"])
    assert key.public_key() == cert.public_key()
    assert leaf["SerialNumber"] == px.serial_hex(cert.serial_number)
    assert parse_time(leaf["ValidBefore"]) == cert.not_valid_after_utc
    assert peer_ok(cert, chain, list(root_by_id(roots).values()), td)
    # Cached: the same leaf (and key) again, at the same index.
    again = ok(client.get(LEAF + "web"))
    assert again.get_json() == leaf
    assert index_of(again) == index_of(resp)
    # Another service gets its own.
    db = ok(client.get(LEAF + "db")).get_json()
    assert db["Service"] == "db" and db["SerialNumber"] != leaf["SerialNumber"]
    assert db["PrivateKeyPEM"] != leaf["PrivateKeyPEM"]
    # A blocking call with nothing to renew waits, then answers with the same leaf.
    q = InThread(lambda: client.get(f"{LEAF}web?index={index_of(resp)}&wait=300ms")).start()
    r = ok(q.result())
    assert q.elapsed >= 0.25
    assert r.get_json()["SerialNumber"] == leaf["SerialNumber"]


def test_agent_leaf_blocking_returns_a_new_leaf_after_rotation(client):
    first_resp = ok(client.get(LEAF + "web"))
    first = first_resp.get_json()
    idx = index_of(first_resp)
    q = block(client, f"{LEAF}web?index={idx}&wait=10s")
    t0 = time.monotonic()
    rotated = ok(client.post(ROTATE)).get_json()
    r = ok(q.result())
    assert time.monotonic() - t0 < PROMPT
    new = r.get_json()
    assert index_of(r) > idx
    assert new["SerialNumber"] != first["SerialNumber"]
    assert new["RootID"] == rotated["ActiveRootID"] != first["RootID"]
    # The new leaf carries the cross-signed root: a peer still on the old root accepts it.
    cert, chain = leaf_and_chain(new)
    old_root = root_by_id(rotated)[first["RootID"]]
    assert peer_ok(cert, chain, [old_root], rotated["TrustDomain"])
    # And later non-blocking calls return the new one.
    assert ok(client.get(LEAF + "web")).get_json()["SerialNumber"] == new["SerialNumber"]


@pytest.mark.parametrize("name", ["-web", "web-", "we%20b", "we_b!", "a" * 129, "wéb"])
def test_agent_leaf_refuses_a_bad_service_name(app_client, name):
    r = app_client.get(LEAF + name)
    assert_error(r, 400, "bad_request", "is not valid")
    assert "BEGIN" not in r.get_data(as_text=True)


def test_agent_leaf_bad_blocking_parameters(app_client):
    assert_error(app_client.get(LEAF + "web?index=soon"), 400, "bad_request", "index")
    assert_error(app_client.get(LEAF + "web?index=1&wait=forever"), 400, "bad_request", "wait")


def test_spiffe_identity_of_the_leaf_is_the_one_asked(app_client):
    # The leaf for "web.v2" (dots are allowed in names) names exactly that service.
    leaf = ok(app_client.get(LEAF + "web.v2")).get_json()
    cert, _ = leaf_and_chain(leaf)
    assert px.leaf_identity(cert) == spiffe.parse_service(leaf["ServiceURI"])
    assert px.leaf_identity(cert).service == "web.v2"


def test_csr_helpers_build_what_they_claim():
    # The bad CSRs above are only meaningful if the helper really builds them.
    key = px.generate_key()
    td = "00000000-0000-0000-0000-000000000000.trellis"
    pem = custom_csr(key, ["spiffe://a/x", "spiffe://b/y"], ca=True)
    csr = px.load_csr(pem)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(san.get_values_for_type(x509.UniformResourceIdentifier)) == 2
    assert csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    good = px.load_csr(service_csr(td, "web"))
    assert px.check_csr(good, trust_domain=td, datacenter=DC).identity.service == "web"
    assert to_pem(good).startswith("-----BEGIN CERTIFICATE REQUEST-----")


def test_a_server_told_to_may_sign_leaves_shorter_than_an_hour(make_client):
    # connect.min_leaf_cert_ttl: the server setting that lets a test watch leaves renew
    # (tests/test_integration_proxy_rotation.py); by default the floor stays Consul's 1h.
    default = make_client()
    assert_error(put_config(default, {"LeafCertTTL": "30s"}), 400, "bad_request", "between 1h")
    short = make_client(ca_min_leaf_ttl="10s")
    assert_error(put_config(short, {"LeafCertTTL": "5s"}), 400, "bad_request", "between 10s")
    ok(put_config(short, {"LeafCertTTL": "30s"}))
    assert config_of(short)["Config"]["LeafCertTTL"] == "30s"
    leaf, _chain = leaf_and_chain(sign(short))
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert life == px.BACKDATE + dt.timedelta(seconds=30)
    for bad in ("0s", "2h", "soon"):
        with pytest.raises(ConfigError, match=r"connect\.min_leaf_cert_ttl"):
            validate(Settings(data_dir="x", node_name="n", ca_min_leaf_ttl=bad))
