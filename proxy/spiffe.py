"""SPIFFE IDs, exactly as the SPIFFE-ID specification and Consul's layout define them.

Pure: no I/O. The CA uses it to check CSRs, the sidecar to check peers, the authorizer to
name services. Parsing is strict because a lenient parser is how a mesh ends up authorizing
``spiffe://evil/../svc/db``: every rule of the spec is enforced, and anything else is refused.

* scheme ``spiffe`` (case-insensitive), a non-empty trust domain of ``[a-z0-9.-_]`` (lower
  case; at most 255 bytes), no userinfo, port, query or fragment;
* path segments of ``[a-zA-Z0-9.-_]``, none empty, none ``.`` or ``..``, no trailing ``/``, no
  percent-encoding; the whole ID at most 2048 bytes;
* a service identity is ``/ns/<ns>/dc/<dc>/svc/<name>``; a signing (CA) identity has no path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
DEFAULT_NAMESPACE = "default"

# Used with ``fullmatch`` only: ``$`` also matches before a trailing newline, so ``match``
# with ``^...$`` let ``spiffe://td\n`` and ``.../svc/web\n`` through (fix: tests/test_spiffe.py).
_TD = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class SpiffeIDError(ValueError):
    """The text is not a valid SPIFFE ID (or not the kind expected). The sender is at fault."""


@dataclass(frozen=True, order=True)
class SpiffeID:
    trust_domain: str
    path: str = ""

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain.lower()


@dataclass(frozen=True)
class ServiceID:
    """``spiffe://<trust-domain>/ns/<namespace>/dc/<datacenter>/svc/<service>``."""

    trust_domain: str
    namespace: str
    datacenter: str
    service: str

    @property
    def uri(self) -> str:
        return (
            f"spiffe://{self.trust_domain}/ns/{self.namespace}/dc/{self.datacenter}"
            f"/svc/{self.service}"
        )

    def __str__(self) -> str:
        return self.uri


def parse(text: str) -> SpiffeID:
    """Parse any SPIFFE ID; raise ``SpiffeIDError`` saying which rule it breaks."""
    if not isinstance(text, str):
        raise SpiffeIDError("a SPIFFE ID must be a string")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise SpiffeIDError(f"a SPIFFE ID may be at most {MAX_ID_BYTES} bytes")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "spiffe":
        raise SpiffeIDError("the scheme must be spiffe://")
    if "?" in rest or "#" in rest:
        raise SpiffeIDError("a SPIFFE ID has no query or fragment")
    if "%" in rest:
        raise SpiffeIDError("a SPIFFE ID has no percent-encoded characters")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise SpiffeIDError("the trust domain has no user info")
    if ":" in authority:
        raise SpiffeIDError("the trust domain has no port")
    if not authority.isascii():
        # Checked before lower-casing: str.lower() maps some non-ASCII letters to ASCII
        # (KELVIN SIGN U+212A -> "k"), which would smuggle them past the character rule.
        raise SpiffeIDError("the trust domain may hold only letters, digits, '.', '-' and '_'")
    td = authority.lower()
    if not td:
        raise SpiffeIDError("the trust domain is empty")
    if len(td.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIDError(f"the trust domain may be at most {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TD.fullmatch(td):
        raise SpiffeIDError("the trust domain may hold only letters, digits, '.', '-' and '_'")
    if not slash:
        return SpiffeID(td, "")
    if path == "":
        raise SpiffeIDError("the path must not end with '/'")
    for seg in path.split("/"):
        if seg == "":
            raise SpiffeIDError("the path has an empty segment or ends with '/'")
        if seg in (".", ".."):
            raise SpiffeIDError("the path has a '.' or '..' segment")
        if not _SEGMENT.fullmatch(seg):
            raise SpiffeIDError(
                f"path segment {seg!r} may hold only letters, digits, '.', '-' and '_'"
            )
    return SpiffeID(td, "/" + path)


def parse_service(text: str) -> ServiceID:
    """Parse a service identity; anything else (an agent, a CA, extra segments) is refused."""
    sid = parse(text)
    segs = sid.segments
    if len(segs) != 6 or segs[0] != "ns" or segs[2] != "dc" or segs[4] != "svc":
        raise SpiffeIDError("not a service identity (/ns/<ns>/dc/<dc>/svc/<service>)")
    return ServiceID(sid.trust_domain, segs[1], segs[3], segs[5])


def service_id(
    trust_domain: str, datacenter: str, service: str, namespace: str = DEFAULT_NAMESPACE
) -> ServiceID:
    """Build a service identity, checking every part so that formatting never yields an ID
    that ``parse_service`` would refuse."""
    # The trust domain goes through the parser, not str.lower(): "\u212atd".lower() is "ktd".
    sid = ServiceID(signing_id(trust_domain).trust_domain, namespace, datacenter, service)
    parsed = parse_service(sid.uri)
    if parsed != sid:
        raise SpiffeIDError(f"cannot form a service identity from {service!r}")
    return sid


def signing_id(trust_domain: str) -> SpiffeID:
    """The CA's identity: the trust domain with no path."""
    sid = parse(f"spiffe://{trust_domain}")
    if sid.path:
        # "spiffe://td/x" parses, but a trust domain holding "/" is not a trust domain, and
        # the signing ID MUST have no path (X509-SVID); refuse rather than return a path.
        raise SpiffeIDError(f"{trust_domain!r} is not a trust domain (it has a path)")
    return sid


def trust_domain_for_cluster(cluster_id: str) -> str:
    """``<cluster-id>.trellis``: a UUID keeps trust domains of different clusters apart."""
    # Parse the name as given (not pre-lowered: str.lower() maps some non-ASCII letters to
    # ASCII) and refuse a path: "abc/def" used to yield the "trust domain" "abc/def.trellis".
    return signing_id(f"{cluster_id}.trellis").trust_domain
