"""``trellis acl ...``: bootstrap, tokens and policies, as ``consul acl`` prints them.

The pretty output is Consul's formatter's, line for line (``AccessorID:       ...``,
``   <policy ID> - <policy name>``, the policy list's indented blocks), and so are the messages
(``Token "<id>" deleted successfully``). ``-format json`` prints the API's objects with
Consul's field order and four-space indent.

Where Trellis differs, it says so in the command's help: a token's secret is shown once, when
the token is made (``bootstrap``, ``token create``); the server keeps only its hash, so every
other command prints ``SecretID:         <hidden>``, as Consul does for a token whose secret
the caller may not see.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from trellis.api.cli.base import (
    Command,
    CommandError,
    Context,
    FlagParser,
    Registry,
    add_format_flag,
)
from trellis.proxy.client import APIError, Client

HIDDEN = "<hidden>"

#: Consul's ``api.ACLToken`` field order, for ``-format json``.
TOKEN_ORDER = (
    "CreateIndex",
    "ModifyIndex",
    "AccessorID",
    "SecretID",
    "Description",
    "Policies",
    "Local",
    "CreateTime",
)


# -- formatting ------------------------------------------------------------------------------


def go_time(text: str) -> str:
    """An API time (``2026-01-02T15:04:05.123400Z``) as Go's ``time.Time.String()`` prints it
    after the Go client parsed it (``2026-01-02 15:04:05.1234 +0000 UTC``); an empty one is Go's
    zero time."""
    if not text:
        return "0001-01-01 00:00:00 +0000 UTC"
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    offset = when.utcoffset() or dt.timedelta(0)
    frac = f"{when.microsecond:06d}".rstrip("0")
    out = when.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "")
    if offset == dt.timedelta(0):
        return out + " +0000 UTC"
    sign = "+" if offset >= dt.timedelta(0) else "-"
    minutes = abs(int(offset.total_seconds())) // 60
    zone = f"{sign}{minutes // 60:02d}{minutes % 60:02d}"
    return f"{out} {zone} {zone}"


def format_token(t: Mapping[str, Any]) -> str:
    """Consul's ``prettyFormatter.FormatToken`` (command/acl/token/formatter.go)."""
    lines = [
        f"AccessorID:       {t.get('AccessorID', '')}",
        f"SecretID:         {t.get('SecretID') or HIDDEN}",
        f"Description:      {t.get('Description', '')}",
        f"Local:            {'true' if t.get('Local') else 'false'}",
        f"Create Time:      {go_time(str(t.get('CreateTime') or ''))}",
    ]
    policies = t.get("Policies") or []
    if policies:
        lines.append("Policies:")
        lines += [f"   {p.get('ID', '')} - {p.get('Name', '')}" for p in policies]
    return "\n".join(lines) + "\n"


def format_policy(p: Mapping[str, Any]) -> str:
    """Consul's ``prettyFormatter.FormatPolicy``: the rules as written, after ``Rules:``."""
    return (
        f"ID:           {p.get('ID', '')}\n"
        f"Name:         {p.get('Name', '')}\n"
        f"Description:  {p.get('Description', '')}\n"
        f"Datacenters:  {', '.join(p.get('Datacenters') or [])}\n"
        "Rules:\n"
        f"{p.get('Rules', '')}"
    )


def format_policy_list(policies: list[Mapping[str, Any]]) -> str:
    out = []
    for p in policies:
        out.append(
            f"{p.get('Name', '')}:\n"
            f"   ID:           {p.get('ID', '')}\n"
            f"   Description:  {p.get('Description', '')}\n"
            f"   Datacenters:  {', '.join(p.get('Datacenters') or [])}\n"
        )
    return "".join(out)


def token_json(t: Mapping[str, Any]) -> dict[str, Any]:
    """The token with Consul's field order; ``Policies`` left out when empty (omitempty)."""
    out = {k: t[k] for k in TOKEN_ORDER if k in t}
    out.update({k: v for k, v in t.items() if k not in out})
    if not out.get("Policies"):
        out.pop("Policies", None)
    return out


def _print(ctx: Context, text: str) -> None:
    # Consul's ui.Info(out): the formatted text, then a newline of its own.
    ctx.stdout.write(text + "\n")


def _print_json(ctx: Context, value: Any) -> None:
    ctx.out(json.dumps(value, indent=4))


def _show_token(ctx: Context, ns: argparse.Namespace, t: Mapping[str, Any]) -> None:
    if ns.format == "json":
        _print_json(ctx, token_json(t))
    else:
        _print(ctx, format_token(t))


def _show_policy(ctx: Context, ns: argparse.Namespace, p: Mapping[str, Any]) -> None:
    if ns.format == "json":
        _print_json(ctx, dict(p))
    else:
        _print(ctx, format_policy(p))


@contextmanager
def _failing(what: str) -> Iterator[None]:
    """An API error as Consul's command prints it: ``<what>: <the server's message>``."""
    try:
        yield
    except APIError as e:
        raise CommandError(f"{what}: {e.message}") from None


def _no_args(ns: argparse.Namespace) -> None:
    if ns.args:
        raise CommandError(f"Too many arguments (expected 0, got {len(ns.args)})")


def _rules_arg(ctx: Context, text: str) -> str:
    """``-rules`` as Consul's ``helpers.LoadDataSource`` reads it: ``@file``, ``-`` (stdin),
    or the rules themselves."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise CommandError(f"Error loading rules: {e.strerror}: {text[1:]}") from None
        except UnicodeDecodeError:
            raise CommandError(f"Error loading rules: {text[1:]} is not UTF-8 text") from None
    if text == "-":
        return ctx.read_stdin().decode("utf-8", errors="replace")
    return text


# -- bootstrap ---------------------------------------------------------------------------------


def _format_only(p: FlagParser) -> None:
    add_format_flag(p)


def acl_bootstrap(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    with ctx.client(ns) as c, _failing("Failed ACL bootstrapping"):
        t = c.acl_bootstrap()
    _show_token(ctx, ns, t)
    return 0


# -- tokens ------------------------------------------------------------------------------------


def _policy_flags(p: FlagParser) -> None:
    p.flag(
        "policy-id",
        action="append",
        default=[],
        metavar="string",
        help="ID of a policy to use for this token. May be specified multiple times.",
    )
    p.flag(
        "policy-name",
        action="append",
        default=[],
        metavar="string",
        help="Name of a policy to use for this token. May be specified multiple times.",
    )


def _token_create_flags(p: FlagParser) -> None:
    p.flag("description", default="", metavar="string", help="A description of the token.")
    _policy_flags(p)
    p.flag(
        "local",
        action="store_true",
        help="Create this as a datacenter local token. The default is false.",
    )
    p.flag(
        "accessor",
        default="",
        metavar="string",
        help="Create the token with this AccessorID (a UUID) instead of a generated one.",
    )
    p.flag(
        "secret",
        default="",
        metavar="string",
        help="Create the token with this SecretID (a UUID) instead of a generated one.",
    )
    add_format_flag(p)


def acl_token_create(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    with ctx.client(ns) as c, _failing("Failed to create new token"):
        t = c.acl_token_create(
            description=ns.description,
            policy_ids=ns.policy_id,
            policy_names=ns.policy_name,
            local=ns.local,
            accessor_id=ns.accessor or None,
            secret_id=ns.secret or None,
        )
    _show_token(ctx, ns, t)
    return 0


def _token_read_flags(p: FlagParser) -> None:
    p.flag("id", default="", metavar="string", help="The AccessorID of the token to read.")
    p.flag(
        "self",
        action="store_true",
        help="Read the token this command sends (-token or TRELLIS_HTTP_TOKEN) instead.",
    )
    add_format_flag(p)


def acl_token_read(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    if not ns.id and not ns.self:
        raise CommandError("Must specify the -id parameter")
    with ctx.client(ns) as c, _failing(f"Error reading token {_q(ns.id)}"):
        t = c.acl_token_self() if ns.self else c.acl_token_read(ns.id)
    _show_token(ctx, ns, t)
    return 0


def _token_update_flags(p: FlagParser) -> None:
    p.flag("id", default="", metavar="string", help="The AccessorID of the token to update.")
    p.flag(
        "description",
        default=None,
        metavar="string",
        help="A new description of the token (the old one is kept without this flag).",
    )
    _policy_flags(p)
    p.flag(
        "merge-policies",
        action="store_true",
        help="Add the given policies to the token's instead of replacing them. Without any "
        "-policy-id or -policy-name, the token's policies are kept either way.",
    )
    add_format_flag(p)


def acl_token_update(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    if not ns.id:
        raise CommandError("Cannot update a token without specifying the -id parameter")
    with ctx.client(ns) as c:
        with _failing("Error when retrieving current token"):
            cur = c.acl_token_read(ns.id)
        links = [{"ID": p["ID"]} for p in cur.get("Policies") or []]
        given = Client._policy_links(ns.policy_id, ns.policy_name)
        if given and ns.merge_policies:
            links += [g for g in given if not _has(cur, g)]
        elif given:
            links = given
        with _failing(f"Failed to update token {ns.id}"):
            t = c.acl_token_update(
                ns.id,
                description=cur.get("Description", "")
                if ns.description is None
                else ns.description,
                policies=links,
                local=bool(cur.get("Local")),
                # The body is the whole new state: what no flag changes is sent back as is.
                keep={k: cur[k] for k in _KEPT_ON_UPDATE if cur.get(k)},
            )
    _show_token(ctx, ns, t)
    return 0


#: A token's fields ``acl token update`` has no flags for, which it keeps.
_KEPT_ON_UPDATE = ("Roles", "ServiceIdentities", "NodeIdentities", "TemplatedPolicies")


def _has(token: Mapping[str, Any], link: Mapping[str, str]) -> bool:
    """Whether the token holds the policy named by ``link`` (by ID or by name)."""
    for p in token.get("Policies") or []:
        if link.get("ID") == p.get("ID") or link.get("Name") == p.get("Name"):
            return True
    return False


def _id_flag(p: FlagParser, what: str) -> None:
    p.flag("id", default="", metavar="string", help=f"The {what} to delete.")


def acl_token_delete(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    if not ns.id:
        raise CommandError("Must specify the -id parameter")
    with ctx.client(ns) as c, _failing(f"Error deleting token {_q(ns.id)}"):
        c.acl_token_delete(ns.id)
    ctx.out(f"Token {_q(ns.id)} deleted successfully")
    return 0


def acl_token_list(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    with ctx.client(ns) as c, _failing("Failed to retrieve the token list"):
        tokens = c.acl_token_list()
    if ns.format == "json":
        _print_json(ctx, [token_json(t) for t in tokens])
    else:
        _print(ctx, "\n".join(format_token(t) for t in tokens))
    return 0


# -- policies ----------------------------------------------------------------------------------


def _policy_write_flags(p: FlagParser, *, update: bool) -> None:
    if update:
        p.flag("id", default="", metavar="string", help="The ID of the policy to update.")
    p.flag(
        "name",
        default=None if update else "",
        metavar="string",
        help="The new name of the policy." if update else "The new policy's name.",
    )
    p.flag(
        "description",
        default=None if update else "",
        metavar="string",
        help="A description of the policy.",
    )
    p.flag(
        "rules",
        default=None if update else "",
        metavar="string",
        help="The policy rules, in HCL or JSON. May be prefixed with '@' to read them from a "
        "file, or be '-' to read them from stdin.",
    )
    p.flag(
        "datacenter",
        action="append",
        default=[],
        metavar="string",
        help="A datacenter the policy is valid in. May be specified multiple times; with none, "
        "the policy is valid in every datacenter.",
    )
    if update:
        p.flag(
            "no-merge",
            action="store_true",
            help="Replace the whole policy with the flags given (an unset one becomes empty) "
            "instead of changing only what the flags name.",
        )
    add_format_flag(p)


def acl_policy_create(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    if not ns.name:
        raise CommandError("Missing require '-name' flag")
    rules = _rules_arg(ctx, ns.rules)
    with ctx.client(ns) as c, _failing("Failed to create new policy"):
        p = c.acl_policy_create(
            ns.name, rules=rules, description=ns.description, datacenters=ns.datacenter
        )
    _show_policy(ctx, ns, p)
    return 0


def _policy_lookup_flags(p: FlagParser, verb: str) -> None:
    p.flag("id", default="", metavar="string", help=f"The ID of the policy to {verb}.")
    p.flag("name", default="", metavar="string", help=f"The name of the policy to {verb}.")


def _find_policy(c: Client, ns: argparse.Namespace) -> dict[str, Any]:
    return c.acl_policy_read(ns.id) if ns.id else c.acl_policy_read_by_name(ns.name)


def _read_flags(p: FlagParser) -> None:
    _policy_lookup_flags(p, "read")
    add_format_flag(p)


def acl_policy_read(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    if not ns.id and not ns.name:
        raise CommandError("Must specify either the -id or -name parameters")
    with ctx.client(ns) as c, _failing(f"Error reading policy {_q(ns.id or ns.name)}"):
        p = _find_policy(c, ns)
    _show_policy(ctx, ns, p)
    return 0


def acl_policy_update(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    if not ns.id:
        raise CommandError("Cannot update a policy without specifying the -id parameter")
    rules = None if ns.rules is None else _rules_arg(ctx, ns.rules)
    with ctx.client(ns) as c:
        if ns.no_merge:
            cur: dict[str, Any] = {"Name": "", "Description": "", "Rules": "", "Datacenters": []}
        else:
            with _failing("Error retrieving current policy"):
                cur = c.acl_policy_read(ns.id)
        with _failing(f"Failed to update policy {ns.id}"):
            p = c.acl_policy_update(
                ns.id,
                cur.get("Name", "") if ns.name is None else ns.name,
                rules=cur.get("Rules", "") if rules is None else rules,
                description=cur.get("Description", "")
                if ns.description is None
                else ns.description,
                datacenters=ns.datacenter or cur.get("Datacenters") or [],
            )
    _show_policy(ctx, ns, p)
    return 0


def acl_policy_delete(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    if not ns.id and not ns.name:
        raise CommandError("Must specify either the -id or -name parameters")
    with ctx.client(ns) as c:
        policy_id = ns.id
        if not policy_id:
            with _failing("Error determining policy ID"):
                policy_id = c.acl_policy_read_by_name(ns.name)["ID"]
        with _failing(f"Error deleting policy {_q(policy_id)}"):
            c.acl_policy_delete(policy_id)
    ctx.out(f"Policy {_q(policy_id)} deleted successfully")
    return 0


def acl_policy_list(ctx: Context, ns: argparse.Namespace) -> int:
    _no_args(ns)
    with ctx.client(ns) as c, _failing("Failed to retrieve the policy list"):
        policies = c.acl_policy_list()
    if ns.format == "json":
        _print_json(ctx, policies)
    else:
        _print(ctx, format_policy_list(policies))
    return 0


def _q(text: str) -> str:
    """A string quoted as Go's ``%q`` quotes it (for UUIDs and policy names: the same)."""
    return json.dumps(text, ensure_ascii=False)


# -- registration ------------------------------------------------------------------------------

ONCE_NOTE = "The token's SecretID is shown here and never again: the server keeps only its hash."


def register(r: Registry) -> None:
    r.group(("acl",), "Interact with Trellis's ACLs")
    r.group(("acl", "token"), "Manage Trellis's ACL tokens")
    r.group(("acl", "policy"), "Manage Trellis's ACL policies")
    r.add(
        Command(
            ("acl", "bootstrap"),
            "Bootstrap Trellis's ACL system",
            "trellis acl bootstrap [options]",
            acl_bootstrap,
            _format_only,
            description="Makes the first management token, once per cluster. " + ONCE_NOTE,
        ),
        Command(
            ("acl", "token", "create"),
            "Create an ACL token",
            "trellis acl token create [options]",
            acl_token_create,
            _token_create_flags,
            description="Creates a token holding the policies given by -policy-id or\n"
            "-policy-name. " + ONCE_NOTE,
        ),
        Command(
            ("acl", "token", "read"),
            "Read an ACL token",
            "trellis acl token read -id ACCESSOR_ID [options]",
            acl_token_read,
            _token_read_flags,
            description="Shows a token (its SecretID as <hidden>: it is shown only when the\n"
            "token is made).",
        ),
        Command(
            ("acl", "token", "update"),
            "Update an ACL token",
            "trellis acl token update -id ACCESSOR_ID [options]",
            acl_token_update,
            _token_update_flags,
            description="Changes a token's description or policies; its secret never changes.",
        ),
        Command(
            ("acl", "token", "delete"),
            "Delete an ACL token",
            "trellis acl token delete -id ACCESSOR_ID [options]",
            acl_token_delete,
            lambda p: _id_flag(p, "AccessorID of the token"),
            description="Deletes a token; its secret stops working at once.",
        ),
        Command(
            ("acl", "token", "list"),
            "List ACL tokens",
            "trellis acl token list [options]",
            acl_token_list,
            _format_only,
            description="Lists every token (never with a secret).",
        ),
        Command(
            ("acl", "policy", "create"),
            "Create an ACL policy",
            "trellis acl policy create -name NAME [options]",
            acl_policy_create,
            lambda p: _policy_write_flags(p, update=False),
            description="Creates a policy. Rules are Consul's policy language, in HCL or JSON.",
        ),
        Command(
            ("acl", "policy", "read"),
            "Read an ACL policy",
            "trellis acl policy read (-id ID | -name NAME) [options]",
            acl_policy_read,
            _read_flags,
            description="Shows a policy with its rules.",
        ),
        Command(
            ("acl", "policy", "update"),
            "Update an ACL policy",
            "trellis acl policy update -id ID [options]",
            acl_policy_update,
            lambda p: _policy_write_flags(p, update=True),
            description="Changes what the flags name (with -no-merge, replaces the whole\n"
            "policy). Tokens holding the policy get its new rules at once.",
        ),
        Command(
            ("acl", "policy", "delete"),
            "Delete an ACL policy",
            "trellis acl policy delete (-id ID | -name NAME) [options]",
            acl_policy_delete,
            lambda p: _policy_lookup_flags(p, "delete"),
            description="Deletes a policy; tokens that held it keep nothing of it.",
        ),
        Command(
            ("acl", "policy", "list"),
            "Lists ACL policies",
            "trellis acl policy list [options]",
            acl_policy_list,
            _format_only,
            description="Lists every policy (without their rules).",
        ),
    )
