"""The provider's ACL, K/V prefix and CA resources end to end: the real Terraform 1.0.3
against a real ``trellis server`` with ACLs, and against ``trellis dev`` with a real OpenBao
as the CA (tests/terraform_support.py's harness; few tests, many steps each: Terraform is
slow)."""

from __future__ import annotations

import json

import pytest

from tests import vault_fixtures
from tests.support import TrellisProcess
from tests.terraform_support import Mirror, Workdir, provider_mirror  # noqa: F401
from trellis.proxy.client import APIError, Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

openbao = vault_fixtures.openbao
vault_paths = vault_fixtures.vault_paths

HEADER = """
terraform {
  required_providers {
    trellis = { source = "trellis.invalid/trellis/trellis", version = "0.1.0" }
  }
}
"""

ACL_TF = (
    HEADER
    + """
variable "token" {
  type      = string
  sensitive = true
}

provider "trellis" {
  address = "%(address)s"
  token   = var.token
}

resource "trellis_acl_policy" "web" {
  name        = "web"
  description = "web's services and config"
  rules       = <<-EOT
%(rules)s
  EOT
}

resource "trellis_acl_token" "ci" {
  description = "web's CI"
  policies    = [trellis_acl_policy.web.name]
}

resource "trellis_keys" "web" {
  path_prefix       = "config/web/"
  values            = { port = "8080", "db/host" = "db.local" }
  flags             = { port = 42 }
  delete_undeclared = true
}

data "trellis_keys" "web" {
  path_prefix = trellis_keys.web.path_prefix
}

output "accessor" { value = trellis_acl_token.ci.accessor_id }
output "keys" { value = data.trellis_keys.web.values }
"""
)

RULES_HCL = """\
    service_prefix "web" {
      policy     = "write"
      intentions = "write"
    }
    key_prefix "config/web/" { policy = "write" }"""
# The same rules as JSON, keys in another order: the same policy.
RULES_JSON = """\
    {"key_prefix": {"config/web/": {"policy": "write"}},
     "service_prefix": {"web": {"intentions": "write", "policy": "write"}}}"""

IMPORT_TF = (
    HEADER
    + """
variable "token" {
  type      = string
  sensitive = true
}

provider "trellis" {
  address = "%(address)s"
  token   = var.token
}

resource "trellis_acl_policy" "ops" {
  name  = "ops"
  rules = "operator = \\"read\\""
}

resource "trellis_acl_token" "ops" {
  description = "made by hand"
  policies    = ["ops"]
}
"""
)


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


def outputs(wd: Workdir) -> dict:
    return {k: v["value"] for k, v in json.loads(wd.run("output", "-json").out).items()}


def test_acl_policy_token_and_keys(provider_mirror: Mirror, acl_server, tmp_path):  # noqa: F811
    with Client(acl_server.url) as anonymous:
        root = anonymous.acl_bootstrap()["SecretID"]
    with Client(acl_server.url, token=root) as admin:
        _acl_policy_token_and_keys(provider_mirror, acl_server, admin, root, tmp_path)


def _acl_policy_token_and_keys(provider_mirror, acl_server, admin, root, tmp_path) -> None:  # noqa: F811
    admin.kv_put("config/web/stale", "left by someone")
    wd = Workdir(tmp_path / "acl", provider_mirror, {"TF_VAR_token": root})
    wd.write(ACL_TF % {"address": acl_server.url, "rules": RULES_HCL})
    wd.run("init", "-no-color", offline=True)
    r = wd.apply()
    assert "Resources: 3 added, 0 changed, 0 destroyed" in r.out, r
    accessor = outputs(wd)["accessor"]
    token = admin.acl_token_read(accessor)
    assert [p["Name"] for p in token["Policies"]] == ["web"]
    # The secret is in the state (terraform/README.md says so, and how to avoid it: Terraform
    # keeps sensitive values in the state, and `show -json` prints them, by design), and in
    # nothing Terraform shows a person: not the apply, not a plan, not `terraform show`.
    (tok,) = [x for x in wd.state()["resources"] if x["type"] == "trellis_acl_token"]
    secret_id = tok["instances"][0]["attributes"]["secret_id"]
    with Client(acl_server.url, token=secret_id) as c:
        assert c.acl_token_self()["AccessorID"] == accessor
    shown = wd.run("show", "-no-color").out
    assert secret_id not in shown and secret_id not in r.out + r.err
    assert "secret_id" in shown and "(sensitive value)" in shown
    # Created keys; the undeclared one is not deleted by the creation.
    assert admin.kv_get("config/web/port").value.flags == 42
    assert admin.kv_get("config/web/stale").value is not None

    # The next plan lists the undeclared key's deletion, as a change and a warning.
    r = wd.plan_exit()
    assert r.code == 2, r
    assert '"config/web/stale"' in r.out and "will delete 1 key(s)" in r.out + r.err, r
    r = wd.apply()
    assert "Resources: 0 added, 1 changed, 0 destroyed" in r.out, r
    assert admin.kv_get("config/web/stale").value is None
    assert wd.plan_exit().code == 0

    # Rules reformatted, as JSON with the keys in another order: no change.
    wd.write(ACL_TF % {"address": acl_server.url, "rules": RULES_JSON})
    r = wd.plan_exit()
    assert r.code == 0, r
    # ... and changed outside Terraform to the same meaning: still no change.
    policy = admin.acl_policy_read_by_name("web")
    admin.acl_policy_update(
        policy["ID"], "web", rules=RULES_JSON.replace("\n", " "), description=policy["Description"]
    )
    assert wd.plan_exit().code == 0

    # Keys drift: a value changed and a declared key deleted through the API are put back.
    admin.kv_put("config/web/port", "9999", flags=42)
    admin.kv_delete("config/web/db/host")
    r = wd.plan_exit()
    assert r.code == 2 and '"8080" -> "9999"' in r.out, r
    assert "terraform show" not in r.out and secret_id not in r.out
    r = wd.apply()
    assert admin.kv_get("config/web/port").value.value == b"8080"
    assert admin.kv_get("config/web/db/host").value.value == b"db.local"
    assert outputs(wd)["keys"] == {"port": "8080", "db/host": "db.local"}
    assert wd.plan_exit().code == 0

    # Import a token made by hand, by accessor ID (and its policy, by name): no change next.
    admin.acl_policy_create("ops", rules='operator = "read"')
    made = admin.acl_token_create(description="made by hand", policy_names=["ops"])
    other = Workdir(tmp_path / "imported", provider_mirror, {"TF_VAR_token": root})
    other.write(IMPORT_TF % {"address": acl_server.url})
    other.run("init", "-no-color", offline=True)
    r = other.run("import", "-no-color", "trellis_acl_token.ops", made["AccessorID"])
    assert "Import successful!" in r.out, r
    other.run("import", "-no-color", "trellis_acl_policy.ops", "ops")
    r = other.plan_exit()
    assert r.code == 0, r
    # Imported, the secret is in neither the state nor what Terraform shows.
    assert made["SecretID"] not in other.shown()

    # Destroy: the token and the policy go; the keys it declared go, nothing else.
    admin.kv_put("config/other", "not web's")
    r = wd.run("destroy", "-auto-approve", "-no-color")
    assert "Resources: 3 destroyed" in r.out, r
    assert [k.key for k in admin.kv_get("config/", recurse=True).value] == ["config/other"]
    with pytest.raises(APIError) as gone:
        admin.acl_token_read(accessor)
    # A gone token reads as Consul answers it: 403 "ACL not found" (issue 15).
    assert gone.value.status == 403 and "ACL not found" in str(gone.value)
    assert [p["Name"] for p in admin.acl_policy_list()] != [] and all(
        p["Name"] != "web" for p in admin.acl_policy_list()
    )


CA_TF = (
    HEADER
    + """
provider "trellis" {}

resource "trellis_ca_config" "ca" {
  connect_provider            = "vault"
  vault_address               = "%(address)s"
  vault_root_pki_path         = "%(root)s"
  vault_intermediate_pki_path = "%(intermediate)s"
  vault_token_file            = "%(token_file)s"
  leaf_cert_ttl               = "%(leaf)s"
}

data "trellis_ca_roots" "now" {
  depends_on = [trellis_ca_config.ca]
}

output "root" { value = data.trellis_ca_roots.now.active_root_id }
"""
)


@pytest.fixture
def dev():
    p = TrellisProcess(["dev", "-http-port", "0", "-dns-port", "-1"]).start()
    try:
        yield p
    finally:
        p.stop()


def test_ca_config_vault_token_file_is_in_no_state(
    provider_mirror: Mirror,  # noqa: F811
    dev,
    openbao,
    vault_paths,
    tmp_path,
):
    token_file = tmp_path / "bao-token"
    token_file.write_text(openbao.token + "\n")
    token_file.chmod(0o600)
    values = {
        "address": openbao.address,
        "root": vault_paths.root,
        "intermediate": vault_paths.intermediate,
        "token_file": token_file,
        "leaf": "72h",
    }
    wd = Workdir(tmp_path / "ca", provider_mirror, {"TRELLIS_HTTP_ADDR": dev.url})
    wd.write(CA_TF % values)
    wd.run("init", "-no-color", offline=True)
    with Client(dev.url) as api:
        builtin_root = api.ca_roots().value["ActiveRootID"]
        # The plan says that applying replaces the root (from the built-in CA to Vault).
        r = wd.plan_exit()
        assert "this apply replaces the CA root" in r.out + r.err, r
        r = wd.apply()
        assert "Resources: 1 added" in r.out, r
        roots = api.ca_roots().value
        assert roots["ActiveRootID"] != builtin_root
        assert api.ca_get_config()["Provider"] == "vault"
        assert outputs(wd)["root"] == roots["ActiveRootID"]
        # The token given by file is in neither terraform show nor the state file.
        everything = wd.shown()
        assert openbao.token not in everything
        assert str(token_file) in everything  # only the file's name is kept
        assert wd.plan_exit().code == 0
        # A TTL change (72h -> 24h) is in place, and rotates nothing: no warning.
        wd.write(CA_TF % {**values, "leaf": "24h"})
        r = wd.apply()
        assert "Resources: 0 added, 1 changed, 0 destroyed" in r.out, r
        assert "replaces the CA root" not in r.out + r.err
        assert api.ca_roots().value["ActiveRootID"] == roots["ActiveRootID"]
        assert api.ca_get_config()["Config"]["LeafCertTTL"] == "24h"
        assert openbao.token not in wd.shown()
        # Destroy forgets the configuration, says so, and leaves the CA serving.
        r = wd.run("destroy", "-auto-approve", "-no-color")
        assert "The CA configuration stays as it is" in r.out + r.err, r
        assert api.ca_get_config()["Provider"] == "vault"
        assert api.ca_roots().value["ActiveRootID"] == roots["ActiveRootID"]
