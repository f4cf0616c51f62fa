"""The ``trellis`` CLI: argument parsing, messages and output, compared verbatim.

Commands run in-process through ``trellis.api.cli.main.run`` (or ``main``) with pytest's captured
streams. Output formatting is checked against canned answers from a scripted HTTP server on
127.0.0.1:0 (so that indexes and fields are fixed) and, end to end, against the real server
(``trellis_server``); a few commands run as real ``trellis`` subprocesses.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.cli_support import Result, run_cli
from tests.http_stub import Reply
from trellis.api import __version__
from trellis.api.cli import main as cli_main
from trellis.api.cli.base import UsageError
from trellis.api.cli.main import main, run
from trellis.api.cli.serve import parse_server_args
from trellis.api.cli.services import services_from_file
from trellis.proxy.client import Client


@pytest.fixture
def cli(capsys):
    """Run ``trellis ARGS`` in-process, with this environment and standard input."""

    def call(*argv: str, env: dict[str, str] | None = None, stdin: str = "") -> Result:
        return run_cli(capsys, argv, env=env or {}, stdin=stdin)

    return call


# -- help, version, usage errors ---------------------------------------------------------------

TOP_HELP = """\
Usage: trellis [--version] [--help] <command> [<args>]

Available commands are:
    acl          Interact with Trellis's ACLs
    agent        Runs the node agent
    ca           Interact with the Connect certificate authority (CA)
    catalog      Interact with the catalog
    connect      Interact with Trellis Connect
    dev          Run a throw-away server on this machine, for development
    event        Fire a new event
    info         Provides debugging information for operators
    intention    Interact with Connect service intentions
    kv           Interact with the key-value store
    leave        Gracefully leaves the cluster and shuts down the agent
    lock         Execute a command holding a lock
    maint        Controls node or service maintenance mode
    members      Lists the members of a Trellis cluster
    reload       Triggers the agent to reload its configuration files
    server       Run the control plane (HTTP API and DNS)
    services     Interact with services
    snapshot     Saves, restores and inspects snapshots of the whole store
    terraform    Install the Terraform provider
    version      Prints the Trellis version
    watch        Watch for changes in Trellis
"""


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help_lists_the_commands(cli, flag):
    r = cli(flag)
    assert (r.code, r.out, r.err) == (0, TOP_HELP, "")


def test_no_arguments_prints_help_and_fails(cli):
    r = cli()
    assert (r.code, r.out, r.err) == (1, "", TOP_HELP)


def test_unknown_command(cli):
    r = cli("frobnicate")
    assert r.code == 1
    assert r.err == "Unknown command: frobnicate\n\n" + TOP_HELP


def test_group_help(cli):
    r = cli("catalog", "-h")
    assert r.code == 0
    assert r.out == (
        "Usage: trellis catalog <subcommand> [options] [args]\n\n"
        "  Interact with the catalog\n\n"
        "Subcommands:\n"
        "    nodes       Lists all nodes in the given datacenter\n"
        "    service     Lists the instances of a service\n"
        "    services    Lists all registered services in a datacenter\n"
    )


@pytest.mark.parametrize("argv", [["version"], ["-version"], ["--version"], ["-v"]])
def test_version(cli, argv):
    r = cli(*argv)
    assert (r.code, r.out, r.err) == (0, f"Trellis v{__version__}\n", "")


def test_main_is_the_console_entry_point(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"Trellis v{__version__}\n"


def test_command_help_goes_to_stdout(cli):
    r = cli("kv", "delete", "-h")
    assert r.code == 0 and r.err == ""
    assert r.out.startswith("Usage: trellis kv delete [options] KEY_OR_PREFIX\n\n")
    assert "\n  -recurse\n     Recursively delete all keys with the path." in r.out
    assert "\n  -modify-index=<uint>\n" in r.out
    assert "\nHTTP API Options:\n\n  -http-addr=<address>\n" in r.out


def test_dev_help_says_what_dev_starts(cli):
    """Only what ``trellis dev`` really starts (no UI): since issue 11 item 5, always a node
    agent, on the API address, in front of the server."""
    r = cli("dev", "-h")
    assert r.code == 0 and r.err == ""
    assert r.out.startswith(
        "Usage: trellis dev [options]\n"
        "\n"
        "  Starts everything on one machine: a server (SQLite in a temporary data directory,\n"
        "  deleted when it stops; the built-in CA; DNS on 127.0.0.1:8600) and in front of it\n"
        "  the node agent of this host (trellis agent), which serves the HTTP API on\n"
        "  127.0.0.1:8500 (-bind, -http-port): it answers the /v1/agent endpoints and\n"
        "  forwards the rest to the server, which listens on a free 127.0.0.1 port of its\n"
        '  own (printed as "Server API"). Nothing else is needed. A service registered with\n'
        '  "connect": {"proxy": {}}, in a -config-dir file or through the API\n'
        "  (PUT /v1/agent/service/register), gets a sidecar the agent runs. Ctrl-C stops\n"
        "  the agent first (it deregisters its services and stops their sidecars), then\n"
        "  the server.\n"
        "\n"
        "Command Options:\n"
    )
    server = cli("server", "-h").out
    assert "UI" not in server and "agent" not in server


def test_missing_key_is_a_usage_error(cli):
    r = cli("kv", "put")
    assert (r.code, r.out) == (1, "")
    assert r.err.startswith("Error! Missing KEY argument\n\nUsage: trellis kv put [options]")


def test_unknown_flag(cli):
    r = cli("kv", "get", "-nope", "k")
    assert r.code == 1
    assert r.err.startswith("flag provided but not defined: -nope\n\nUsage: trellis kv get ")


def test_bad_flag_value(cli):
    r = cli("kv", "put", "-flags=many", "k", "v")
    assert r.code == 1
    assert r.err.startswith("invalid value for flag -flags: 'many' is not a whole number\n\n")


def test_flag_without_its_value(cli):
    r = cli("kv", "put", "k", "-modify-index")
    assert r.code == 1
    assert r.err.startswith("flag needs an argument: -modify-index\n\n")


def test_too_many_arguments(cli):
    r = cli("kv", "get", "a", "b")
    assert r.code == 1
    assert r.err.startswith("Too many arguments (expected 1, got 2)\n\nUsage: trellis kv get")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["kv", "put", "-cas", "k", "v"], "Must specify -modify-index with -cas!"),
        (
            ["kv", "delete", "-cas", "k"],
            "Cannot delete a key that does not exist. Provide a -modify-index greater than 0.",
        ),
        (["kv", "delete", "-modify-index=3", "k"], "Cannot specify -modify-index without -cas!"),
        (
            ["kv", "delete", "-cas", "-modify-index=3", "-recurse", "k"],
            "Cannot specify both -cas and -recurse!",
        ),
        (["kv", "put", "-base64", "k", "!!!"], None),
        (["kv", "import", "not json"], None),
        (["kv", "import", '[{"flags": 1}]'], "Cannot unmarshal data: entry 0 has no string 'key'"),
    ],
)
def test_invalid_combinations_fail_before_any_request(cli, dead_url, argv, message):
    # The address is dead: a request would fail differently, so these fail on their own.
    r = cli(*argv, "-http-addr", dead_url)
    assert (r.code, r.out) == (1, "")
    if message is not None:
        assert r.err == message + "\n"
    assert "cannot reach" not in r.err
    assert "Traceback" not in r.err


def test_bad_base64_message(cli, dead_url):
    r = cli("kv", "put", "-base64", "k", "!!!", "-http-addr", dead_url)
    assert r.err.startswith("Error! Cannot base 64 decode data: ")


def test_unmarshal_message(cli, dead_url):
    r = cli("kv", "import", "not json", "-http-addr", dead_url)
    assert r.err.startswith("Cannot unmarshal data: Expecting value")


def test_connection_refused_message(cli, dead_url):
    r = cli("kv", "get", "some/key", "-http-addr", dead_url)
    assert (r.code, r.out) == (1, "")
    assert r.err == f"Error! cannot reach Trellis at {dead_url}: [Errno 111] Connection refused\n"


def test_main_reads_the_address_from_the_environment(capsys, dead_url, monkeypatch):
    monkeypatch.setenv("TRELLIS_HTTP_ADDR", dead_url)
    assert main(["catalog", "services"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"Error listing services: cannot reach Trellis at {dead_url}: ")


def test_malformed_address(cli):
    r = cli("members", "-http-addr", "ftp://x")
    assert r.code == 1
    assert r.err == (
        "Error! cannot reach Trellis at ftp://x: the address must look like http://HOST:PORT\n"
    )


# -- address and token come from flags or the environment --------------------------------------


def test_env_address_and_token_are_used(cli, stub):
    stub.route = lambda req: Reply(200, b"true")
    env = {"TRELLIS_HTTP_ADDR": stub.url, "TRELLIS_HTTP_TOKEN": "from-env"}
    r = cli("kv", "put", "a/b", "v", env=env)
    assert (r.code, r.out, r.err) == (0, "Success! Data written to: a/b\n", "")
    req = stub.seen[-1]
    assert (req.method, req.path, req.body) == ("PUT", "/v1/kv/a/b", b"v")
    assert req.headers["x-consul-token"] == "from-env"


def test_flags_beat_the_environment(cli, stub, dead_url, tmp_path):
    stub.route = lambda req: Reply(200, b"true")
    env = {"TRELLIS_HTTP_ADDR": dead_url, "TRELLIS_HTTP_TOKEN": "from-env"}
    assert cli("kv", "put", "-http-addr", stub.url, "-token=flag", "k", env=env).code == 0
    assert stub.seen[-1].headers["x-consul-token"] == "flag"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    r = cli("kv", "put", f"--http-addr={stub.url}", "--token-file", str(token_file), "k", env=env)
    assert r.code == 0
    assert stub.seen[-1].headers["x-consul-token"] == "from-file"


def test_api_error_message_is_shown(cli, stub):
    stub.route = lambda req: Reply(403, b"Permission denied", {"Content-Type": "text/plain"})
    r = cli("kv", "get", "secret", "-http-addr", stub.url)
    assert (r.code, r.out, r.err) == (1, "", "Error! Permission denied\n")
    stub.route = lambda req: stub.json(500, {"error": "store unavailable: disk full"})
    r = cli("kv", "put", "k", "v", "-http-addr", stub.url)
    assert r.err == "Error! Failed writing data: store unavailable: disk full\n"


# -- output formats, on canned answers ---------------------------------------------------------

ENTRY = {
    "Key": "web/config",
    "CreateIndex": 12,
    "ModifyIndex": 15,
    "LockIndex": 0,
    "Flags": 42,
    "Value": base64.b64encode(b"max=5").decode(),
    "Session": "",
}
DETAILED = (
    "CreateIndex      12\n"
    "Flags            42\n"
    "Key              web/config\n"
    "LockIndex        0\n"
    "ModifyIndex      15\n"
    "Session          -\n"
    "Value            max=5\n"
)


def test_kv_get_detailed_layout(cli, stub):
    stub.route = lambda req: stub.json(200, [ENTRY])
    r = cli("kv", "get", "-detailed", "web/config", "-http-addr", stub.url)
    assert (r.code, r.out, r.err) == (0, DETAILED, "")
    r = cli("kv", "get", "-detailed", "-base64", "web/config", "-http-addr", stub.url)
    assert r.out == DETAILED.replace("max=5", "bWF4PTU=")


def test_kv_get_recurse_detailed_separates_entries(cli, stub):
    other = {**ENTRY, "Key": "web/other", "Session": "abc", "Value": None}
    stub.route = lambda req: stub.json(200, [ENTRY, other])
    r = cli("kv", "get", "-recurse", "-detailed", "web/", "-http-addr", stub.url)
    second = (
        DETAILED.replace("web/config", "web/other")
        .replace("Session          -", "Session          abc")
        .replace("Value            max=5", "Value")
    )
    assert r.out == DETAILED + "\n" + second
    assert stub.seen[-1].query == {"recurse": ["true"]}


def test_kv_get_json(cli, stub):
    stub.route = lambda req: stub.json(200, [ENTRY])
    r = cli("kv", "get", "-format", "json", "web/config", "-http-addr", stub.url)
    assert r.code == 0
    assert json.loads(r.out) == ENTRY


def test_kv_get_prints_binary_values_unchanged(capsysbinary, stub):
    raw = b"\x00\xffbinary\n"
    stub.route = lambda req: stub.json(200, [{**ENTRY, "Value": base64.b64encode(raw).decode()}])
    code = run(
        ["kv", "get", "web/config", "-http-addr", stub.url],
        env={},
        stdin=io.StringIO(),
        stdout=sys.stdout,
        stderr=sys.stderr,
    )
    assert code == 0
    assert capsysbinary.readouterr().out == raw + b"\n"


def test_catalog_nodes_table(cli, stub):
    nodes = [
        {"ID": "9f1a2b3c-1111-2222-3333-444455556666", "Node": "node-b", "Address": "10.0.0.2"},
        {"ID": "", "Node": "a", "Address": "127.0.0.1"},
    ]
    for n in nodes:
        n["Datacenter"] = "dc1"
    stub.route = lambda req: stub.json(200, nodes)
    r = cli("catalog", "nodes", "-http-addr", stub.url)
    assert (r.code, r.err) == (0, "")
    assert r.out == (
        "Node    ID        Address    DC\n"
        "a                 127.0.0.1  dc1\n"
        "node-b  9f1a2b3c  10.0.0.2   dc1\n"
    )


def test_catalog_services_with_tags(cli, stub):
    stub.route = lambda req: stub.json(200, {"web": ["v2", "v1"], "db": []})
    r = cli("catalog", "services", "-tags", "-http-addr", stub.url)
    assert (r.code, r.out, r.err) == (0, "db\nweb      v1,v2\n", "")
    r = cli("catalog", "services", "-http-addr", stub.url)
    assert r.out == "db\nweb\n"


def test_catalog_services_empty(cli, stub):
    stub.route = lambda req: stub.json(200, {})
    r = cli("catalog", "services", "-http-addr", stub.url)
    assert (r.code, r.out) == (0, "")
    assert r.err == "No services match the given query - try expanding your search.\n"


SELF = {
    "Config": {"NodeName": "a", "Datacenter": "dc1", "Version": "0.1.0", "Server": True},
    "Member": {"Name": "a", "Addr": "127.0.0.1", "Port": 8301, "Tags": {"vsn": "2"}},
    "Stats": {
        "build": {"version": "0.1.0", "prerelease": ""},
        "agent": {"services": "2", "check_monitors": "0"},
    },
}


def _self_and_nodes(stub):
    nodes = [
        {"ID": "x", "Node": "node-b", "Address": "10.0.0.2", "Datacenter": "dc1"},
        {"ID": "y", "Node": "a", "Address": "127.0.0.1", "Datacenter": "dc1"},
    ]

    def route(req):
        if req.path == "/v1/agent/self":
            return stub.json(200, SELF)
        if req.path == "/v1/catalog/nodes":
            return stub.json(200, nodes)
        return Reply(404)

    return route


def test_members_table(cli, stub):
    stub.route = _self_and_nodes(stub)
    r = cli("members", "-http-addr", stub.url)
    assert (r.code, r.err) == (0, "")
    assert r.out == (
        "Node    Address         Status  Type    Build  Protocol  DC\n"
        "a       127.0.0.1:8301  alive   server  0.1.0  2         dc1\n"
        "node-b  10.0.0.2        alive   client" + " " * 19 + "dc1\n"
    )


def test_members_json(cli, stub):
    stub.route = _self_and_nodes(stub)
    r = cli("members", "-format=json", "-http-addr", stub.url)
    assert json.loads(r.out)[0] == {
        "Node": "a",
        "Address": "127.0.0.1:8301",
        "Status": "alive",
        "Type": "server",
        "Build": "0.1.0",
        "Protocol": "2",
        "DC": "dc1",
    }


def test_info_sections(cli, stub):
    stub.route = _self_and_nodes(stub)
    r = cli("info", "-http-addr", stub.url)
    assert (r.code, r.err) == (0, "")
    assert r.out == (
        "agent:\n\tcheck_monitors = 0\n\tservices = 2\nbuild:\n\tprerelease = \n\tversion = 0.1.0\n"
    )


def test_bad_format_value(cli, stub):
    r = cli("info", "-format", "yaml", "-http-addr", stub.url)
    assert r.code == 1
    assert r.err.startswith("invalid value for flag -format: invalid choice: 'yaml'")
    assert stub.seen == []


# -- dev and server flags ----------------------------------------------------------------------


def test_dev_flags_become_settings_values():
    values, config = parse_server_args(
        [
            "-data-dir",
            "/tmp/d",
            "-store=sqlite:///x.db",
            "-datacenter",
            "east",
            "-node",
            "n1",
            "-bind",
            "127.0.0.2",
            "-http-port",
            "0",
            "-dns-port",
            "-1",
            "-domain",
            "mesh.",
            "--workers=3",
            "-worker-class",
            "gthread",
            "-log-level",
            "debug",
        ],
        dev=True,
    )
    assert config is None
    assert values == {
        "data_dir": "/tmp/d",
        "store": "sqlite:///x.db",
        "datacenter": "east",
        "node_name": "n1",
        "http_host": "127.0.0.2",
        "dns_host": "127.0.0.2",
        "http_port": 0,
        "dns_port": -1,
        "domain": "mesh.",
        "workers": 3,
        "worker_class": "gthread",
        "log_level": "debug",
    }


def test_only_given_flags_go_into_the_values():
    assert parse_server_args([], dev=True) == ({}, None)
    assert parse_server_args(["-config", "c.hcl", "-http-port=8501"], dev=False) == (
        {"http_port": 8501},
        "c.hcl",
    )
    assert parse_server_args(["-config-file=c.json"], dev=False) == ({}, "c.json")


@pytest.mark.parametrize(
    ("argv", "dev", "message"),
    [
        (["-config", "c.json"], True, "flag provided but not defined: -config"),
        (["-worker-class", "eventlet"], False, "invalid value for flag -worker-class"),
        (["-http-port", "http"], True, "invalid value for flag -http-port"),
        (["extra"], True, "Too many arguments (expected 0, got 1)"),
    ],
)
def test_bad_server_flags(argv, dev, message):
    with pytest.raises(UsageError) as ei:
        parse_server_args(argv, dev=dev)
    assert ei.value.message.startswith(message)


# -- service definition files ------------------------------------------------------------------


def test_service_files_json_and_hcl(tmp_path):
    one = tmp_path / "web.json"
    one.write_text(json.dumps({"service": {"name": "web", "port": 8080}}))
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"services": [{"name": "a"}, {"name": "b"}]}))
    hcl = tmp_path / "web.hcl"
    hcl.write_text(
        """
        service {
          name = "web"
          port = 8080
          tags = ["v1"]
          meta = { team = "x" }
          checks = [{ http = "http://127.0.0.1:8080/health", interval = "10s" }]
          connect {
            sidecar_service {}
          }
        }
        """
    )
    assert services_from_file(str(one)) == [{"name": "web", "port": 8080}]
    assert services_from_file(str(many)) == [{"name": "a"}, {"name": "b"}]
    assert services_from_file(str(hcl)) == [
        {
            "name": "web",
            "port": 8080,
            "tags": ["v1"],
            "meta": {"team": "x"},
            "checks": [{"http": "http://127.0.0.1:8080/health", "interval": "10s"}],
            "connect": {"sidecar_service": {}},
        }
    ]


def test_two_service_blocks_in_hcl(tmp_path):
    f = tmp_path / "two.hcl"
    f.write_text('service {\n name = "a"\n}\nservice {\n name = "b"\n}\n')
    assert services_from_file(str(f)) == [{"name": "a"}, {"name": "b"}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "Error: Error decoding "),
        ('{"node": {}}', "Error: "),
        ("[1]", "Error: "),
    ],
)
def test_bad_service_files(cli, dead_url, tmp_path, text, message):
    f = tmp_path / "bad.json"
    f.write_text(text)
    r = cli("services", "register", str(f), "-http-addr", dead_url)
    assert r.code == 1
    assert r.err.startswith(message)
    assert "cannot reach" not in r.err


def test_missing_service_file(cli, dead_url, tmp_path):
    r = cli("services", "register", str(tmp_path / "nope.json"), "-http-addr", dead_url)
    assert r.code == 1
    assert r.err == f"Error: Error reading {tmp_path / 'nope.json'}: No such file or directory\n"


def test_register_needs_a_file_or_flags(cli):
    r = cli("services", "register")
    assert r.code == 1
    assert r.err.startswith("Service registration requires at least one argument or flags.\n")


def test_register_from_flags_sends_the_file_form(cli, stub):
    stub.route = lambda req: Reply(200)
    r = cli(
        "services",
        "register",
        "-name=web",
        "-id",
        "web-1",
        "-port",
        "8080",
        "-address",
        "127.0.0.1",
        "-tag",
        "a",
        "-tag=b",
        "-meta",
        "team=x",
        "-http-addr",
        stub.url,
    )
    assert (r.code, r.out, r.err) == (0, "Registered service: web\n", "")
    assert json.loads(stub.seen[-1].body) == {
        "name": "web",
        "id": "web-1",
        "address": "127.0.0.1",
        "port": 8080,
        "tags": ["a", "b"],
        "meta": {"team": "x"},
    }


def test_register_error_message(cli, stub):
    stub.route = lambda req: stub.json(400, {"error": "Missing service name"})
    r = cli("services", "register", "-name=x", "-http-addr", stub.url)
    assert (r.code, r.err) == (1, 'Error registering service "x": Missing service name\n')


# -- end to end, against the real server -------------------------------------------------------


@pytest.fixture
def srv(trellis_server):
    return trellis_server


@pytest.fixture
def prefix():
    return f"cli-{uuid.uuid4().hex[:8]}"


def _t(cli, srv, *argv, stdin=""):
    return cli(*argv, env={"TRELLIS_HTTP_ADDR": srv.url}, stdin=stdin)


@pytest.mark.integration
def test_kv_put_get_delete(cli, srv, prefix):
    key = f"{prefix}/maxconns"
    r = _t(cli, srv, "kv", "put", key, "5")
    assert (r.code, r.out, r.err) == (0, f"Success! Data written to: {key}\n", "")
    r = _t(cli, srv, "kv", "get", key)
    assert (r.code, r.out, r.err) == (0, "5\n", "")
    r = _t(cli, srv, "kv", "get", "/" + key)  # a leading slash is dropped, as Consul does
    assert r.out == "5\n"
    r = _t(cli, srv, "kv", "get", "-base64", key)
    assert r.out == "NQ==\n"
    r = _t(cli, srv, "kv", "delete", key)
    assert (r.code, r.out, r.err) == (0, f"Success! Deleted key: {key}\n", "")
    r = _t(cli, srv, "kv", "get", key)
    assert (r.code, r.out, r.err) == (1, "", f"Error! No key exists at: {key}\n")


@pytest.mark.integration
def test_kv_put_value_forms(cli, srv, prefix, tmp_path):
    f = tmp_path / "lic"
    f.write_bytes(b"from a file\n")
    assert _t(cli, srv, "kv", "put", f"{prefix}/file", f"@{f}").code == 0
    assert _t(cli, srv, "kv", "put", f"{prefix}/stdin", "-", stdin="piped").code == 0
    assert _t(cli, srv, "kv", "put", f"{prefix}/b64", "-base64", "aGVsbG8=").code == 0
    assert _t(cli, srv, "kv", "put", f"{prefix}/dash", "-x").code == 0
    assert _t(cli, srv, "kv", "put", f"{prefix}/empty").code == 0
    r = _t(cli, srv, "kv", "get", "-recurse", prefix)
    assert r.out == (
        f"{prefix}/b64:hello\n"
        f"{prefix}/dash:-x\n"
        f"{prefix}/empty:\n"
        f"{prefix}/file:from a file\n\n"
        f"{prefix}/stdin:piped\n"
    )


@pytest.mark.integration
def test_kv_detailed_cas_and_flags(cli, srv, prefix):
    key = f"{prefix}/k"
    assert _t(cli, srv, "kv", "put", "-flags=42", key, "v1").code == 0
    with Client(srv.url) as c:
        pair = c.kv_get(key).value
    r = _t(cli, srv, "kv", "get", "-detailed", key)
    assert r.out == (
        f"CreateIndex      {pair.create_index}\n"
        "Flags            42\n"
        f"Key              {key}\n"
        "LockIndex        0\n"
        f"ModifyIndex      {pair.modify_index}\n"
        "Session          -\n"
        "Value            v1\n"
    )
    stale = str(pair.modify_index + 1000)
    r = _t(cli, srv, "kv", "put", "-cas", "-modify-index", stale, key, "v2")
    assert (r.code, r.out, r.err) == (1, "", f"Error! Did not write to {key}: CAS failed\n")
    r = _t(cli, srv, "kv", "put", "-cas", f"-modify-index={pair.modify_index}", key, "v2")
    assert (r.code, r.out) == (0, f"Success! Data written to: {key}\n")
    r = _t(cli, srv, "kv", "delete", "-cas", f"-modify-index={pair.modify_index}", key)
    assert (r.code, r.err) == (1, f"Error! Did not delete key {key}: CAS failed\n")
    assert _t(cli, srv, "kv", "get", key).out == "v2\n"


@pytest.mark.integration
def test_kv_keys_list_and_recursive_delete(cli, srv, prefix):
    for k in ("a", "b/c", "b/d"):
        assert _t(cli, srv, "kv", "put", f"{prefix}/{k}", k).code == 0
    r = _t(cli, srv, "kv", "get", "-keys", f"{prefix}/")
    assert r.out == f"{prefix}/a\n{prefix}/b/\n"
    r = _t(cli, srv, "kv", "list", prefix)
    assert r.out == f"{prefix}/a\n{prefix}/b/c\n{prefix}/b/d\n"
    r = _t(cli, srv, "kv", "list", "-format=json", f"{prefix}/b")
    assert json.loads(r.out) == [f"{prefix}/b/c", f"{prefix}/b/d"]
    r = _t(cli, srv, "kv", "delete", "-recurse", f"{prefix}/b")
    assert r.out == f"Success! Deleted keys with prefix: {prefix}/b\n"
    assert _t(cli, srv, "kv", "list", prefix).out == f"{prefix}/a\n"


@pytest.mark.integration
def test_kv_export_then_import(cli, srv, prefix, tmp_path):
    assert _t(cli, srv, "kv", "put", "-flags", "7", f"{prefix}/x", "one").code == 0
    assert _t(cli, srv, "kv", "put", f"{prefix}/y", "two").code == 0
    r = _t(cli, srv, "kv", "export", prefix)
    assert r.code == 0
    assert r.out == (
        "[\n"
        f'\t{{\n\t\t"key": "{prefix}/x",\n\t\t"flags": 7,\n\t\t"value": "b25l"\n\t}},\n'
        f'\t{{\n\t\t"key": "{prefix}/y",\n\t\t"flags": 0,\n\t\t"value": "dHdv"\n\t}}\n'
        "]\n"
    )
    dump = tmp_path / "dump.json"
    dump.write_text(r.out.replace(prefix, prefix + "-copy"))
    r = _t(cli, srv, "kv", "import", f"@{dump}")
    assert (r.code, r.out, r.err) == (
        0,
        f"Imported: {prefix}-copy/x\nImported: {prefix}-copy/y\n",
        "",
    )
    r = _t(cli, srv, "kv", "get", "-recurse", f"{prefix}-copy")
    assert r.out == f"{prefix}-copy/x:one\n{prefix}-copy/y:two\n"
    stdin_data = json.dumps([{"key": f"{prefix}-stdin", "flags": 0, "value": "eg=="}])
    r = _t(cli, srv, "kv", "import", "-", stdin=stdin_data)
    assert r.out == f"Imported: {prefix}-stdin\n"
    assert _t(cli, srv, "kv", "get", f"{prefix}-stdin").out == "z\n"


@pytest.mark.integration
def test_services_register_catalog_deregister(cli, srv, prefix, tmp_path):
    name = f"{prefix}-web"
    f = tmp_path / "web.hcl"
    f.write_text(f'service {{\n  name = "{name}"\n  port = 8080\n  tags = ["v2", "v1"]\n}}\n')
    r = _t(cli, srv, "services", "register", str(f))
    assert (r.code, r.out, r.err) == (0, f"Registered service: {name}\n", "")
    r = _t(cli, srv, "catalog", "services")
    assert name in r.out.splitlines()
    r = _t(cli, srv, "catalog", "services", "-tags")
    line = next(x for x in r.out.splitlines() if x.startswith(name + " "))
    assert line.split() == [name, "v1,v2"]
    with Client(srv.url) as c:
        inst = c.catalog_service(name).value
    assert len(inst) == 1
    node, addr = inst[0]["Node"], inst[0]["ServiceAddress"] or inst[0]["Address"]
    r = _t(cli, srv, "catalog", "service", name)
    w_id, w_node, w_addr = max(2, len(name)), max(4, len(node)), max(7, len(addr))
    assert r.out == (
        f"{'ID':<{w_id}}  {'Node':<{w_node}}  {'Address':<{w_addr}}  Port  Tags\n"
        f"{name:<{w_id}}  {node:<{w_node}}  {addr:<{w_addr}}  8080  v2,v1\n"
    )
    r = _t(cli, srv, "services", "deregister", str(f))
    assert (r.code, r.out, r.err) == (0, f"Deregistered service: {name}\n", "")
    assert name not in _t(cli, srv, "catalog", "services").out.splitlines()


@pytest.mark.integration
def test_services_register_json_and_deregister_by_id(cli, srv, prefix, tmp_path):
    f = tmp_path / "svcs.json"
    defs = [{"name": f"{prefix}-a", "id": f"{prefix}-a1", "port": 1}, {"name": f"{prefix}-b"}]
    f.write_text(json.dumps({"services": defs}))
    r = _t(cli, srv, "services", "register", str(f))
    assert r.out == f"Registered service: {prefix}-a\nRegistered service: {prefix}-b\n"
    r = _t(cli, srv, "services", "deregister", f"{prefix}-a1")
    assert r.out == f"Deregistered service: {prefix}-a1\n"
    r = _t(cli, srv, "services", "deregister", "-id", f"{prefix}-b")
    assert r.out == f"Deregistered service: {prefix}-b\n"
    out = _t(cli, srv, "catalog", "services").out.splitlines()
    assert f"{prefix}-a" not in out and f"{prefix}-b" not in out


@pytest.mark.integration
def test_catalog_nodes_members_info(cli, srv):
    with Client(srv.url) as c:
        nodes = c.catalog_nodes().value
        me = c.agent_self()
    node = me["Config"]["NodeName"]
    r = _t(cli, srv, "catalog", "nodes")
    assert r.code == 0
    header, *rows = r.out.splitlines()
    assert header.split() == ["Node", "ID", "Address", "DC"]
    mine = next(n for n in nodes if n["Node"] == node)
    assert [node, mine["ID"][:8], mine["Address"], mine["Datacenter"]] in [x.split() for x in rows]
    r = _t(cli, srv, "members")
    assert r.code == 0
    header, first, *_ = r.out.splitlines()
    assert header.split() == ["Node", "Address", "Status", "Type", "Build", "Protocol", "DC"]
    assert first.split()[0] == node
    assert first.split()[2:4] == ["alive", "server"]
    r = _t(cli, srv, "info")
    assert r.code == 0 and r.err == ""
    assert r.out.splitlines()[0].endswith(":")
    assert all(x.endswith(":") or x.startswith("\t") for x in r.out.splitlines())


# -- the console script, as a real process -----------------------------------------------------

TRELLIS = Path(sys.executable).parent / "trellis"


def _script(*argv: str, url: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    assert TRELLIS.exists(), f"{TRELLIS} is missing: pip install -e . into the venv"
    env = {**os.environ, "TRELLIS_HTTP_ADDR": url}
    env.pop("TRELLIS_HTTP_TOKEN", None)
    return subprocess.run(
        [str(TRELLIS), *argv], input=stdin, capture_output=True, text=True, env=env, timeout=60
    )


def test_script_version_and_refused_connection(dead_url):
    r = _script("version", url=dead_url)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"Trellis v{__version__}\n", "")
    r = _script("kv", "get", "k", url=dead_url)
    assert r.returncode == 1
    assert r.stdout == ""
    assert (
        r.stderr == f"Error! cannot reach Trellis at {dead_url}: [Errno 111] Connection refused\n"
    )


def test_script_client_commands_import_no_server_code(stub):
    # The client commands must not load Flask or gunicorn; a usage error exercises the import.
    code = (
        "import sys; from trellis.api.cli.main import main; main(['kv', 'get', '-h']); "
        "bad = [m for m in ('flask', 'gunicorn', 'gevent') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.integration
def test_script_end_to_end(srv, prefix):
    key = f"{prefix}/script"
    r = _script("kv", "put", key, "-", url=srv.url, stdin="from stdin")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"Success! Data written to: {key}\n", "")
    r = _script("kv", "get", key, url=srv.url)
    assert (r.returncode, r.stdout, r.stderr) == (0, "from stdin\n", "")
    r = _script("kv", "get", f"{prefix}/nope", url=srv.url)
    assert (r.returncode, r.stdout, r.stderr) == (
        1,
        "",
        f"Error! No key exists at: {prefix}/nope\n",
    )
    r = _script("kv", "delete", "-recurse", prefix, url=srv.url)
    assert r.stdout == f"Success! Deleted keys with prefix: {prefix}\n"


def test_hcl_blocks_become_objects_but_repeatable_ones_stay_lists():
    from trellis.api import hcl

    doc = hcl.loads(
        'service {\n name = "web"\n connect {\n sidecar_service {}\n }\n'
        ' checks = [{ http = "http://x", interval = "10s" }]\n}\n'
    )
    assert doc == {
        "service": [
            {
                "name": "web",
                "connect": {"sidecar_service": {}},
                "checks": [{"http": "http://x", "interval": "10s"}],
            }
        ]
    }


def test_server_with_a_missing_config_file_fails_cleanly(cli, tmp_path):
    # Goes through the CLI into api.server.main_server, which refuses the configuration.
    missing = tmp_path / "nope.json"
    r = cli("server", "-config", str(missing), "-http-port", "0", "-dns-port", "-1")
    assert (r.code, r.out) == (1, "")
    assert r.err.startswith("Error: invalid configuration: cannot read config file ")
    assert "Traceback" not in r.err


def test_dev_usage_error_starts_nothing(cli):
    r = cli("dev", "-http-port", "eighty")
    assert r.code == 1
    assert r.err.startswith(
        "invalid value for flag -http-port: 'eighty' is not a whole number\n\nUsage: trellis dev"
    )


def test_an_unexpected_failure_is_one_line(capsys):
    # A command with a bug, injected through the registry: no traceback reaches the user.
    from trellis.api.cli.base import Command, Registry

    def broken(ctx, ns):
        raise RuntimeError("boom")

    registry = Registry()
    registry.add(Command(("oops",), "A broken command", "trellis oops", broken, http=False))
    code = run(
        ["oops"],
        env={},
        stdin=io.StringIO(),
        stdout=sys.stdout,
        stderr=sys.stderr,
        registry=registry,
    )
    out, err = capsys.readouterr()
    assert (code, out, err) == (
        1,
        "",
        "Error! Unexpected failure in trellis oops: RuntimeError: boom\n",
    )


def test_server_answer_of_the_wrong_shape(cli, stub):
    stub.route = lambda req: stub.json(200, ["web"])
    r = cli("catalog", "services", "-http-addr", stub.url)
    assert (r.code, r.out) == (1, "")
    assert (
        r.err == "Error listing services: the server sent an array where an object was expected\n"
    )


def test_each_first_word_names_the_module_that_registers_it():
    # ``trellis connect proxy`` (and every command) imports only the module its first word
    # names: a word missing from the table, or naming the wrong module, would be an unknown
    # command.
    seen: dict[str, str] = {}
    for module in cli_main.MODULES:
        r = cli_main.build_registry((module,))
        for path in [*r.commands, *r.groups]:
            if path != ("version",):
                seen[path[0]] = module
    assert seen == cli_main.FIRST_WORDS
    full = cli_main.build_registry()
    for word, module in cli_main.FIRST_WORDS.items():
        mine = cli_main.registry_for([word, "x"])
        assert {p for p in full.commands if p[0] == word} == {
            p for p in mine.commands if p[0] == word
        }, module
