"""DNS under ACLs, end to end: a real ``trellis server`` with ACLs on and the default policy
deny answers DNS with the anonymous token's rules, and follows a change of them.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tests.support import TrellisProcess, wait_until
from trellis.api.acl.service import ANONYMOUS_ACCESSOR

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    config = tmp_path / "trellis.json"
    config.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    p = TrellisProcess(
        [
            "server",
            *("-config", str(config), "-data-dir", str(tmp_path / "data")),
            *("-http-port", "0", "-dns-port", "0", "-workers", "2", "-node", "n1"),
        ]
    ).start()
    yield p
    p.stop()


def lookup(p: TrellisProcess, name: str) -> tuple[int, set[str]]:
    assert p.dns_port is not None
    r = DNSRecord.parse(DNSRecord.question(name, "A").send("127.0.0.1", p.dns_port, timeout=2))
    return r.header.rcode, {str(rr.rdata) for rr in r.rr if rr.rtype == QTYPE.A}


def test_dns_answers_what_the_anonymous_token_may_read(server):
    url = server.url
    root = {"X-Consul-Token": httpx.put(f"{url}/v1/acl/bootstrap").json()["SecretID"]}
    r = httpx.put(
        f"{url}/v1/agent/service/register",
        json={"Name": "web", "Port": 80, "Address": "10.1.2.3"},
        headers=root,
    )
    assert r.status_code == 200, r.text
    # Registered, but the anonymous token may read nothing: the name does not exist.
    assert lookup(server, "web.service.trellis") == (RCODE.NXDOMAIN, set())
    assert lookup(server, "n1.node.trellis")[0] == RCODE.NXDOMAIN
    policy = httpx.put(
        f"{url}/v1/acl/policy",
        json={
            "Name": "dns",
            "Rules": 'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }',
        },
        headers=root,
    ).json()
    r = httpx.put(
        f"{url}/v1/acl/token/{ANONYMOUS_ACCESSOR}",
        json={"Description": "anonymous, may read the catalog", "Policies": [{"ID": policy["ID"]}]},
        headers=root,
    )
    assert r.status_code == 200, r.text
    # Both workers answer DNS; each follows the change through its change feed.
    for _ in range(4):
        wait_until(lambda: lookup(server, "web.service.trellis") == (RCODE.NOERROR, {"10.1.2.3"}))
    assert lookup(server, "n1.node.trellis") == (RCODE.NOERROR, {"127.0.0.1"})


def test_dns_answers_with_the_configured_dns_token_not_the_anonymous_one(tmp_path):
    """``acl.tokens.dns`` (HCL config): DNS answers what that token may read, while the
    anonymous token may read nothing; a lookup before the token exists answers nothing."""
    dns_secret = str(uuid.uuid4())
    config = tmp_path / "trellis.hcl"
    config.write_text(
        'acl {\n  enabled = true\n  default_policy = "deny"\n'
        f'  tokens {{\n    dns = "{dns_secret}"\n  }}\n}}\n'
    )
    p = TrellisProcess(
        [
            "server",
            *("-config", str(config), "-data-dir", str(tmp_path / "data")),
            *("-http-port", "0", "-dns-port", "0", "-workers", "2", "-node", "n1"),
        ]
    ).start()
    try:
        url = p.url
        root = {"X-Consul-Token": httpx.put(f"{url}/v1/acl/bootstrap").json()["SecretID"]}
        r = httpx.put(
            f"{url}/v1/agent/service/register",
            json={"Name": "web", "Port": 80, "Address": "10.1.2.3"},
            headers=root,
        )
        assert r.status_code == 200, r.text
        assert lookup(p, "web.service.trellis") == (RCODE.NXDOMAIN, set())
        policy = httpx.put(
            f"{url}/v1/acl/policy",
            json={
                "Name": "dns",
                "Rules": 'service_prefix "" { policy = "read" }\n'
                'node_prefix "" { policy = "read" }',
            },
            headers=root,
        ).json()
        r = httpx.put(
            f"{url}/v1/acl/token",
            json={"SecretID": dns_secret, "Policies": [{"ID": policy["ID"]}]},
            headers=root,
        )
        assert r.status_code == 200, r.text
        for _ in range(4):
            wait_until(lambda: lookup(p, "web.service.trellis") == (RCODE.NOERROR, {"10.1.2.3"}))
        # The anonymous token still may read nothing over HTTP.
        assert httpx.get(f"{url}/v1/catalog/service/web").json() == []
    finally:
        p.stop()
