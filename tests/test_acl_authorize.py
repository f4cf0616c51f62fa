"""``trellis.api.acl.authorize.decide``: the answers of ``POST /v1/internal/acl/authorize``,
from real Authorizers built from policy text (pure: no I/O)."""

from __future__ import annotations

import pytest

from trellis.api.acl.authorize import MAX_REQUESTS, decide
from trellis.api.acl.rules import Authorizer, parse_rules
from trellis.api.errors import BadRequest


def authz(text: str) -> Authorizer:
    return Authorizer([parse_rules(text)], default_allow=False)


def allows(a: Authorizer, *asks: tuple[str, str, str]) -> list[bool]:
    body = [{"Resource": r, "Segment": s, "Access": x} for r, s, x in asks]
    return [e["Allow"] for e in decide(a, body)]


def test_agent_is_node_on_the_segment():
    a = authz('node "n1" { policy = "write" }')
    assert allows(a, ("agent", "n1", "write"), ("agent", "n2", "read"), ("node", "n1", "read")) == [
        True,
        False,
        True,
    ]


def test_mesh_and_peering_follow_operator_and_keyring_is_never_allowed():
    a = authz('operator = "read"')
    asks = [("mesh", "", "read"), ("mesh", "", "write"), ("peering", "", "read")]
    assert allows(a, *asks, ("keyring", "", "read")) == [True, False, True, False]
    assert allows(Authorizer.management(), ("keyring", "", "read"), ("acl", "", "write")) == [
        False,
        True,
    ]


def test_key_levels_and_access_in_any_case():
    a = authz('key_prefix "app/" { policy = "write" }\nkey "app/locked" { policy = "read" }')
    assert allows(
        a,
        ("key", "app/x", "READ"),
        ("key", "app/", "list"),
        ("key", "app/x", "Write"),
        ("key", "app/", "write-prefix"),
        ("key", "other", "read"),
    ) == [True, True, True, False, False]


def test_the_answer_echoes_the_request_with_allow_and_omits_an_empty_segment():
    got = decide(authz('operator = "write"'), [{"resource": "operator", "ACCESS": "write"}])
    assert got == [{"Resource": "operator", "Access": "write", "Allow": True}]
    assert decide(authz(""), []) == []


@pytest.mark.parametrize(
    "body, says",
    [
        ({"Resource": "operator", "Access": "write"}, "JSON list"),
        (["operator"], "[0]: each authorization must be a JSON object"),
        ([{"Resource": "Operator", "Access": "read"}], "Invalid ACL resource"),
        ([{"Resource": "operator", "Access": "list"}], "Invalid access level"),
        ([{"Resource": "node", "Segment": 3, "Access": "read"}], "[0].Segment: must be a string"),
        ([{"Resource": "node", "Acess": "read"}], "unknown field 'Acess'"),
        ([{"Resource": "node", "resource": "node", "Access": "read"}], "given twice"),
        ([{"Resource": "acl", "Access": "read"}] * (MAX_REQUESTS + 1), "more than 64"),
    ],
)
def test_a_bad_list_is_the_callers_400_for_the_whole_list(body, says):
    with pytest.raises(BadRequest) as e:
        decide(Authorizer.management(), body)
    assert says in str(e.value)
