"""``trellis intention ...`` against a real ``trellis dev`` subprocess, output compared verbatim.

Commands run in-process through ``trellis.api.cli.main.run`` with captured streams; the server is
the real one (``trellis_server``), started on first use (the usage errors need none). IDs and times
are the server's: they are read back with the typed client and put into the expected text.
Output, messages and exit statuses are ``consul intention``'s, except ``check``: Denied exits 2
(Consul: 1) and an error 1 (Consul: 2), as Trellis's module docstring explains.
"""

from __future__ import annotations

import datetime as dt

import pytest

from tests import cli_support
from trellis.api.cli.intention import rfc850

pytestmark = pytest.mark.integration


# Shared fixtures, bound here by name (importing them directly trips ruff's F811).
Result = cli_support.Result
cli = cli_support.cli


def created_at(ixn: dict) -> str:
    """What Go's ``CreatedAt.Local().Format(time.RFC850)`` prints, computed another way than
    the CLI does (strftime in the C locale, which Python keeps unless told otherwise)."""
    when = dt.datetime.strptime(ixn["CreatedAt"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=dt.UTC).astimezone().strftime("%A, %d-%b-%y %H:%M:%S %Z")


def ok(r: Result, out: str) -> None:
    assert (r.code, r.out, r.err) == (0, out, ""), r


def fails(r: Result, err: str, code: int = 1) -> None:
    assert (r.code, r.out, r.err) == (code, "", err), r


# -- create ----------------------------------------------------------------------------------


def test_create_allow_deny_and_default(cli, api):
    ok(cli("intention", "create", "-allow", "web", "db"), "Created: web => db (allow)\n")
    ok(cli("intention", "create", "-deny", "web", "cache"), "Created: web => cache (deny)\n")
    ok(cli("intention", "create", "api", "db"), "Created: api => db (allow)\n")  # allow by default
    ok(cli("intention", "create", "-deny", "*", "*"), "Created: * => * (deny)\n")
    got = {
        (i["SourceName"], i["DestinationName"]): i["Action"] for i in api.intentions_list().value
    }
    assert got == {
        ("web", "db"): "allow",
        ("web", "cache"): "deny",
        ("api", "db"): "allow",
        ("*", "*"): "deny",
    }


def test_create_with_description_and_meta(cli, api):
    r = cli(
        "intention", "create", "-deny", "-description", "no reports", "-meta", "team=edge",
        "-meta=ticket=OPS-1=2", "reports", "db",
    )  # fmt: skip
    ok(r, "Created: reports => db (deny)\n")
    ixn = api.intention_get_exact("reports", "db").value
    assert (ixn["Description"], ixn["Meta"]) == (
        "no reports",
        {"team": "edge", "ticket": "OPS-1=2"},
    )


def test_create_an_existing_pair_fails_unless_replace(cli, api):
    ok(cli("intention", "create", "-meta", "a=1", "web", "db"), "Created: web => db (allow)\n")
    first = api.intention_get_exact("web", "db").value
    fails(
        cli("intention", "create", "-deny", "web", "db"),
        'Error creating intention "web => db (deny)": an intention web => db already exists\n',
    )
    assert api.intention_get_exact("web", "db").value["Action"] == "allow"
    # -replace says what it did (Consul prints nothing); the ID is kept, and the metadata is
    # replaced by the command's (here: none).
    ok(
        cli("intention", "create", "-replace", "-deny", "-description", "d", "web", "db"),
        "Replaced: web => db (deny)\n",
    )
    now = api.intention_get_exact("web", "db").value
    assert (now["ID"], now["Action"], now["Description"], now["Meta"]) == (
        first["ID"],
        "deny",
        "d",
        {},
    )
    assert len(api.intentions_list().value) == 1
    # -replace of a pair that has none creates it, and says so.
    ok(cli("intention", "create", "-replace", "api", "db"), "Created: api => db (allow)\n")


def test_create_errors(cli, dead_url):
    fails(
        cli("intention", "create", "-allow", "-deny", "web", "db", addr=dead_url),
        "Only one of -allow or -deny may be specified.\n",
    )
    for args in ((), ("web",), ("web", "db", "x")):
        fails(
            cli("intention", "create", *args, addr=dead_url),
            "Error: Must specify two arguments: source and destination\n",
        )
    r = cli("intention", "create", "-meta", "novalue", "web", "db", addr=dead_url)
    assert r.code == 1
    assert r.err.startswith('invalid value for flag -meta: Missing "=" value in argument: novalue')
    r = cli("intention", "create", "web", "db", addr=dead_url)
    assert r.code == 1
    assert r.err.startswith(
        f'Error creating intention "web => db (allow)": cannot reach Trellis at {dead_url}'
    )


def test_create_refused_by_the_server(cli):
    fails(
        cli("intention", "create", "web*", "db"),
        "Error creating intention \"web* => db (allow)\": SourceName: 'web*': '*' matches any"
        " service only as the whole name; partial wildcards are not supported\n",
    )


# -- get ---------------------------------------------------------------------------------------


def test_get_by_names_and_by_id(cli, api):
    iid = api.intention_create("web", "db", "deny")
    ixn = api.intention_get(iid)
    expected = (
        "Source:       web\n"
        "Destination:  db\n"
        "Action:       deny\n"
        f"ID:           {iid}\n"
        f"Created At:   {created_at(ixn)}\n"
    )
    ok(cli("intention", "get", "web", "db"), expected)
    ok(cli("intention", "get", iid), expected)

    rid = api.intention_create(
        "reports", "db", "allow", description="nightly", meta={"z": "last", "owner": "bi"}
    )
    ok(
        cli("intention", "get", "reports", "db"),
        "Source:       reports\n"
        "Destination:  db\n"
        "Action:       allow\n"
        f"ID:           {rid}\n"
        "Description:  nightly\n"
        "Meta[owner]:  bi\n"
        "Meta[z]:      last\n"
        f"Created At:   {created_at(api.intention_get(rid))}\n",
    )
    # A long meta key widens the first column, as columnize does.
    api.intention_upsert_exact("*", "db", "deny", meta={"maintainer": "x"})
    out = cli("intention", "get", "*", "db").out
    assert out.splitlines()[:2] == ["Source:" + " " * 12 + "*", "Destination:" + " " * 7 + "db"]
    assert "Meta[maintainer]:  x\n" in out


def test_get_errors(cli):
    fails(
        cli("intention", "get", "web", "db"),
        'Intention not found with source "web" and destination "db"\n',
    )
    fails(
        cli("intention", "get", "0b0b0b0b-0000-4000-8000-000000000000"),
        'Intention not found with ID "0b0b0b0b-0000-4000-8000-000000000000"\n',
    )
    fails(
        cli("intention", "get", "nope"),
        "Error reading the intention: 'nope' is not an intention ID (a UUID)\n",
    )
    for args in ((), ("a", "b", "c")):
        fails(cli("intention", "get", *args), "command requires exactly 1 or 2 arguments\n")


def test_rfc850_is_gos_layout():
    assert rfc850("2026-01-02T15:04:05.123456Z") == created_at(
        {"CreatedAt": "2026-01-02T15:04:05.123456Z"}
    )
    summer = "2026-07-31T23:59:59.000001Z"
    assert rfc850(summer) == created_at({"CreatedAt": summer})
    assert rfc850("not a time") == "not a time"


# -- delete ------------------------------------------------------------------------------------


def test_delete_by_names_and_by_id(cli, api):
    api.intention_create("web", "db")
    iid = api.intention_create("api", "db")
    ok(cli("intention", "delete", "web", "db"), "Intention deleted.\n")
    ok(cli("intention", "delete", iid), "Intention deleted.\n")
    assert api.intentions_list().value == []
    # A pair with no intention: nothing to do, as Consul (DELETE .../exact answers true).
    ok(cli("intention", "delete", "web", "db"), "Intention deleted.\n")
    fails(
        cli("intention", "delete", iid),
        f"Error deleting the intention: intention {iid} not found\n",
    )
    fails(cli("intention", "delete"), "command requires exactly 1 or 2 arguments\n")


# -- list --------------------------------------------------------------------------------------


def test_list(cli, api):
    fails(cli("intention", "list"), "There are no intentions.\n", code=2)
    ids = {
        "web-db": api.intention_create("web", "db", "allow"),
        "star-star": api.intention_create("*", "*", "deny"),
        "analytics-star": api.intention_create("analytics", "*", "allow"),
        "star-db": api.intention_create("*", "db", "deny"),
        "api-db": api.intention_create("api", "db", "deny"),
    }
    # Highest precedence first, then by names, as Consul's server orders them.
    ok(
        cli("intention", "list"),
        "ID                                    Source     Action  Destination  Precedence\n"
        f"{ids['api-db']}  api        deny    db           9\n"
        f"{ids['web-db']}  web        allow   db           9\n"
        f"{ids['star-db']}  *          deny    db           8\n"
        f"{ids['analytics-star']}  analytics  allow   *            6\n"
        f"{ids['star-star']}  *          deny    *            5\n",
    )
    fails(cli("intention", "list", "extra"), "Too many arguments (expected 0, got 1)\n")


# -- match -------------------------------------------------------------------------------------


def test_match(cli, api):
    for s, d, a in [
        ("*", "*", "deny"),
        ("web", "*", "allow"),
        ("*", "db", "deny"),
        ("api", "db", "allow"),
        ("web", "db", "deny"),
        ("web", "cache", "allow"),
    ]:
        api.intention_create(s, d, a)
    by_destination = (
        "web => db (deny)\napi => db (allow)\n* => db (deny)\nweb => * (allow)\n* => * (deny)\n"
    )
    ok(cli("intention", "match", "db"), by_destination)
    ok(cli("intention", "match", "-destination", "db"), by_destination)
    ok(
        cli("intention", "match", "-source", "web"),
        "web => db (deny)\nweb => cache (allow)\n* => db (deny)\nweb => * (allow)\n* => * (deny)\n",
    )
    ok(cli("intention", "match", "-source", "nobody"), "* => db (deny)\n* => * (deny)\n")
    fails(
        cli("intention", "match", "-source", "-destination", "web"),
        "Error: only one of -source or -destination may be specified\n",
    )
    for args in ((), ("a", "b")):
        fails(
            cli("intention", "match", *args),
            "Error: command requires exactly one argument: src or dst\n",
        )
    r = cli("intention", "match", "we b")
    assert r.code == 1
    assert r.err.startswith("Error matching the connection: name: service name 'we b' is not valid")


# -- check -------------------------------------------------------------------------------------


def test_check_exit_statuses(cli, api):
    # ACLs are off in ``trellis dev``: with no intention, everything is allowed.
    ok(cli("intention", "check", "web", "db"), "Allowed\n")
    api.intention_create("web", "db", "deny")
    r = cli("intention", "check", "web", "db")
    assert (r.code, r.out, r.err) == (2, "Denied\n", "")
    ok(cli("intention", "check", "api", "db"), "Allowed\n")
    api.intention_create("*", "db", "deny")
    assert cli("intention", "check", "api", "db").code == 2
    api.intention_upsert_exact("web", "db", "allow")
    ok(cli("intention", "check", "web", "db"), "Allowed\n")
    for args in ((), ("web",), ("a", "b", "c")):
        fails(
            cli("intention", "check", *args),
            "Error: command requires exactly two arguments: src and dst\n",
        )
    r = cli("intention", "check", "web*", "db")
    assert r.code == 1
    assert r.err.startswith("Error checking the connection: source: 'web*'")


def test_check_error_is_not_denied(cli, dead_url):
    r = cli("intention", "check", "web", "db", addr=dead_url)
    assert (r.code, r.out) == (1, "")
    assert r.err.startswith(f"Error checking the connection: cannot reach Trellis at {dead_url}")


# -- help --------------------------------------------------------------------------------------


def test_group_help(cli, dead_url):
    r = cli("intention", "-h", addr=dead_url)
    ok(
        r,
        "Usage: trellis intention <subcommand> [options] [args]\n\n"
        "  Interact with Connect service intentions\n\n"
        "Subcommands:\n"
        "    check     Check whether a connection between two services is allowed.\n"
        "    create    Create intentions for service connections.\n"
        "    delete    Delete an intention.\n"
        "    get       Show information about an intention.\n"
        "    list      List connect intentions\n"
        "    match     Show intentions that match a source or destination.\n",
    )
    r = cli("intention", "get", "-h", addr=dead_url)
    assert r.code == 0
    assert r.out.startswith(
        "Usage: trellis intention get [options] SRC DST\n"
        "Usage: trellis intention get [options] ID\n"
    )
