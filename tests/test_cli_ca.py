"""``trellis ca ...`` against a real ``trellis dev`` subprocess, output compared verbatim.

Commands run in-process through ``trellis.api.cli.main.run`` with captured streams; the server is
the real one (``trellis_server``). Root IDs, names and dates are the server's, so they are matched
with a pattern and then compared with what the typed client reads from the API.
"""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests import cli_support
from tests.ca_support import RFC3339, certs, service_csr
from trellis.proxy.client import APIError

pytestmark = pytest.mark.integration

ID = r"[0-9a-f]{2}(?::[0-9a-f]{2}){19}"  # a 20-byte key ID
NAME = r"Trellis CA [0-9a-f]{8}"


# Shared fixtures, bound here by name (importing them directly trips ruff's F811).
Result = cli_support.Result
cli = cli_support.cli


def _row(root_id: str, name: str, active: str, not_after: str) -> str:
    # columnize: every column but the last padded to its widest cell, two spaces between.
    return f"{root_id}  {name}  {active.ljust(6)}  {not_after}"


def test_ca_roots_table_json_and_pem(cli, api):
    r = cli("ca", "roots")
    assert (r.code, r.err) == (0, "")
    m = re.fullmatch(
        rf"ID {{59}}Name {{17}}Active  NotAfter\n({ID})  ({NAME})  true    ({RFC3339})\n", r.out
    )
    assert m, r.out
    roots = api.ca_roots().value
    [root] = roots["Roots"]
    assert m.groups() == (roots["ActiveRootID"], root["Name"], root["NotAfter"])

    r = cli("ca", "roots", "-format=json")
    assert (r.code, r.err) == (0, "")
    assert r.out == json.dumps(roots, indent=2) + "\n"

    r = cli("ca", "roots", "-pem")
    assert (r.code, r.out, r.err) == (0, root["RootCert"], "")
    assert len(certs(r.out)) == 1

    # The typed client's signing call (the sidecar's path): a leaf, or the refusal as APIError.
    issued = api.ca_sign(service_csr(roots["TrustDomain"], "web"))
    assert (issued["Service"], issued["RootID"]) == ("web", roots["ActiveRootID"])
    certs(issued["CertPEM"])[0].verify_directly_issued_by(certs(root["RootCert"])[0])
    with pytest.raises(APIError) as e:
        api.ca_sign("not a CSR")
    assert e.value.status == 400 and "exactly one PEM" in e.value.message

    r = cli("ca", "roots", "-pem", "-format", "json")
    assert r.code == 1
    assert r.err.startswith("Error! -pem and -format=json cannot be used together\n\nUsage:")
    r = cli("ca", "roots", "extra")
    assert (r.code, r.out) == (1, "")
    assert r.err.startswith("Too many arguments (expected 0, got 1)\n")


GET_CONFIG = """\
{
\t"Provider": "%s",
\t"Config": {
\t\t"CSRMaxConcurrent": 0,
\t\t"CSRMaxPerSecond": 50,
\t\t"IntermediateCertTTL": "8760h",
\t\t"LeafCertTTL": "%s",
\t\t"PrivateKeyBits": 256,
\t\t"PrivateKeyType": "ec",
\t\t"RootCertTTL": "87600h"
\t},
\t"State": null,
\t"ForceWithoutCrossSigning": false,
\t"CreateIndex": N,
\t"ModifyIndex": N
}
"""


def _indexes_out(text: str) -> str:
    return re.sub(r'("(?:Create|Modify)Index": )\d+', r"\1N", text)


def test_ca_get_and_set_config(cli, api, tmp_path):
    r = cli("ca", "get-config")
    assert (r.code, r.err) == (0, "")
    assert _indexes_out(r.out) == GET_CONFIG % ("builtin", "72h")
    assert json.loads(r.out) == api.ca_get_config()
    before = api.ca_roots().value

    f = tmp_path / "ca.json"
    f.write_text(json.dumps({"Provider": "consul", "Config": {"LeafCertTTL": "24h"}}))
    r = cli("ca", "set-config", "-config-file", str(f))
    assert (r.code, r.out, r.err) == (0, "Configuration updated!\n", "")
    r = cli("ca", "get-config")
    assert _indexes_out(r.out) == GET_CONFIG % ("consul", "24h")
    assert api.ca_roots().value == before  # a TTL change does not rotate

    # What get-config prints is a valid set-config file (its read-only fields are dropped).
    f.write_text(r.out)
    r = cli("ca", "set-config", f"-config-file={f}")
    assert (r.code, r.out, r.err) == (0, "Configuration updated!\n", "")

    # Errors: one line, "Error! ...", exit status 1, nothing on stdout.
    bad = tmp_path / "bad.json"
    cases = [
        ((), "Error! The -config-file flag is required\n"),
        (
            ("-config-file", str(tmp_path / "none.json")),
            f"Error! Cannot read config file {tmp_path / 'none.json'}: No such file or directory\n",
        ),
        (
            ("-config-file", str(bad), "{nope"),
            None,  # Python's JSON message: matched below
        ),
        (("-config-file", str(bad), "[1]"), f"Error! Config file {bad} must hold a JSON object\n"),
        (
            ("-config-file", str(bad), '{"Provider": "consul", "Config": {"LeafCertTTL": "10m"}}'),
            "Error! Failed to set the CA configuration: Config.LeafCertTTL: must be between 1h"
            " and 8760h (one year)\n",
        ),
        (
            ("-config-file", str(bad), '{"Provider": "consul", "Colour": "red"}'),
            "Error! Failed to set the CA configuration: Colour: Unknown field.\n",
        ),
        (
            ("-config-file", str(bad), '{"Provider": "vault", "Config": {}}'),
            "Error! Failed to set the CA configuration: Config.Address: is required for the"
            " vault provider; Config.Token: is required for the vault provider\n",
        ),
    ]
    for args, expected in cases:
        argv = list(args)
        if len(argv) == 3:
            bad.write_text(argv.pop())
        r = cli("ca", "set-config", *argv)
        assert (r.code, r.out) == (1, ""), args
        if expected is None:
            assert re.fullmatch(
                rf"Error! Config file {re.escape(str(bad))} is not valid JSON: .+\n", r.err
            ), r.err
        else:
            assert r.err == expected, args
    assert _indexes_out(cli("ca", "get-config").out) == GET_CONFIG % ("consul", "24h")


def test_ca_rotate(cli, api, tmp_path):
    old = api.ca_roots().value["ActiveRootID"]
    r = cli("ca", "rotate")
    assert (r.code, r.err) == (0, "")
    m = re.fullmatch(rf"Root rotated: new active root ({ID})\n", r.out)
    assert m, r.out
    roots = api.ca_roots().value
    assert m.group(1) == roots["ActiveRootID"] != old
    r = cli("ca", "roots")
    lines = r.out.splitlines()
    assert lines[1:] == [
        _row(x["ID"], x["Name"], "true" if x["Active"] else "false", x["NotAfter"])
        for x in roots["Roots"]
    ]
    assert [x["ID"] for x in roots["Roots"]] == [old, m.group(1)]
    assert re.fullmatch(rf"{ID}  {NAME}  false   {RFC3339}", lines[1])

    r = cli("ca", "rotate", "-force-without-cross-signing")
    m = re.fullmatch(rf"Root rotated: new active root ({ID})\n", r.out)
    assert (r.code, r.err) == (0, "") and m
    assert api.ca_roots().value["ActiveRootID"] == m.group(1)
    assert len(api.ca_roots().value["Roots"]) == 3

    # A key type change through set-config rotates too.
    f = tmp_path / "rsa.json"
    f.write_text(
        json.dumps(
            {"Provider": "consul", "Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 2048}}
        )
    )
    assert cli("ca", "set-config", "-config-file", str(f)).code == 0
    assert len(api.ca_roots().value["Roots"]) == 4

    r = cli("ca", "rotate", "now")
    assert (r.code, r.out) == (1, "")
    assert r.err.startswith("Too many arguments (expected 0, got 1)\n")


def test_ca_commands_against_no_server(cli):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    try:
        for argv, what in (
            (("ca", "roots"), "Failed to read the CA roots"),
            (("ca", "get-config"), "Failed to read the CA configuration"),
            (("ca", "rotate"), "Failed to rotate the CA root"),
        ):
            r = cli(*argv, addr=dead)
            assert (r.code, r.out) == (1, "")
            assert r.err.startswith(f"Error! {what}: cannot reach Trellis at {dead}: "), r.err
            assert r.err.count("\n") == 1
    finally:
        s.close()
