"""``trellis acl ...`` against a real ``trellis server`` with ACLs on (default deny), output
compared verbatim.

Commands run in-process through ``trellis.api.cli.main.run`` with captured streams; the server is a
real subprocess started once for the module from a JSON config file. IDs and times are the
server's, so they are matched with a pattern and then compared with what the typed client
reads from the API. The server logs at debug level, and no secret may appear in its output.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import uuid
from dataclasses import dataclass

import pytest

from tests.support import TrellisProcess
from trellis.api.cli.main import run
from trellis.proxy.client import APIError, Client

pytestmark = pytest.mark.integration

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
GO_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})? \+0000 UTC"
MANAGEMENT = "00000000-0000-0000-0000-000000000001"
ANONYMOUS = "00000000-0000-0000-0000-000000000002"
RULES_HCL = 'key_prefix "app/" {\n  policy = "write"\n}\n'


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Server:
    process: TrellisProcess
    url: str
    #: ``trellis acl bootstrap``'s result, and the management secret it printed.
    bootstrap: Result
    root: str


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("acl-cli")
    config = base / "config.json"
    config.write_text(
        json.dumps(
            {
                "acl": {"enabled": True, "default_policy": "deny"},
                "data_dir": str(base / "data"),
                "log_level": "debug",
            }
        )
    )
    p = TrellisProcess(
        ["server", "-config", str(config), "-http-port", "0", "-dns-port", "-1"]
    ).start()
    try:
        boot = call(p.url, "acl", "bootstrap")
        m = re.search(rf"^SecretID: +({UUID})$", boot.out, re.M)
        assert m, (boot, p.output())
        yield Server(p, p.url, boot, m.group(1))
    finally:
        p.stop()


def call(url: str, *argv: str, token: str | None = None, stdin: str = "") -> Result:
    env = {"TRELLIS_HTTP_ADDR": url}
    if token is not None:
        env["TRELLIS_HTTP_TOKEN"] = token
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), env=env, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(server):
    """``trellis ARGS`` with the management token in TRELLIS_HTTP_TOKEN (``token=`` another
    secret instead, ``token=None`` none)."""

    def run_cli(*argv: str, stdin: str = "", **kw: str | None) -> Result:
        secret = kw.pop("token", server.root)
        assert not kw, kw
        return call(server.url, *argv, token=secret, stdin=stdin)

    return run_cli


@pytest.fixture
def api(server):
    with Client(server.url, token=server.root) as c:
        yield c


def go_time(api_time: str) -> str:
    """What the CLI must print for an API time (independent of api.cli.acl.go_time)."""
    when = dt.datetime.strptime(api_time, "%Y-%m-%dT%H:%M:%S.%fZ")
    frac = f"{when.microsecond:06d}".rstrip("0")
    return when.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "") + " +0000 UTC"


def token_text(t: dict, shown: str | None = None) -> str:
    """The token as the CLI prints it: its secret ``shown``, else ``<hidden>``."""
    lines = [
        f"AccessorID:       {t['AccessorID']}",
        f"SecretID:         {shown or '<hidden>'}",
        f"Description:      {t['Description']}",
        f"Local:            {str(t['Local']).lower()}",
        "Create Time:      "
        + (go_time(t["CreateTime"]) if t["CreateTime"] else "0001-01-01 00:00:00 +0000 UTC"),
    ]
    if t["Policies"]:
        lines.append("Policies:")
        lines += [f"   {p['ID']} - {p['Name']}" for p in t["Policies"]]
    return "\n".join(lines) + "\n"


def policy_text(p: dict) -> str:
    return (
        f"ID:           {p['ID']}\n"
        f"Name:         {p['Name']}\n"
        f"Description:  {p['Description']}\n"
        f"Datacenters:  {', '.join(p['Datacenters'])}\n"
        f"Rules:\n{p['Rules']}\n"
    )


# -- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_prints_the_token_once(server, cli, api):
    boot = server.bootstrap
    assert (boot.code, boot.err) == (0, "")
    m = re.fullmatch(
        rf"AccessorID:       ({UUID})\n"
        rf"SecretID:         ({UUID})\n"
        r"Description:      Bootstrap Token \(Global Management\)\n"
        r"Local:            false\n"
        rf"Create Time:      ({GO_TIME})\n"
        r"Policies:\n"
        rf"   {MANAGEMENT} - global-management\n"
        r"\n",
        boot.out,
    )
    assert m, boot.out
    me = api.acl_token_self()
    assert (m.group(1), m.group(2)) == (me["AccessorID"], server.root)
    assert m.group(3) == go_time(me["CreateTime"])

    again = cli("acl", "bootstrap", token=None)
    assert again == Result(
        1, "", "Failed ACL bootstrapping: Permission denied: ACL bootstrap no longer allowed\n"
    )


# -- policies --------------------------------------------------------------------------------


def test_policy_create_read_update_list_delete(cli, api, tmp_path):
    rules_file = tmp_path / "rules.hcl"
    rules_file.write_text(RULES_HCL)
    r = cli(
        "acl", "policy", "create", "-name", "app-kv", "-description", "app keys",
        "-rules", f"@{rules_file}", "-datacenter", "dc1",
    )  # fmt: skip
    assert (r.code, r.err) == (0, "")
    m = re.fullmatch(
        rf"ID:           ({UUID})\n"
        r"Name:         app-kv\n"
        r"Description:  app keys\n"
        r"Datacenters:  dc1\n"
        r"Rules:\n" + re.escape(RULES_HCL) + r"\n",
        r.out,
    )
    assert m, r.out
    pid = m.group(1)
    p = api.acl_policy_read(pid)
    assert r.out == policy_text(p)

    # read by ID and by name, pretty and JSON
    assert cli("acl", "policy", "read", "-id", pid) == Result(0, policy_text(p), "")
    assert cli("acl", "policy", "read", "-name", "app-kv") == Result(0, policy_text(p), "")
    r = cli("acl", "policy", "read", "-name", "app-kv", "-format", "json")
    assert r == Result(0, json.dumps(p, indent=4) + "\n", "")

    # update: only what the flags name changes (rules from the command line, as JSON)
    r = cli("acl", "policy", "update", "-id", pid, "-description", "all app keys")
    p = api.acl_policy_read(pid)
    assert (p["Description"], p["Rules"], p["Datacenters"]) == ("all app keys", RULES_HCL, ["dc1"])
    assert r == Result(0, policy_text(p), "")
    rules_json = json.dumps({"key_prefix": {"app/": {"policy": "read"}}})
    r = cli("acl", "policy", "update", "-id", pid, "-name", "app-read", "-rules", rules_json)
    p = api.acl_policy_read(pid)
    assert (p["Name"], p["Rules"], p["Description"]) == ("app-read", rules_json, "all app keys")
    assert r == Result(0, policy_text(p), "")
    r = cli("acl", "policy", "update", "-id", pid, "-no-merge", "-name", "app-read")
    p = api.acl_policy_read(pid)
    assert (p["Rules"], p["Description"], p["Datacenters"]) == ("", "", [])
    assert r == Result(0, policy_text(p), "")

    # rules from stdin
    r = cli("acl", "policy", "create", "-name", "ops", "-rules", "-", stdin='operator = "read"')
    assert r.code == 0, r
    ops = api.acl_policy_read_by_name("ops")
    assert ops["Rules"] == 'operator = "read"'

    # the list, in name order, without rules
    r = cli("acl", "policy", "list")
    expected = "".join(
        f"{x['Name']}:\n"
        f"   ID:           {x['ID']}\n"
        f"   Description:  {x['Description']}\n"
        f"   Datacenters:  {', '.join(x['Datacenters'])}\n"
        for x in api.acl_policy_list()
    )
    assert r == Result(0, expected + "\n", "")
    assert "global-management:\n   ID:           " + MANAGEMENT in r.out
    r = cli("acl", "policy", "list", "-format", "json")
    assert r == Result(0, json.dumps(api.acl_policy_list(), indent=4) + "\n", "")

    # delete by name and by ID
    assert cli("acl", "policy", "delete", "-name", "ops") == Result(
        0, f'Policy "{ops["ID"]}" deleted successfully\n', ""
    )
    assert cli("acl", "policy", "delete", "-id", pid) == Result(
        0, f'Policy "{pid}" deleted successfully\n', ""
    )
    with pytest.raises(APIError) as e:
        api.acl_policy_read(pid)
    assert e.value.status == 404
    r = cli("acl", "policy", "delete", "-id", pid)
    assert r == Result(1, "", f'Error deleting policy "{pid}": ACL policy {pid} not found\n')
    r = cli("acl", "policy", "delete", "-name", "ops")
    assert r == Result(1, "", "Error determining policy ID: ACL policy 'ops' not found\n")
    r = cli("acl", "policy", "read", "-name", "ops")
    assert r == Result(1, "", "Error reading policy \"ops\": ACL policy 'ops' not found\n")


def test_policy_errors(cli):
    r = cli("acl", "policy", "create", "-name", "bad", "-rules", 'agent "" { policy = "read" }')
    assert r.code == 1
    assert r.err.startswith('Failed to create new policy: Rules: unknown rule "agent"'), r.err
    r = cli("acl", "policy", "create", "-name", "bad", "-rules", "@/nonexistent/rules.hcl")
    assert r == Result(
        1, "", "Error loading rules: No such file or directory: /nonexistent/rules.hcl\n"
    )
    assert cli("acl", "policy", "create") == Result(1, "", "Missing require '-name' flag\n")
    assert cli("acl", "policy", "read") == Result(
        1, "", "Must specify either the -id or -name parameters\n"
    )
    assert cli("acl", "policy", "delete") == Result(
        1, "", "Must specify either the -id or -name parameters\n"
    )
    assert cli("acl", "policy", "update", "-name", "x") == Result(
        1, "", "Cannot update a policy without specifying the -id parameter\n"
    )
    cli("acl", "policy", "create", "-name", "dup")
    r = cli("acl", "policy", "create", "-name", "dup")
    assert r == Result(1, "", "Failed to create new policy: a policy named 'dup' exists\n")
    cli("acl", "policy", "delete", "-name", "dup")


# -- tokens ----------------------------------------------------------------------------------


def test_token_create_read_update_list_delete(server, cli, api):
    kv = api.acl_policy_create("kv-app", rules=RULES_HCL)
    ops = api.acl_policy_create("ops-read", rules='operator = "read"')
    r = cli(
        "acl", "token", "create", "-description", "deployer",
        "-policy-name", "kv-app", "-policy-id", ops["ID"],
    )  # fmt: skip
    assert (r.code, r.err) == (0, "")
    m = re.fullmatch(
        rf"AccessorID:       ({UUID})\n"
        rf"SecretID:         ({UUID})\n"
        r"Description:      deployer\n"
        r"Local:            false\n"
        rf"Create Time:      {GO_TIME}\n"
        r"Policies:\n"
        rf"   {ops['ID']} - ops-read\n"
        rf"   {kv['ID']} - kv-app\n"
        r"\n",
        r.out,
    )
    assert m, r.out
    accessor, secret = m.groups()
    t = api.acl_token_read(accessor)
    assert r.out == token_text(t, secret) + "\n"

    # The secret works, from the environment or from -token (which wins).
    assert cli("kv", "put", "app/x", "1", token=secret) == Result(
        0, "Success! Data written to: app/x\n", ""
    )
    r = cli("kv", "put", "-token", secret, "app/y", "1", token=str(uuid.uuid4()))
    assert r == Result(0, "Success! Data written to: app/y\n", "")
    r = cli("kv", "put", "other", "1", token=secret)
    assert r.code == 1 and "Permission denied" in r.err, r

    # read: never the secret
    r = cli("acl", "token", "read", "-id", accessor)
    assert r == Result(0, token_text(t) + "\n", "")
    assert secret not in r.out
    r = cli("acl", "token", "read", "-id", accessor, "-format", "json")
    want = {
        "CreateIndex": t["CreateIndex"],
        "ModifyIndex": t["ModifyIndex"],
        "AccessorID": accessor,
        "Description": "deployer",
        "Policies": t["Policies"],
        "Local": False,
        "CreateTime": t["CreateTime"],
    }
    assert r == Result(0, json.dumps(want, indent=4) + "\n", "")
    assert list(json.loads(r.out)) == list(want)  # Consul's field order
    r = cli("acl", "token", "read", "-self", token=secret)
    assert r == Result(0, token_text(t) + "\n", "")

    # update: the description alone keeps the policies; policies replace, or merge
    r = cli("acl", "token", "update", "-id", accessor, "-description", "renamed")
    t = api.acl_token_read(accessor)
    assert (t["Description"], [p["Name"] for p in t["Policies"]]) == (
        "renamed",
        ["ops-read", "kv-app"],
    )
    assert r == Result(0, token_text(t) + "\n", "")
    r = cli("acl", "token", "update", "-id", accessor, "-policy-name", "ops-read")
    t = api.acl_token_read(accessor)
    assert [p["Name"] for p in t["Policies"]] == ["ops-read"]
    assert r == Result(0, token_text(t) + "\n", "")
    r = cli("acl", "token", "update", "-id", accessor, "-merge-policies", "-policy-id", kv["ID"])
    t = api.acl_token_read(accessor)
    assert [p["Name"] for p in t["Policies"]] == ["ops-read", "kv-app"]
    assert t["Description"] == "renamed"
    # the secret did not change
    assert cli("kv", "put", "app/z", "1", token=secret).code == 0

    # list: every token, the secrets hidden
    r = cli("acl", "token", "list")
    tokens = api.acl_token_list()
    assert r == Result(0, "\n".join(token_text(x) for x in tokens) + "\n", "")
    assert [x["AccessorID"] for x in tokens][:1] == [ANONYMOUS]
    assert secret not in r.out and server.root not in r.out
    r = cli("acl", "token", "list", "-format", "json")
    listed = json.loads(r.out)
    assert [x["AccessorID"] for x in listed] == [x["AccessorID"] for x in tokens]
    assert all("SecretID" not in x for x in listed)
    assert r.out == json.dumps(listed, indent=4) + "\n"

    # delete
    r = cli("acl", "token", "delete", "-id", accessor)
    assert r == Result(0, f'Token "{accessor}" deleted successfully\n', "")
    r = cli("acl", "token", "read", "-id", accessor)
    assert r == Result(
        1, "", f'Error reading token "{accessor}": Permission denied: ACL not found\n'
    )
    r = cli("acl", "token", "delete", "-id", accessor)
    assert r == Result(
        1, "", f'Error deleting token "{accessor}": ACL token {accessor} not found\n'
    )
    r = cli("kv", "put", "app/x", "2", token=secret)
    assert r.code == 1 and "ACL not found" in r.err, r
    api.acl_policy_delete(kv["ID"])
    api.acl_policy_delete(ops["ID"])


def test_token_update_keeps_roles_and_identities(cli, api):
    """``acl token update`` changes what its flags name and keeps the rest, as Consul's does:
    the PUT body is the token's whole new state, and the CLI used to send only the
    description, policies and locality, so an update dropped the token's roles and
    identities."""
    role = api.request("PUT", "/v1/acl/role", json={"Name": "cli-kept"}).json()
    body = {
        "Description": "before",
        "Roles": [{"ID": role["ID"]}],
        "ServiceIdentities": [{"ServiceName": "web"}],
        "NodeIdentities": [{"NodeName": "n1", "Datacenter": "dc1"}],
        "TemplatedPolicies": [{"TemplateName": "builtin/dns"}],
    }
    t = api.request("PUT", "/v1/acl/token", json=body).json()
    r = cli("acl", "token", "update", "-id", t["AccessorID"], "-description", "after")
    assert r.code == 0, r
    got = api.acl_token_read(t["AccessorID"])
    assert got["Description"] == "after"
    assert got["Roles"] == [{"ID": role["ID"], "Name": "cli-kept"}]
    for key in ("ServiceIdentities", "NodeIdentities", "TemplatedPolicies"):
        assert got[key] == body[key], key
    api.acl_token_delete(t["AccessorID"])
    api.request("DELETE", f"/v1/acl/role/{role['ID']}")


def test_tokens_and_their_errors(server, cli):
    # No token: the anonymous token, which may read itself and nothing else.
    r = cli("acl", "token", "read", "-self", token=None)
    assert r.code == 0
    assert r.out.startswith(f"AccessorID:       {ANONYMOUS}\nSecretID:         <hidden>\n")
    assert "Create Time:      0001-01-01 00:00:00 +0000 UTC\n" in r.out
    r = cli("acl", "token", "list", token=None)
    assert r == Result(
        1, "", "Failed to retrieve the token list: Permission denied: token lacks permission "
        "'acl:read'\n",
    )  # fmt: skip
    r = cli("acl", "token", "create", token=None)
    assert r == Result(
        1, "", "Failed to create new token: Permission denied: token lacks permission "
        "'acl:write'\n",
    )  # fmt: skip
    unknown = str(uuid.uuid4())
    r = cli("acl", "token", "read", "-self", token=unknown)
    assert r == Result(1, "", 'Error reading token "": Permission denied: ACL not found\n')
    assert cli("acl", "token", "read") == Result(1, "", "Must specify the -id parameter\n")
    assert cli("acl", "token", "delete") == Result(1, "", "Must specify the -id parameter\n")
    assert cli("acl", "token", "update") == Result(
        1, "", "Cannot update a token without specifying the -id parameter\n"
    )
    r = cli("acl", "token", "create", "-policy-name", "nope")
    assert r == Result(1, "", "Failed to create new token: no such ACL policy: nope\n")
    r = cli("acl", "token", "read", "-id", "not-a-uuid")
    assert r.code == 1 and r.err.startswith('Error reading token "not-a-uuid": '), r


def test_help(cli):
    r = cli("acl", "-h")
    assert r == Result(
        0,
        "Usage: trellis acl <subcommand> [options] [args]\n\n"
        "  Interact with Trellis's ACLs\n\n"
        "Subcommands:\n"
        "    bootstrap    Bootstrap Trellis's ACL system\n"
        "    policy       Manage Trellis's ACL policies\n"
        "    token        Manage Trellis's ACL tokens\n",
        "",
    )
    r = cli("acl", "token")
    assert r.code == 1
    assert r.err == (
        "Usage: trellis acl token <subcommand> [options] [args]\n\n"
        "  Manage Trellis's ACL tokens\n\n"
        "Subcommands:\n"
        "    create    Create an ACL token\n"
        "    delete    Delete an ACL token\n"
        "    list      List ACL tokens\n"
        "    read      Read an ACL token\n"
        "    update    Update an ACL token\n"
    )
    r = cli("acl", "policy", "create", "-h")
    assert r.code == 0
    assert r.out.startswith("Usage: trellis acl policy create -name NAME [options]\n")
    for flag in ("-name=<string>", "-rules=<string>", "-datacenter=<string>", "-token=<value>"):
        assert f"  {flag}\n" in r.out, flag


def test_no_secret_reaches_the_server_log(server, cli, api):
    """The server runs at debug level; whatever it printed so far (every test of this module
    sent tokens), and a few more requests, never show a secret."""
    made = cli("acl", "token", "create", "-description", "log check")
    secret = re.search(rf"^SecretID: +({UUID})$", made.out, re.M).group(1)
    cli("kv", "put", "app/x", "1", token=secret)
    cli("acl", "token", "read", "-self", token=secret)
    unknown = str(uuid.uuid4())
    cli("acl", "token", "read", "-self", token=unknown)
    with Client(server.url, token=secret) as c, pytest.raises(APIError):
        c.kv_put("x", "1")
    log = server.process.output() + "\n".join(server.process.lines)
    assert "PUT /v1/acl/token" in log  # the log shows requests, at debug level
    for s in (server.root, secret, unknown):
        assert s not in log
