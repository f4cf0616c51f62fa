"""``acl.tokens.initial_management`` and ``acl.tokens.agent`` end to end: a real ``trellis
server`` with ACLs on (default deny) bootstraps with the configured secret, and a real ``trellis
agent`` whose config file sets ``acl.tokens.agent`` registers its node and service with it.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.support import TrellisProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def started():
    procs: list[TrellisProcess] = []
    yield procs
    for p in reversed(procs):
        p.stop()


def test_the_agent_registers_with_the_token_of_its_config_file(tmp_path, started):
    management = str(uuid.uuid4())
    config = tmp_path / "server.json"
    config.write_text(
        json.dumps(
            {
                "acl": {
                    "enabled": True,
                    "default_policy": "deny",
                    "tokens": {"initial_management": management},
                }
            }
        )
    )
    server = TrellisProcess(
        [
            "server",
            *("-config", str(config), "-data-dir", str(tmp_path / "data")),
            *("-http-port", "0", "-dns-port", "-1", "-workers", "1", "-node", "srv"),
        ]
    )
    started.append(server)
    server.start()
    root = {"X-Consul-Token": management}
    assert httpx.get(f"{server.url}/v1/acl/token/self", headers=root).status_code == 200
    assert httpx.put(f"{server.url}/v1/acl/bootstrap").status_code == 403

    conf = tmp_path / "agent-conf"
    conf.mkdir()
    (conf / "agent.json").write_text(
        json.dumps(
            {
                "acl": {"tokens": {"agent": management}},
                "service": {"name": "web", "port": 8080},
            }
        )
    )
    agent = TrellisProcess(
        [
            "agent",
            *("-node", "worker-1", "-http-port", "0", "-server", server.url),
            *("-data-dir", str(tmp_path / "agent-data"), "-config-dir", str(conf)),
        ]
    )
    started.append(agent)
    agent.start()

    def registered() -> bool:
        r = httpx.get(f"{server.url}/v1/catalog/node/worker-1", headers=root, timeout=5)
        body = r.json() if r.status_code == 200 else None
        return bool(body) and "web" in (body.get("Services") or {})

    wait_until(registered, timeout=20)
