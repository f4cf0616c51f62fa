"""A CA seal key that does not fit is an error an operator can act on (issue 8, item 6).

The CA's private keys are sealed in the store with the server's CA seal key. A server given
another key (a typo in ``connect.ca_seal_key``, replicas configured differently, a data dir's
``ca-seal.key`` replaced) cannot sign. That used to be a generic 500 ("internal error; see the
server log") and a traceback; it is now a 500 with its own code, naming the secret that does
not open and where the server's key came from, and the same line in the log.
"""

from __future__ import annotations

import base64
import logging
import secrets

from tests.api_fixtures import assert_error, make_client  # noqa: F401 - fixture
from tests.ca_support import service_csr
from trellis.api.app import create_app
from trellis.api.settings import Settings, validate


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _sign(client) -> object:
    td = client.get("/v1/connect/ca/roots").get_json()["TrustDomain"]
    return client.post("/v1/connect/ca/sign", json={"CSR": service_csr(td, "web")})


def test_a_wrong_configured_seal_key_names_the_key_and_the_secret(make_client, caplog) -> None:  # noqa: F811
    first = make_client(ca_seal_key=_key())
    r = _sign(first)
    assert r.status_code == 200, r.get_data(as_text=True)
    # A second server on the same store, configured with another key.
    second = make_client(ca_seal_key=_key())
    with caplog.at_level(logging.ERROR, logger="trellis.api"):
        r = _sign(second)
    body = assert_error(r, 500, "ca_seal_key_mismatch")
    assert "ca/keys/" in body["error"]  # which secret
    assert "connect.ca_seal_key" in body["error"]  # which key, what to check
    assert "same on every server" in body["error"]
    # The operator sees the same message in the log, without a traceback.
    logged = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert any(body["error"] in rec.getMessage() for rec in logged), logged
    assert all(rec.exc_info is None for rec in logged)
    # The server that has the right key still signs.
    assert _sign(first).status_code == 200


def test_a_replaced_seal_key_file_is_named_in_the_error(tmp_path) -> None:
    settings = validate(Settings(data_dir=str(tmp_path), node_name="n1"))
    app = create_app(settings, background=False)
    try:
        assert _sign(app.test_client()).status_code == 200
    finally:
        app.extensions["trellis"].close()
    key_file = tmp_path / "ca-seal.key"
    key_file.write_text(_key() + "\n")
    app = create_app(settings, background=False)
    try:
        r = _sign(app.test_client())
        body = assert_error(r, 500, "ca_seal_key_mismatch")
        assert str(key_file) in body["error"]
    finally:
        app.extensions["trellis"].close()
