"""The shapes of the objects Consul's ``?filter=`` runs against, one per kind of listing. Pure.

Consul derives each endpoint's selectors from its Go structs; these are the same selectors
(as its API documentation lists them per endpoint), so an expression written for Consul means
the same here, and one naming a field Consul does not have is refused as it is there. The
raft indexes (``CreateIndex``, ``ModifyIndex``) are not selectors, in Consul either. The server
(``trellis.api.views``) and the node agent's local API (``trellis.proxy.agent.localapi``) both
check expressions against these.
"""

from __future__ import annotations

from typing import Any

from trellis.proxy.bexpr import BOOL, INT, STRING, ListOf, MapOf, Shape, struct

STRINGS = ListOf(STRING)
STRING_MAP = MapOf(STRING)

#: A service's tagged address: Consul's JSON spells its keys in lower case.
_SERVICE_ADDRESS = struct(Address=("address", STRING), Port=("port", INT))
_MESH_GATEWAY = struct(Mode=STRING)
_UPSTREAM = struct(
    DestinationType=STRING,
    DestinationNamespace=STRING,
    DestinationName=STRING,
    Datacenter=STRING,
    LocalBindAddress=STRING,
    LocalBindPort=INT,
    MeshGateway=_MESH_GATEWAY,
)
PROXY = struct(
    DestinationServiceName=STRING,
    DestinationServiceID=STRING,
    LocalServiceAddress=STRING,
    LocalServicePort=INT,
    Mode=STRING,
    TransparentProxy=struct(OutboundListenerPort=INT, DialedDirectly=BOOL),
    MeshGateway=_MESH_GATEWAY,
    Upstreams=ListOf(_UPSTREAM),
)
_CONNECT = struct(Native=BOOL)
_WEIGHTS = struct(Passing=INT, Warning=INT)

#: ``/catalog/nodes``; the ``Node`` of a health entry.
NODE = struct(
    ID=STRING,
    Node=STRING,
    Address=STRING,
    Datacenter=STRING,
    TaggedAddresses=STRING_MAP,
    Meta=STRING_MAP,
)

_NODE_SERVICE_FIELDS: dict[str, Shape] = dict(
    ID=STRING,
    Service=STRING,
    Tags=STRINGS,
    Address=STRING,
    TaggedAddresses=MapOf(_SERVICE_ADDRESS),
    Meta=STRING_MAP,
    Port=INT,
    Weights=_WEIGHTS,
    EnableTagOverride=BOOL,
    Kind=STRING,
    Proxy=PROXY,
    Connect=_CONNECT,
)

#: ``/catalog/node/{node}`` (each of ``Services``); the ``Service`` of a health entry.
NODE_SERVICE = struct(**_NODE_SERVICE_FIELDS)

#: ``/agent/services`` (each value).
AGENT_SERVICE = struct(**_NODE_SERVICE_FIELDS, Datacenter=STRING)

#: ``/catalog/service/{name}``, ``/catalog/connect/{name}``, and ``/catalog/services``
#: (which filters the instances, then lists the names and tags of those that match).
SERVICE_NODE = struct(
    ID=STRING,
    Node=STRING,
    Address=STRING,
    Datacenter=STRING,
    TaggedAddresses=STRING_MAP,
    NodeMeta=STRING_MAP,
    ServiceID=STRING,
    ServiceName=STRING,
    ServiceTags=STRINGS,
    ServiceAddress=STRING,
    ServicePort=INT,
    ServiceMeta=STRING_MAP,
    ServiceTaggedAddresses=MapOf(_SERVICE_ADDRESS),
    ServiceWeights=_WEIGHTS,
    ServiceEnableTagOverride=BOOL,
    ServiceKind=STRING,
    ServiceProxy=PROXY,
    ServiceConnect=_CONNECT,
)

#: ``/health/node/{node}``, ``/health/checks/{name}``, ``/health/state/{state}``, and
#: ``/agent/checks`` (each value).
HEALTH_CHECK = struct(
    Node=STRING,
    CheckID=STRING,
    Name=STRING,
    Status=STRING,
    Notes=STRING,
    Output=STRING,
    ServiceID=STRING,
    ServiceName=STRING,
    ServiceTags=STRINGS,
    Type=STRING,
)

#: ``/health/service/{name}``, ``/health/connect/{name}``.
CHECK_SERVICE_NODE = struct(Node=NODE, Service=NODE_SERVICE, Checks=ListOf(HEALTH_CHECK))

#: ``/connect/intentions``.
INTENTION = struct(
    ID=STRING,
    Description=STRING,
    SourceNS=STRING,
    SourceName=STRING,
    DestinationNS=STRING,
    DestinationName=STRING,
    SourceType=STRING,
    Action=STRING,
    Meta=STRING_MAP,
    Precedence=INT,
)

#: ``/agent/members`` (``consul members -filter``).
AGENT_MEMBER = struct(Name=STRING, Addr=STRING, Port=INT, Tags=STRING_MAP, Status=INT)


#: The agent service fields Consul leaves out when empty (``json:",omitempty"`` on its
#: AgentService); the catalog shapes keep them.
AGENT_OMIT_EMPTY = ("Kind", "TaggedAddresses")


def omit_empty(d: dict[str, Any]) -> dict[str, Any]:
    """An agent service as Consul prints it: ``AGENT_OMIT_EMPTY`` fields left out when empty.
    Applied after filtering, which sees every field."""
    return {k: v for k, v in d.items() if not (k in AGENT_OMIT_EMPTY and not v)}
