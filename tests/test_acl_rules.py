"""Table and property tests of api/acl/rules.py: Consul's ACL rule language (HCL and JSON) and
the authorizer it compiles into (DESIGN.md "ACLs", CONSUL-API.md intentions ACL notes)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trellis.api.acl import rules as acl
from trellis.api.acl.rules import (
    DENY,
    LIST,
    READ,
    WRITE,
    Authorizer,
    Rule,
    Rules,
    RulesError,
    parse_rules,
)

EXAMPLE_HCL = """
# Comments are fine.
service "web" {
  policy = "write"
  intentions = "write"
}
service_prefix "" { policy = "read" }
key_prefix "app/" { policy = "list" }
key "app/secret" { policy = "deny" }
node_prefix "" { policy = "read" }
operator = "read"
acl = "write"
"""

EXAMPLE_JSON = """{
  "service": {"web": {"policy": "write", "intentions": "write"}},
  "service_prefix": {"": {"policy": "read"}},
  "key_prefix": {"app/": {"policy": "list"}},
  "key": {"app/secret": {"policy": "deny"}},
  "node_prefix": {"": {"policy": "read"}},
  "operator": "read",
  "acl": "write"
}"""

EXAMPLE = Rules(
    rules=(
        Rule("key", "app/secret", False, DENY),
        Rule("key", "app/", True, LIST),
        Rule("node", "", True, READ),
        Rule("service", "web", False, WRITE, WRITE),
        Rule("service", "", True, READ),
    ),
    operator=READ,
    acl=WRITE,
)


def authz(*texts: str, default_allow: bool = False) -> Authorizer:
    return Authorizer([parse_rules(t) for t in texts], default_allow=default_allow)


# -- parsing: accepted ----------------------------------------------------------------------


def test_the_example_parses_the_same_from_hcl_and_json():
    assert parse_rules(EXAMPLE_HCL) == EXAMPLE
    assert parse_rules(EXAMPLE_JSON) == EXAMPLE


@pytest.mark.parametrize("text", ["", "   \n\t", "# only a comment\n", "// c\n/* c */", "{}"])
def test_empty_rules(text):
    assert parse_rules(text) == Rules()
    assert parse_rules(text) == Rules((), None, None)


EQUIVALENT = [
    # (HCL, JSON): each pair, and every text in it, gives the same Rules.
    (
        'service "web" { policy = "read" }',
        '{"service": {"web": {"policy": "read"}}}',
    ),
    (  # one block of a kind that api/hcl.py does not list as repeatable
        'key_prefix "" { policy = "write" }',
        '{"key_prefix": {"": {"policy": "write"}}}',
    ),
    (  # several attributes on one line, as Consul's docs write them
        'service "db" { policy = "read" intentions = "write" }',
        '{"service": {"db": {"intentions": "write", "policy": "read"}}}',
    ),
    (  # interleaved blocks: order does not matter
        'key "b" { policy = "read" }\nnode "n" { policy = "write" }\nkey "a" { policy = "deny" }',
        '{"node": {"n": {"policy": "write"}}, "key": {"b": {"policy": "read"},'
        ' "a": {"policy": "deny"}}}',
    ),
    (  # policy values are case-insensitive (Consul lower-cases them)
        'service "web" { policy = "WRITE"\n intentions = "Read" }\noperator = "Deny"',
        '{"service": {"web": {"policy": "write", "intentions": "read"}}, "operator": "deny"}',
    ),
    (  # "" for operator, acl or intentions means unset, as in Consul
        'operator = ""\nacl = ""\nservice "a" {\npolicy = "read"\nintentions = ""\n}',
        '{"service": {"a": {"policy": "read"}}}',
    ),
    (  # exact and prefix rules for the same name are different rules
        'service "web" { policy = "deny" }\nservice_prefix "web" { policy = "write" }',
        '{"service_prefix": {"web": {"policy": "write"}}, "service": {"web": {"policy": "deny"}}}',
    ),
    (  # names are taken literally: escapes, non-ASCII, "${...}", empty
        'key "a\\"b" { policy = "read" }\nkey "\u00e9t\u00e9" { policy = "read" }\n'
        'key "${x}" { policy = "read" }\nkey "" { policy = "read" }',
        '{"key": {"a\\"b": {"policy": "read"}, "\\u00e9t\\u00e9": {"policy": "read"},'
        ' "${x}": {"policy": "read"}, "": {"policy": "read"}}}',
    ),
    (  # the HCL object form, and the JSON list-of-blocks form, are the same rules
        'service = { web = { policy = "read" }, "db" = { policy = "write" } }',
        '{"service": [{"web": {"policy": "read"}}, {"db": {"policy": "write"}}]}',
    ),
    (  # a heredoc is a string like any other
        'key_prefix "" {\n  policy = <<EOT\nread\nEOT\n}',
        '  \n {"key_prefix": {"": {"policy": "read"}}}  \n',
    ),
]


@pytest.mark.parametrize(("hcl_text", "json_text"), EQUIVALENT)
def test_hcl_and_json_forms_give_identical_rules(hcl_text, json_text):
    assert parse_rules(hcl_text) == parse_rules(json_text)
    assert parse_rules(hcl_text).rules  # not vacuously equal


def test_rules_come_out_in_a_canonical_order():
    a = parse_rules('key "b" { policy = "read" }\nkey "a" { policy = "read" }')
    b = parse_rules('key "a" { policy = "read" }\nkey "b" { policy = "read" }')
    assert a == b
    assert [r.name for r in a.rules] == ["a", "b"]
    assert [r.block for r in EXAMPLE.rules] == [
        "key",
        "key_prefix",
        "node_prefix",
        "service",
        "service_prefix",
    ]


def test_size_limit_counts_utf8_bytes():
    rule = 'key "k" { policy = "read" }\n'
    pad = acl.MAX_RULES_BYTES - len(rule) - 2  # "#" and "\n"
    assert parse_rules(rule + "#" + "x" * pad + "\n").rules == (Rule("key", "k", False, READ),)
    with pytest.raises(RulesError, match=r"^rules may be at most 65536 bytes$"):
        parse_rules(rule + "#" + "x" * (pad + 1) + "\n")
    # Fewer than 65536 characters, more than 65536 bytes.
    with pytest.raises(RulesError, match=r"^rules may be at most 65536 bytes$"):
        parse_rules(rule + "#" + "\u00e9" * (pad // 2 + 1) + "\n")


# -- parsing: refused -----------------------------------------------------------------------

ERRORS = [
    # Unknown resources, including Consul ones Trellis does not enforce.
    (
        'agent_prefix "" { policy = "read" }',
        'unknown rule "agent_prefix" (Trellis knows acl, event, event_prefix, '
        "key, key_prefix, node, node_prefix, operator, query, query_prefix, service,"
        " service_prefix, session, session_prefix)",
    ),
    (
        'keyring = "read"',
        'unknown rule "keyring" (Trellis knows acl, event, event_prefix, key, key_prefix, '
        "node, node_prefix, operator, query, query_prefix, service, service_prefix, session,"
        " session_prefix)",
    ),
    # Bad policies.
    ('service "web" { policy = "admin" }', 'service "web": policy must be read, write or deny'),
    (
        '{"service": {"web": {"policy": "admin"}}}',
        'service "web": policy must be read, write or deny',
    ),
    ('service_prefix "" { policy = 1 }', 'service_prefix "": policy must be read, write or deny'),
    ('{"node": {"n": {"policy": true}}}', 'node "n": policy must be read, write or deny'),
    ('{"node": {"n": {"policy": null}}}', 'node "n": policy must be read, write or deny'),
    ('node_prefix "" { policy = ["read"] }', 'node_prefix "": policy must be read, write or deny'),
    ('key "k" { policy = "" }', 'key "k": policy must be read, write, list or deny'),
    (
        'key_prefix "k" { policy = "rw" }',
        'key_prefix "k": policy must be read, write, list or deny',
    ),
    ('service "web" {}', 'service "web": policy is required'),
    ('{"key": {"k": {}}}', 'key "k": policy is required'),
    ('service "db" { intentions = "write" }', 'service "db": policy is required'),
    # list is for keys only.
    (
        'service "web" { policy = "list" }',
        'service "web": policy "list" is only for key and key_prefix rules',
    ),
    (
        '{"node_prefix": {"": {"policy": "list"}}}',
        'node_prefix "": policy "list" is only for key and key_prefix rules',
    ),
    # intentions are for services only, and are read, write or deny.
    (
        'node "n" { policy = "read"\n intentions = "read" }',
        'node "n": intentions are only for service and service_prefix rules',
    ),
    (
        '{"key_prefix": {"": {"policy": "read", "intentions": "read"}}}',
        'key_prefix "": intentions are only for service and service_prefix rules',
    ),
    (
        'service "db" { policy = "read"\n intentions = "list" }',
        'service "db": intentions must be read, write or deny',
    ),
    (
        '{"service_prefix": {"": {"policy": "read", "intentions": 2}}}',
        'service_prefix "": intentions must be read, write or deny',
    ),
    # Unknown fields in a rule.
    (
        'service "web" { polcy = "read" }',
        'service "web": unknown field "polcy" (a rule holds policy and intentions)',
    ),
    (
        'key "k" {\n policy = "read"\n sub { x = 1 }\n}',
        'key "k": unknown field "sub" (a rule holds policy)',
    ),
    (
        'service "a" "b" { policy = "read" }',
        'service "a": unknown field "b" (a rule holds policy and intentions)',
    ),
    # Operator and acl levels.
    ('operator = "list"', "operator must be read, write or deny"),
    ('{"operator": null}', "operator must be read, write or deny"),
    ('acl = "manage"', "acl must be read, write or deny"),
    ('{"acl": ["write"]}', "acl must be read, write or deny"),
    # Shapes.
    ('service { policy = "read" }', 'service: expected service "<name>" { policy = "..." }'),
    (
        'key_prefix { policy = "read" }',
        'key_prefix: expected key_prefix "<name>" { policy = "..." }',
    ),
    ('{"service": "web"}', 'service: expected service "<name>" { policy = "..." }'),
    ('{"service": ["web"]}', 'service: expected service "<name>" { policy = "..." }'),
    ('{"node": {"n": "read"}}', 'node: expected node "<name>" { policy = "..." }'),
    ('service = "read"', 'service: expected service "<name>" { policy = "..." }'),
    ("[1, 2]", "rules are not valid HCL (line 1, column 1)"),
    # Duplicates: rules for the same name, and fields or top-level keys given twice.
    (
        'service "web" { policy = "read" }\nservice "web" { policy = "write" }',
        'service "web": duplicate rule',
    ),
    (
        '{"service": {"web": {"policy": "read"}, "web": {"policy": "write"}}}',
        'service "web": duplicate rule',
    ),
    (
        '{"service": [{"web": {"policy": "read"}}, {"web": {"policy": "read"}}]}',
        'service "web": duplicate rule',
    ),
    (
        'key_prefix "" { policy = "read" }\nkey_prefix "" { policy = "read" }',
        'key_prefix "": duplicate rule',
    ),
    (
        'service = { web = { policy = "read" }, web = { policy = "write" } }',
        'duplicate "web" on line 1',
    ),
    ('service "web" {\n policy = "read"\n policy = "write"\n}', 'duplicate "policy" on line 3'),
    (
        '{"service": {"web": {"policy": "read", "policy": "write"}}}',
        'service "web": duplicate "policy"',
    ),
    ('operator = "deny"\nacl = "read"\noperator = "write"', 'duplicate "operator" on line 3'),
    ('{"operator": "deny", "operator": "write"}', 'duplicate "operator"'),
    # Syntax.
    (
        'service "web" { policy = "read"; intentions = "write" }',
        "rules are not valid HCL (line 1, column 32)",
    ),
    ('service "web" { policy = "read"', "rules are not valid HCL (line 1, column 32)"),
    ('{"service": ', "rules are not valid JSON (line 1, column 13): Expecting value"),
    ('{"service": {}} x', "rules are not valid JSON (line 1, column 17): Extra data"),
    # Names in messages are quoted with control characters escaped, and capped.
    ('service "a\\nb" { policy = "x" }', 'service "a\\nb": policy must be read, write or deny'),
    (
        '{"service": {"' + "n" * 100 + '": {"policy": "x"}}}',
        'service "' + "n" * 64 + '...": policy must be read, write or deny',
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_bad_rules_are_refused_with_a_message_that_says_where(text, message):
    with pytest.raises(RulesError) as e:
        parse_rules(text)
    assert str(e.value) == message
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        "{" * 50_000 + "}" * 10,
        '{"a": ' + "[" * 30_000 + "]" * 30_000 + "}",
        "x = " + "[" * 5_000 + "]" * 5_000,
        "x = " + "{a = " * 3_000 + "1" + "}" * 3_000,
        "\x00",
        "\ufeff" + 'service "a" { policy = "read" }',
        'service "a" { policy = "read" } }',
    ],
)
def test_garbage_and_deep_nesting_are_a_rules_error(text):
    with pytest.raises(RulesError, match=r"^rules are not valid (HCL|JSON)"):
        parse_rules(text)


def test_non_text_is_a_rules_error():
    with pytest.raises(RulesError, match=r"^rules must be text$"):
        parse_rules(b'operator = "read"')  # type: ignore[arg-type]
    with pytest.raises(RulesError, match=r"^rules must be text$"):
        parse_rules(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Rule("agent", "", True, READ),
        lambda: Rule("service", "web", False, LIST),
        lambda: Rule("node", "n", False, "admin"),
        lambda: Rule("key", "k", False, READ, READ),
        lambda: Rule("service", "web", False, READ, LIST),
        lambda: Rules(operator=LIST),
        lambda: Rules(acl="manage"),
    ],
)
def test_rules_built_in_code_are_checked_too(make):
    with pytest.raises(RulesError):
        make()


# -- exact beats prefix; the longest prefix wins --------------------------------------------

SPECIFICITY = """
{r}_prefix "" {{ policy = "read" }}
{r}_prefix "we" {{ policy = "deny" }}
{r}_prefix "web" {{ policy = "write" }}
{r} "web-admin" {{ policy = "deny" }}
{r} "w" {{ policy = "write" }}
"""

# name -> (read, write)
SPECIFICITY_TABLE = {
    "web": (True, True),  # prefix "web" (longest) beats "we" and ""
    "web-1": (True, True),
    "webadmin": (True, True),
    "web-admin": (False, False),  # the exact rule beats the longer-matching prefix "web"
    "web-admin2": (True, True),  # an exact rule matches only its own name
    "we": (False, False),
    "wex": (False, False),
    "w": (True, True),  # exact
    "wa": (True, False),  # only prefix "" matches: the exact "w" does not
    "db": (True, False),
    "": (True, False),
    "WEB": (True, False),  # case-sensitive, as Consul's radix trees are
}


@pytest.mark.parametrize("default_allow", [False, True])
@pytest.mark.parametrize(("name", "expected"), SPECIFICITY_TABLE.items())
def test_exact_beats_prefix_and_the_longest_prefix_wins(name, expected, default_allow):
    for resource in ("service", "node", "key"):
        a = authz(SPECIFICITY.format(r=resource), default_allow=default_allow)
        read = getattr(a, f"{resource}_read")
        write = getattr(a, f"{resource}_write")
        assert (read(name), write(name)) == expected, (resource, name)


@pytest.mark.parametrize("default_allow", [False, True])
def test_no_matching_rule_falls_to_the_default(default_allow):
    a = authz(
        'service_prefix "web" { policy = "read" }\nnode "n1" { policy = "read" }\n'
        'key_prefix "app/" { policy = "read" }',
        default_allow=default_allow,
    )
    assert a.service_read("web-1") and not a.service_write("web-1")
    assert a.node_read("n1") and not a.node_write("n1")
    assert a.key_read("app/x") and not a.key_write("app/x")
    for check, arg in [
        (a.service_read, "db"),
        (a.service_write, "we"),
        (a.node_read, "n"),
        (a.node_write, "n10"),
        (a.key_read, "app"),
        (a.key_list, "other/"),
        (a.key_write, "APP/x"),
        (a.key_write_prefix, "other/"),
        (a.intention_read, "db"),
        (a.intention_write, "db"),
    ]:
        assert check(arg) is default_allow, (check.__name__, arg)
    assert a.operator_read() is default_allow
    assert a.operator_write() is default_allow


def test_resources_do_not_leak_into_each_other():
    a = authz('service_prefix "" { policy = "write" }')
    assert a.service_write("x")
    assert not a.node_read("x") and not a.key_read("x") and not a.operator_read()


# -- events: Consul's event and event_prefix rules, by event name ----------------------------


@pytest.mark.parametrize("default_allow", [False, True])
def test_event_rules_decide_by_name_longest_prefix_first(default_allow):
    a = authz(
        'event_prefix "" { policy = "read" }\n'
        'event_prefix "deploy" { policy = "write" }\n'
        'event "deploy-prod" { policy = "deny" }',
        default_allow=default_allow,
    )
    assert a.event_read("anything") and not a.event_write("anything")
    assert a.event_read("deploy-web") and a.event_write("deploy-web")
    assert not a.event_read("deploy-prod") and not a.event_write("deploy-prod")
    # Events are their own resource: these rules grant no key, service or node.
    assert a.key_read("deploy") is default_allow
    assert a.service_read("deploy") is default_allow
    # And no other resource's rule grants events.
    b = authz('key_prefix "" { policy = "write" }', default_allow=default_allow)
    assert b.event_write("deploy") is default_allow


def test_event_rules_parse_from_json_as_from_hcl():
    hcl = parse_rules('event_prefix "" { policy = "write" }')
    js = parse_rules('{"event_prefix": {"": {"policy": "write"}}}')
    assert hcl == js
    with pytest.raises(RulesError, match='policy "list" is only for key'):
        parse_rules('event "x" { policy = "list" }')


def test_query_rules_name_prepared_queries_by_prefix():
    a = authz(
        'query_prefix "" { policy = "read" }\n'
        'query_prefix "db-" { policy = "write" }\n'
        'query "db-secret" { policy = "deny" }'
    )
    assert a.query_read("web") and not a.query_write("web")
    assert a.query_read("db-x") and a.query_write("db-x")
    assert not a.query_read("db-secret") and not a.query_write("db-secret")
    assert not a.service_read("web") and not a.key_read("db-x")
    assert authz('{"query": {"q": {"policy": "write"}}}').query_write("q")


# -- keys: list, read, write, recursive writes ----------------------------------------------

KEY_LEVELS = {
    # policy -> (list, read, write)
    "deny": (False, False, False),
    "read": (True, True, False),  # a reader may list (Consul without enable_key_list_policy)
    "list": (True, True, False),  # list grants read too, as Consul's enforce() does
    "write": (True, True, True),
}


@pytest.mark.parametrize(("policy", "expected"), KEY_LEVELS.items())
@pytest.mark.parametrize("default_allow", [False, True])
def test_key_levels(policy, expected, default_allow):
    a = authz(f'key_prefix "app/" {{ policy = "{policy}" }}', default_allow=default_allow)
    assert (a.key_list("app/"), a.key_read("app/x"), a.key_write("app/x")) == expected
    b = authz(f'key "app/x" {{ policy = "{policy}" }}', default_allow=default_allow)
    assert (b.key_list("app/x"), b.key_read("app/x"), b.key_write("app/x")) == expected


def test_key_example_from_consul_docs():
    a = authz(
        'key_prefix "" { policy = "read" }\nkey_prefix "foo/" { policy = "write" }\n'
        'key_prefix "foo/private/" { policy = "deny" }\nkey "foo/bar/secret" { policy = "deny" }'
    )
    assert a.key_read("anything") and not a.key_write("anything")
    assert a.key_write("foo/bar") and a.key_write("foo/bar/secret2")
    assert not a.key_read("foo/bar/secret") and not a.key_write("foo/bar/secret")
    assert not a.key_read("foo/private/x") and not a.key_list("foo/private/")
    assert a.key_list("foo/priv")  # "foo/priv" is under "foo/", not under "foo/private/"


KEY_WRITE_PREFIX = [
    # (rules, prefix, default_allow, expected)
    ('key_prefix "app/" { policy = "write" }', "app/", False, True),
    ('key_prefix "app/" { policy = "write" }', "app/sub/", False, True),
    ('key_prefix "app/" { policy = "write" }', "ap", False, False),  # "ap" covers "apx"
    ('key_prefix "app/" { policy = "write" }', "", False, False),
    ('key_prefix "app/" { policy = "write" }', "", True, True),  # all rules under "" write
    ('key_prefix "app/" { policy = "read" }', "app/", True, False),
    (
        'key_prefix "" { policy = "write" }\nkey "app/secret" { policy = "deny" }',
        "app/",
        False,
        False,
    ),
    (
        'key_prefix "" { policy = "write" }\nkey "app/secret" { policy = "read" }',
        "app/",
        False,
        False,
    ),  # not only deny: anything short of write under the prefix
    (
        'key_prefix "" { policy = "write" }\nkey "app/secret" { policy = "list" }',
        "app/",
        False,
        False,
    ),
    (
        'key_prefix "" { policy = "write" }\nkey_prefix "app/x/" { policy = "deny" }',
        "app/",
        False,
        False,
    ),
    (
        'key_prefix "" { policy = "write" }\nkey_prefix "app/x/" { policy = "deny" }',
        "app/x/y/",
        False,
        False,
    ),  # the base rule for the prefix is the deny
    (
        'key_prefix "" { policy = "write" }\nkey "app/secret" { policy = "deny" }',
        "app/s",
        False,
        False,
    ),
    (
        'key_prefix "" { policy = "write" }\nkey "app/secret" { policy = "deny" }',
        "app/t",
        False,
        True,
    ),  # the deny is not under "app/t"
    (
        'key_prefix "" { policy = "write" }\nkey "app/" { policy = "deny" }',
        "app/",
        False,
        False,
    ),  # an exact rule on the prefix itself counts
    ('key_prefix "" { policy = "write" }\nkey "ap" { policy = "deny" }', "app/", False, True),
    (
        'key_prefix "" { policy = "write" }\nkey_prefix "app/x/" { policy = "write" }',
        "app/",
        False,
        True,
    ),
    # With no prefix rule above, the default decides even when everything under is write.
    ('key_prefix "app/x/" { policy = "write" }', "app/", False, False),
    ('key_prefix "app/x/" { policy = "write" }', "app/", True, True),
    ('key "app/" { policy = "write" }', "app/", False, False),  # exact rules are not a base
    ('key_prefix "app/x/" { policy = "deny" }', "app/", True, False),
    (
        'key_prefix "" { policy = "deny" }\nkey_prefix "app/" { policy = "write" }',
        "app/",
        False,
        True,
    ),
]


@pytest.mark.parametrize(("text", "prefix", "default_allow", "expected"), KEY_WRITE_PREFIX)
def test_key_write_prefix(text, prefix, default_allow, expected):
    assert authz(text, default_allow=default_allow).key_write_prefix(prefix) is expected


# -- intentions -----------------------------------------------------------------------------

INTENTIONS = [
    # (rules, destination, (intention_read, intention_write)), default deny
    ('service "db" { policy = "read" }', "db", (True, False)),  # implied read
    ('service "db" { policy = "write" }', "db", (True, False)),  # implied read, never write
    ('service "db" { policy = "deny" }', "db", (False, False)),
    ('service "db" { policy = "read"\n intentions = "write" }', "db", (True, True)),
    ('service "db" { policy = "deny"\n intentions = "write" }', "db", (True, True)),
    ('service "db" { policy = "write"\n intentions = "deny" }', "db", (False, False)),
    ('service "db" { policy = "deny"\n intentions = "read" }', "db", (True, False)),
    ('service_prefix "" { policy = "read"\n intentions = "write" }', "anything", (True, True)),
    # The deciding service rule's intentions count, not a broader one's.
    (
        'service_prefix "" { policy = "read"\n intentions = "write" }\n'
        'service "db" { policy = "read" }',
        "db",
        (True, False),
    ),
    (
        'service_prefix "" { policy = "read"\n intentions = "write" }\n'
        'service_prefix "d" { policy = "deny" }',
        "db",
        (False, False),
    ),
    ('service "web" { policy = "write"\n intentions = "write" }', "db", (False, False)),
    (
        'node_prefix "" { policy = "write" }\nkey_prefix "" { policy = "write" }',
        "db",
        (False, False),
    ),
]


@pytest.mark.parametrize(("text", "destination", "expected"), INTENTIONS)
def test_intentions_are_destination_oriented(text, destination, expected):
    a = authz(text)
    assert (a.intention_read(destination), a.intention_write(destination)) == expected


def test_intentions_under_a_default_allow():
    # No rule: the default allows writing; a service rule without intentions only implies read.
    a = authz('service "db" { policy = "write" }', default_allow=True)
    assert a.intention_write("web") and a.intention_read("web")
    assert a.intention_read("db") and not a.intention_write("db")


# -- operator and acl -----------------------------------------------------------------------


@pytest.mark.parametrize("default_allow", [False, True])
@pytest.mark.parametrize(
    ("level", "expected"),
    [(None, None), ("deny", (False, False)), ("read", (True, False)), ("write", (True, True))],
)
def test_operator_and_acl(level, expected, default_allow):
    for field in ("operator", "acl"):
        a = authz(f'{field} = "{level}"' if level else "", default_allow=default_allow)
        got = (getattr(a, f"{field}_read")(), getattr(a, f"{field}_write")())
        if expected is not None:
            assert got == expected
        elif field == "operator":
            assert got == (default_allow, default_allow)
        else:  # acl is never granted by the default (Consul's allow-all is not management)
            assert got == (False, False)


# -- management and ACLs disabled -----------------------------------------------------------


def _every_answer(a: Authorizer, name: str) -> list[bool]:
    return [
        a.service_read(name),
        a.service_write(name),
        a.intention_read(name),
        a.intention_write(name),
        a.node_read(name),
        a.node_write(name),
        a.key_read(name),
        a.key_list(name),
        a.key_write(name),
        a.key_write_prefix(name),
        a.query_read(name),
        a.query_write(name),
        a.operator_read(),
        a.operator_write(),
        a.acl_read(),
        a.acl_write(),
    ]


@pytest.mark.parametrize("make", [Authorizer.management, Authorizer.allow_all])
@pytest.mark.parametrize("name", ["", "web", "app/secret", "\x00"])
def test_management_and_allow_all_allow_everything(make, name):
    assert all(_every_answer(make(), name))


def test_no_rules_and_default_deny_denies_everything():
    for name in ("", "web", "app/"):
        assert not any(_every_answer(Authorizer([], default_allow=False), name))
        assert not any(_every_answer(Authorizer([Rules()], default_allow=False), name))


def test_default_allow_with_no_rules_allows_everything_but_acl():
    a = Authorizer([], default_allow=True)
    assert _every_answer(a, "web") == [True] * 14 + [False, False]


# -- several policies on one token ----------------------------------------------------------

MERGES = [
    # (policy texts, check, argument, expected)
    (
        ['service "db" { policy = "read" }', 'service "db" { policy = "write" }'],
        "service_write",
        "db",
        True,
    ),  # the most permissive wins...
    (
        ['service "db" { policy = "write" }', 'service "db" { policy = "deny" }'],
        "service_read",
        "db",
        False,
    ),  # ...but deny beats everything
    (
        ['service "db" { policy = "deny" }', 'service "db" { policy = "write" }'],
        "service_read",
        "db",
        False,
    ),  # whatever the order
    (
        [
            'key "k" { policy = "read" }',
            'key "k" { policy = "list" }',
            'key "k" { policy = "write" }',
        ],
        "key_write",
        "k",
        True,
    ),
    (['key "k" { policy = "write" }', 'key "k" { policy = "deny" }'], "key_list", "k", False),
    (['operator = "read"', 'operator = "write"'], "operator_write", None, True),
    (['operator = "write"', 'operator = "deny"'], "operator_read", None, False),
    (['acl = "read"', 'acl = "write"'], "acl_write", None, True),
    (['acl = "write"', 'acl = "deny"'], "acl_read", None, False),
    (['acl = "write"', ""], "acl_write", None, True),  # a policy without acl changes nothing
    # Rules merge per exact name / per prefix, then the most specific one decides: the
    # exact write from one policy beats the prefix deny of the other.
    (
        ['service_prefix "" { policy = "deny" }', 'service "db" { policy = "write" }'],
        "service_write",
        "db",
        True,
    ),
    (
        ['service_prefix "d" { policy = "deny" }', 'service_prefix "db" { policy = "write" }'],
        "service_write",
        "db",
        True,
    ),
    (
        ['service_prefix "d" { policy = "deny" }', 'service_prefix "db" { policy = "write" }'],
        "service_read",
        "d",
        False,
    ),
    # Intentions merge on their own; with none explicit, the merged policy implies them.
    (
        [
            'service "db" { policy = "write" }',
            'service "db" { policy = "read"\n intentions = "write" }',
        ],
        "intention_write",
        "db",
        True,
    ),
    (
        [
            'service "db" { policy = "write" }',
            'service "db" { policy = "read"\n intentions = "deny" }',
        ],
        "intention_read",
        "db",
        False,
    ),
    (
        ['service "db" { policy = "read" }', 'service "db" { policy = "deny" }'],
        "intention_read",
        "db",
        False,
    ),  # merged policy deny implies intentions deny
    (
        [
            'service "db" { policy = "deny" }',
            'service "db" { policy = "read"\n intentions = "read" }',
        ],
        "intention_read",
        "db",
        True,
    ),  # explicit intentions survive (as in Consul)
    (
        [
            'service "db" { policy = "read"\n intentions = "write" }',
            'service "db" { policy = "read"\n intentions = "deny" }',
        ],
        "intention_read",
        "db",
        False,
    ),
]


@pytest.mark.parametrize(("texts", "check", "arg", "expected"), MERGES)
def test_merging_several_policies(texts, check, arg, expected):
    for order in (texts, list(reversed(texts))):
        a = authz(*order)
        method = getattr(a, check)
        assert (method() if arg is None else method(arg)) is expected, order


def test_long_names_against_many_prefix_rules_are_cheap():
    rules = [Rule("key", "a" * n, True, READ) for n in range(1, 2000)]
    a = Authorizer([Rules((*rules, Rule("key", "b", True, WRITE)))], default_allow=False)
    name = "a" * 1_000_000
    start = time.perf_counter()
    for _ in range(100):
        assert a.key_read(name) and not a.key_write(name)
        assert not a.key_write_prefix("a")
    assert time.perf_counter() - start < 2.0


def test_parse_results_are_shared():
    assert parse_rules(EXAMPLE_HCL) is parse_rules(EXAMPLE_HCL)


# -- property: the authorizer equals a straightforward reference ----------------------------

ALPHABET = "ab/"
NAMES = st.text(ALPHABET, max_size=3)
ORDER = [DENY, WRITE, LIST, READ]  # merge precedence, strongest first


def ref_merge(levels: Sequence[str | None]) -> str | None:
    for level in ORDER:
        if level in levels:
            return level
    return None


def ref_grants(level: str, need: str) -> bool:
    if level == DENY:
        return False
    if level == WRITE:
        return True
    return need in (READ, LIST)  # read and list both grant reading and listing


def ref_deciding(policies: Sequence[Rules], resource: str, name: str) -> list[Rule]:
    """All rules (from every policy) at the most specific level that matches ``name``."""
    matching = [
        r
        for p in policies
        for r in p.rules
        if r.resource == resource and (name.startswith(r.name) if r.prefix else name == r.name)
    ]
    if not matching:
        return []
    exact = [r for r in matching if not r.prefix]
    if exact:
        return exact
    longest = max(len(r.name) for r in matching)
    return [r for r in matching if len(r.name) == longest]


def ref_check(policies, default_allow, resource, name, need):
    deciding = ref_deciding(policies, resource, name)
    if not deciding:
        return default_allow
    policy = ref_merge([r.policy for r in deciding])
    assert policy is not None
    return ref_grants(policy, need)


def ref_intention(policies, default_allow, name, need):
    deciding = ref_deciding(policies, "service", name)
    if not deciding:
        return default_allow
    level = ref_merge([r.intentions for r in deciding])
    if level is None:
        level = READ if ref_merge([r.policy for r in deciding]) in (READ, WRITE) else DENY
    return ref_grants(level, need)


def ref_write_prefix(policies, default_allow, prefix):
    keys = [r for p in policies for r in p.rules if r.resource == "key"]
    under = [r for r in keys if r.name.startswith(prefix)]
    by_target: dict[tuple[bool, str], list[str]] = {}
    for r in under:
        by_target.setdefault((r.prefix, r.name), []).append(r.policy)
    if any(ref_merge(levels) != WRITE for levels in by_target.values()):
        return False
    above = [r for r in keys if r.prefix and prefix.startswith(r.name)]
    if not above:
        return default_allow
    longest = max(len(r.name) for r in above)
    return ref_merge([r.policy for r in above if len(r.name) == longest]) == WRITE


def ref_scalar(policies, field, need, default):
    level = ref_merge([getattr(p, field) for p in policies])
    return default if level is None else ref_grants(level, need)


@st.composite
def rules_strategy(draw):
    """One policy: at most one rule per (resource, prefix?, name), as parse_rules allows."""
    targets = draw(
        st.lists(
            st.tuples(st.sampled_from(["service", "node", "key"]), st.booleans(), NAMES),
            max_size=6,
            unique=True,
        )
    )
    out = []
    for resource, prefix, name in targets:
        policies = [READ, WRITE, DENY] + ([LIST] if resource == "key" else [])
        policy = draw(st.sampled_from(policies))
        intentions = None
        if resource == "service":
            intentions = draw(st.sampled_from([None, READ, WRITE, DENY]))
        out.append(Rule(resource, name, prefix, policy, intentions))
    levels = st.sampled_from([None, READ, WRITE, DENY])
    return Rules(
        tuple(sorted(out, key=lambda r: (r.resource, r.prefix, r.name))),
        operator=draw(levels),
        acl=draw(levels),
    )


def to_hcl(rules: Rules) -> str:
    lines = []
    for r in rules.rules:
        body = f"policy = {json.dumps(r.policy)}"
        if r.intentions is not None:
            body += f"\n  intentions = {json.dumps(r.intentions)}"
        lines.append(f"{r.block} {json.dumps(r.name)} {{\n  {body}\n}}")
    for field in ("operator", "acl"):
        if getattr(rules, field) is not None:
            lines.append(f"{field} = {json.dumps(getattr(rules, field))}")
    return "\n".join(lines) + "\n"


def to_json(rules: Rules) -> str:
    doc: dict[str, object] = {}
    for r in rules.rules:
        body = {"policy": r.policy}
        if r.intentions is not None:
            body["intentions"] = r.intentions
        doc.setdefault(r.block, {})[r.name] = body  # type: ignore[index]
    for field in ("operator", "acl"):
        if getattr(rules, field) is not None:
            doc[field] = getattr(rules, field)
    return json.dumps(doc)


@settings(max_examples=200, deadline=None)
@given(rules_strategy())
def test_property_hcl_and_json_round_trip(rules):
    assert parse_rules(to_hcl(rules)) == rules
    assert parse_rules(to_json(rules)) == rules


@settings(max_examples=400, deadline=None)
@given(st.lists(rules_strategy(), max_size=3), st.booleans(), st.lists(NAMES, max_size=4))
def test_property_authorizer_matches_the_reference(policies, default_allow, names):
    a = Authorizer(policies, default_allow=default_allow)
    for name in [*names, "", "a", "ab", "b/"]:
        for resource in ("service", "node", "key"):
            for need in (READ, WRITE):
                got = getattr(a, f"{resource}_{need}")(name)
                assert got == ref_check(policies, default_allow, resource, name, need)
        assert a.key_list(name) == ref_check(policies, default_allow, "key", name, LIST)
        assert a.intention_read(name) == ref_intention(policies, default_allow, name, READ)
        assert a.intention_write(name) == ref_intention(policies, default_allow, name, WRITE)
        assert a.key_write_prefix(name) == ref_write_prefix(policies, default_allow, name)
    for need in (READ, WRITE):
        assert getattr(a, f"operator_{need}")() == ref_scalar(
            policies, "operator", need, default_allow
        )
        assert getattr(a, f"acl_{need}")() == ref_scalar(policies, "acl", need, False)
