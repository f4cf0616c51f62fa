"""Table and property tests of proxy/spiffe.py against SECURITY.md 1.1 and 1.4."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trellis.proxy import spiffe
from trellis.proxy.spiffe import ServiceID, SpiffeID, SpiffeIDError

TD = "example.trellis"
SVC = f"spiffe://{TD}/ns/default/dc/dc1/svc/web"

# What a valid ID looks like once parsed and printed back: ASCII only, canonical.
CANONICAL = re.compile(r"spiffe://[a-z0-9._-]{1,255}(/[A-Za-z0-9._-]+)*\Z")


def _max_id(extra: int = 0, tail: str = "") -> str:
    prefix = f"spiffe://{TD}/"
    return prefix + "a" * (spiffe.MAX_ID_BYTES - len(prefix) - len(tail.encode()) + extra) + tail


# -- parse: accepted -----------------------------------------------------------------------

VALID = [
    ("spiffe://example.org", "example.org", ""),
    ("SPIFFE://example.org/a", "example.org", "/a"),
    ("SpIfFe://example.org/a", "example.org", "/a"),
    ("spiffe://EXAMPLE.Org/Path/Case", "example.org", "/Path/Case"),
    ("spiffe://127.0.0.1/x", "127.0.0.1", "/x"),
    ("spiffe://10.0.0.1", "10.0.0.1", ""),
    ("spiffe://999.999.999.999/x", "999.999.999.999", "/x"),
    ("spiffe://a_b-c.d/x.y_z-1/A", "a_b-c.d", "/x.y_z-1/A"),
    ("spiffe://td/.../.a/a./-/_", "td", "/.../.a/a./-/_"),
    ("spiffe://" + "a" * 255, "a" * 255, ""),
    ("spiffe://" + "A" * 255 + "/x", "a" * 255, "/x"),
    (_max_id(), TD, _max_id()[len(f"spiffe://{TD}") :]),
]


@pytest.mark.parametrize(
    ("text", "td", "path"),
    VALID,
    ids=[
        "plain",
        "scheme-upper",
        "scheme-mixed",
        "td-lowered-path-kept",
        "ipv4-td",
        "ipv4-td-no-path",
        "ip-looking-not-an-ip",
        "all-allowed-chars",
        "dots-inside-segments",
        "td-255-bytes",
        "td-255-upper",
        "id-2048-bytes",
    ],
)
def test_parse_accepts(text: str, td: str, path: str) -> None:
    sid = spiffe.parse(text)
    assert sid == SpiffeID(td, path)
    assert str(sid) == f"spiffe://{td}{path}"
    assert spiffe.parse(str(sid)) == sid


# -- parse: refused ------------------------------------------------------------------------

INVALID: list[tuple[str, Any, str]] = [
    # scheme
    ("empty", "", "scheme"),
    ("http", "http://example.org/x", "scheme"),
    ("one-slash", "spiffe:/example.org/x", "scheme"),
    ("no-slashes", "spiffe:example.org", "scheme"),
    ("no-colon", "spiffe//example.org", "scheme"),
    ("leading-space", " spiffe://example.org", "scheme"),
    ("spiffes", "spiffes://example.org", "scheme"),
    ("not-a-string", b"spiffe://example.org", "string"),
    ("none", None, "string"),
    # trust domain
    ("td-empty", "spiffe://", "trust domain is empty"),
    ("td-empty-with-path", "spiffe:///ns/default", "trust domain is empty"),
    ("td-space", "spiffe://exa mple.org", "trust domain may hold only"),
    ("td-star", "spiffe://exa*mple.org", "trust domain may hold only"),
    ("td-bang", "spiffe://ex!ample", "trust domain may hold only"),
    ("td-backslash", "spiffe://td\\x", "trust domain may hold only"),
    ("td-plus", "spiffe://a+b", "trust domain may hold only"),
    ("td-trailing-newline", "spiffe://example.org\n", "trust domain may hold only"),
    ("td-newline-before-path", "spiffe://example.org\n/x", "trust domain may hold only"),
    ("td-non-ascii", "spiffe://ex\u00e4mple.org", "trust domain may hold only"),
    ("td-kelvin-sign", "spiffe://\u212aexample.org", "trust domain may hold only"),
    ("td-dotless-i", "spiffe://\u0130stanbul", "trust domain may hold only"),
    ("td-percent", "spiffe://exa%41mple.org", "percent"),
    ("td-port", "spiffe://example.org:8080/x", "port"),
    ("td-empty-port", "spiffe://example.org:/x", "port"),
    ("td-ip-port", "spiffe://127.0.0.1:443/x", "port"),
    ("td-ipv6", "spiffe://[::1]/x", "trust domain"),
    ("td-userinfo", "spiffe://user@example.org/x", "user info"),
    ("td-userinfo-password", "spiffe://user:pw@example.org/x", "user info"),
    ("td-256-bytes", "spiffe://" + "a" * 256, "at most 255 bytes"),
    # query and fragment
    ("query-on-td", "spiffe://example.org?x=1", "query or fragment"),
    ("query-on-path", "spiffe://example.org/x?y=1", "query or fragment"),
    ("empty-query", "spiffe://example.org/x?", "query or fragment"),
    ("fragment", "spiffe://example.org/x#frag", "query or fragment"),
    ("empty-fragment", "spiffe://example.org#", "query or fragment"),
    # path
    ("trailing-slash-root", "spiffe://example.org/", "must not end with '/'"),
    ("trailing-slash", "spiffe://example.org/a/", "empty segment"),
    ("double-slash-start", "spiffe://example.org//a", "empty segment"),
    ("double-slash-middle", "spiffe://example.org/a//b", "empty segment"),
    ("dot", "spiffe://example.org/.", "'.' or '..'"),
    ("dotdot", "spiffe://example.org/..", "'.' or '..'"),
    ("dot-middle", "spiffe://example.org/a/./b", "'.' or '..'"),
    ("dotdot-middle", "spiffe://example.org/ns/../svc/db", "'.' or '..'"),
    ("path-percent", "spiffe://example.org/a%2Fb", "percent"),
    ("path-percent-dot", "spiffe://example.org/%2e%2e/db", "percent"),
    ("path-space", "spiffe://example.org/a b", "path segment"),
    ("path-star", "spiffe://example.org/a*b", "path segment"),
    ("path-plus", "spiffe://example.org/a+b", "path segment"),
    ("path-colon", "spiffe://example.org/a:b", "path segment"),
    ("path-at", "spiffe://example.org/a@b", "path segment"),
    ("path-tilde", "spiffe://example.org/a~b", "path segment"),
    ("path-backslash", "spiffe://example.org/a\\b", "path segment"),
    ("path-non-ascii", "spiffe://example.org/caf\u00e9", "path segment"),
    ("path-kelvin", "spiffe://example.org/\u212a", "path segment"),
    ("path-inner-newline", "spiffe://example.org/a\nb", "path segment"),
    ("path-trailing-newline", SVC + "\n", "path segment"),
    ("path-trailing-cr", SVC + "\r", "path segment"),
    ("path-nul", SVC + "\x00", "path segment"),
    # length
    ("id-2049-bytes", _max_id(extra=1), "at most 2048 bytes"),
]


@pytest.mark.parametrize(
    ("text", "words"), [(t, w) for _, t, w in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_parse_refuses(text: Any, words: str) -> None:
    with pytest.raises(SpiffeIDError, match=re.escape(words)):
        spiffe.parse(text)


def test_length_limits_are_in_bytes() -> None:
    # 2048 characters but 2049 bytes: refused for its length, before any other rule.
    text = _max_id()[:-1] + "\u00e9"
    assert len(text) == spiffe.MAX_ID_BYTES
    with pytest.raises(SpiffeIDError, match="2048 bytes"):
        spiffe.parse(text)
    assert len(_max_id()) == spiffe.MAX_ID_BYTES
    spiffe.parse(_max_id())


def test_spiffe_id_error_is_a_value_error() -> None:
    assert issubclass(SpiffeIDError, ValueError)


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("spiffe://td/Web", "spiffe://td/web", False),
        ("spiffe://td/ns/default/dc/DC1/svc/web", SVC.replace(TD, "td"), False),
        ("SPIFFE://TD/web", "spiffe://td/web", True),
        ("spiffe://Example.Trellis/x", f"spiffe://{TD}/x", True),
    ],
    ids=["path-case-sensitive", "dc-case-sensitive", "scheme-td-insensitive", "td-insensitive"],
)
def test_case_rules(a: str, b: str, equal: bool) -> None:
    assert (spiffe.parse(a) == spiffe.parse(b)) is equal


@pytest.mark.parametrize(
    ("text", "segments"),
    [("spiffe://td", ()), ("spiffe://td/a", ("a",)), ("spiffe://td/a/B/c", ("a", "B", "c"))],
    ids=["root", "one", "three"],
)
def test_segments(text: str, segments: tuple[str, ...]) -> None:
    assert spiffe.parse(text).segments == segments


@pytest.mark.parametrize(
    ("text", "td", "member"),
    [
        ("spiffe://td/x", "td", True),
        ("spiffe://td/x", "TD", True),
        ("spiffe://TD/x", "td", True),
        ("spiffe://td/x", "td.", False),
        ("spiffe://td/x", "other", False),
        ("spiffe://td.example/x", "td", False),
    ],
    ids=["same", "arg-upper", "id-upper", "trailing-dot", "other", "suffix"],
)
def test_member_of(text: str, td: str, member: bool) -> None:
    assert spiffe.parse(text).member_of(td) is member


def test_ip_and_dns_looking_trust_domains_follow_the_same_rules() -> None:
    for td in ("10.1.2.3", "db.internal"):
        sid = spiffe.parse_service(f"spiffe://{td}/ns/default/dc/dc1/svc/web")
        assert sid == ServiceID(td, "default", "dc1", "web")
        assert spiffe.signing_id(td) == SpiffeID(td, "")
        with pytest.raises(SpiffeIDError, match="port"):
            spiffe.parse(f"spiffe://{td}:8443/x")
        with pytest.raises(SpiffeIDError, match="user info"):
            spiffe.parse(f"spiffe://u@{td}/x")


# -- parse_service ------------------------------------------------------------------------

SERVICE_OK = [
    ("plain", SVC, ServiceID(TD, "default", "dc1", "web")),
    (
        "td-lowered-rest-kept",
        "SPIFFE://Example.TRELLIS/ns/default/dc/DC1/svc/Web",
        ServiceID(TD, "default", "DC1", "Web"),
    ),
    (
        "other-namespace-parses",
        f"spiffe://{TD}/ns/team-a/dc/dc1/svc/web",
        ServiceID(TD, "team-a", "dc1", "web"),
    ),
    (
        "keyword-values",
        f"spiffe://{TD}/ns/ns/dc/dc/svc/svc",
        ServiceID(TD, "ns", "dc", "svc"),
    ),
    (
        "ip-td",
        "spiffe://10.0.0.1/ns/default/dc/dc1/svc/db",
        ServiceID("10.0.0.1", "default", "dc1", "db"),
    ),
]


@pytest.mark.parametrize(
    ("text", "want"), [c[1:] for c in SERVICE_OK], ids=[c[0] for c in SERVICE_OK]
)
def test_parse_service_accepts(text: str, want: ServiceID) -> None:
    got = spiffe.parse_service(text)
    assert got == want
    assert (
        got.uri
        == str(got)
        == f"spiffe://{want.trust_domain}/ns/{want.namespace}/dc/{want.datacenter}/svc/{want.service}"
    )


NOT_SERVICE = "not a service identity"
SERVICE_BAD = [
    ("extra-segment", SVC + "/extra", NOT_SERVICE),
    ("two-extra-segments", SVC + "/svc/db", NOT_SERVICE),
    ("missing-name", f"spiffe://{TD}/ns/default/dc/dc1/svc", NOT_SERVICE),
    ("missing-svc", f"spiffe://{TD}/ns/default/dc/dc1", NOT_SERVICE),
    ("missing-dc", f"spiffe://{TD}/ns/default/svc/web", NOT_SERVICE),
    ("missing-ns", f"spiffe://{TD}/dc/dc1/svc/web", NOT_SERVICE),
    ("signing-id", f"spiffe://{TD}", NOT_SERVICE),
    ("NS-upper", f"spiffe://{TD}/NS/default/dc/dc1/svc/web", NOT_SERVICE),
    ("DC-upper", f"spiffe://{TD}/ns/default/DC/dc1/svc/web", NOT_SERVICE),
    ("SVC-upper", f"spiffe://{TD}/ns/default/dc/dc1/SVC/web", NOT_SERVICE),
    ("namespace-word", f"spiffe://{TD}/namespace/default/dc/dc1/svc/web", NOT_SERVICE),
    ("swapped-order", f"spiffe://{TD}/dc/dc1/ns/default/svc/web", NOT_SERVICE),
    ("agent-client", f"spiffe://{TD}/agent/client/dc/dc1/id/0a1b2c3d", NOT_SERVICE),
    ("agent-short", f"spiffe://{TD}/agent/0a1b2c3d-0000-1111-2222-333344445555", NOT_SERVICE),
    ("agent-server", f"spiffe://{TD}/agent/server/dc/dc1", NOT_SERVICE),
    ("mesh-gateway", f"spiffe://{TD}/gateway/mesh/dc/dc1", NOT_SERVICE),
    ("trailing-slash", SVC + "/", "empty segment"),
    ("dotdot-smuggle", f"spiffe://{TD}/ns/default/dc/dc1/svc/../db", "'.' or '..'"),
    ("newline", SVC + "\n", "path segment"),
    ("query", SVC + "?x", "query"),
    ("http-scheme", SVC.replace("spiffe", "https", 1), "scheme"),
]


@pytest.mark.parametrize(
    ("text", "words"), [c[1:] for c in SERVICE_BAD], ids=[c[0] for c in SERVICE_BAD]
)
def test_parse_service_refuses(text: str, words: str) -> None:
    with pytest.raises(SpiffeIDError, match=re.escape(words)):
        spiffe.parse_service(text)


# -- service_id ------------------------------------------------------------------------------

SERVICE_ID_OK = [
    ("plain", (TD, "dc1", "web"), {}, SVC),
    ("td-lowered", ("Example.TRELLIS", "dc1", "web"), {}, SVC),
    ("namespace", (TD, "dc1", "web"), {"namespace": "team-a"}, SVC.replace("default", "team-a")),
    (
        "case-kept",
        (TD, "DC-2", "Web_API.v2"),
        {},
        f"spiffe://{TD}/ns/default/dc/DC-2/svc/Web_API.v2",
    ),
    ("ip-td", ("10.0.0.1", "dc1", "web"), {}, SVC.replace(TD, "10.0.0.1")),
]


@pytest.mark.parametrize(
    ("args", "kwargs", "uri"), [c[1:] for c in SERVICE_ID_OK], ids=[c[0] for c in SERVICE_ID_OK]
)
def test_service_id_round_trips(
    args: tuple[str, str, str], kwargs: dict[str, str], uri: str
) -> None:
    sid = spiffe.service_id(*args, **kwargs)
    assert sid.uri == str(sid) == uri
    assert spiffe.parse_service(sid.uri) == sid
    assert sid.namespace == kwargs.get("namespace", spiffe.DEFAULT_NAMESPACE)


SERVICE_ID_BAD = [
    ("svc-slash", (TD, "dc1", "a/b"), {}),
    ("svc-injects-path", (TD, "dc1", "x/svc/db"), {}),
    ("svc-empty", (TD, "dc1", ""), {}),
    ("svc-dot", (TD, "dc1", "."), {}),
    ("svc-dotdot", (TD, "dc1", ".."), {}),
    ("svc-space", (TD, "dc1", "we b"), {}),
    ("svc-newline", (TD, "dc1", "web\n"), {}),
    ("svc-query", (TD, "dc1", "web?x=1"), {}),
    ("svc-fragment", (TD, "dc1", "web#x"), {}),
    ("svc-percent", (TD, "dc1", "w%65b"), {}),
    ("svc-non-ascii", (TD, "dc1", "w\u00e9b"), {}),
    ("dc-slash", (TD, "dc1/svc/db/dc/x", "web"), {}),
    ("dc-empty", (TD, "", "web"), {}),
    ("ns-slash", (TD, "dc1", "web"), {"namespace": "a/b"}),
    ("ns-empty", (TD, "dc1", "web"), {"namespace": ""}),
    ("td-empty", ("", "dc1", "web"), {}),
    ("td-port", ("td:80", "dc1", "web"), {}),
    ("td-path", ("td/x", "dc1", "web"), {}),
    ("td-userinfo", ("u@td", "dc1", "web"), {}),
    ("td-kelvin", ("\u212atd", "dc1", "web"), {}),
]


@pytest.mark.parametrize(
    ("args", "kwargs"), [c[1:] for c in SERVICE_ID_BAD], ids=[c[0] for c in SERVICE_ID_BAD]
)
def test_service_id_refuses_names_that_would_not_parse(
    args: tuple[str, str, str], kwargs: dict[str, str]
) -> None:
    with pytest.raises(SpiffeIDError):
        spiffe.service_id(*args, **kwargs)


# -- signing_id, trust_domain_for_cluster ---------------------------------------------------


@pytest.mark.parametrize(
    ("td", "want"),
    [
        ("example.trellis", "example.trellis"),
        ("Example.TRELLIS", "example.trellis"),
        ("10.0.0.1", "10.0.0.1"),
    ],
    ids=["plain", "lowered", "ip"],
)
def test_signing_id_has_no_path(td: str, want: str) -> None:
    sid = spiffe.signing_id(td)
    assert sid == SpiffeID(want, "")
    assert sid.path == "" and sid.segments == ()
    assert str(sid) == f"spiffe://{want}"


@pytest.mark.parametrize(
    ("td", "words"),
    [
        ("td/x", "path"),
        ("td/ns/default/dc/dc1/svc/web", "path"),
        ("td/", "end with '/'"),
        ("", "empty"),
        ("td:8080", "port"),
        ("u@td", "user info"),
        ("td?x", "query"),
        ("td#x", "fragment"),
        ("t d", "may hold only"),
    ],
    ids=[
        "path",
        "service-path",
        "trailing-slash",
        "empty",
        "port",
        "userinfo",
        "query",
        "fragment",
        "space",
    ],
)
def test_signing_id_refuses(td: str, words: str) -> None:
    with pytest.raises(SpiffeIDError, match=re.escape(words)):
        spiffe.signing_id(td)


@pytest.mark.parametrize(
    ("cluster", "want"),
    [
        ("6f1c2e3a-0b1d-4e5f-8a9b-0c1d2e3f4a5b", "6f1c2e3a-0b1d-4e5f-8a9b-0c1d2e3f4a5b.trellis"),
        ("6F1C2E3A-0B1D-4E5F-8A9B-0C1D2E3F4A5B", "6f1c2e3a-0b1d-4e5f-8a9b-0c1d2e3f4a5b.trellis"),
        ("a" * 247, "a" * 247 + ".trellis"),
    ],
    ids=["uuid", "uuid-upper", "longest"],
)
def test_trust_domain_for_cluster(cluster: str, want: str) -> None:
    td = spiffe.trust_domain_for_cluster(cluster)
    assert td == want
    assert spiffe.signing_id(td) == SpiffeID(want, "")


@pytest.mark.parametrize(
    "cluster",
    ["abc/def", "abc/", "abc:80", "u@abc", "a b", "abc?x", "abc#x", "\u212aabc", "a" * 248],
    ids=[
        "slash",
        "trailing-slash",
        "port",
        "userinfo",
        "space",
        "query",
        "fragment",
        "kelvin",
        "too-long",
    ],
)
def test_trust_domain_for_cluster_refuses(cluster: str) -> None:
    with pytest.raises(SpiffeIDError):
        spiffe.trust_domain_for_cluster(cluster)


# -- properties ------------------------------------------------------------------------------

_ALPHABET = "aZ09.-_/%?#:@ \n\r\t\\\u212a\u00e9\u0130"
_TEXTS = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda scheme, rest: scheme + rest,
        st.sampled_from(["spiffe://", "SPIFFE://", "spiffe:/", "spiffe:", "http://", ""]),
        st.text(alphabet=_ALPHABET, max_size=40),
    ),
    st.builds(
        lambda td, segs, tail: f"spiffe://{td}/" + "/".join(segs) + tail,
        st.text(alphabet="abcXYZ.-_\u212a:@", min_size=0, max_size=8),
        st.lists(st.text(alphabet="aB.-_%\n\u212a", max_size=4), max_size=7),
        st.sampled_from(["", "/", "\n", "?q", "#f", "%2e"]),
    ),
)


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_parse_result_is_always_canonical(text: str) -> None:
    """Whatever parse accepts prints back as a strictly valid ID that parses to itself."""
    try:
        sid = spiffe.parse(text)
    except SpiffeIDError:
        return
    out = str(sid)
    assert CANONICAL.match(out), out
    assert len(out.encode()) <= spiffe.MAX_ID_BYTES
    assert spiffe.parse(out) == sid
    for seg in sid.segments:
        assert seg not in (".", "..")
    # Only the scheme and trust domain may change case; the path is kept exactly.
    assert out.lower() == text.lower()


_NAME = st.text(alphabet="aZ09.-_/ \n%?#\u212a", min_size=0, max_size=6)


@settings(max_examples=300, deadline=None)
@given(_NAME, _NAME, _NAME)
def test_service_id_never_forms_an_id_that_would_not_parse(ns: str, dc: str, name: str) -> None:
    try:
        sid = spiffe.service_id(TD, dc, name, namespace=ns)
    except SpiffeIDError:
        return
    assert (sid.namespace, sid.datacenter, sid.service) == (ns, dc, name)
    assert spiffe.parse_service(sid.uri) == sid
    assert CANONICAL.match(sid.uri)
