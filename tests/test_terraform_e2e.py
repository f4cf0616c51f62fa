"""The Terraform provider end to end: the real Terraform 1.0.3 against a real ``trellis dev``
(and a real ``trellis server`` with ACLs, which ``trellis dev`` cannot turn on).

Terraform costs about a second per command, so there are few tests, each walking through
many steps of one story; tests/terraform_support.py isolates every run.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support import TRELLIS, TrellisProcess
from tests.terraform_support import Mirror, Workdir, h1_hash, provider_mirror  # noqa: F401
from trellis.proxy.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOURCE = "trellis.invalid/trellis/trellis"

MAIN_TF = """
terraform {
  required_providers {
    trellis = { source = "%(source)s", version = "0.1.0" }
  }
}

variable "action" { default = "allow" }
variable "destination" { default = "db" }

# No address: it comes from TRELLIS_HTTP_ADDR.
provider "trellis" {}

resource "trellis_intention" "web" {
  source      = "web"
  destination = var.destination
  action      = var.action
  description = "web may call its database"
  meta        = { team = "web" }
}

resource "trellis_key" "port" {
  path  = "config/web/port"
  value = "8080"
  flags = 42
  cas   = true
}

data "trellis_intention_check" "web" {
  source      = "web"
  destination = trellis_intention.web.destination
}

output "allowed" { value = data.trellis_intention_check.web.allowed }
output "deciding" { value = data.trellis_intention_check.web.intention }
"""

IMPORTED_TF = """
terraform {
  required_providers {
    trellis = { source = "%(source)s", version = "0.1.0" }
  }
}

provider "trellis" {}

resource "trellis_intention" "api" {
  source      = "api"
  destination = "db"
  action      = "deny"
}

resource "trellis_key" "motd" {
  path  = "config/motd"
  value = "hello"
}
"""


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


def check_cli(url: str, source: str, destination: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRELLIS, "intention", "check", source, destination],
        env={"TRELLIS_HTTP_ADDR": url},
        capture_output=True,
        text=True,
        timeout=30,
    )


def outputs(wd: Workdir) -> dict:
    return {k: v["value"] for k, v in json.loads(wd.run("output", "-json").out).items()}


def test_lifecycle_drift_import_destroy_on_trellis_dev(
    provider_mirror: Mirror,  # noqa: F811
    dev,
    api,
    tmp_path,
):
    wd = Workdir(tmp_path / "main", provider_mirror, {"TRELLIS_HTTP_ADDR": dev.url})
    wd.write(MAIN_TF % {"source": SOURCE})

    # init installs from the mirror with no network at all, and locks the package's hash.
    r = wd.run("init", "-no-color", offline=True)
    assert f"Installed {SOURCE} v0.1.0" in r.out, r
    assert wd.lock_hashes() == [h1_hash(provider_mirror.package)]

    r = wd.apply()
    assert "Resources: 2 added, 0 changed, 0 destroyed" in r.out, r
    assert outputs(wd) == {"allowed": True, "deciding": "web => db (allow)"}
    got = api.intention_get_exact("web", "db").value
    assert (got["Action"], got["Meta"]) == ("allow", {"team": "web"})
    pair = api.kv_get("config/web/port").value
    assert (pair.value, pair.flags) == (b"8080", 42)
    assert wd.plan_exit().code == 0

    # The user's flow: the same intention switched to deny, applied in place; the CLI says
    # Denied.
    r = wd.apply("-var", "action=deny")
    assert '~ action      = "allow" -> "deny"' in r.out, r
    assert "Resources: 0 added, 1 changed, 0 destroyed" in r.out, r
    c = check_cli(dev.url, "web", "db")
    assert (c.returncode, c.stdout.strip()) == (2, "Denied"), c
    assert outputs(wd) == {"allowed": False, "deciding": "web => db (deny)"}
    assert wd.plan_exit("-var", "action=deny").code == 0

    # Drift: the intention deleted and the key changed through the API show in the next
    # plan; the next apply re-creates the one and puts the other back.
    api.intention_delete_exact("web", "db")
    api.kv_put("config/web/port", "9999")
    r = wd.plan_exit("-var", "action=deny")
    assert r.code == 2, r
    assert "trellis_intention.web has been deleted" in r.out, r
    assert '"8080" -> "9999"' in r.out, r  # the change made outside Terraform
    r = wd.apply("-var", "action=deny")
    assert "Resources: 1 added, 1 changed, 0 destroyed" in r.out, r
    assert api.intention_get_exact("web", "db").value["Action"] == "deny"
    assert api.kv_get("config/web/port").value.value == b"8080"
    assert wd.plan_exit("-var", "action=deny").code == 0

    # A new destination replaces the intention.
    r = wd.apply("-var", "action=deny", "-var", "destination=cache")
    assert "# forces replacement" in r.out, r
    assert "Resources: 1 added, 0 changed, 1 destroyed" in r.out, r
    assert api.intention_get_exact("web", "db").value is None
    assert api.intention_get_exact("web", "cache").value["Action"] == "deny"

    # Import what was made outside Terraform, into another configuration: the next plan has
    # nothing to change.
    api.intention_create("api", "db", "deny")
    api.kv_put("config/motd", "hello")
    other = Workdir(tmp_path / "imported", provider_mirror, {"TRELLIS_HTTP_ADDR": dev.url})
    other.write(IMPORTED_TF % {"source": SOURCE})
    other.run("init", "-no-color", offline=True)
    r = other.run("import", "-no-color", "trellis_intention.api", "api/db")
    assert "Import successful!" in r.out, r
    other.run("import", "-no-color", "trellis_key.motd", "config/motd")
    assert other.plan_exit().code == 0, other.plan_exit()

    # Destroy both: nothing is left behind.
    other.run("destroy", "-auto-approve", "-no-color")
    r = wd.run("destroy", "-auto-approve", "-no-color", "-var", "destination=cache")
    assert "Resources: 2 destroyed" in r.out, r
    assert api.intentions_list().value == []
    assert api.kv_get("", recurse=True).value == []
    assert wd.state()["resources"] == [] or all(
        res["mode"] == "data" for res in wd.state()["resources"]
    )


ACL_TF = """
terraform {
  required_providers {
    trellis = { source = "%(source)s", version = "0.1.0" }
  }
}

variable "token" {
  type      = string
  sensitive = true
}

provider "trellis" {
  address = "%(address)s"
  token   = var.token
}

resource "trellis_intention" "web" {
  source      = "web"
  destination = "db"
  action      = "allow"
}

resource "trellis_key" "port" {
  path  = "config/web/port"
  value = "8080"
}
"""


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


def test_permission_denied_is_a_clear_diagnostic_and_the_token_stays_secret(
    provider_mirror: Mirror,  # noqa: F811
    acl_server,
    tmp_path,
):
    with Client(acl_server.url) as anonymous:
        root = anonymous.acl_bootstrap()["SecretID"]
    with Client(acl_server.url, token=root) as admin:
        _permission_denied(provider_mirror, acl_server, admin, tmp_path)


def _permission_denied(provider_mirror: Mirror, acl_server, admin: Client, tmp_path) -> None:  # noqa: F811
    admin.acl_policy_create("keys-only", rules='key_prefix "config/" { policy = "write" }')
    limited = admin.acl_token_create(policy_names=["keys-only"])["SecretID"]

    wd = Workdir(tmp_path / "acl", provider_mirror, {"TF_VAR_token": limited})
    wd.write(ACL_TF % {"source": SOURCE, "address": acl_server.url})
    wd.run("init", "-no-color", offline=True)
    r = wd.apply(codes=(1,))
    assert "Error: Cannot create intention web => db: permission denied" in r.err, r
    assert "lacks intentions:write on 'db'" in r.err, r
    assert 'service "db" { intentions = "write" }' in r.err, r
    # What the token may do was done.
    assert admin.kv_get("config/web/port").value.value == b"8080"
    assert admin.intentions_list().value == []
    # The token is in neither the state nor what Terraform shows.
    shown = wd.run("show", "-no-color").out + wd.run("show", "-json").out
    assert limited not in shown and limited not in (wd.path / "terraform.tfstate").read_text()
    r = wd.run("destroy", "-auto-approve", "-no-color")
    assert admin.kv_get("config/web/port").value is None, r
