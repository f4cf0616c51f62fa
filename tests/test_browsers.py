"""Web pages against the API (issue 9, item 11): cross-origin writes and DNS rebinding.

The decision (``trellis.api.browsers.refusal``) is table-tested; then a real ``trellis dev``
gets, byte for byte, the requests a browser sends for the attacks (what Chromium sends for a
``fetch(..., {mode: "no-cors"})`` or a form POST from another site, and for a page whose host
name was rebound to 127.0.0.1), and the requests curl, the CLI and Consul clients send.
"""

from __future__ import annotations

import json
import socket

import consul
import httpx
import pytest

from tests.support import TrellisProcess
from trellis.api.browsers import allowed_host, cross_origin, refusal
from trellis.proxy.client import Client

HOST = "127.0.0.1:8500"


def decide(method="POST", mimetype="", dev=False, **headers):
    headers = {k.replace("_", "-"): v for k, v in headers.items()}
    headers.setdefault("Host", HOST)
    return refusal(method, headers, mimetype, dev=dev, listen_host="127.0.0.1")


@pytest.mark.parametrize(
    ("what", "kwargs"),
    [
        ("curl -d (form-urlencoded, no Origin)", {"mimetype": "application/x-www-form-urlencoded"}),
        ("curl -X PUT --data-binary", {"method": "PUT", "mimetype": ""}),
        ("the CLI and Consul clients (JSON)", {"mimetype": "application/json"}),
        ("a read from another site", {"method": "GET", "Origin": "http://evil.example"}),
        (
            "a same-origin page",
            {"Origin": "http://127.0.0.1:8500", "Sec_Fetch_Site": "same-origin"},
        ),
        ("same origin, default port spelled out", {"Origin": "http://h", "Host": "h:80"}),
        ("a typed URL (Sec-Fetch-Site: none)", {"Sec_Fetch_Site": "none"}),
        (
            "cross-origin JSON (only after a CORS preflight)",
            {"mimetype": "application/json", "Origin": "http://evil.example"},
        ),
        ("server mode: any Host", {"Host": "trellis.internal:8500"}),
        ("dev: localhost", {"dev": True, "Host": "localhost:8500"}),
        ("dev: an IPv6 literal", {"dev": True, "Host": "[::1]:8500"}),
        ("dev: a .localhost name", {"dev": True, "Host": "app.localhost:8500"}),
    ],
)
def test_what_is_served(what, kwargs):
    assert decide(**kwargs) is None, what


@pytest.mark.parametrize(
    ("what", "kwargs"),
    [
        (
            "text/plain POST from another site",
            {"mimetype": "text/plain", "Origin": "http://evil.example"},
        ),
        (
            "form POST, Sec-Fetch-Site cross-site",
            {"mimetype": "application/x-www-form-urlencoded", "Sec_Fetch_Site": "cross-site"},
        ),
        (
            "another port of the same host (same-site)",
            {"mimetype": "text/plain", "Sec_Fetch_Site": "same-site"},
        ),
        ("Origin: null (sandboxed frame, file)", {"mimetype": "text/plain", "Origin": "null"}),
        (
            "multipart DELETE from another origin",
            {"method": "DELETE", "mimetype": "multipart/form-data", "Origin": "https://x.example"},
        ),
        (
            "an origin on another port, no Sec-Fetch-Site",
            {"mimetype": "text/plain", "Origin": "http://127.0.0.1:3000"},
        ),
        ("dev: a rebound name", {"dev": True, "method": "GET", "Host": "evil.example:8500"}),
        ("dev: no Host", {"dev": True, "method": "GET", "Host": ""}),
    ],
)
def test_what_is_refused(what, kwargs):
    assert decide(**kwargs) is not None, what


def test_cross_origin_and_allowed_host_details():
    assert not cross_origin({}, HOST)
    assert cross_origin({"Origin": "chrome-extension://abc"}, HOST)
    assert not cross_origin({"Origin": "https://h"}, "h:443")
    assert allowed_host("127.0.0.1", "127.0.0.1")
    assert allowed_host("LOCALHOST.:8500", "127.0.0.1")
    assert allowed_host("dev-box:8500", "dev-box")  # the name it was told to listen on
    assert not allowed_host("localhost.evil.example", "127.0.0.1")


# -- a real trellis dev -------------------------------------------------------------------------


@pytest.fixture
def dev(tmp_path):
    p = TrellisProcess(
        ["dev", "-http-port", "0", "-dns-port", "-1", "-data-dir", str(tmp_path / "data")]
    ).start()
    yield p
    p.stop()


def raw(url: str, request: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


INTENTION = json.dumps({"SourceName": "*", "DestinationName": "*", "Action": "deny"})


def chromium_no_cors_post(host: str) -> bytes:
    """What Chromium sends for ``fetch("http://<host>/v1/connect/intentions", {method: "POST",
    mode: "no-cors", body: <json string>})`` from a page on http://evil.example."""
    body = INTENTION.encode()
    return (
        "POST /v1/connect/intentions HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n"
        'sec-ch-ua-platform: "Linux"\r\n'
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/156.0.0.0 Safari/537.36\r\n"
        "sec-ch-ua-mobile: ?0\r\n"
        "Content-Type: text/plain;charset=UTF-8\r\n"
        "Accept: */*\r\n"
        "Origin: http://evil.example\r\n"
        "Sec-Fetch-Site: cross-site\r\n"
        "Sec-Fetch-Mode: no-cors\r\n"
        "Sec-Fetch-Dest: empty\r\n"
        "Referer: http://evil.example/\r\n"
        "Accept-Encoding: gzip, deflate, br, zstd\r\n"
        "Accept-Language: en-US,en;q=0.9\r\n"
        "\r\n"
    ).encode() + body


def test_a_cross_site_page_cannot_create_an_intention(dev):
    host = dev.url.removeprefix("http://")
    status, body = raw(dev.url, chromium_no_cors_post(host))
    assert status == 403, body
    assert json.loads(body)["error"].startswith("Permission denied")
    assert httpx.get(dev.url + "/v1/connect/intentions").json() == []


def test_a_rebound_host_name_gets_nothing(dev):
    """DNS rebinding: the page's name now resolves to 127.0.0.1, so its requests carry its
    own name in Host and are same-origin."""
    httpx.put(dev.url + "/v1/kv/secret", content=b"s3cret")
    port = dev.url.rsplit(":", 1)[1]
    req = (
        "GET /v1/kv/secret?raw HTTP/1.1\r\n"
        f"Host: rebind.evil.example:{port}\r\n"
        "Connection: close\r\n"
        "Sec-Fetch-Site: same-origin\r\n"
        "Sec-Fetch-Mode: cors\r\n"
        "\r\n"
    ).encode()
    status, body = raw(dev.url, req)
    assert status == 403 and b"s3cret" not in body, body
    # The same request addressed to localhost is served.
    ok = req.replace(f"rebind.evil.example:{port}".encode(), f"localhost:{port}".encode())
    assert raw(dev.url, ok) == (200, b"s3cret")


def test_a_rebound_host_name_cannot_register_with_devs_node_agent(dev):
    """dev's API address is its node agent's, which answers /v1/agent/service/register
    itself (and would run a managed sidecar for it): a rebound page gets a 403 there too, and
    nothing is registered. The server behind the agent sees only the agent's Host, so the
    agent is the one that must refuse."""
    port = dev.url.rsplit(":", 1)[1]
    body = json.dumps({"Name": "evil", "Port": 1, "Connect": {"Proxy": {}}}).encode()
    req = (
        "PUT /v1/agent/service/register HTTP/1.1\r\n"
        f"Host: rebind.evil.example:{port}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Origin: http://rebind.evil.example:" + port + "\r\n"
        "Sec-Fetch-Site: same-origin\r\n"
        "Sec-Fetch-Mode: cors\r\n"
        "\r\n"
    ).encode() + body
    status, answer = raw(dev.url, req)
    assert status == 403, answer
    assert json.loads(answer)["code"] == "permission_denied"
    assert "evil" not in httpx.get(dev.url + "/v1/agent/services").json()
    assert httpx.get(dev.url + "/v1/catalog/service/evil").json() == []


def test_curl_the_cli_and_consul_clients_still_work(dev):
    host = dev.url.removeprefix("http://")
    # curl -d @intention.json (form-urlencoded, no Origin)
    body = INTENTION.encode()
    status, out = raw(
        dev.url,
        (
            "POST /v1/connect/intentions HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "User-Agent: curl/7.88.1\r\nAccept: */*\r\nConnection: close\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body,
    )
    assert status == 200, out
    # The CLI's client.
    with Client(dev.url) as client:
        client.kv_put("from-cli", b"v")
        assert client.kv_get("from-cli") is not None
    # A Consul client (py-consul).
    c = consul.Consul(host=host.split(":")[0], port=int(host.split(":")[1]))
    try:
        assert c.kv.put("from-py-consul", "v") is True
        assert c.kv.get("from-py-consul")[1]["Value"] == b"v"
    finally:
        c.http.session.close()
