"""The mesh module and trellis_service end to end: the real Terraform 1.0.3, a real
``trellis dev``, and real ``trellis connect proxy`` processes.

Terraform costs about a second per command, so each test walks through one whole story;
tests/terraform_support.py isolates every run.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.proxy_support import EchoApp, ProxyProcess, exchange, free_port
from tests.support import TrellisProcess, wait_until
from tests.terraform_support import TERRAFORM, Mirror, Workdir, provider_mirror  # noqa: F401
from trellis.api.acl.rules import parse_rules
from trellis.proxy.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODULE = Path(__file__).resolve().parent.parent / "terraform" / "modules" / "mesh"


@pytest.fixture
def dev():
    p = TrellisProcess(["dev", "-http-port", "0", "-dns-port", "-1"]).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def api(dev):
    with Client(dev.url) as c:
        yield c


def outputs(wd: Workdir) -> dict:
    return {k: v["value"] for k, v in json.loads(wd.run("output", "-json").out).items()}


def catalog(api: Client) -> dict[str, list[str]]:
    """Every node's service IDs, but the server's own ``consul`` entry."""
    out = {}
    for n in api.catalog_nodes().value:
        ids = sorted(
            sid
            for sid, s in (api.catalog_node(n["Node"]).value or {}).get("Services", {}).items()
            if s["Service"] != "consul"
        )
        if ids:
            out[n["Node"]] = ids
    return out


def test_module_is_formatted_and_valid_and_its_basic_example_applies_and_destroys(
    provider_mirror: Mirror,  # noqa: F811
    dev,
    api,
    tmp_path,
):
    # fmt over the module and its examples, as they are in the repository.
    r = Workdir(tmp_path / "fmt", provider_mirror).run(
        "fmt", "-check", "-recursive", "-diff", "-no-color", str(MODULE), codes=(0, 3)
    )
    assert r.code == 0, f"terraform fmt would change these files:\n{r}"
    # Copies, so that init leaves nothing in the repository.
    shutil.copytree(MODULE, tmp_path / "mesh")
    module = Workdir(tmp_path / "mesh", provider_mirror)
    module.run("init", "-no-color", "-backend=false", offline=True)
    assert "Success!" in module.run("validate", "-no-color").out

    node = api.catalog_nodes().value[0]["Node"]  # trellis dev's own
    before = catalog(api)
    wd = Workdir(
        tmp_path / "mesh" / "examples" / "basic", provider_mirror, {"TRELLIS_HTTP_ADDR": dev.url}
    )
    wd.run("init", "-no-color", offline=True)
    assert "Success!" in wd.run("validate", "-no-color").out
    var = ("-var", f"node={node}")
    r = wd.apply(*var)
    assert "Resources: 6 added, 0 changed, 0 destroyed" in r.out, r
    out = outputs(wd)
    assert sorted(out["intentions"]) == ["*/*", "api/db", "web/api"]
    assert {k: (v["id"], v["port"]) for k, v in out["services"].items()} == {
        "web": (f"{node}/web", 8080),
        "api": (f"{node}/api", 8081),
        "db": (f"{node}/db", 5432),
    }
    ports = sorted(v["sidecar_port"] for v in out["services"].values())
    assert len(set(ports)) == 3 and all(21000 <= p <= 21255 for p in ports)  # no clash
    ids = ["api", "api-sidecar-proxy", "db", "db-sidecar-proxy", "web", "web-sidecar-proxy"]
    assert catalog(api)[node] == sorted(ids + before.get(node, []))
    web_sidecar = api.catalog_node(node).value["Services"]["web-sidecar-proxy"]
    assert web_sidecar["Proxy"]["Upstreams"] == [{"DestinationName": "api", "LocalBindPort": 9191}]
    assert api.intention_check("web", "api") is True
    assert api.intention_check("web", "db") is False  # the default deny
    # Nothing changed: nothing to do (tags as sets, empty meta, computed ports).
    r = wd.plan_exit(*var)
    assert r.code == 0, r

    # Drift: a sidecar deregistered outside Terraform is put back, on its port.
    api.catalog_deregister(node, service_id="db-sidecar-proxy")
    r = wd.apply(*var)
    assert "Resources: 0 added, 1 changed, 0 destroyed" in r.out, r
    again = api.catalog_node(node).value["Services"]["db-sidecar-proxy"]["Port"]
    assert again == out["services"]["db"]["sidecar_port"]

    r = wd.run("destroy", "-auto-approve", "-no-color", *var)
    assert "Resources: 6 destroyed" in r.out, r
    assert catalog(api) == before
    assert api.intentions_list().value == []


FLOW_TF = """
terraform {
  required_providers {
    trellis = { source = "trellis.invalid/trellis/trellis", version = "0.1.0" }
  }
}

provider "trellis" {}

variable "action" { default = "allow" }

resource "trellis_service" "db" {
  name         = "db"
  node         = "%(node)s"
  address      = "127.0.0.1"
  port         = %(db_app)d
  sidecar      = true
  sidecar_port = %(db_public)d

  check {
    check_id = "db-alive"
    name     = "db accepts connections"
    status   = "passing"
    tcp      = "127.0.0.1:%(db_app)d"
    interval = "10s"
  }
}

resource "trellis_service" "web" {
  name         = "web"
  node         = "%(node)s"
  address      = "127.0.0.1"
  port         = %(web_app)d
  tags         = ["v2", "v1"]
  sidecar      = true
  sidecar_port = %(web_public)d

  upstream {
    destination_name = "db"
    local_bind_port  = %(up)d
  }
}

resource "trellis_intention" "web_db" {
  source      = "web"
  destination = "db"
  action      = var.action
}

data "trellis_service" "web" {
  name       = "web"
  depends_on = [trellis_service.web]
}

data "trellis_services" "all" {
  depends_on = [trellis_service.web, trellis_service.db]
}

output "web_instances" { value = data.trellis_service.web.instances }
output "services" { value = data.trellis_services.all.tags }
"""


def test_user_flow_a_deny_applied_refuses_new_connections_through_real_sidecars(
    provider_mirror: Mirror,  # noqa: F811
    dev,
    api,
    procs,
    apps,
    tmp_path,
):
    db_app = EchoApp(upper=True)
    apps.append(db_app)
    node = api.catalog_nodes().value[0]["Node"]
    before = catalog(api)
    ports = {"db_public": free_port(), "web_public": free_port(), "up": free_port()}
    wd = Workdir(tmp_path / "flow", provider_mirror, {"TRELLIS_HTTP_ADDR": dev.url})
    wd.write(FLOW_TF % {"node": node, "db_app": db_app.port, "web_app": free_port(), **ports})
    wd.run("init", "-no-color", offline=True)
    r = wd.apply()
    assert "Resources: 3 added, 0 changed, 0 destroyed" in r.out, r
    out = outputs(wd)
    (web,) = out["web_instances"]
    assert (web["id"], web["node"], web["address"]) == ("web", node, "127.0.0.1")
    assert web["tags"] == ["v1", "v2"] and web["meta"] == {}
    assert out["services"]["web"] == ["v1", "v2"] and "db-sidecar-proxy" in out["services"]
    assert wd.plan_exit().code == 0
    # Imported (check block, sidecar, upstreams and all): the next plan has nothing to do.
    for name in ("db", "web"):
        wd.run("state", "rm", f"trellis_service.{name}")
        r = wd.run("import", "-no-color", f"trellis_service.{name}", f"{node}/{name}")
        assert "Import successful!" in r.out, r
    r = wd.plan_exit()
    assert r.code == 0, r

    # The sidecars, run as a developer would: flags, not the agent API, so that what routes
    # web's connections to db is what Terraform registered (db's sidecar, found through
    # /v1/health/connect/db at the address and port of the trellis_service).
    db = ProxyProcess(
        ["-service", "db", "-listen", f"127.0.0.1:{ports['db_public']}",
         "-service-addr", f"127.0.0.1:{db_app.port}", "-http-addr", dev.url]
    ).start()  # fmt: skip
    procs.append(db)
    web_proxy = ProxyProcess(
        ["-service", "web", "-upstream", f"db:{ports['up']}", "-http-addr", dev.url]
    ).start()
    procs.append(web_proxy)
    opened: list[socket.socket] = []

    def echoes(text: bytes) -> bool:
        c = socket.create_connection(("127.0.0.1", ports["up"]), timeout=5)
        opened.append(c)
        return exchange(c, text) == text.upper()

    wait_until(lambda: echoes(b"allowed"))

    # The same intention switched to deny and applied: new connections are refused.
    r = wd.apply("-var", "action=deny")
    assert "Resources: 0 added, 1 changed, 0 destroyed" in r.out, r
    wait_until(lambda: not echoes(b"denied"), timeout=10)
    db.wait_for_line(r"refused spiffe://\S+/svc/web: Matched intention: web => db \(deny\)")
    assert not echoes(b"still denied")
    for c in opened:
        c.close()

    r = wd.run("destroy", "-auto-approve", "-no-color", "-var", "action=deny")
    assert "Resources: 3 destroyed" in r.out, r
    assert catalog(api) == before  # the services and their sidecars are gone
    assert api.intentions_list().value == []


@pytest.fixture
def acl_server(tmp_path):
    config = tmp_path / "server.json"
    config.write_text(
        json.dumps(
            {"acl": {"enabled": True, "default_policy": "deny"}, "data_dir": str(tmp_path / "d")}
        )
    )
    p = TrellisProcess(
        ["server", "-config", str(config), "-http-port", "0", "-dns-port", "-1"]
    ).start()
    try:
        yield p
    finally:
        p.stop()


def team_rules(services: list[str], node: str) -> str:
    """The rules examples/multi-team/platform gives a team's policy (HCL, as it writes it)."""
    rules = []
    for s in services:
        rules.append(f'service "{s}" {{\n  policy     = "write"\n  intentions = "write"\n}}')
        rules.append(f'service "{s}-sidecar-proxy" {{\n  policy = "write"\n}}')
    rules.append(f'node "{node}" {{\n  policy = "read"\n}}')
    return "\n".join(rules)


def test_multi_team_example_each_team_owns_its_services_and_intentions(
    provider_mirror: Mirror,  # noqa: F811
    acl_server,
    tmp_path,
):
    # platform/ (run with the management token) makes the teams' policies, their tokens and
    # the default deny; each team then applies its own configuration with its own token.
    with Client(acl_server.url) as anonymous:
        root = anonymous.acl_bootstrap()["SecretID"]
    admin = Client(acl_server.url, token=root)
    try:
        node = admin.catalog_nodes().value[0]["Node"]
        shutil.copytree(MODULE, tmp_path / "mesh")
        example = tmp_path / "mesh" / "examples" / "multi-team"
        platform = Workdir(
            example / "platform",
            provider_mirror,
            {"TRELLIS_HTTP_ADDR": acl_server.url, "TRELLIS_HTTP_TOKEN": root},
        )
        platform.run("init", "-no-color", offline=True)
        assert "Success!" in platform.run("validate", "-no-color").out
        r = platform.apply("-var", f"node={node}")
        assert "Apply complete!" in r.out, r
        assert platform.plan_exit("-var", f"node={node}").code == 0
        out = outputs(platform)
        tokens = {"web": out["team_web_token"], "db": out["team_db_token"]}
        assert all(tokens.values()) and tokens["web"] != tokens["db"]
        assert all(t not in r.out for t in tokens.values())  # sensitive outputs stay hidden
        # The policies are the ones the test expects a team to get (by meaning, not text).
        for team in ("web", "db"):
            got = admin.acl_policy_read_by_name(f"team-{team}")["Rules"]
            assert parse_rules(got) == parse_rules(team_rules([team], node)), got
        teams = {
            team: Workdir(
                example / f"team-{team}",
                provider_mirror,
                {"TRELLIS_HTTP_ADDR": acl_server.url, "TRELLIS_HTTP_TOKEN": tokens[team]},
            )
            for team in ("db", "web")
        }
        var = ("-var", f"node={node}")
        for wd in teams.values():
            wd.run("init", "-no-color", offline=True)
            assert "Success!" in wd.run("validate", "-no-color").out
            r = wd.apply(*var)
            assert "Apply complete!" in r.out, r
            assert wd.plan_exit(*var).code == 0
        # db's team allowed web in; web's team owns web and its upstream.
        assert admin.intention_check("web", "db") is True
        assert admin.intention_check("db", "web") is False
        got = admin.catalog_node(node).value["Services"]
        assert {"web", "web-sidecar-proxy", "db", "db-sidecar-proxy"} <= set(got)
        assert outputs(teams["db"])["intentions"] == {"web/db": intention_id(admin, "web", "db")}
        # The web team cannot allow itself into db: a clear diagnostic, nothing written.
        sneaky = Workdir(
            tmp_path / "sneaky",
            provider_mirror,
            {"TRELLIS_HTTP_ADDR": acl_server.url, "TRELLIS_HTTP_TOKEN": tokens["web"]},
        )
        sneaky.write(
            "terraform {\n  required_providers {\n    trellis = { source = "
            '"trellis.invalid/trellis/trellis" }\n  }\n}\n'
            'resource "trellis_intention" "x" {\n  source      = "web"\n'
            '  destination = "db"\n  action      = "allow"\n}\n'
        )
        sneaky.run("init", "-no-color", offline=True)
        r = sneaky.apply(codes=(1,))
        assert "permission denied" in r.err and "intentions:write on 'db'" in r.err, r
        # The tokens are in no state and no output.
        for wd in teams.values():
            state = (wd.path / "terraform.tfstate").read_text()
            assert all(t not in state for t in tokens.values())
        for wd in teams.values():
            r = wd.run("destroy", "-auto-approve", "-no-color", *var)
            assert "Destroy complete!" in r.out, r
        left = admin.catalog_node(node).value["Services"]
        assert not {"web", "web-sidecar-proxy", "db", "db-sidecar-proxy"} & set(left)
        assert [i["SourceName"] for i in admin.intentions_list().value] == ["*"]
        r = platform.run("destroy", "-auto-approve", "-no-color", "-var", f"node={node}")
        assert "Destroy complete!" in r.out, r
        assert admin.intentions_list().value == []
        assert not {"team-web", "team-db"} & {p["Name"] for p in admin.acl_policy_list()}
    finally:
        admin.close()


def intention_id(api: Client, source: str, destination: str) -> str:
    return api.intention_get_exact(source, destination).value["ID"]
