"""The typed HTTP client (``trellis.proxy.client``).

The transport behaviour (error mapping, timeouts, headers, query encoding) is tested against a
small scripted HTTP server on 127.0.0.1 port 0; the API behaviour against the real Trellis server
(``trellis_server``, a ``trellis dev`` subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from tests.http_stub import Reply
from tests.support import wait_until
from trellis.proxy.client import (
    APIError,
    Client,
    ConnectionFailed,
    Indexed,
    KVPair,
    Response,
    normalize_address,
)

# -- transport: errors, headers, timeouts ------------------------------------------------------


def test_json_error_body_gives_status_and_message(stub):
    stub.route = lambda req: stub.json(400, {"error": "bad key", "code": "bad_request"})
    with Client(stub.url) as c, pytest.raises(APIError) as ei:
        c.request("GET", "/v1/kv/x")
    assert ei.value.status == 400
    assert ei.value.message == "bad key"
    assert str(ei.value) == "bad key"
    assert not isinstance(ei.value, ConnectionFailed)


def test_text_error_body_is_the_message(stub):
    stub.route = lambda req: Reply(403, b"Permission denied\n", {"Content-Type": "text/plain"})
    with Client(stub.url) as c, pytest.raises(APIError) as ei:
        c.kv_put("a", b"1")
    assert (ei.value.status, ei.value.message) == (403, "Permission denied")


def test_empty_error_body_names_the_status(stub):
    stub.route = lambda req: Reply(500)
    with Client(stub.url) as c, pytest.raises(APIError) as ei:
        c.agent_self()
    assert (ei.value.status, ei.value.message) == (500, "Unexpected response code: 500")


def test_json_body_without_error_field_is_shown_as_text(stub):
    stub.route = lambda req: stub.json(409, {"message": "x"})
    with Client(stub.url) as c, pytest.raises(APIError) as ei:
        c.request("PUT", "/v1/anything")
    assert ei.value.message == '{"message": "x"}'


def test_allowed_status_is_returned_not_raised(stub):
    stub.route = lambda req: Reply(404, b"", {"X-Consul-Index": "7"})
    with Client(stub.url) as c:
        r = c.request("GET", "/v1/kv/nope", allow=(404,))
    assert (r.status, r.index, r.body) == (404, 7, b"")


def test_connection_refused_is_connection_failed(dead_url):
    with Client(dead_url) as c, pytest.raises(ConnectionFailed) as ei:
        c.status_leader()
    e = ei.value
    assert isinstance(e, APIError)
    assert e.status is None
    assert e.message.startswith(f"cannot reach Trellis at {dead_url}: ")
    assert "refused" in e.message.lower()


@pytest.mark.parametrize("address", ["ftp://127.0.0.1:8500", "http://", "http://127.0.0.1:port"])
def test_malformed_address_is_connection_failed(address):
    with pytest.raises(ConnectionFailed) as ei:
        Client(address)
    assert ei.value.message.startswith(f"cannot reach Trellis at {address}: ")


def test_address_without_scheme_gets_http():
    assert normalize_address("127.0.0.1:8500") == "http://127.0.0.1:8500"
    assert normalize_address("https://h:1/") == "https://h:1"


def test_token_is_sent_as_x_consul_token(stub):
    stub.route = lambda req: stub.json(200, "127.0.0.1:8300")
    with Client(stub.url, token="s3cret") as c:
        assert c.status_leader() == "127.0.0.1:8300"
    with Client(stub.url) as c:
        c.status_leader()
    assert stub.seen[0].headers["x-consul-token"] == "s3cret"
    assert "x-consul-token" not in stub.seen[1].headers


@pytest.mark.parametrize(("header", "index"), [("42", 42), (None, None), ("nope", None)])
def test_index_header_is_parsed(stub, header, index):
    headers = {"X-Consul-Index": header} if header else {}
    stub.route = lambda req: stub.json(200, {}, **headers)
    with Client(stub.url) as c:
        assert c.request("GET", "/v1/catalog/services").index == index


def test_blocking_read_waits_longer_than_the_base_timeout(stub):
    # The server holds the request for 0.8 s; the client's ordinary timeout is 0.3 s. A blocking
    # read with wait=1s must be given more than wait + wait/16 to read, an ordinary one not.
    stub.route = lambda req: Reply(200, b"{}", {"X-Consul-Index": "9"}, delay=0.8)
    with Client(stub.url, timeout=0.3) as c:
        got = c.catalog_services(index=5, wait=1)
        assert got == Indexed({}, 9)
        assert stub.seen[-1].query == {"index": ["5"], "wait": ["1s"]}
        with pytest.raises(ConnectionFailed) as ei:
            c.catalog_services()
    assert "timed out" in ei.value.message


def test_wait_given_as_duration_text(stub):
    stub.route = lambda req: stub.json(200, [])
    with Client(stub.url) as c:
        c.catalog_nodes(index=3, wait="1500ms")
        c.health_service("web", passing=True, tag="v1", index=1, wait="2m")
    assert stub.seen[0].query == {"index": ["3"], "wait": ["1.5s"]}
    assert stub.seen[1].path == "/v1/health/service/web"
    assert stub.seen[1].query == {
        "passing": ["true"],
        "tag": ["v1"],
        "index": ["1"],
        "wait": ["2m0s"],
    }


def test_non_json_body_is_an_api_error(stub):
    stub.route = lambda req: Reply(200, b"<html>", {"Content-Type": "text/html"})
    with Client(stub.url) as c, pytest.raises(APIError) as ei:
        c.agent_services()
    assert ei.value.message.startswith("the server sent a body that is not JSON")


@pytest.mark.parametrize(
    ("call", "body", "message"),
    [
        (lambda c: c.catalog_services(), b"[1, 2]", "an array where an object was expected"),
        (lambda c: c.catalog_nodes(), b"{}", "an object where an array was expected"),
        (lambda c: c.status_leader(), b"null", "NoneType where a string was expected"),
        (lambda c: c.kv_get("k"), b"[3]", "a K/V entry that is not an object"),
        (lambda c: c.kv_get("k"), b'[{"Key": "k", "Value": "%%%"}]', "not base64"),
    ],
)
def test_unexpected_shapes_are_the_servers_fault(stub, call, body, message):
    stub.route = lambda req: Reply(200, body, {"Content-Type": "application/json"})
    with Client(stub.url) as c, pytest.raises(APIError) as ei:
        call(c)
    assert ei.value.status == 200
    assert message in ei.value.message


# -- request shapes ----------------------------------------------------------------------------


def test_kv_keys_are_escaped_but_keep_slashes(stub):
    stub.route = lambda req: Reply(404, b"", {"X-Consul-Index": "3"})
    with Client(stub.url) as c:
        assert c.kv_get("/a b/c?d#e%") == Indexed(None, 3)
        assert c.kv_get("p/", recurse=True) == Indexed([], 3)
        assert c.kv_get("p/", keys=True, separator="/") == Indexed([], 3)
    assert stub.seen[0].path == "/v1/kv/a%20b/c%3Fd%23e%25"
    assert stub.seen[0].query == {}
    assert stub.seen[1].query == {"recurse": ["true"]}
    assert stub.seen[2].query == {"keys": ["true"], "separator": ["/"]}


def test_kv_get_decodes_entries(stub):
    entry = {
        "Key": "a/b",
        "Value": "aGk=",
        "Flags": 7,
        "CreateIndex": 3,
        "ModifyIndex": 5,
        "LockIndex": 0,
        "Session": "",
    }
    stub.route = lambda req: stub.json(200, [entry, {**entry, "Key": "a/c", "Value": None}])
    with Client(stub.url) as c:
        one = c.kv_get("a/b").value
        many = c.kv_get("a/", recurse=True).value
    assert one == KVPair("a/b", b"hi", flags=7, create_index=3, modify_index=5)
    assert [p.value for p in many] == [b"hi", None]
    assert one.to_json() == entry


def test_kv_put_and_delete_send_cas_and_flags(stub):
    answers = iter([b"true", b"false", b"true"])
    stub.route = lambda req: Reply(200, next(answers))
    with Client(stub.url) as c:
        assert c.kv_put("k", b"\x00\xff", flags=2) is True
        assert c.kv_put("k", "text", cas=0) is False
        assert c.kv_delete("p/", recurse=True) is True
    put1, put2, delete = stub.seen
    assert (put1.method, put1.path, put1.query, put1.body) == (
        "PUT",
        "/v1/kv/k",
        {"flags": ["2"]},
        b"\x00\xff",
    )
    assert (put2.query, put2.body) == ({"cas": ["0"]}, b"text")
    assert (delete.method, delete.query) == ("DELETE", {"recurse": ["true"]})


def test_agent_register_sends_the_body_as_is(stub):
    stub.route = lambda req: Reply(200)
    body = {"service": {"name": "web", "port": 8080}}["service"]
    with Client(stub.url) as c:
        c.agent_service_register(body)
        c.agent_service_deregister("web/1")
    reg, dereg = stub.seen
    assert (reg.method, reg.path, json.loads(reg.body)) == (
        "PUT",
        "/v1/agent/service/register",
        body,
    )
    assert (dereg.method, dereg.path) == ("PUT", "/v1/agent/service/deregister/web%2F1")


def test_response_is_frozen():
    r = Response(200, b"[1]")
    assert r.json() == [1]
    with pytest.raises(AttributeError):
        r.status = 500  # type: ignore[misc]


def test_client_imports_no_flask():
    code = (
        "import sys, trellis.proxy.client; "
        "bad = [m for m in ('flask', 'gunicorn', 'trio') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- against the real server -------------------------------------------------------------------


@pytest.mark.integration
def test_kv_round_trip(api):
    assert api.kv_put("api-test/a", b"\x00binary\xff", flags=42) is True
    assert api.kv_put("api-test/b/c", b"two") is True
    got = api.kv_get("api-test/a")
    assert got.value is not None
    assert (got.value.key, got.value.value, got.value.flags) == (
        "api-test/a",
        b"\x00binary\xff",
        42,
    )
    assert got.index is not None and got.index >= got.value.modify_index
    assert api.kv_get("api-test/a", raw=True).value == b"\x00binary\xff"
    keys = api.kv_get("api-test/", keys=True, separator="/").value
    assert keys == ["api-test/a", "api-test/b/"]
    pairs = api.kv_get("api-test/", recurse=True).value
    assert [p.key for p in pairs] == ["api-test/a", "api-test/b/c"]
    assert api.kv_get("api-test/missing").value is None
    assert api.kv_delete("api-test/", recurse=True) is True
    assert api.kv_get("api-test/", recurse=True).value == []


@pytest.mark.integration
def test_kv_cas(api):
    assert api.kv_put("cas-test", b"1", cas=0) is True
    assert api.kv_put("cas-test", b"2", cas=0) is False
    idx = api.kv_get("cas-test").value.modify_index
    assert api.kv_put("cas-test", b"3", cas=idx + 1000) is False
    assert api.kv_put("cas-test", b"3", cas=idx) is True
    new = api.kv_get("cas-test").value
    assert new.value == b"3"
    assert api.kv_delete("cas-test", cas=idx) is False
    assert api.kv_delete("cas-test", cas=new.modify_index) is True


@pytest.mark.integration
def test_blocking_kv_read_wakes_on_write(api, trellis_server):
    api.kv_put("block-test", b"old")
    first = api.kv_get("block-test")

    def write_once_parked():
        # Only once the read is parked on the server, so that the write is what wakes it.
        with Client(trellis_server.url) as other:
            wait_until(lambda: int(other.agent_self()["Stats"]["blocking"]["waiting"]) >= 1)
            other.kv_put("block-test", b"new")

    t = threading.Thread(target=write_once_parked)
    t.start()
    second = api.kv_get("block-test", index=first.index, wait="20s")
    t.join(15)
    assert not t.is_alive()
    assert second.value.value == b"new"
    assert second.index > first.index


@pytest.mark.integration
def test_blocking_read_returns_after_wait_without_change(api):
    api.kv_put("idle-test", b"x")
    first = api.kv_get("idle-test")
    started = time.monotonic()
    again = api.kv_get("idle-test", index=first.index, wait="1s")
    took = time.monotonic() - started
    assert again.value.value == b"x"
    assert again.index == first.index
    assert 0.9 < took < 1 + 1 / 16 + 3


@pytest.mark.integration
def test_service_register_catalog_health_deregister(api):
    api.agent_service_register({"name": "api-web", "id": "api-web-1", "port": 8080, "tags": ["v1"]})
    try:
        assert "api-web-1" in api.agent_services()
        assert api.catalog_services().value["api-web"] == ["v1"]
        inst = api.catalog_service("api-web").value
        assert [(s["ServiceID"], s["ServicePort"]) for s in inst] == [("api-web-1", 8080)]
        assert api.catalog_service("api-web", tag="nope").value == []
        health = api.health_service("api-web", passing=True).value
        assert [h["Service"]["ID"] for h in health] == ["api-web-1"]
        node = api.catalog_node(inst[0]["Node"]).value
        assert node is not None and node["Node"]["Node"] == inst[0]["Node"]
    finally:
        api.agent_service_deregister("api-web-1")
    assert "api-web" not in api.catalog_services().value
    assert api.catalog_node("no-such-node").value is None


@pytest.mark.integration
def test_status_and_self(api):
    assert isinstance(api.status_leader(), str)
    assert isinstance(api.status_peers(), list)
    me = api.agent_self()
    assert me["Config"]["NodeName"] in [n["Node"] for n in api.catalog_nodes().value]


@pytest.mark.integration
def test_real_server_errors_are_api_errors(api):
    with pytest.raises(APIError) as ei:
        api.agent_service_register({"port": 1})  # no name
    assert ei.value.status == 400
    assert ei.value.message


def _https_stub(tmp_path):
    """A stub over HTTPS with a self-signed certificate for 127.0.0.1, and its PEM file."""
    import datetime as dt
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tests.http_stub import StubServer

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trellis test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "server.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    return StubServer(tls=ctx), str(pem)


def test_https_with_a_ca_file_and_without(tmp_path):
    # The proxy's -ca-file: the server's certificate is checked against that file, and a
    # certificate no trusted CA signed is a connection failure, not an answer.
    server, ca_file = _https_stub(tmp_path)
    try:
        server.route = lambda req: server.json(200, "127.0.0.1:8300")
        with Client(server.url, verify=ca_file) as c:
            assert c.status_leader() == "127.0.0.1:8300"
            assert c.status_leader() == "127.0.0.1:8300"  # again, on the kept connection
        with Client(server.url) as c, pytest.raises(ConnectionFailed) as ei:
            c.status_leader()
        assert "CERTIFICATE_VERIFY_FAILED" in ei.value.message
        assert len(server.seen) == 2
    finally:
        server.close()


def test_a_kept_connection_the_server_closed_is_not_reused(stub):
    # The stub answers "Connection: close" once: the client must open a new connection for
    # the next request instead of writing into the closed one.
    replies = iter([Reply(200, b'"a"', {"Connection": "close"}), Reply(200, b'"b"')])
    stub.route = lambda req: next(replies)
    with Client(stub.url) as c:
        assert c.status_leader() == "a"
        assert c.status_leader() == "b"
