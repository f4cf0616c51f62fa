"""Intentions and the authorization decision: may service *source* open a connection to
service *destination*? Pure: no I/O, no Flask, no trio. The server (``/intentions/check``,
``/intentions/match``, ``/agent/connect/authorize``), the sidecar (every inbound connection)
and the native SDK all decide with this one module, so they can never disagree.

Theory of operation
-------------------

An intention is ``(source, destination, action)``; each name is a service name or ``*``, and
``*`` matches any name, but only as the *whole* name (``web*`` is not a pattern, it is refused).
There is at most one intention per ``(source, destination)`` pair (Consul's rule too).

Precedence depends only on where the wildcards are::

    exact -> exact   9        * -> exact   8        exact -> *   6        * -> *   5

A query ``(s, d)`` can therefore be matched by at most four intentions, and they live under
four known keys: ``(s, d)`` 9, ``(*, d)`` 8, ``(s, *)`` 6, ``(*, *)`` 5. ``IntentionSet`` indexes
intentions by destination, then source, at construction; ``decide`` probes those four keys in
that order and stops at the first hit. Nothing is scanned, so a sidecar holding 100,000
intentions decides as fast as one holding 10, and the cost is paid on the connection path.

Why the first hit decides:

* *the most precise match decides*: the four keys have four different precedences and are
  probed from the highest down, so the first hit is the unique maximum;
* *at equal precedence deny wins*: two intentions matching the same query with the same
  precedence must sit under the same key (the key is the query with the intention's wildcards
  put back), i.e. be two intentions for one pair. ``IntentionSet`` refuses those, so a tie
  cannot happen here; but the slot under a key is the *strongest* intention of its group
  (``_strongest``: deny before allow), so if duplicates were ever admitted, deny would still
  win, with ``decide`` unchanged;
* *no match*: the default policy decides (allow when ACLs are off, deny when the ACL default
  policy is deny).

Fail-closed (CVE-2021-36213, where a default-deny cluster with one L7 deny intention let L4
traffic through): a decision is ``allowed`` only if the deciding intention is an allow
intention that matches the query and has the highest precedence among those that match, or if
no intention matches and the default is allow. There is no third path: no "cancelling out",
no L7 ``Permissions`` (an intention without ``action`` is refused here, so callers that meet
one must treat it as deny, as Consul does), and ``default_allow`` must be a real ``bool``, so a
policy string such as ``"deny"`` (truthy) cannot turn into an allow. ``Decision`` has no truth
value at all, so ``if decision:`` raises instead of always passing. tests/test_authz.py
model-checks this exhaustively over a small universe and with hypothesis over larger ones.

Names are compared exactly, case included (``Web`` is not ``web``), like SPIFFE path segments,
from which the sidecar takes the peer's service name.

``authorize`` is the whole decision for a connection whose peer presented a certificate: the
peer's identity is checked first (a URI that is not a service identity, another trust domain,
another datacenter or namespace: each a refusal with its own ``Outcome`` and reason, whatever
the intentions and the default say), and only a local identity reaches the intentions. The
server's ``/v1/agent/connect/authorize``, the sidecar and the SDK call it and nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from trellis.proxy import spiffe
from trellis.proxy.names import is_service_name

ALLOW, DENY = "allow", "deny"
WILDCARD = "*"


PRECEDENCE_EXACT_EXACT = 9
PRECEDENCE_WILDCARD_EXACT = 8
PRECEDENCE_EXACT_WILDCARD = 6
PRECEDENCE_WILDCARD_WILDCARD = 5


class IntentionError(ValueError):
    """The intention (or the query about intentions) is not valid: the caller sent it, the
    caller is at fault (an HTTP API answers 400)."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a service name or the wildcard ``*`` alone.

    A service name is 1-128 ASCII letters, digits, ``_``, ``.`` or ``-``, starting and ending
    with a letter or digit (the catalog's rule). Partial wildcards (``web*``, ``*web``, ``**``)
    are refused rather than taken literally: a user who writes ``web*`` means a pattern, and
    silently matching nothing would be a surprise. IntentionError: the caller is at fault.
    """
    if not isinstance(name, str):
        raise IntentionError(f"a service name must be a string, not {type(name).__name__}")
    if name == WILDCARD:
        return name
    if WILDCARD in name:
        raise IntentionError(
            f"{name!r}: '*' matches any service only as the whole name; partial wildcards"
            " are not supported"
        )
    if not is_service_name(name):  # the catalog's rule (trellis.proxy.names)
        raise IntentionError(
            f"service name {name!r} is not valid: use 1-128 letters, digits, '-', '_' or '.',"
            " starting and ending with a letter or digit, or '*' alone"
        )
    return name


def precedence(source: str, destination: str) -> int:
    """Consul's (OSS) precedence: exact->exact 9, ``*``->exact 8, exact->``*`` 6, ``*``->``*`` 5.

    The names are not validated here (``Intention`` does that); anything but ``*`` is exact.
    """
    if destination == WILDCARD:
        return PRECEDENCE_WILDCARD_WILDCARD if source == WILDCARD else PRECEDENCE_EXACT_WILDCARD
    return PRECEDENCE_WILDCARD_EXACT if source == WILDCARD else PRECEDENCE_EXACT_EXACT


@dataclass(frozen=True)
class Intention:
    """One intention. Construction validates it; IntentionError means the caller sent a bad
    one. ``meta`` is copied into a read-only mapping and takes no part in ``hash()``."""

    source: str
    destination: str
    action: str
    id: str = ""
    description: str = ""
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        check_name(self.source)
        check_name(self.destination)
        if self.action not in (ALLOW, DENY):
            # No L7 "Permissions" and no other spelling: an intention that is neither allow
            # nor deny has no L4 meaning, and guessing one is how CVE-2021-36213 happened.
            raise IntentionError(f"action must be 'allow' or 'deny', not {self.action!r}")
        if not isinstance(self.id, str) or not isinstance(self.description, str):
            raise IntentionError("an intention's id and description must be strings")
        if not isinstance(self.meta, Mapping):
            raise IntentionError("an intention's meta must be a mapping of strings")
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def precedence(self) -> int:
        return precedence(self.source, self.destination)

    @property
    def allows(self) -> bool:
        return self.action == ALLOW

    def matches(self, source: str, destination: str) -> bool:
        """Does this intention apply to a connection from ``source`` to ``destination``?"""
        return (self.source == WILDCARD or self.source == source) and (
            self.destination == WILDCARD or self.destination == destination
        )

    def label(self) -> str:
        """``web => db (allow)``, as Consul prints it (and ``trellis intention create``)."""
        return f"{self.source} => {self.destination} ({self.action})"


class Outcome(enum.Enum):
    """What decided: an intention, the default policy, or the peer's identity (a refusal)."""

    INTENTION = "intention"
    DEFAULT = "default"
    #: The peer's certificate URI is not a service identity (or not a SPIFFE ID at all).
    INVALID_PEER = "invalid-peer"
    #: The peer's identity is from another trust domain (another cluster's CA).
    FOREIGN_TRUST_DOMAIN = "foreign-trust-domain"
    #: The peer's identity names another datacenter (federation is not served).
    OTHER_DATACENTER = "other-datacenter"
    #: The peer's identity names a namespace other than ``default`` (not served).
    OTHER_NAMESPACE = "other-namespace"


#: The outcomes decided by the peer's identity alone: always a denial.
REFUSALS = frozenset(
    {
        Outcome.INVALID_PEER,
        Outcome.FOREIGN_TRUST_DOMAIN,
        Outcome.OTHER_DATACENTER,
        Outcome.OTHER_NAMESPACE,
    }
)


@dataclass(frozen=True)
class Decision:
    """The answer to "may source connect to destination?", with the reason, for logs, metrics
    and ``/agent/connect/authorize``. ``intention`` is the deciding intention, or None when the
    default policy decided or the peer's identity was refused; ``outcome`` says which.

    A Decision has no truth value: ``if decision:`` raises TypeError (a dataclass instance is
    always truthy, so that test would allow everything); test ``decision.allowed``.
    """

    allowed: bool
    reason: str
    intention: Intention | None
    outcome: Outcome = Outcome.DEFAULT

    def __post_init__(self) -> None:
        # Programming errors, not the client's: a decision that contradicts itself.
        if self.intention is not None:
            if self.outcome is not Outcome.INTENTION:
                raise ValueError(f"a decision by {self.intention.label()} has outcome INTENTION")
            if self.allowed != self.intention.allows:
                raise ValueError(f"{self.intention.label()} cannot yield allowed={self.allowed}")
        elif self.outcome is Outcome.INTENTION:
            raise ValueError("a decision with outcome INTENTION names its intention")
        if self.outcome in REFUSALS and self.allowed is not False:
            raise ValueError(f"a peer refused ({self.outcome.value}) is never allowed")

    @property
    def default(self) -> bool:
        """True when no intention matched and the default policy decided."""
        return self.outcome is Outcome.DEFAULT

    def __bool__(self) -> bool:
        raise TypeError("a Decision has no truth value; use decision.allowed")

    @classmethod
    def matched(cls, intention: Intention) -> Decision:
        return cls(
            intention.allows,
            f"Matched intention: {intention.label()}",
            intention,
            Outcome.INTENTION,
        )

    @classmethod
    def refused(cls, outcome: Outcome, reason: str) -> Decision:
        """A denial decided by the peer's identity (``outcome`` is one of ``REFUSALS``)."""
        return cls(False, reason, None, outcome)


DEFAULT_ALLOW = Decision(True, "Default behavior configured by ACLs (allow)", None)
DEFAULT_DENY = Decision(False, "Default behavior configured by ACLs (deny)", None)

_MATCH_BY = ("source", "destination")


def _evaluation_key(i: Intention) -> tuple[int, int, str, str]:
    """Evaluation order: precedence descending, deny before allow, then names ascending."""
    return (-i.precedence, 0 if i.action == DENY else 1, i.source, i.destination)


def _strongest(group: Iterable[Intention]) -> Intention:
    """The intention that decides among intentions of equal precedence: a deny if any.

    Every group ``IntentionSet`` builds has one member (it refuses duplicate pairs); this is
    where "at equal precedence deny wins" would hold if it ever admitted more.
    """
    return min(group, key=_evaluation_key)


# Stands in for a destination with no intentions. A plain dict, never written: its .get() is
# three times cheaper than a MappingProxyType's, and decide() is on every connection's path.
_NO_SLOTS: Mapping[str, Decision] = {}


class IntentionSet:
    """Compiled index of intentions: decide() does O(1) dict lookups, never scans.

    Immutable once built; build a new one when the intentions change (the sidecar swaps its
    reference atomically, so a connection sees either the old set or the new one).
    """

    __slots__ = ("_by_destination", "_by_name", "_ordered")

    def __init__(self, intentions: Iterable[Intention]) -> None:
        """IntentionError (the caller's fault) if two intentions name the same pair."""
        groups: dict[tuple[str, str], list[Intention]] = {}
        for i in intentions:
            if not isinstance(i, Intention):
                raise TypeError(f"expected an Intention, not {type(i).__name__}")
            groups.setdefault((i.source, i.destination), []).append(i)
        for (src, dst), group in groups.items():
            if len(group) > 1:
                raise IntentionError(
                    f"there is already an intention from {src!r} to {dst!r};"
                    " only one per (source, destination) is allowed"
                )
        by_destination: dict[str, dict[str, Decision]] = {}
        by_name: dict[str, dict[str, list[Intention]]] = {"source": {}, "destination": {}}
        ordered: list[Intention] = []
        for (src, dst), group in groups.items():
            winner = _strongest(group)
            by_destination.setdefault(dst, {})[src] = Decision.matched(winner)
            by_name["source"].setdefault(src, []).extend(group)
            by_name["destination"].setdefault(dst, []).extend(group)
            ordered.extend(group)
        ordered.sort(key=_evaluation_key)
        self._by_destination = by_destination
        self._by_name = by_name
        self._ordered = tuple(ordered)

    def decide(self, source: str, destination: str, *, default_allow: bool) -> Decision:
        """May ``source`` connect to ``destination``? At most six dict lookups, no scan.

        The names are not validated (the sidecar takes them from a verified SPIFFE ID, the
        API validates its input with ``check_name``); a name is compared exactly, so a query
        for ``*`` matches only intentions whose side is ``*``. TypeError if ``default_allow``
        is not a bool (a truthy policy string must not become an allow): the caller's bug.
        """
        if default_allow is not True and default_allow is not False:
            raise TypeError(f"default_allow must be a bool, not {type(default_allow).__name__}")
        index = self._by_destination
        # Highest precedence first; see the module docstring for why the first hit decides.
        exact = index.get(destination, _NO_SLOTS)
        hit = exact.get(source)  # 9: exact -> exact
        if hit is not None:
            return hit
        hit = exact.get(WILDCARD)  # 8: * -> exact
        if hit is not None:
            return hit
        wild = index.get(WILDCARD, _NO_SLOTS)
        hit = wild.get(source)  # 6: exact -> *
        if hit is not None:
            return hit
        hit = wild.get(WILDCARD)  # 5: * -> *
        if hit is not None:
            return hit
        return DEFAULT_ALLOW if default_allow else DEFAULT_DENY

    def match(self, *, by: str, name: str) -> list[Intention]:
        """Every intention that applies to service ``name`` on side ``by`` (``"source"`` or
        ``"destination"``): those naming it exactly and those with ``*`` there, in evaluation
        order (precedence descending, deny before allow, then source and destination names
        ascending). ``name`` ``*`` yields only the wildcard ones. IntentionError for a bad
        ``by`` or ``name``: the caller is at fault.
        """
        if by not in _MATCH_BY:
            raise IntentionError(f"by must be 'source' or 'destination', not {by!r}")
        check_name(name)
        side = self._by_name[by]
        found = list(side.get(WILDCARD, ()))
        if name != WILDCARD:
            found.extend(side.get(name, ()))
        found.sort(key=_evaluation_key)
        return found

    def get(self, source: str, destination: str) -> Intention | None:
        """The intention for exactly this pair (``*`` taken literally), if there is one."""
        decision = self._by_destination.get(destination, _NO_SLOTS).get(source)
        return None if decision is None else decision.intention

    def __len__(self) -> int:
        return len(self._ordered)

    def __iter__(self) -> Iterator[Intention]:
        """All intentions, in evaluation order (as ``match`` orders them)."""
        return iter(self._ordered)

    def __repr__(self) -> str:
        return f"<IntentionSet of {len(self._ordered)} intentions>"


def authorize(
    peer: str | spiffe.ServiceID,
    target: str,
    *,
    trust_domain: str,
    datacenter: str,
    intentions: IntentionSet,
    default_allow: bool,
) -> Decision:
    """May the peer open a connection to service ``target`` of this datacenter?

    ``peer`` is the URI of the peer's client certificate (its URI SAN), or the identity already
    parsed from it; ``trust_domain`` and ``datacenter`` are the local ones. The identity is
    checked first, and each way it can fail is a denial with its own ``Outcome``, whatever the
    intentions and the default say: a URI that is not a service identity (``INVALID_PEER``, the
    parser's reason), another trust domain, another datacenter, another namespace (Trellis
    serves only ``default``). A local identity is decided by ``intentions``, then the default.

    A ``ServiceID`` is checked as its URI would be (one built by hand cannot smuggle in a name
    the parser refuses, such as ``*``). IntentionError if ``target`` is not a service name
    (``*`` included), TypeError if ``default_allow`` is not a bool: the caller's bugs, since
    the caller names its own target.
    """
    if default_allow is not True and default_allow is not False:
        raise TypeError(f"default_allow must be a bool, not {type(default_allow).__name__}")
    if check_name(target) == WILDCARD:
        raise IntentionError("the target must be a service name, not '*'")
    try:
        identity = spiffe.parse_service(peer.uri if isinstance(peer, spiffe.ServiceID) else peer)
    except spiffe.SpiffeIDError as e:
        return Decision.refused(Outcome.INVALID_PEER, f"Client certificate URI is invalid: {e}")
    # The wording of the three refusals below is what Consul clients have seen from Trellis's
    # /v1/agent/connect/authorize; it is kept (datacenter and namespace share one sentence).
    if identity.trust_domain != trust_domain.lower():
        return Decision.refused(
            Outcome.FOREIGN_TRUST_DOMAIN,
            f"Client certificate is from another trust domain ({identity.trust_domain})",
        )
    if identity.datacenter != datacenter:
        return Decision.refused(
            Outcome.OTHER_DATACENTER, "Client certificate names another datacenter or namespace"
        )
    if identity.namespace != spiffe.DEFAULT_NAMESPACE:
        return Decision.refused(
            Outcome.OTHER_NAMESPACE, "Client certificate names another datacenter or namespace"
        )
    return intentions.decide(identity.service, target, default_allow=default_allow)
