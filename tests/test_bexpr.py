"""Table tests of the filter language (trellis.proxy.bexpr) on fixed catalog data.

Each expression runs against the same instances (the shape of ``/catalog/service/{name}``
and of ``/health/service/{name}``); the expected answer is the list of IDs it keeps. Invalid
expressions are refused with the position where reading stopped.
"""

from __future__ import annotations

import time

import pytest

from trellis.proxy import filtershapes as shapes
from trellis.proxy.bexpr import MAX_DEPTH, MAX_LENGTH, FilterError, parse, parse_optional

INSTANCES = [
    {
        "ID": "n1-id",
        "Node": "node-1",
        "Address": "10.0.0.1",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "10.0.0.1"},
        "NodeMeta": {"os": "linux", "rack": "r1"},
        "ServiceID": "web-1",
        "ServiceName": "web",
        "ServiceTags": ["v1", "primary"],
        "ServiceAddress": "",
        "ServicePort": 8080,
        "ServiceMeta": {"env": "prod", "team": "a b"},
        "ServiceTaggedAddresses": {"lan": {"address": "10.0.0.1", "port": 8080}},
        "ServiceWeights": {"Passing": 1, "Warning": 1},
        "ServiceEnableTagOverride": False,
        "ServiceKind": "",
        "ServiceProxy": None,
        "ServiceConnect": {"Native": True},
    },
    {
        "ID": "n2-id",
        "Node": "node-2",
        "Address": "10.0.0.2",
        "Datacenter": "dc1",
        "TaggedAddresses": {},
        "NodeMeta": {"os": "freebsd"},
        "ServiceID": "web-2",
        "ServiceName": "web",
        "ServiceTags": ["v2"],
        "ServiceAddress": "192.168.1.2",
        "ServicePort": 8081,
        "ServiceMeta": {"env": "qa"},
        "ServiceTaggedAddresses": {},
        "ServiceWeights": {"Passing": 3, "Warning": 1},
        "ServiceEnableTagOverride": True,
        "ServiceKind": "",
        "ServiceProxy": None,
        "ServiceConnect": None,
    },
    {
        "ID": "n2-id",
        "Node": "node-2",
        "Address": "10.0.0.2",
        "Datacenter": "dc1",
        "TaggedAddresses": {},
        "NodeMeta": {"os": "freebsd"},
        "ServiceID": "web-sidecar-proxy",
        "ServiceName": "web-sidecar-proxy",
        "ServiceTags": [],
        "ServiceAddress": "",
        "ServicePort": 21000,
        "ServiceMeta": {},
        "ServiceKind": "connect-proxy",
        "ServiceProxy": {
            "DestinationServiceName": "web",
            "LocalServicePort": 8081,
            "Upstreams": [
                {"DestinationName": "db", "LocalBindPort": 9191},
                {"DestinationName": "cache", "LocalBindPort": 9192},
            ],
        },
    },
]

ALL = ["web-1", "web-2", "web-sidecar-proxy"]

CASES = [
    # equality, on strings, numbers and booleans; quoted, raw and bare values
    ('ServiceID == "web-1"', ["web-1"]),
    ("ServiceID == `web-1`", ["web-1"]),
    ("ServiceName == web", ["web-1", "web-2"]),
    ('ServiceName != "web"', ["web-sidecar-proxy"]),
    ("ServicePort == 8081", ["web-2"]),
    ('ServicePort == "8081"', ["web-2"]),
    ("ServicePort != 8081", ["web-1", "web-sidecar-proxy"]),
    ("ServiceEnableTagOverride == true", ["web-2"]),
    ("ServiceEnableTagOverride == false", ["web-1", "web-sidecar-proxy"]),  # absent: zero value
    ("ServiceConnect.Native == true", ["web-1"]),
    ("ServiceWeights.Passing == 3", ["web-2"]),
    ('ServiceKind == ""', ["web-1", "web-2"]),
    ('ServiceKind == "connect-proxy"', ["web-sidecar-proxy"]),
    # maps: keys by "." and by ["..."]; an absent key matches no positive operator
    ('ServiceMeta.env == "qa"', ["web-2"]),
    ('ServiceMeta["env"] == "prod"', ["web-1"]),
    ('ServiceMeta["team"] == "a b"', ["web-1"]),
    ('ServiceMeta.env != "qa"', ["web-1", "web-sidecar-proxy"]),
    ('NodeMeta.os == "linux"', ["web-1"]),
    ('"env" in ServiceMeta', ["web-1", "web-2"]),
    ('"env" not in ServiceMeta', ["web-sidecar-proxy"]),
    ("ServiceMeta is empty", ["web-sidecar-proxy"]),
    ("ServiceMeta is not empty", ["web-1", "web-2"]),
    ("ServiceMeta.env is empty", ["web-sidecar-proxy"]),
    ("ServiceMeta.env matches `^p`", ["web-1"]),
    ("ServiceMeta.env not matches `^p`", ["web-2", "web-sidecar-proxy"]),
    ('ServiceTaggedAddresses.lan.Address == "10.0.0.1"', ["web-1"]),
    ("ServiceTaggedAddresses.lan.Port == 8080", ["web-1"]),
    ("TaggedAddresses is empty", ["web-2", "web-sidecar-proxy"]),
    # lists: in / contains / is empty
    ('"v1" in ServiceTags', ["web-1"]),
    ('ServiceTags contains "v2"', ["web-2"]),
    ('"v1" not in ServiceTags', ["web-2", "web-sidecar-proxy"]),
    ('ServiceTags not contains "v1"', ["web-2", "web-sidecar-proxy"]),
    ("ServiceTags is empty", ["web-sidecar-proxy"]),
    ("ServiceTags is not empty", ["web-1", "web-2"]),
    # strings: in / contains is a substring test
    ('"sidecar" in ServiceName', ["web-sidecar-proxy"]),
    ('ServiceAddress contains "192.168"', ["web-2"]),
    ("ServiceAddress is empty", ["web-1", "web-sidecar-proxy"]),
    # regular expressions: unanchored, RE2 syntax
    ('ServiceID matches "-[0-9]$"', ["web-1", "web-2"]),
    ('ServiceID matches "(?i)^WEB-1"', ["web-1"]),
    ('Node matches "2"', ["web-2", "web-sidecar-proxy"]),
    ('ServiceID not matches "proxy"', ["web-1", "web-2"]),
    # a null object's fields have their zero values; lists of objects: any element
    ('ServiceProxy.DestinationServiceName == ""', ["web-1", "web-2"]),
    ('ServiceProxy.DestinationServiceName == "web"', ["web-sidecar-proxy"]),
    ("ServiceProxy.LocalServicePort == 8081", ["web-sidecar-proxy"]),
    ("ServiceProxy.Upstreams is empty", ["web-1", "web-2"]),
    ('ServiceProxy.Upstreams.DestinationName == "cache"', ["web-sidecar-proxy"]),
    ("ServiceProxy.Upstreams.LocalBindPort == 9000", []),
    ('ServiceProxy.Upstreams.DestinationName != "db"', ["web-1", "web-2"]),
    # and / or / not, precedence and parentheses
    ('ServiceName == web and "v1" in ServiceTags', ["web-1"]),
    ('ServiceName == web and not "v1" in ServiceTags', ["web-2"]),
    ("ServicePort == 8080 or ServicePort == 21000", ["web-1", "web-sidecar-proxy"]),
    # and binds tighter than or
    ("ServicePort == 8080 or ServicePort == 8081 and ServiceTags is empty", ["web-1"]),
    ("(ServicePort == 8080 or ServicePort == 8081) and ServiceTags is empty", []),
    ("not ServiceName == web or ServicePort == 8080", ["web-1", "web-sidecar-proxy"]),
    ("not (ServiceName == web or ServicePort == 8080)", ["web-sidecar-proxy"]),
    ("not not ServiceName == web", ["web-1", "web-2"]),
    ("not(ServiceName == web)", ["web-sidecar-proxy"]),
    ('( ( ServiceID == "web-1" ) )', ["web-1"]),
    # whitespace is free outside strings
    ('  ServiceID=="web-2"  ', ["web-2"]),
    ('ServiceID\t==\n"web-2"', ["web-2"]),
    # escapes in double quotes; none in backquotes
    ('ServiceMeta.team == "a\\x20b"', ["web-1"]),
    ("ServiceMeta.team == `a\\x20b`", []),
]


@pytest.mark.parametrize(("expression", "expected"), CASES)
def test_expression_selects(expression, expected):
    f = parse(expression, shapes.SERVICE_NODE)
    assert [d["ServiceID"] for d in f.select(INSTANCES)] == expected


HEALTH = [
    {
        "Node": {"Node": "node-1", "Meta": {"os": "linux"}},
        "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1"], "Port": 8080},
        "Checks": [
            {"CheckID": "serfHealth", "Status": "passing", "ServiceName": ""},
            {"CheckID": "service:web-1", "Status": "passing", "ServiceName": "web"},
        ],
    },
    {
        "Node": {"Node": "node-2", "Meta": {}},
        "Service": {"ID": "web-2", "Service": "web", "Tags": [], "Port": 8081},
        "Checks": [
            {"CheckID": "serfHealth", "Status": "passing", "ServiceName": ""},
            {"CheckID": "service:web-2", "Status": "critical", "ServiceName": "web"},
        ],
    },
]

HEALTH_CASES = [
    ('Service.Tags contains "v1"', ["web-1"]),
    ('Node.Meta.os == "linux"', ["web-1"]),
    ('Node.Node == "node-2"', ["web-2"]),
    ('Checks.Status == "critical"', ["web-2"]),
    ('Checks.Status != "critical"', ["web-1"]),
    ('Checks.Status == "passing"', ["web-1", "web-2"]),
    ('Checks.CheckID matches "^service:"', ["web-1", "web-2"]),
    ("Checks is empty", []),
    ('Service.Port == 8081 or Checks.Status == "warning"', ["web-2"]),
]


@pytest.mark.parametrize(("expression", "expected"), HEALTH_CASES)
def test_expression_selects_health_entries(expression, expected):
    f = parse(expression, shapes.CHECK_SERVICE_NODE)
    assert [d["Service"]["ID"] for d in f.select(HEALTH)] == expected


INVALID = [
    # (expression, position where it failed, words of the message)
    ("ServiceName ==", 15, "expected a value"),
    ("ServiceName = web", 13, "expected an operator"),
    ("ServiceName web", 13, "expected an operator"),
    ('ServiceName == "web', 16, "unterminated string"),
    ("ServiceName == `web", 16, "unterminated string"),
    ('ServiceName == "a\\qb"', 18, "invalid escape"),
    ("(ServiceName == web", 1, "unmatched '('"),
    ("(ServiceName == web x", 21, "expected ')'"),
    ("ServiceName == web)", 19, "expected 'and', 'or' or the end"),
    ("ServiceName == web and", 23, "expected a selector or a value"),
    ("ServiceName == web or or", 23, "expected"),
    ("not", 4, "expected an expression after 'not'"),
    ("", 1, "empty"),
    ('"web" ServiceName', 7, "expected 'in'"),
    ('"web" in', 9, "expected a selector after 'in'"),
    ('"web" in "x"', 10, "expected a selector after 'in'"),
    ("ServiceMeta.", 13, "expected a name after '.'"),
    ("ServiceMeta[env] == x", 13, "quoted map key"),
    ('ServiceMeta["env" == x', 19, "expected ']'"),
    ("ServiceMeta is", 15, "expected 'empty'"),
    ("ServiceMeta is not full", 20, "expected 'empty'"),
    ("ServicePort == 80x", 16, "invalid number"),
    ("ServicePort == 08", 16, "invalid number"),
    ("ServiceName == @", 16, "unexpected '@'"),
    ("$x == 1", 1, "unexpected '$'"),
    # selectors the endpoint does not have
    ("Service == web", 1, "unknown selector 'Service'"),
    ("ServiceMeta.env.x == 1", 1, "has no fields"),
    ("ServiceProxy.Nope == 1", 1, "ServiceProxy has no field 'Nope'"),
    ("CreateIndex == 1", 1, "unknown selector"),
    # operators the field's type does not take
    ('ServicePort contains "80"', 1, "'contains' does not apply to ServicePort, which is a number"),
    ("ServiceTags == v1", 1, "'==' does not apply to ServiceTags"),
    ('ServiceTags matches "v"', 1, "'matches' does not apply"),
    ("ServiceProxy is empty", 1, "an object"),
    ('"x" in ServiceProxy.Upstreams', 8, "'in' does not apply"),
    ('"x" not in ServicePort', 12, "'not in' does not apply"),
    ("ServiceMeta == x", 1, "which is a map"),
    ("ServiceEnableTagOverride != yes", 29, "'yes' is not true or false"),
    ("ServicePort == http", 16, "'http' is not a whole number"),
    ("ServiceWeights.Passing == 1.5", 27, "not a whole number"),
    # regular expressions RE2 refuses, or that are too big
    ('ServiceName matches "(a"', 21, "invalid regular expression"),
    ('ServiceName matches "(a)\\\\1"', 21, "invalid regular expression"),
    ('ServiceName matches "(?=a)"', 21, "invalid regular expression"),
    ('ServiceName matches "((a{1000}){1000}){1000}"', 21, "invalid regular expression"),
]


@pytest.mark.parametrize(("expression", "position", "words"), INVALID)
def test_invalid_expression_is_refused_with_its_position(expression, position, words):
    with pytest.raises(FilterError) as e:
        parse(expression, shapes.SERVICE_NODE)
    assert e.value.position == position, str(e.value)
    assert words in e.value.message
    assert str(e.value).endswith(f"(at position {position})")


def test_length_limit():
    clause = 'ServiceName == "web" or '
    text = clause * (MAX_LENGTH // len(clause)) + "ServiceID == x"
    assert len(text) > MAX_LENGTH
    with pytest.raises(FilterError, match="longer than 2048 characters"):
        parse(text, shapes.SERVICE_NODE)
    # Just under the limit is accepted, and evaluates all its clauses.
    text = clause * ((MAX_LENGTH - 20) // len(clause)) + 'ServiceID == "web-2"'
    assert len(text) <= MAX_LENGTH
    assert [d["ServiceID"] for d in parse(text, shapes.SERVICE_NODE).select(INSTANCES)] == [
        "web-1",
        "web-2",
    ]


@pytest.mark.parametrize("opener", ["(", "not ", "not ("])
def test_nesting_limit(opener):
    def nested(n: int) -> str:
        closer = ")" * opener.count("(")
        return opener * n + "ServiceName == web" + closer * n

    per = opener.count("(") + opener.count("not")  # levels each opener adds
    parse(nested(MAX_DEPTH // per - 1), shapes.SERVICE_NODE)  # accepted
    with pytest.raises(FilterError, match=f"deeper than {MAX_DEPTH} levels"):
        parse(nested(MAX_DEPTH // per + 1), shapes.SERVICE_NODE)


def test_long_and_or_chains_are_not_recursion():
    # ~100 clauses in one chain: loops, not one level of recursion per clause.
    text = " and ".join(["ServicePort != 1"] * (MAX_LENGTH // len("ServicePort != 1 and ")))
    assert len(text) <= MAX_LENGTH
    assert len(parse(text, shapes.SERVICE_NODE).select(INSTANCES)) == 3


def test_matches_runs_in_linear_time():
    """A pattern that backtracks exponentially in Python's re (ReDoS) is linear in RE2."""
    f = parse('ServiceName matches "^(a+)+$"', shapes.SERVICE_NODE)
    victim = {"ServiceName": "a" * 100_000 + "!"}
    start = time.monotonic()
    assert not f(victim)
    # Python's re takes longer than the age of the universe on this input; RE2 milliseconds.
    assert time.monotonic() - start < 1.0


def test_parse_optional():
    assert parse_optional([], shapes.NODE) is None
    assert parse_optional(["", "  "], shapes.NODE) is None
    f = parse_optional(["", 'Node == "a"'], shapes.NODE)
    assert f is not None and f({"Node": "a"}) and not f({"Node": "b"})
    with pytest.raises(FilterError, match="one 'filter' parameter"):
        parse_optional(['Node == "a"', 'Node == "b"'], shapes.NODE)


def test_values_of_an_unexpected_type_match_nothing():
    """The evaluator never raises on odd data (a store row it did not expect)."""
    f = parse('ServicePort == 80 or ServiceName == "x" or "a" in ServiceTags', shapes.SERVICE_NODE)
    odd = {"ServicePort": "80", "ServiceName": 7, "ServiceTags": "a"}
    assert f(odd)  # "a" in "a" as a substring
    assert not f({"ServicePort": True, "ServiceName": None, "ServiceTags": None})
    assert not f("not an object")
