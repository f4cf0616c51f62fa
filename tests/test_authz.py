"""Table, property and model-checking tests of proxy/authz.py (DESIGN.md "Intentions and
authorization", CONSUL-API.md intentions, SECURITY.md CVE-2021-36213)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trellis.proxy import authz, spiffe
from trellis.proxy.authz import (
    ALLOW,
    DEFAULT_ALLOW,
    DEFAULT_DENY,
    DENY,
    REFUSALS,
    WILDCARD,
    Decision,
    Intention,
    IntentionError,
    IntentionSet,
    Outcome,
    authorize,
    check_name,
    precedence,
)


def ixn(spec: str) -> Intention:
    """``"web => db allow"`` -> Intention("web", "db", "allow")."""
    src, arrow, dst, action = spec.split()
    assert arrow == "=>"
    return Intention(src, dst, action)


def iset(*specs: str) -> IntentionSet:
    return IntentionSet(ixn(s) for s in specs)


# -- the reference evaluator: written from the rules, sharing no code with proxy/authz.py -----

# Precedence from DESIGN.md, keyed by (source is "*", destination is "*").
REF_PRECEDENCE = {(False, False): 9, (True, False): 8, (False, True): 6, (True, True): 5}


def ref_precedence(i: Intention) -> int:
    return REF_PRECEDENCE[(i.source == "*", i.destination == "*")]


def ref_matches(i: Intention, source: str, destination: str) -> bool:
    return i.source in ("*", source) and i.destination in ("*", destination)


def reference(
    intentions: Iterable[Intention], source: str, destination: str, default_allow: bool
) -> tuple[bool, Intention | None]:
    """Scan everything, keep what matches, take the highest precedence, deny wins ties."""
    matching = [i for i in intentions if ref_matches(i, source, destination)]
    if not matching:
        return default_allow, None
    top = max(ref_precedence(i) for i in matching)
    best = [i for i in matching if ref_precedence(i) == top]
    denies = [i for i in best if i.action == "deny"]
    chosen = denies[0] if denies else best[0]
    return chosen.action == "allow", chosen


def assert_fail_closed(
    intentions: Sequence[Intention],
    source: str,
    destination: str,
    default_allow: bool,
    d: Decision,
) -> None:
    """CVE-2021-36213: nothing is allowed unless an allow intention is the most precise match,
    or no intention matches and the default is allow. Also: the decision is self-consistent."""
    assert d.outcome not in REFUSALS, "decide() judges names, never identities"
    matching = [i for i in intentions if ref_matches(i, source, destination)]
    if d.intention is None:
        assert d.outcome is Outcome.DEFAULT and d.default
        assert not matching, (source, destination, d)
        assert d.allowed is default_allow
        assert d.reason.startswith("Default behavior configured by ACLs")
        return
    assert d.outcome is Outcome.INTENTION and not d.default
    assert d.intention in matching, (source, destination, d)
    assert d.reason == f"Matched intention: {d.intention.label()}"
    assert d.allowed is (d.intention.action == "allow")
    if d.allowed:
        mine = ref_precedence(d.intention)
        for other in matching:
            assert ref_precedence(other) <= mine, (other, d)
            if ref_precedence(other) == mine:
                assert other.action == "allow", (other, d)


# -- precedence -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        ("web", "db", 9),
        ("*", "db", 8),
        ("web", "*", 6),
        ("*", "*", 5),
        ("web", "web", 9),
        ("web*", "db", 9),  # not a wildcard (and Intention refuses it): exact
    ],
)
def test_precedence(source: str, destination: str, expected: int) -> None:
    assert precedence(source, destination) == expected
    if "web*" not in (source, destination):
        assert Intention(source, destination, ALLOW).precedence == expected


# -- check_name and Intention validation -----------------------------------------------------

GOOD_NAMES = ["web", "a", "A", "7", "Web-1", "a.b_c-d", "a" * 128, "x" + "-" * 126 + "y", "*"]
BAD_NAMES = [
    "",
    "web*",
    "*web",
    "w*b",
    "**",
    " *",
    "* ",
    "*\n",
    "web\n",
    "\nweb",
    "a" * 129,
    "-web",
    "web-",
    ".web",
    "web.",
    "_web",
    "we b",
    "web/db",
    "web:db",
    "wéb",
    "\u212aelvin",  # KELVIN SIGN: would pass a case-insensitive [a-z] check
    "web\x00",
    "%77eb",
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(IntentionError):
        check_name(name)


@pytest.mark.parametrize("name", [None, 5, b"web", ["web"]])
def test_check_name_refuses_non_strings(name: object) -> None:
    with pytest.raises(IntentionError, match="must be a string"):
        check_name(name)  # type: ignore[arg-type]


def test_partial_wildcard_message_says_why() -> None:
    with pytest.raises(IntentionError, match="whole name"):
        check_name("web*")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_intention_refuses_bad_names_on_either_side(name: str) -> None:
    with pytest.raises(IntentionError):
        Intention(name, "db", ALLOW)
    with pytest.raises(IntentionError):
        Intention("web", name, ALLOW)


@pytest.mark.parametrize("action", ["Allow", "ALLOW", "Deny", "", "permit", " allow", None, True])
def test_intention_refuses_bad_actions(action: object) -> None:
    with pytest.raises(IntentionError, match="action"):
        Intention("web", "db", action)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"), [("id", None), ("description", 5), ("meta", ["k", "v"])]
)
def test_intention_refuses_bad_field_types(field: str, value: object) -> None:
    with pytest.raises(IntentionError):
        Intention("web", "db", ALLOW, **{field: value})  # type: ignore[arg-type]


def test_intention_value_semantics() -> None:
    meta = {"owner": "team-a"}
    i = Intention("web", "db", ALLOW, id="1234", description="d", meta=meta)
    meta["owner"] = "mallory"
    assert i.meta == {"owner": "team-a"}, "meta is copied, not shared"
    with pytest.raises(TypeError):
        i.meta["owner"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        i.action = DENY  # type: ignore[misc]
    assert hash(i) == hash(Intention("web", "db", ALLOW, id="1234", description="d"))
    assert i == Intention("web", "db", ALLOW, id="1234", description="d", meta={"owner": "team-a"})
    assert i != Intention("web", "db", ALLOW, id="1234", description="d")
    assert i.label() == "web => db (allow)"
    assert Intention("*", "*", DENY).label() == "* => * (deny)"


# -- decide(): tables -----------------------------------------------------------------------

# (intentions, source, destination, default_allow, allowed, deciding intention or None)
DECIDE_CASES = [
    # no intentions: the default decides, both ways
    ((), "web", "db", True, True, None),
    ((), "web", "db", False, False, None),
    # each precedence level alone, allow and deny, under both defaults
    *[
        ((f"{s} => {d} {a}",), "web", "db", default, a == ALLOW, f"{s} => {d} {a}")
        for s, d in [("web", "db"), ("*", "db"), ("web", "*"), ("*", "*")]
        for a in (ALLOW, DENY)
        for default in (True, False)
    ],
    # intentions that do not match leave the default in charge
    (("api => db allow", "web => cache allow", "db => web allow"), "web", "db", False, False, None),
    (("api => db deny", "web => cache deny", "db => web deny"), "web", "db", True, True, None),
    # exact beats wildcard: every higher level against every lower one, opposite actions
    *[
        ((hi, lo), "web", "db", default, hi.endswith(ALLOW), hi)
        for hi_s, lo_s in itertools.combinations(
            [("web", "db"), ("*", "db"), ("web", "*"), ("*", "*")], 2
        )
        for a, b in [(ALLOW, DENY), (DENY, ALLOW)]
        for hi, lo in [(f"{hi_s[0]} => {hi_s[1]} {a}", f"{lo_s[0]} => {lo_s[1]} {b}")]
        for default in (True, False)
    ],
    # the classic set: deny everything, allow one edge
    (("* => * deny", "web => db allow"), "web", "db", True, True, "web => db allow"),
    (("* => * deny", "web => db allow"), "api", "db", True, False, "* => * deny"),
    (("* => * deny", "web => db allow"), "db", "web", True, False, "* => * deny"),
    # allow everything into db but deny one source
    (("* => db allow", "web => db deny"), "web", "db", False, False, "web => db deny"),
    (("* => db allow", "web => db deny"), "api", "db", False, True, "* => db allow"),
    (("* => db allow", "web => db deny"), "api", "cache", False, False, None),
    # * -> exact (8) beats exact -> * (6)
    (("web => * deny", "* => db allow"), "web", "db", False, True, "* => db allow"),
    (("web => * allow", "* => db deny"), "web", "db", True, False, "* => db deny"),
    (("web => * allow", "* => db deny"), "web", "cache", False, True, "web => * allow"),
    # a service talking to itself is an ordinary pair
    (("web => web deny",), "web", "web", True, False, "web => web deny"),
    # names are case-sensitive
    (("Web => db deny",), "web", "db", True, True, None),
    (("Web => db deny",), "Web", "db", True, False, "Web => db deny"),
    (("web => DB allow",), "web", "db", False, False, None),
    (("web => DB allow",), "web", "DB", False, True, "web => DB allow"),
    # names that only look like wildcards match nothing but the "*" intentions
    (("web => db allow",), "web*", "db", False, False, None),
    (("web => db allow",), "**", "db", False, False, None),
    (("web => db allow",), "web", "db*", False, False, None),
    (("* => db allow",), "web*", "db", False, True, "* => db allow"),
    (("* => db allow",), "*web", "db", False, True, "* => db allow"),
    # a query for "*" itself is taken literally: only "*" intentions apply to it
    (("web => db allow",), "*", "db", False, False, None),
    (("* => db deny", "web => db allow"), "*", "db", True, False, "* => db deny"),
    (("web => * allow",), "web", "*", False, True, "web => * allow"),
]


@pytest.mark.parametrize(
    ("specs", "source", "destination", "default_allow", "allowed", "decider"), DECIDE_CASES
)
def test_decide_table(
    specs: tuple[str, ...],
    source: str,
    destination: str,
    default_allow: bool,
    allowed: bool,
    decider: str | None,
) -> None:
    s = iset(*specs)
    d = s.decide(source, destination, default_allow=default_allow)
    assert d.allowed is allowed
    if decider is None:
        assert d.intention is None and d.default
        assert d == (DEFAULT_ALLOW if default_allow else DEFAULT_DENY)
    else:
        assert d.intention == ixn(decider) and not d.default
    # the table agrees with the reference evaluator, and the decision is fail-closed
    assert (d.allowed, d.intention) == reference(list(s), source, destination, default_allow)
    assert_fail_closed(list(s), source, destination, default_allow, d)


def test_reason_strings() -> None:
    s = iset("web => db allow", "api => db deny")
    assert (
        s.decide("web", "db", default_allow=False).reason == "Matched intention: web => db (allow)"
    )
    assert s.decide("api", "db", default_allow=True).reason == "Matched intention: api => db (deny)"
    d = s.decide("x", "db", default_allow=False)
    assert d.reason == "Default behavior configured by ACLs (deny)"
    assert d.default and d.intention is None and d.allowed is False
    d = s.decide("x", "db", default_allow=True)
    assert d.reason == "Default behavior configured by ACLs (allow)"
    assert d.default and d.allowed is True


@pytest.mark.parametrize("default_allow", ["deny", "allow", "", 0, 1, None, [False]])
def test_default_must_be_a_bool(default_allow: object) -> None:
    """A policy string is truthy: taken as a bool, "deny" would fail open."""
    with pytest.raises(TypeError, match="bool"):
        iset().decide("web", "db", default_allow=default_allow)  # type: ignore[arg-type]


def test_a_decision_has_no_truth_value() -> None:
    """``if decision:`` would always pass (dataclass instances are truthy): it must raise."""
    d = iset("web => db deny").decide("web", "db", default_allow=True)
    with pytest.raises(TypeError, match="allowed"):
        bool(d)
    with pytest.raises(TypeError):
        if d:  # pragma: no cover - the test is that this line raises
            pass


def test_a_decision_cannot_contradict_its_intention() -> None:
    with pytest.raises(ValueError):
        Decision(True, "Matched intention: web => db (deny)", ixn("web => db deny"))
    with pytest.raises(ValueError):
        Decision(False, "Matched intention: web => db (allow)", ixn("web => db allow"))


def test_a_decision_cannot_contradict_its_outcome() -> None:
    """An intention's decision says so; a refusal of the peer is never an allow."""
    allow = ixn("web => db allow")
    with pytest.raises(ValueError):
        Decision(True, "Matched intention: web => db (allow)", allow, Outcome.DEFAULT)
    with pytest.raises(ValueError):
        Decision(True, "no intention", None, Outcome.INTENTION)
    for outcome in REFUSALS:
        with pytest.raises(ValueError):
            Decision(True, "refused, yet allowed", None, outcome)
        with pytest.raises(ValueError):
            Decision(False, "refused, with an intention", ixn("web => db deny"), outcome)
        d = Decision.refused(outcome, "why")
        assert (d.allowed, d.reason, d.intention, d.outcome) == (False, "why", None, outcome)
        assert not d.default
    assert Decision.matched(allow).outcome is Outcome.INTENTION
    assert DEFAULT_ALLOW.outcome is DEFAULT_DENY.outcome is Outcome.DEFAULT


def test_deny_wins_ties_in_the_slot() -> None:
    """One intention per pair means no tie can reach decide(); the slot keeps the strongest,
    so were duplicates ever admitted, deny would still win (whatever the input order)."""
    allow, deny = ixn("web => db allow"), ixn("web => db deny")
    assert authz._strongest([allow, deny]) is deny
    assert authz._strongest([deny, allow]) is deny
    assert authz._strongest([allow]) is allow


# -- the set: duplicates, len, iter, get -----------------------------------------------------


@pytest.mark.parametrize(
    "specs",
    [
        ("web => db allow", "web => db deny"),
        ("web => db allow", "web => db allow"),
        ("* => db deny", "api => db allow", "* => db allow"),
        ("* => * allow", "* => * deny"),
        ("web => * deny", "web => * deny"),
    ],
)
def test_duplicate_pairs_are_refused(specs: tuple[str, ...]) -> None:
    with pytest.raises(IntentionError, match="already an intention"):
        iset(*specs)


def test_pairs_differing_only_in_case_or_direction_are_distinct() -> None:
    s = iset("web => db allow", "Web => db deny", "db => web deny", "web => DB deny")
    assert len(s) == 4


def test_only_intentions_go_in() -> None:
    with pytest.raises(TypeError):
        IntentionSet([("web", "db", "allow")])  # type: ignore[list-item]


def test_len_iter_get() -> None:
    specs = ["web => db allow", "* => db deny", "web => * allow", "* => * deny", "api => db deny"]
    s = iset(*specs)
    assert len(s) == 5
    assert sorted(i.label() for i in s) == sorted(ixn(x).label() for x in specs)
    assert [i.label() for i in s] == [
        "api => db (deny)",
        "web => db (allow)",
        "* => db (deny)",
        "web => * (allow)",
        "* => * (deny)",
    ]
    assert s.get("web", "db") == ixn("web => db allow")
    assert s.get("*", "*") == ixn("* => * deny")
    assert s.get("api", "cache") is None
    assert s.get("db", "web") is None
    assert len(IntentionSet([])) == 0 and list(IntentionSet(iter([]))) == []


def test_the_set_is_a_snapshot_of_its_input() -> None:
    source = [ixn("web => db allow")]
    s = IntentionSet(source)
    source.append(ixn("* => * deny"))
    assert len(s) == 1
    assert s.decide("api", "db", default_allow=True).default


# -- match() ----------------------------------------------------------------------------------

MATCH_SET = [
    "web => db allow",
    "api => db deny",
    "zeta => db allow",
    "alpha => db allow",
    "* => db allow",
    "web => * deny",
    "web => cache allow",
    "* => * deny",
    "db => web allow",
    "* => cache deny",
]


@pytest.mark.parametrize(
    ("by", "name", "expected"),
    [
        (
            "destination",
            "db",
            [
                "api => db deny",  # 9, deny first
                "alpha => db allow",  # 9, then names ascending
                "web => db allow",
                "zeta => db allow",
                "* => db allow",  # 8
                "web => * deny",  # 6
                "* => * deny",  # 5
            ],
        ),
        (
            "source",
            "web",
            [
                "web => cache allow",
                "web => db allow",
                "* => cache deny",
                "* => db allow",
                "web => * deny",
                "* => * deny",
            ],
        ),
        ("destination", "web", ["db => web allow", "web => * deny", "* => * deny"]),
        ("destination", "nothing", ["web => * deny", "* => * deny"]),
        ("source", "nothing", ["* => cache deny", "* => db allow", "* => * deny"]),
        ("destination", "*", ["web => * deny", "* => * deny"]),
        ("source", "*", ["* => cache deny", "* => db allow", "* => * deny"]),
        ("destination", "DB", ["web => * deny", "* => * deny"]),
    ],
)
def test_match_order(by: str, name: str, expected: list[str]) -> None:
    s = iset(*MATCH_SET)
    assert s.match(by=by, name=name) == [ixn(x) for x in expected]


def test_match_returns_a_fresh_list() -> None:
    s = iset(*MATCH_SET)
    got = s.match(by="destination", name="db")
    got.clear()
    assert len(s.match(by="destination", name="db")) == 7


@pytest.mark.parametrize(
    ("by", "name"), [("dest", "db"), ("Source", "web"), ("", "web"), ("source", "web*")]
)
def test_match_refuses_bad_queries(by: str, name: str) -> None:
    with pytest.raises(IntentionError):
        iset(*MATCH_SET).match(by=by, name=name)


def test_match_agrees_with_decide() -> None:
    """The first intention of match(destination) that also matches the source decides."""
    s = iset(*MATCH_SET)
    for src in ["web", "api", "db", "alpha", "zeta", "other"]:
        for dst in ["db", "web", "cache", "other"]:
            first = next(
                (i for i in s.match(by="destination", name=dst) if ref_matches(i, src, dst)), None
            )
            assert s.decide(src, dst, default_allow=False).intention == first


# -- properties: decide() == the reference, and fail-closed ---------------------------------

INTENTION_NAMES = ["a", "b", "c", "A", "*"]
QUERY_NAMES = ["a", "b", "c", "A", "d", "*"]

intention_sets = st.dictionaries(
    st.tuples(st.sampled_from(INTENTION_NAMES), st.sampled_from(INTENTION_NAMES)),
    st.sampled_from([ALLOW, DENY]),
    max_size=len(INTENTION_NAMES) ** 2,
).map(lambda d: [Intention(s, t, a) for (s, t), a in d.items()])
queries = st.lists(
    st.tuples(st.sampled_from(QUERY_NAMES), st.sampled_from(QUERY_NAMES)), min_size=1, max_size=8
)


@settings(max_examples=400, deadline=None)
@given(intentions=intention_sets, qs=queries, default_allow=st.booleans())
def test_decide_equals_reference(
    intentions: list[Intention], qs: list[tuple[str, str]], default_allow: bool
) -> None:
    s = IntentionSet(intentions)
    for src, dst in qs:
        d = s.decide(src, dst, default_allow=default_allow)
        assert (d.allowed, d.intention) == reference(intentions, src, dst, default_allow)
        assert_fail_closed(intentions, src, dst, default_allow, d)


@settings(max_examples=200, deadline=None)
@given(intentions=intention_sets, by=st.sampled_from(["source", "destination"]))
def test_match_equals_reference(intentions: list[Intention], by: str) -> None:
    s = IntentionSet(intentions)
    for name in QUERY_NAMES:
        side = "source" if by == "source" else "destination"
        want = [i for i in intentions if getattr(i, side) in ("*", name)]
        want.sort(key=lambda i: (-ref_precedence(i), i.action != "deny", i.source, i.destination))
        assert s.match(by=by, name=name) == want


realistic_names = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    intentions=st.dictionaries(
        st.tuples(
            st.one_of(st.just("*"), realistic_names), st.one_of(st.just("*"), realistic_names)
        ),
        st.sampled_from([ALLOW, DENY]),
        max_size=30,
    ).map(lambda d: [Intention(s, t, a) for (s, t), a in d.items()]),
    default_allow=st.booleans(),
    data=st.data(),
)
def test_fail_closed_with_arbitrary_names(
    intentions: list[Intention], default_allow: bool, data: st.DataObject
) -> None:
    """Queries drawn from the names in the set (so that they hit) and from anywhere."""
    s = IntentionSet(intentions)
    named = sorted({i.source for i in intentions} | {i.destination for i in intentions} | {"x"})
    for _ in range(5):
        src = data.draw(st.one_of(st.sampled_from(named), realistic_names))
        dst = data.draw(st.one_of(st.sampled_from(named), realistic_names))
        d = s.decide(src, dst, default_allow=default_allow)
        assert_fail_closed(intentions, src, dst, default_allow, d)
        assert (d.allowed, d.intention) == reference(intentions, src, dst, default_allow)


def test_fail_closed_exhaustively_over_a_tiny_universe() -> None:
    """Every set of intentions over services {a, b} and "*" (each of the 9 pairs absent, allow
    or deny: 3^9 = 19,683 sets), every query among a, b and an outsider c, both defaults."""
    names = ["a", "b", "*"]
    pairs = list(itertools.product(names, names))
    choices = {p: (None, Intention(*p, ALLOW), Intention(*p, DENY)) for p in pairs}
    qs = list(itertools.product(["a", "b", "c"], repeat=2))
    sets = 0
    for combo in itertools.product(range(3), repeat=len(pairs)):
        intentions = [choices[p][c] for p, c in zip(pairs, combo, strict=True) if c]
        s = IntentionSet(intentions)  # type: ignore[arg-type]
        for src, dst in qs:
            for default_allow in (False, True):
                d = s.decide(src, dst, default_allow=default_allow)
                ok, decider = reference(intentions, src, dst, default_allow)  # type: ignore[arg-type]
                assert d.allowed is ok and d.intention is decider, (intentions, src, dst)
                if d.allowed and not default_allow:
                    # the sharpest form of the CVE: under default deny, only an allow may allow
                    assert d.intention is not None and d.intention.action == ALLOW
                if not d.allowed and default_allow:
                    assert d.intention is not None and d.intention.action == DENY
        sets += 1
    assert sets == 3**9


# -- decide() does not scan ------------------------------------------------------------------

BASE = [
    "web => db allow",
    "* => db deny",
    "api => * allow",
    "* => cache allow",
    "batch => cache deny",
    "* => * deny",
    "web => queue allow",
    "ops => web allow",
    "* => web deny",
    "db => * deny",
]
# (source, destination): exact, * -> exact, exact -> *, * -> *, exact again, * -> exact
PROBES = [("web", "db"), ("x", "db"), ("api", "x"), ("x", "y"), ("batch", "cache"), ("z", "web")]


def _filler(n: int) -> list[Intention]:
    """n intentions none of which matches any probe (no "*", names unlike the probes')."""
    return [Intention(f"svc-{k}", f"dst-{k % 997}", ALLOW if k % 3 else DENY) for k in range(n)]


@pytest.fixture(scope="module")
def small_and_big() -> tuple[IntentionSet, IntentionSet]:
    base = [ixn(x) for x in BASE]
    return IntentionSet(base), IntentionSet(base + _filler(100_000 - len(base)))


class _Counted(str):
    """A name that counts how often it is hashed or compared: a scan compares it with every
    intention; an index hashes it once per probe."""

    touches = [0]

    def __hash__(self) -> int:
        self.touches[0] += 1
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        self.touches[0] += 1
        return str.__eq__(self, other)


def test_decide_touches_the_names_a_constant_number_of_times(
    small_and_big: tuple[IntentionSet, IntentionSet],
) -> None:
    small, big = small_and_big
    assert len(small) == 10 and len(big) == 100_000
    for src, dst in [*PROBES, ("svc-5", "dst-6"), ("nobody", "dst-5")]:
        counts = []
        for s in (small, big):
            _Counted.touches[0] = 0
            d = s.decide(_Counted(src), _Counted(dst), default_allow=False)
            counts.append(_Counted.touches[0])
            assert (d.allowed, d.intention) == reference(list(s), src, dst, False)
        # at most: destination hashed once, source hashed twice, plus an equality check on
        # each of those three lookups that finds its key
        assert all(c <= 6 for c in counts), (src, dst, counts)
        if not src.startswith("svc-") and not dst.startswith("dst-"):
            # names the filler does not hold: the 99,990 extra intentions change nothing
            assert counts[0] == counts[1], (src, dst, counts)


@pytest.mark.slow
def test_decide_costs_the_same_with_100k_intentions(
    small_and_big: tuple[IntentionSet, IntentionSet],
) -> None:
    small, big = small_and_big
    queries = PROBES * (20_000 // len(PROBES))

    def best_of_5(s: IntentionSet) -> float:
        decide = s.decide
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for src, dst in queries:
                decide(src, dst, default_allow=False)
            runs.append(time.perf_counter() - t0)
        return min(runs)

    best_of_5(big)  # warm-up
    t_small, t_big = best_of_5(small), best_of_5(big)
    assert t_big < 3 * t_small, (t_small, t_big)


def test_wildcard_constant_is_the_star() -> None:
    assert WILDCARD == "*" and ALLOW == "allow" and DENY == "deny"


# -- authorize(): the peer's identity first, then the intentions --------------------------------

TD = "7f3c0f7e-1a2b-4c5d-8e9f-000000000001.trellis"
DC = "dc1"


def peer(service: str = "web", *, td: str = TD, dc: str = DC, ns: str = "default") -> str:
    return f"spiffe://{td}/ns/{ns}/dc/{dc}/svc/{service}"


OTHER_PLACE = "Client certificate names another datacenter or namespace"
# (peer, outcome, reason or reason prefix): every way a peer can be refused, and the wording
# /v1/agent/connect/authorize has given Consul clients for each.
REFUSED_PEERS: list[tuple[object, Outcome, str]] = [
    (
        peer(td="0a0a0a0a-0000-4000-8000-000000000000.trellis"),
        Outcome.FOREIGN_TRUST_DOMAIN,
        "Client certificate is from another trust domain"
        " (0a0a0a0a-0000-4000-8000-000000000000.trellis)",
    ),
    (
        peer(td="evil.example"),
        Outcome.FOREIGN_TRUST_DOMAIN,
        "Client certificate is from another trust domain (evil.example)",
    ),
    (peer(dc="dc2"), Outcome.OTHER_DATACENTER, OTHER_PLACE),
    (peer(dc="DC1"), Outcome.OTHER_DATACENTER, OTHER_PLACE),  # path segments are exact
    (peer(ns="team-a"), Outcome.OTHER_NAMESPACE, OTHER_PLACE),
    (
        peer(td="evil.example", dc="dc2", ns="x"),
        Outcome.FOREIGN_TRUST_DOMAIN,
        "Client certificate is from another trust domain (evil.example)",
    ),  # checked first
    (peer(dc="dc2", ns="x"), Outcome.OTHER_DATACENTER, OTHER_PLACE),
    *[
        (bad, Outcome.INVALID_PEER, "Client certificate URI is invalid: ")
        for bad in [
            "",
            "not a uri",
            "https://example.com/ns/default/dc/dc1/svc/web",
            f"spiffe://{TD}",  # the CA's own identity
            f"spiffe://{TD}/svc/web",  # not a service identity
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web/extra",
            f"spiffe://{TD}/ns/default/dc/dc1/svc/../db",
            f"spiffe://{TD}/ns/default/dc/dc1/svc/*",  # a peer is never the wildcard
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web\n",
            peer() + "\n",
            peer() + "?x=1",
            f"spiffe://user@{TD}/ns/default/dc/dc1/svc/web",
            None,
            5,
            b"spiffe://x/ns/default/dc/dc1/svc/web",
            spiffe.ServiceID(TD, "default", DC, "*"),  # built by hand: checked as its URI
            spiffe.ServiceID(TD, "default", DC, "we b"),
        ]
    ],
]


def _authorize(p: object, intentions: IntentionSet, default_allow: bool, target: str = "db"):
    return authorize(
        p,  # type: ignore[arg-type]
        target,
        trust_domain=TD,
        datacenter=DC,
        intentions=intentions,
        default_allow=default_allow,
    )


@pytest.mark.parametrize(("p", "outcome", "reason"), REFUSED_PEERS)
@pytest.mark.parametrize("default_allow", [True, False])
def test_authorize_refuses_peers_from_elsewhere_whatever_allows_them(
    p: object, outcome: Outcome, reason: str, default_allow: bool
) -> None:
    """Fail closed: no intention, not even ``* => *`` allow, and no default lets in a peer
    whose identity is not a local service's."""
    for intentions in (iset(), iset("* => * allow"), iset("* => db allow", "web => db allow")):
        d = _authorize(p, intentions, default_allow)
        assert d.allowed is False and d.outcome is outcome and d.intention is None, (p, d)
        assert not d.default
        if outcome is Outcome.INVALID_PEER:
            assert d.reason.startswith(reason) and len(d.reason) > len(reason), d.reason
        else:
            assert d.reason == reason


AUTHORIZE_CASES = [
    # (peer, intentions, default_allow, allowed, reason)
    (peer(), (), True, True, "Default behavior configured by ACLs (allow)"),
    (peer(), (), False, False, "Default behavior configured by ACLs (deny)"),
    (peer(), ("web => db allow",), False, True, "Matched intention: web => db (allow)"),
    (peer(), ("* => db deny",), True, False, "Matched intention: * => db (deny)"),
    (
        peer("api"),
        ("* => db deny", "web => db allow"),
        True,
        False,
        "Matched intention: * => db (deny)",
    ),
    # The trust domain is compared as SPIFFE IDs are: case-insensitively.
    (
        peer(td=TD.upper()),
        ("web => db allow",),
        False,
        True,
        "Matched intention: web => db (allow)",
    ),
    (
        spiffe.ServiceID(TD, "default", DC, "web"),
        ("web => db allow",),
        False,
        True,
        "Matched intention: web => db (allow)",
    ),
    (
        spiffe.parse_service(peer("api")),
        ("web => db allow",),
        False,
        False,
        "Default behavior configured by ACLs (deny)",
    ),
]


@pytest.mark.parametrize(("p", "specs", "default_allow", "allowed", "reason"), AUTHORIZE_CASES)
def test_authorize_decides_a_local_peer_by_the_intentions(
    p: object, specs: tuple[str, ...], default_allow: bool, allowed: bool, reason: str
) -> None:
    s = iset(*specs)
    d = _authorize(p, s, default_allow)
    assert (d.allowed, d.reason) == (allowed, reason)
    service = p.service if isinstance(p, spiffe.ServiceID) else spiffe.parse_service(p).service
    assert d == s.decide(service, "db", default_allow=default_allow)


def test_authorize_takes_the_local_trust_domain_in_any_case() -> None:
    d = authorize(
        peer(),
        "db",
        trust_domain=TD.upper(),
        datacenter=DC,
        intentions=iset("web => db allow"),
        default_allow=False,
    )
    assert d.allowed is True


@pytest.mark.parametrize("target", ["*", "db*", "", "-db", "d b", None, 5])
def test_authorize_refuses_a_target_that_is_not_a_service_name(target: object) -> None:
    """The caller names its own target: a bad one is its bug, not a denial to report."""
    with pytest.raises(IntentionError):
        _authorize(peer(), iset("* => * allow"), True, target)  # type: ignore[arg-type]


@pytest.mark.parametrize("default_allow", ["deny", "allow", "", 0, 1, None])
def test_authorize_default_must_be_a_bool(default_allow: object) -> None:
    """Checked before the peer, so that a refused peer cannot hide the caller's bug."""
    for p in (peer(), peer(dc="dc2"), "garbage"):
        with pytest.raises(TypeError, match="bool"):
            _authorize(p, iset(), default_allow)  # type: ignore[arg-type]


def test_authorize_fail_closed_exhaustively_over_a_tiny_universe() -> None:
    """Every set of intentions over services {a} and "*" (3^4 = 81 sets), every peer (local a,
    local b, and each way of being from elsewhere), both targets and both defaults: a local
    peer is decided exactly as the reference evaluator says, any other peer is denied."""
    names = ["a", "*"]
    pairs = list(itertools.product(names, names))
    choices = {p: (None, Intention(*p, ALLOW), Intention(*p, DENY)) for p in pairs}
    peers: list[tuple[object, str | None]] = [
        (peer("a"), "a"),
        (peer("b"), "b"),
        (spiffe.parse_service(peer("a")), "a"),
        *[(p, None) for p, _, _ in REFUSED_PEERS],
    ]
    checked = 0
    for combo in itertools.product(range(3), repeat=len(pairs)):
        intentions = [choices[p][c] for p, c in zip(pairs, combo, strict=True) if c]
        s = IntentionSet(intentions)  # type: ignore[arg-type]
        for p, service in peers:
            for target in ("a", "b"):
                for default_allow in (False, True):
                    d = _authorize(p, s, default_allow, target)
                    if service is None:
                        assert d.allowed is False and d.outcome in REFUSALS, (p, d)
                        continue
                    ok, decider = reference(intentions, service, target, default_allow)  # type: ignore[arg-type]
                    assert d.allowed is ok and d.intention is decider, (intentions, p, d)
                    assert_fail_closed(intentions, service, target, default_allow, d)  # type: ignore[arg-type]
                    checked += 1
    assert checked == 3**4 * 3 * 2 * 2


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=80),
        st.builds(
            lambda td, ns, dc, svc: f"spiffe://{td}/ns/{ns}/dc/{dc}/svc/{svc}",
            st.sampled_from([TD, TD.upper(), "other.trellis", "", "a:1"]),
            st.sampled_from(["default", "Default", "team", ""]),
            st.sampled_from([DC, "dc2", "", "DC1"]),
            st.one_of(st.sampled_from(["web", "*", "a b", "..", ""]), st.text(max_size=10)),
        ),
    ),
    default_allow=st.booleans(),
)
def test_authorize_allows_only_local_identities(text: str, default_allow: bool) -> None:
    """Whatever the URI, an allow needs a parseable identity of the local trust domain,
    datacenter and namespace, and then an allow from the intentions (here ``* => *``)."""
    d = _authorize(text, iset("* => * allow"), default_allow)
    if d.allowed:
        ident = spiffe.parse_service(text)
        assert (ident.trust_domain, ident.datacenter, ident.namespace) == (TD, DC, "default")
        assert d.outcome is Outcome.INTENTION
    else:
        assert d.outcome in REFUSALS
