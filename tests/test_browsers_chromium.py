"""The web-page attacks of issue 9 item 11, made by a real headless Chromium.

A page served by a small HTTP server (the attacker's site, ``attacker.test``) posts an
intention to a real ``trellis dev`` with ``fetch(..., {mode: "no-cors"})`` and with a form; a
page loaded under a rebound name (``rebind.test``, resolved to 127.0.0.1 as DNS rebinding
would) reads a key same-origin. Chromium's ``--host-resolver-rules`` stands in for the
attacker's DNS; everything stays on loopback. Chromium comes from Debian's package and
Playwright from the test extras (``make test`` installs both; see the Makefile).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.support import TrellisProcess

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP attacker.test 127.0.0.1, MAP rebind.test 127.0.0.1",
]
INTENTION = {"SourceName": "*", "DestinationName": "*", "Action": "deny"}


@pytest.fixture
def dev(tmp_path) -> Iterator[TrellisProcess]:
    p = TrellisProcess(
        ["dev", "-http-port", "0", "-dns-port", "-1", "-data-dir", str(tmp_path / "data")]
    ).start()
    yield p
    p.stop()


@pytest.fixture
def attacker(dev) -> Iterator[tuple[str, list[str]]]:
    """The attacker's site on 127.0.0.1 (port 0): a page that attacks ``dev``. Yields the
    page's URL under the name attacker.test, and the paths the site was asked for."""
    target = dev.url
    body = json.dumps(INTENTION)
    page = f"""<!doctype html><html><body>
<form id="f" method="POST" action="{target}/v1/connect/intentions" enctype="text/plain"
      target="sink"><input name='{body[:-1]}, "x": "' value='"}}'></form>
<iframe name="sink"></iframe>
<script>
window.attack = async () => {{
  try {{
    await fetch("{target}/v1/connect/intentions", {{
      method: "POST", mode: "no-cors", body: {json.dumps(body)} }});
  }} catch (e) {{}}
  document.getElementById("f").submit();
  return "sent";
}};
</script></body></html>""".encode()
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://attacker.test:{server.server_address[1]}/", asked
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_a_page_on_another_site_cannot_create_an_intention(dev, attacker, browser):
    url, asked = attacker
    page = browser.new_page()
    page.goto(url)
    assert "/" in asked

    def posted(kind: str):
        def match(r) -> bool:
            req = r.request
            return r.url.startswith(dev.url) and req.method == "POST" and req.resource_type == kind

        return match

    # Playwright sees the answers the page itself may not read (no-cors, another origin).
    with (
        page.expect_response(posted("fetch")) as by_fetch,
        page.expect_response(posted("document")) as by_form,
    ):
        assert page.evaluate("window.attack()") == "sent"
    for resp in (by_fetch.value, by_form.value):
        assert resp.status == 403, (resp.request.resource_type, resp.status)
        assert resp.request.headers["content-type"].startswith("text/plain")
    assert httpx.get(dev.url + "/v1/connect/intentions").json() == []


def test_a_rebound_name_reads_nothing(dev, browser):
    httpx.put(dev.url + "/v1/kv/secret", content=b"s3cret")
    port = dev.url.rsplit(":", 1)[1]
    page = browser.new_page()
    # The attacker's name now resolves to 127.0.0.1: the page is served by Trellis itself,
    # and its script's requests are same-origin.
    resp = page.goto(f"http://rebind.test:{port}/v1/status/leader")
    assert resp is not None and resp.status == 403
    got = page.evaluate("fetch('/v1/kv/secret?raw').then(async r => [r.status, await r.text()])")
    assert got[0] == 403 and "s3cret" not in got[1], got
    # The same browser, addressing the server as localhost, is served.
    page.goto(f"http://localhost:{port}/v1/status/leader")
    got = page.evaluate("fetch('/v1/kv/secret?raw').then(async r => [r.status, await r.text()])")
    assert got == [200, "s3cret"]
