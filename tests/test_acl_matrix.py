"""The ACL matrix: every endpoint of the app x a set of tokens, with the exact status expected.

One app with ACLs on and the default policy deny, on a real SQLite file and then on a real
PostgreSQL database, holds a small world
(services ``web`` and ``db`` on this node and on ``ext-1``, a sidecar for ``web``, checks, keys
under ``app/`` and ``secret/``, intentions ``api => web`` and ``api => db``, prepared queries
``web-q`` and ``db-q``, a victim ACL policy, role and token). Each row below is one request (an
endpoint with one target: ``web``/``app/`` is the one the scoped tokens may touch,
``db``/``secret/`` the one they may not) and the status each token must get. The columns:

========  ==================================================================================
none      no token: the anonymous token, which holds no policy
read      ``service_prefix "" {policy="read"}``, ``node_prefix ""``, ``key_prefix ""`` and
          ``event_prefix ""`` read, ``query_prefix ""`` read
web       ``service "web" {policy="write" intentions="write"}``, ``query_prefix "web-"`` write
app       ``key_prefix "app/" {policy="write"}``
op        ``operator = "write"``
mgmt      the bootstrap token (global-management)
bogus     a secret no token has: "ACL not found" wherever a token is looked at
========  ==================================================================================

The expectations follow Consul's rules as the views enforce them (``api/views/*``), e.g.:
filtered reads (catalog, health, agent lists, intention lists, recursive K/V reads) are 200
with the rows the token may read, never 403, and catalog/health rows also need ``node:read``
(so the ``web`` token, which has none, sees none there); writing intentions needs an explicit
``intentions = "write"``; ``acl:*`` is never granted by the default. Where a filtered body is
asserted, the row says what each token sees.

After every 403 nothing may have changed: the store's change index, and every object in it
(services, checks, nodes, keys, intentions, ACL tokens and policies, the CA), are compared
before and after. Before every cell, the world is put back as it was if an allowed write
changed it, so each cell starts from the same state.

Every endpoint of the app must have a row (``test_every_endpoint_has_a_row``): an endpoint
added later without one fails the suite until its row is written.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from tests.openapi_check import ValidatingClient
from tests.support import fresh_database
from trellis.api.app import create_app
from trellis.api.queries import DOC as QUERIES_DOC
from trellis.api.settings import Settings, validate
from trellis.proxy import spiffe
from trellis.proxy import x509 as px

NODE = "test-node"
TOKENS = ("none", "read", "web", "app", "op", "mgmt", "bogus")
F = 403  # the cell a token may not do

POLICIES = {
    "read": 'service_prefix "" { policy = "read" }\n'
    'node_prefix "" { policy = "read" }\n'
    'key_prefix "" { policy = "read" }\n'
    'event_prefix "" { policy = "read" }\n'
    'query_prefix "" { policy = "read" }\n',
    "web": 'service "web" { policy = "write" intentions = "write" }\n'
    'query_prefix "web-" { policy = "write" }',
    "app": 'key_prefix "app/" { policy = "write" }',
    "op": 'operator = "write"',
}

# -- the world ---------------------------------------------------------------------------------

WEB_1 = {
    "Name": "web",
    "ID": "web-1",
    "Port": 8080,
    "Check": {"CheckID": "web-ttl", "Name": "web ttl", "TTL": "10m"},
    "Connect": {"SidecarService": {}},
}
DB_1 = {
    "Name": "db",
    "ID": "db-1",
    "Port": 5432,
    "Check": {"CheckID": "db-ttl", "Name": "db ttl", "TTL": "10m"},
}
DISK = {"CheckID": "disk", "Name": "disk", "TTL": "10m"}
EXT_WEB = {
    "Node": "ext-1",
    "Address": "10.0.0.5",
    "Service": {"ID": "web-ext", "Service": "web", "Port": 80},
}
EXT_DB = {
    "Node": "ext-1",
    "Address": "10.0.0.5",
    "Service": {"ID": "db-ext", "Service": "db", "Port": 5432},
    "Check": {
        "CheckID": "db-ext-check",
        "Name": "db ext",
        "Status": "passing",
        "ServiceID": "db-ext",
    },
}
KEYS = {"app/cfg": b"a", "secret/cfg": b"s"}
QUERIES = {"web-q": "web", "db-q": "db"}
INTENTIONS = (("api", "web"), ("api", "db"))
VICTIM_RULES = 'key "victim" { policy = "read" }'


@dataclass
class World:
    client: ValidatingClient
    app: Any
    secrets: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    victim_token: str = ""
    trust_domain: str = ""
    baseline: dict[str, Any] = field(default_factory=dict)
    csrs: dict[str, str] = field(default_factory=dict)
    #: The accessors of the tokens the world starts with (not the victim).
    baseline_tokens: frozenset[str] = frozenset()
    #: The key that signs the JWTs the ``victim-m`` auth method trusts, and its binding rule.
    jwt_key: Any = None
    victim_rule: str = ""

    @property
    def store(self):
        return self.app.extensions["trellis"].store

    def mgmt(self, method: str, url: str, **kw: Any):
        r = self.client.open(
            url, method=method, headers={"X-Consul-Token": self.secrets["mgmt"]}, **kw
        )
        assert r.status_code == 200, (method, url, r.status_code, r.get_data(as_text=True))
        return r

    # -- building and restoring ----------------------------------------------------------

    def build_catalog(self) -> None:
        self.mgmt("PUT", "/v1/agent/service/register", json=WEB_1)
        self.mgmt("PUT", "/v1/agent/service/register", json=DB_1)
        self.mgmt("PUT", "/v1/agent/check/register", json=DISK)
        self.mgmt("PUT", "/v1/catalog/register", json=EXT_WEB)
        self.mgmt("PUT", "/v1/catalog/register", json=EXT_DB)

    def build_kv(self) -> None:
        for k, v in KEYS.items():
            self.mgmt("PUT", f"/v1/kv/{k}", data=v)

    def build_intentions(self) -> None:
        for s, d in INTENTIONS:
            self.mgmt(
                "PUT",
                f"/v1/connect/intentions/exact?source={s}&destination={d}",
                json={"Action": "allow"},
            )

    def build_queries(self) -> None:
        for name, service in QUERIES.items():
            self.mgmt("POST", "/v1/query", json={"Name": name, "Service": {"Service": service}})

    def queries_doc(self) -> Any:
        got = self.store.system_get(QUERIES_DOC)
        return got[0] if got is not None else None

    def build_acl(self) -> None:
        victim = self.store.acl_policy(name="victim")
        body = {"Name": "victim", "Rules": VICTIM_RULES}
        if victim is None:
            self.mgmt("PUT", "/v1/acl/policy", json=body)
        else:
            self.mgmt("PUT", f"/v1/acl/policy/{victim.id}", json=body)
        if self.victim_token and self.store.acl_token(accessor_id=self.victim_token):
            self.mgmt("PUT", f"/v1/acl/token/{self.victim_token}", json={"Description": "victim"})
        else:
            r = self.mgmt("PUT", "/v1/acl/token", json={"Description": "victim"})
            self.victim_token = r.get_json()["AccessorID"]
        role = self.store.acl_role(name="victim")
        body = {"Name": "victim", "Policies": [{"Name": "victim"}]}
        if role is None:
            self.mgmt("PUT", "/v1/acl/role", json=body)
        else:
            self.mgmt("PUT", f"/v1/acl/role/{role.id}", json=body)

    def jwt_config(self) -> dict[str, Any]:
        pub = self.jwt_key.public_key().public_bytes(
            Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {"JWTValidationPubKeys": [pub.decode()], "ClaimMappings": {"service": "svc"}}

    def jwt(self) -> str:
        """A JWT for ``victim-m`` that its binding rule binds (service identity ``web``)."""

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        head = b64(json.dumps({"alg": "RS256"}).encode())
        body = b64(json.dumps({"service": "web", "exp": int(time.time()) + 300}).encode())
        signed = f"{head}.{body}".encode()
        sig = self.jwt_key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
        return f"{head}.{body}.{b64(sig)}"

    def build_logins(self) -> None:
        body = {"Name": "victim-m", "Type": "jwt", "Config": self.jwt_config()}
        if self.store.acl_auth_method("victim-m") is None:
            self.mgmt("PUT", "/v1/acl/auth-method", json=body)
        else:
            self.mgmt("PUT", "/v1/acl/auth-method/victim-m", json=body)
        rule = {"AuthMethod": "victim-m", "BindType": "service", "BindName": "${value.svc}"}
        if self.victim_rule and self.store.acl_binding_rule(self.victim_rule):
            self.mgmt("PUT", f"/v1/acl/binding-rule/{self.victim_rule}", json=rule)
        else:
            self.victim_rule = self.mgmt("PUT", "/v1/acl/binding-rule", json=rule).get_json()["ID"]

    def signature(self) -> dict[str, Any]:
        """What the rows depend on (not indexes, check states or the CA)."""
        st = self.store
        return {
            "catalog": (
                sorted(
                    (s.node, s.id, s.name, s.port, s.kind, s.destination) for s in st.services()
                ),
                sorted((c.node, c.check_id, c.service_id, c.service_name) for c in st.checks()),
                sorted((n.name, n.address) for n in st.nodes()),
            ),
            "kv": sorted((e.key, e.value, e.flags) for e in st.kv_list("")),
            "intentions": sorted(
                (r.source, r.destination, r.action, r.description) for r in st.intentions()
            ),
            "acl": (
                sorted((p.name, p.rules, p.description) for p in st.acl_policies()),
                sorted((t.description, t.policies) for t in st.acl_tokens()),
                sorted((r.name, r.description, len(r.policies)) for r in st.acl_roles()),
            ),
            "queries": self.queries_doc(),
            "logins": (
                sorted(
                    (m.name, m.description, json.dumps(m.config)) for m in st.acl_auth_methods()
                ),
                sorted(
                    (b.auth_method, b.bind_type, b.bind_name, b.selector)
                    for b in st.acl_binding_rules()
                ),
            ),
        }

    def restore(self) -> None:
        """Put back whatever an allowed write changed."""
        now = self.signature()
        if now == self.baseline:
            return
        st = self.store
        if now["catalog"] != self.baseline["catalog"]:
            services = {(s[0], s[1]) for s in self.baseline["catalog"][0]}
            checks = {(c[0], c[1]) for c in self.baseline["catalog"][1]}
            nodes = {n[0] for n in self.baseline["catalog"][2]}
            for s in st.services():
                if (s.node, s.id) not in services:
                    st.deregister_service(s.node, s.id)
            for c in st.checks():
                if (c.node, c.check_id) not in checks:
                    st.deregister_check(c.node, c.check_id)
            for n in st.nodes():
                if n.name not in nodes:
                    st.deregister_node(n.name)
            self.build_catalog()
        if now["kv"] != self.baseline["kv"]:
            st.kv_delete("", recurse=True)
            self.build_kv()
        if now["intentions"] != self.baseline["intentions"]:
            for r in st.intentions():
                st.intention_delete(r.id)
            self.build_intentions()
        if now["acl"] != self.baseline["acl"]:
            keep = {t.accessor_id for t in st.acl_tokens()} & set(self.baseline_tokens)
            for t in st.acl_tokens():
                if t.accessor_id not in keep and t.accessor_id != self.victim_token:
                    st.acl_token_delete(t.accessor_id)
            names = {p[0] for p in self.baseline["acl"][0]}
            for p in st.acl_policies():
                if p.name not in names:
                    st.acl_policy_delete(p.id)
            role_names = {r[0] for r in self.baseline["acl"][2]}
            for r in st.acl_roles():
                if r.name not in role_names:
                    st.acl_role_delete(r.id)
            self.build_acl()
        if now["logins"] != self.baseline["logins"]:
            for m in st.acl_auth_methods():
                if m.name != "victim-m":
                    st.acl_auth_method_delete(m.name)
            for b in st.acl_binding_rules():
                if b.id != self.victim_rule:
                    st.acl_binding_rule_delete(b.id)
            self.build_logins()
        if now["queries"] != self.baseline["queries"]:
            # The queries are one document: put it back as it was (the same IDs).
            st.system_write({QUERIES_DOC: self.baseline["queries"]})
        assert self.signature() == self.baseline, "the world could not be restored"

    def snapshot(self) -> tuple:
        """Everything in the store, to prove that a 403 changed nothing."""
        st = self.store
        ca = self.app.extensions["trellis"].ca
        return (
            st.current_index(),
            st.nodes(),
            st.services(),
            st.checks(),
            st.kv_list(""),
            st.intentions(),
            st.acl_tokens(),
            st.acl_policies(),
            st.acl_roles(),
            st.acl_auth_methods(),
            st.acl_binding_rules(),
            ca.config_view(),
            ca.roots_view(),
            st.events(),
            self.queries_doc(),
        )

    def values(self) -> dict[str, str]:
        """The placeholders of the rows' URLs, from the world as it is now."""
        st = self.store
        out = {
            "ixn_web": st.intention_exact("api", "web").id,
            "ixn_db": st.intention_exact("api", "db").id,
            "victim_policy": st.acl_policy(name="victim").id,
            "victim_token": self.victim_token,
            "victim_role": st.acl_role(name="victim").id,
            "victim_rule": self.victim_rule,
        }
        for d in (self.queries_doc() or {}).get("Queries", ()):
            out[f"query_{d['Name'].removesuffix('-q')}"] = d["ID"]
        return out

    def csr(self, service: str) -> str:
        if service not in self.csrs:
            ident = spiffe.service_id(self.trust_domain, "dc1", service)
            self.csrs[service] = (
                px.build_csr(px.generate_key(), ident).public_bytes(Encoding.PEM).decode()
            )
        return self.csrs[service]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory) -> Iterator[World]:
    """The world on a SQLite file, then on a fresh PostgreSQL database: the matrix runs on
    both stores."""
    data = tmp_path_factory.mktemp("acl-matrix")
    with contextlib.ExitStack() as stack:
        store = ""  # SQLite in the data dir
        if request.param == "postgresql":
            admin = request.getfixturevalue("pg_server").get_uri()
            store = stack.enter_context(fresh_database(admin))
        yield from _world(data, store)


def _world(data, store: str) -> Iterator[World]:
    settings = validate(
        Settings(
            data_dir=str(data),
            store=store,
            node_name=NODE,
            acl_enabled=True,
            acl_default_policy="deny",
            ca_seal_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        )
    )
    app = create_app(settings, background=False)
    c = ValidatingClient(app.test_client())
    w = World(client=c, app=app)
    boot = c.put("/v1/acl/bootstrap").get_json()
    w.secrets["mgmt"] = boot["SecretID"]
    w.descriptions = {"none": "Anonymous Token", "mgmt": boot["Description"], "bogus": ""}
    for name, rules in POLICIES.items():
        w.mgmt("PUT", "/v1/acl/policy", json={"Name": name, "Rules": rules})
        t = w.mgmt(
            "PUT",
            "/v1/acl/token",
            json={"Description": f"{name} token", "Policies": [{"Name": name}]},
        ).get_json()
        w.secrets[name] = t["SecretID"]
        w.descriptions[name] = f"{name} token"
    w.secrets["bogus"] = str(uuid.uuid4())
    w.baseline_tokens = frozenset(t.accessor_id for t in w.store.acl_tokens())
    w.build_catalog()
    w.build_kv()
    w.build_intentions()
    w.build_acl()
    w.jwt_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    w.build_logins()
    w.mgmt("PUT", "/v1/event/fire/deploy", data=b"v1")
    w.build_queries()
    w.trust_domain = app.extensions["trellis"].ca.trust_domain
    w.baseline = w.signature()
    yield w
    app.extensions["trellis"].close()


# -- the rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    method: str
    url: str  # may hold {ixn_web}, {ixn_db}, {victim_policy}, {victim_token}, {victim_role}...
    expect: dict[str, int]
    body: Any = None  # JSON, bytes, or a callable(world) giving JSON
    view: Callable[[Any], Any] | None = None  # what of a 200 body to compare
    bodies: dict[str, Any] | None = None  # per token, the view of its 200 body
    #: What every 403's message says, when not the token's missing permission (or, for the
    #: bogus token, "ACL not found").
    message: str | None = None

    @property
    def id(self) -> str:
        extra = ""
        if isinstance(self.body, dict):
            extra = " " + json.dumps(self.body, sort_keys=True)[:80]
        return f"{self.method} {self.url}{extra}"


def R(
    method: str,
    url: str,
    *statuses: int,
    body: Any = None,
    view: Callable[[Any], Any] | None = None,
    message: str | None = None,
    **bodies: Any,
) -> Row:
    """A row: the status of each token, in the order of ``TOKENS``; ``view`` and, per token,
    what the view of its 200 body must be."""
    expect = dict(zip(TOKENS, statuses, strict=True))
    assert set(bodies) <= set(TOKENS), bodies
    return Row(method, url, expect, body, view, bodies or None, message)


def keys(body: Any) -> list[str]:
    return sorted(body)


def kv_keys(body: Any) -> list[str]:
    return sorted(e["Key"] for e in body)


def service_ids(body: Any) -> list[str]:
    return sorted(e["ServiceID"] for e in body)


def health_ids(body: Any) -> list[str]:
    return sorted(e["Service"]["ID"] for e in body)


def check_ids(body: Any) -> list[str]:
    return sorted(c["CheckID"] for c in body)


def node_names(body: Any) -> list[str]:
    return sorted(n["Node"] for n in body)


def event_names(body: Any) -> list[str]:
    return sorted({e["Name"] for e in body})


def member_names(body: Any) -> list[str]:
    return sorted(n["Name"] for n in body)


def node_services(body: Any) -> list[str] | None:
    return None if body is None else sorted(body["Services"])


def node_service_list(body: Any) -> list[str] | None:
    return None if body["Node"] is None else sorted(s["ID"] for s in body["Services"])


def entry_names(body: Any) -> list[str]:
    return [e["Name"] for e in body]


def labels(body: Any) -> list[str]:
    return sorted(f"{i['SourceName']} => {i['DestinationName']}" for i in body)


def match_labels(body: Any) -> dict[str, list[str]]:
    return {k: labels(v) for k, v in body.items()}


def description(body: Any) -> str:
    return body["Description"]


def csr_body(service: str) -> Callable[[World], Any]:
    return lambda w: {"CSR": w.csr(service)}


def authorize_body(target: str) -> Callable[[World], Any]:
    def body(w: World) -> Any:
        uri = f"spiffe://{w.trust_domain}/ns/default/dc/dc1/svc/api"
        return {"Target": target, "ClientCertURI": uri}

    return body


LOCAL_CHECKS = [
    "db-ttl",
    "disk",
    "serfHealth",
    "service:web-1-sidecar-proxy:1",
    "service:web-1-sidecar-proxy:2",
    "web-ttl",
]
ALL_CHECKS = sorted([*LOCAL_CHECKS, "db-ext-check"])
ALL_SERVICES = ["consul", "db", "web", "web-sidecar-proxy"]  # consul: the server itself
LOCAL_IDS = ["db-1", "web-1", "web-1-sidecar-proxy"]
NODE_IDS = ["consul", *LOCAL_IDS]  # the server's node holds its consul service too
BOTH_NODES = ["ext-1", NODE]
BOTH_IXNS = ["api => db", "api => web"]
BOTH_QUERIES = ["db-q", "web-q"]


def query_names(body: Any) -> list[str]:
    return sorted(q["Name"] for q in body)


# fmt: off
ROWS: list[Row] = [
    # ---- K/V: key:read / key:write; recursive reads and key listings filtered, as Consul does
    # without acl.enable_key_list_policy (tests/test_acl_api.py has the policy on)
    #                                            none read web  app  op   mgmt bogus
    R("GET", "/v1/kv/app/cfg",                   F,   200, F,   200, F,   200, F),
    R("GET", "/v1/kv/secret/cfg",                F,   200, F,   F,   F,   200, F),
    R("GET", "/v1/kv/?recurse",                  404, 200, 404, 200, 404, 200, F, view=kv_keys,
      read=["app/cfg", "secret/cfg"], app=["app/cfg"], mgmt=["app/cfg", "secret/cfg"]),
    R("GET", "/v1/kv/app/?keys",                 404, 200, 404, 200, 404, 200, F, view=sorted,
      read=["app/cfg"], app=["app/cfg"], mgmt=["app/cfg"]),
    R("GET", "/v1/kv/?keys",                     404, 200, 404, 200, 404, 200, F, view=sorted,
      read=["app/cfg", "secret/cfg"], app=["app/cfg"], mgmt=["app/cfg", "secret/cfg"]),
    R("PUT", "/v1/kv/app/cfg",                   F,   F,   F,   200, F,   200, F, body=b"new"),
    R("PUT", "/v1/kv/secret/cfg",                F,   F,   F,   F,   F,   200, F, body=b"new"),
    R("PUT", "/v1/kv/",                          400, 400, 400, 400, 400, 400, 400, body=b"x"),
    R("DELETE", "/v1/kv/app/cfg",                F,   F,   F,   200, F,   200, F),
    R("DELETE", "/v1/kv/secret/cfg",             F,   F,   F,   F,   F,   200, F),
    R("DELETE", "/v1/kv/app/?recurse",           F,   F,   F,   200, F,   200, F),
    R("DELETE", "/v1/kv/?recurse",               F,   F,   F,   F,   F,   200, F),

    # ---- catalog writes: service:write on the service (and on what it overwrites), node:write
    #      on the node unless SkipNodeUpdate on a known node
    R("PUT", "/v1/catalog/register",             F,   F,   200, F,   F,   200, F, body={
        "Node": "ext-1", "Address": "10.0.0.5", "SkipNodeUpdate": True,
        "Service": {"ID": "web-ext", "Service": "web", "Port": 81}}),
    R("PUT", "/v1/catalog/register",             F,   F,   F,   F,   F,   200, F, body={
        "Node": "ext-1", "Address": "10.0.0.5", "SkipNodeUpdate": True,
        "Service": {"ID": "db-ext", "Service": "db", "Port": 5433}}),
    R("PUT", "/v1/catalog/register",             F,   F,   F,   F,   F,   200, F, body={
        "Node": "ext-1", "Address": "10.0.0.6"}),
    # web's write may not take over db's instance by its ID, nor db's check by its ID (fixed)
    R("PUT", "/v1/catalog/register",             F,   F,   F,   F,   F,   200, F, body={
        "Node": "ext-1", "Address": "10.0.0.5", "SkipNodeUpdate": True,
        "Service": {"ID": "db-ext", "Service": "web", "Port": 80}}),
    R("PUT", "/v1/catalog/register",             F,   F,   F,   F,   F,   200, F, body={
        "Node": "ext-1", "Address": "10.0.0.5", "SkipNodeUpdate": True,
        "Service": {"ID": "web-ext", "Service": "web", "Port": 80},
        "Check": {"CheckID": "db-ext-check", "Name": "x", "ServiceID": "web-ext",
                  "Status": "critical"}}),
    R("PUT", "/v1/catalog/deregister",           F,   F,   200, F,   F,   200, F, body={
        "Node": "ext-1", "ServiceID": "web-ext"}),
    R("PUT", "/v1/catalog/deregister",           F,   F,   F,   F,   F,   200, F, body={
        "Node": "ext-1", "ServiceID": "db-ext"}),
    R("PUT", "/v1/catalog/deregister",           F,   F,   F,   F,   F,   200, F, body={
        "Node": "ext-1", "CheckID": "db-ext-check"}),
    R("PUT", "/v1/catalog/deregister",           F,   F,   F,   F,   F,   200, F, body={
        "Node": "ext-1"}),

    # ---- transactions: each operation checked as its own endpoint would be; a denied one is
    #      Consul's 409 with "Permission denied" for it (nothing written: tests/test_api_txn.py),
    #      reads filtered
    R("PUT", "/v1/txn",                          409, 409, 409, 200, 409, 200, F, body=[
        {"KV": {"Verb": "set", "Key": "app/txn", "Value": "dA=="}}]),
    R("PUT", "/v1/txn",                          409, 409, 200, 409, 409, 200, F, body=[
        {"Service": {"Verb": "set", "Node": NODE,
                     "Service": {"ID": "web-txn", "Service": "web"}}}]),
    R("PUT", "/v1/txn",                          409, 409, 409, 409, 409, 200, F, body=[
        {"KV": {"Verb": "set", "Key": "app/txn", "Value": "dA=="}},
        {"Service": {"Verb": "set", "Node": NODE,
                     "Service": {"ID": "web-txn", "Service": "web"}}}]),
    R("PUT", "/v1/txn",                          200, 200, 200, 200, 200, 200, F, body=[
        {"KV": {"Verb": "get-tree", "Key": ""}}]),

    # ---- catalog reads: no ACL for datacenters; the rest filtered (service:read + node:read)
    R("GET", "/v1/catalog/datacenters",          200, 200, 200, 200, 200, 200, 200),
    R("GET", "/v1/catalog/services",             200, 200, 200, 200, 200, 200, F, view=keys,
      none=[], read=ALL_SERVICES, web=["web"], app=[], op=[], mgmt=ALL_SERVICES),
    R("GET", "/v1/catalog/nodes",                200, 200, 200, 200, 200, 200, F,
      view=node_names, none=[], read=BOTH_NODES, web=[], app=[], op=[], mgmt=BOTH_NODES),
    R("GET", "/v1/catalog/service/web",          200, 200, 200, 200, 200, 200, F,
      view=service_ids, none=[], read=["web-1", "web-ext"], web=[], app=[], op=[],
      mgmt=["web-1", "web-ext"]),
    R("GET", "/v1/catalog/service/db",           200, 200, 200, 200, 200, 200, F,
      view=service_ids, none=[], read=["db-1", "db-ext"], web=[], app=[], op=[],
      mgmt=["db-1", "db-ext"]),
    R("GET", "/v1/catalog/connect/web",          200, 200, 200, 200, 200, 200, F,
      view=service_ids, none=[], read=["web-1-sidecar-proxy"], web=[], app=[], op=[],
      mgmt=["web-1-sidecar-proxy"]),
    R("GET", f"/v1/catalog/node/{NODE}",         200, 200, 200, 200, 200, 200, F,
      view=node_services, none=None, read=NODE_IDS, web=None, app=None, op=None,
      mgmt=NODE_IDS),

    # node-services: as catalog/node (a null Node without node:read), services filtered
    R("GET", f"/v1/catalog/node-services/{NODE}", 200, 200, 200, 200, 200, 200, F,
      view=node_service_list, none=None, read=NODE_IDS, web=None, app=None, op=None,
      mgmt=NODE_IDS),
    # gateway-services: service:read on the gateway, as Consul (always empty: no gateways)
    R("GET", "/v1/catalog/gateway-services/web", F,   200, 200, F,   F,   200, F),

    # ---- health: filtered like the catalog
    R("GET", "/v1/health/ingress/web",           200, 200, 200, 200, 200, 200, F),
    R("GET", "/v1/health/service/web",           200, 200, 200, 200, 200, 200, F,
      view=health_ids, none=[], read=["web-1", "web-ext"], web=[], app=[], op=[],
      mgmt=["web-1", "web-ext"]),
    R("GET", "/v1/health/service/db",            200, 200, 200, 200, 200, 200, F,
      view=health_ids, none=[], read=["db-1", "db-ext"], web=[], app=[], op=[],
      mgmt=["db-1", "db-ext"]),
    R("GET", "/v1/health/connect/web",           200, 200, 200, 200, 200, 200, F,
      view=health_ids, none=[], read=["web-1-sidecar-proxy"], web=[], app=[], op=[],
      mgmt=["web-1-sidecar-proxy"]),
    R("GET", "/v1/health/checks/web",            200, 200, 200, 200, 200, 200, F,
      view=check_ids, none=[], read=["web-ttl"], web=[], app=[], op=[], mgmt=["web-ttl"]),
    R("GET", f"/v1/health/node/{NODE}",          200, 200, 200, 200, 200, 200, F,
      view=check_ids, none=[], read=LOCAL_CHECKS, web=[], app=[], op=[], mgmt=LOCAL_CHECKS),
    R("GET", "/v1/health/state/any",             200, 200, 200, 200, 200, 200, F,
      view=check_ids, none=[], read=ALL_CHECKS, web=[], app=[], op=[], mgmt=ALL_CHECKS),

    # ---- agent: registration needs service:write (also on a proxy's destination, a custom
    #      sidecar name, and whatever the registration overwrites by ID)
    R("PUT", "/v1/agent/service/register",       F,   F,   200, F,   F,   200, F, body=WEB_1),
    R("PUT", "/v1/agent/service/register",       F,   F,   F,   F,   F,   200, F, body=DB_1),
    R("PUT", "/v1/agent/service/register",       F,   F,   F,   F,   F,   200, F, body={
        "Name": "web", "ID": "web-proxy-x", "Kind": "connect-proxy", "Port": 21999,
        "Proxy": {"DestinationServiceName": "db"}}),  # CVE-2021-38698
    R("PUT", "/v1/agent/service/register",       F,   F,   F,   F,   F,   200, F, body={
        "Name": "web", "ID": "db-1", "Port": 1}),
    R("PUT", "/v1/agent/service/register",       F,   F,   F,   F,   F,   200, F, body={
        "Name": "web", "ID": "web-2", "Port": 8081,
        "Connect": {"SidecarService": {"Name": "db"}}}),
    R("PUT", "/v1/agent/service/register",       F,   F,   F,   F,   F,   200, F, body={
        "Name": "web", "ID": "web-1", "Port": 8080,
        "Check": {"CheckID": "db-ttl", "TTL": "10m"}}),
    R("PUT", "/v1/agent/service/deregister/web-1",       F,   F,   200, F,   F,   200, F),
    R("PUT", "/v1/agent/service/deregister/db-1",        F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/agent/services",               200, 200, 200, 200, 200, 200, F, view=keys,
      none=[], read=LOCAL_IDS, web=["web-1"], app=[], op=[], mgmt=LOCAL_IDS),
    # A service the token may not read is not there (404), as with the list.
    R("GET", "/v1/agent/service/web-1",          404, 200, 200, 404, 404, 200, F),
    R("GET", "/v1/agent/service/db-1",           404, 200, 404, 404, 404, 200, F),
    R("GET", "/v1/agent/checks",                 200, 200, 200, 200, 200, 200, F, view=keys,
      none=[], read=LOCAL_CHECKS, web=["web-ttl"], app=[], op=[], mgmt=LOCAL_CHECKS),
    R("PUT", "/v1/agent/check/register",         F,   F,   200, F,   F,   200, F, body={
        "CheckID": "web-extra", "Name": "web extra", "ServiceID": "web-1", "TTL": "10m"}),
    R("PUT", "/v1/agent/check/register",         F,   F,   F,   F,   F,   200, F, body={
        "CheckID": "db-extra", "Name": "db extra", "ServiceID": "db-1", "TTL": "10m"}),
    R("PUT", "/v1/agent/check/register",         F,   F,   F,   F,   F,   200, F, body={
        "CheckID": "node-extra", "Name": "node extra", "TTL": "10m"}),
    R("PUT", "/v1/agent/check/register",         F,   F,   F,   F,   F,   200, F, body={
        "CheckID": "db-ttl", "Name": "taken", "ServiceID": "web-1", "TTL": "10m"}),
    R("PUT", "/v1/agent/check/register",         F,   F,   F,   F,   F,   200, F, body={
        "CheckID": "disk", "Name": "taken", "ServiceID": "web-1", "TTL": "10m"}),
    R("PUT", "/v1/agent/check/deregister/web-ttl",       F,   F,   200, F,   F,   200, F),
    R("PUT", "/v1/agent/check/deregister/db-ttl",        F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/agent/check/deregister/disk",  F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/agent/check/pass/web-ttl",     F,   F,   200, F,   F,   200, F),
    R("PUT", "/v1/agent/check/pass/db-ttl",      F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/agent/check/warn/web-ttl",     F,   F,   200, F,   F,   200, F),
    R("PUT", "/v1/agent/check/warn/db-ttl",      F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/agent/check/fail/web-ttl",     F,   F,   200, F,   F,   200, F),
    R("PUT", "/v1/agent/check/fail/disk",        F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/agent/check/update/web-ttl",   F,   F,   200, F,   F,   200, F,
      body={"Status": "warning", "Output": "slow"}),
    R("PUT", "/v1/agent/check/update/db-ttl",    F,   F,   F,   F,   F,   200, F,
      body={"Status": "warning", "Output": "slow"}),
    R("GET", "/v1/agent/self",                   F,   200, F,   F,   F,   200, F),
    R("GET", "/v1/agent/members",                200, 200, 200, 200, 200, 200, F,
      view=member_names, none=[], read=BOTH_NODES, web=[], app=[], op=[], mgmt=BOTH_NODES),

    # ---- sessions: session:write on the session's node to create (the scoped tokens have no
    # session rule), reads filtered by session:read; the token is resolved even when the
    # session does not exist (a bogus token is refused, as everywhere)
    R("PUT", "/v1/session/create",               F,   F,   F,   F,   F,   200, F, body={}),
    R("GET", "/v1/session/list",                 200, 200, 200, 200, 200, 200, F),
    R("GET", f"/v1/session/node/{NODE}",         200, 200, 200, 200, 200, 200, F),
    R("GET", "/v1/session/info/no-such-session", 200, 200, 200, 200, 200, 200, F),
    R("PUT", "/v1/session/renew/no-such-session", 404, 404, 404, 404, 404, 404, F),
    R("PUT", "/v1/session/destroy/no-such-session", 200, 200, 200, 200, 200, 200, F),

    # ---- maintenance mode: node:write on this node, service:write on the service (the
    # unknown service is a 404 once the token is known, as with deregister)
    R("PUT", "/v1/agent/maintenance?enable=true&reason=m", F, F, F, F, F, 200, F),
    R("PUT", "/v1/agent/maintenance?enable=false", F,  F,   F,   F,   F,   200, F),
    R("PUT", "/v1/agent/service/maintenance/web-1?enable=true", F, F, 200, F, F, 200, F),
    R("PUT", "/v1/agent/service/maintenance/db-1?enable=true", F, F, F, F, F, 200, F),
    R("PUT", "/v1/agent/service/maintenance/web-1?enable=false", F, F, 200, F, F, 200, F),
    R("PUT", "/v1/agent/service/maintenance/nothing?enable=true", 404, 404, 404, 404, 404, 404,
      F),

    # ---- events: event:write on the name to fire; the list holds the events the token may
    # read (event:read), never a 403 but for an unknown token
    R("PUT", "/v1/event/fire/deploy",            F,   F,   F,   F,   F,   200, F, body=b"v2"),
    R("GET", "/v1/event/list",                   200, 200, 200, 200, 200, 200, F,
      view=event_names, none=[], read=["deploy"], web=[], app=[], op=[], mgmt=["deploy"]),
    R("GET", "/v1/event/list?name=deploy",       200, 200, 200, 200, 200, 200, F,
      view=event_names, none=[], read=["deploy"], web=[], app=[], op=[], mgmt=["deploy"]),
    # ---- prepared queries: query:write on the name to create, change (old and new names) or
    # delete, query:read to read (lists filtered); an unnamed query is governed as the name ""
    # (Consul exempts it). Executing needs no query rule: the results are filtered by the
    # caller's token (these queries carry none).
    R("POST", "/v1/query",                       F,   F,   200, F,   F,   200, F,
      body={"Name": "web-new", "Service": {"Service": "web"}}),
    R("POST", "/v1/query",                       F,   F,   F,   F,   F,   200, F,
      body={"Name": "db-new", "Service": {"Service": "db"}}),
    R("POST", "/v1/query",                       F,   F,   F,   F,   F,   200, F,
      body={"Service": {"Service": "web"}}),
    R("GET", "/v1/query",                        200, 200, 200, 200, 200, 200, F,
      view=query_names, none=[], read=BOTH_QUERIES, web=["web-q"], app=[], op=[],
      mgmt=BOTH_QUERIES),
    R("GET", "/v1/query/{query_web}",            F,   200, 200, F,   F,   200, F),
    R("GET", "/v1/query/{query_db}",             F,   200, F,   F,   F,   200, F),
    R("PUT", "/v1/query/{query_web}",            F,   F,   200, F,   F,   200, F,
      body={"Name": "web-q", "Service": {"Service": "web"}, "DNS": {"TTL": "5s"}}),
    # renaming web's query out of web- needs write on the new name too
    R("PUT", "/v1/query/{query_web}",            F,   F,   F,   F,   F,   200, F,
      body={"Name": "db-2", "Service": {"Service": "db"}}),
    R("PUT", "/v1/query/{query_db}",             F,   F,   F,   F,   F,   200, F,
      body={"Name": "db-q", "Service": {"Service": "db"}}),
    R("DELETE", "/v1/query/{query_web}",         F,   F,   200, F,   F,   200, F),
    R("DELETE", "/v1/query/{query_db}",          F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/query/web-q/execute",          200, 200, 200, 200, 200, 200, F),
    R("GET", "/v1/query/web-q/explain",          F,   200, 200, F,   F,   200, F),
    R("GET", "/v1/query/db-q/explain",           F,   200, F,   F,   F,   200, F),

    # ---- coordinates (Trellis has none) and the Raft configuration (operator:read)
    R("GET", "/v1/coordinate/datacenters",       200, 200, 200, 200, 200, 200, F),
    R("GET", "/v1/coordinate/nodes",             200, 200, 200, 200, 200, 200, F),
    R("GET", f"/v1/coordinate/node/{NODE}",      404, 404, 404, 404, 404, 404, F),
    R("PUT", "/v1/coordinate/update",            400, 400, 400, 400, 400, 400, F,
      body={"Node": NODE, "Coord": {"Vec": [0.0], "Error": 1.5, "Adjustment": 0, "Height": 0}}),
    R("GET", "/v1/operator/raft/configuration",  F,   F,   F,   F,   200, 200, F),

    # ---- usage and autopilot (operator:read; the autopilot write is a 400 once operator:write
    # is granted: Trellis has no autopilot to configure)
    R("GET", "/v1/operator/usage",               F,   F,   F,   F,   200, 200, F),
    R("GET", "/v1/operator/autopilot/configuration", F, F, F,   F,   200, 200, F),
    R("PUT", "/v1/operator/autopilot/configuration", F, F, F,   F,   400, 400, F,
      body={"CleanupDeadServers": True}),
    R("GET", "/v1/operator/autopilot/health",    F,   F,   F,   F,   200, 200, F),
    R("GET", "/v1/operator/autopilot/state",     F,   F,   F,   F,   200, 200, F),

    # ---- the agent itself: version needs nothing; host operator:read; metrics and monitor
    # Consul's agent:read, reload agent:write (node:read/node:write on this node); the
    # agent's tokens acl:write. The monitor row asks for a bad level, so that a token allowed
    # past the ACL check gets the 400 at once rather than an endless stream.
    R("GET", "/v1/agent/version",                200, 200, 200, 200, 200, 200, 200),
    R("GET", "/v1/agent/host",                   F,   F,   F,   F,   200, 200, F),
    R("GET", "/v1/agent/metrics",                F,   200, F,   F,   F,   200, F),
    R("GET", "/v1/agent/metrics?format=prometheus", F, 200, F,  F,   F,   200, F),
    R("GET", "/v1/agent/monitor?loglevel=nonsense", F, 400, F,  F,   F,   400, F),
    R("PUT", "/v1/agent/reload",                 F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/agent/token/default",          F,   F,   F,   F,   F,   200, F,
      body={"Token": "d2a1d1c6-0000-4000-8000-000000000001"}),
    R("PUT", "/v1/agent/token/no-such-kind",     F,   F,   F,   F,   F,   404, F,
      body={"Token": "x"}),

    # ---- Consul's internal authorization endpoint: any token may ask what it may do (the
    # bogus one is "ACL not found", as anywhere); each answer is the Authorizer's. The agent
    # resource is node on the segment. A body that is not a list is a 400 before the token is
    # looked at.
    R("POST", "/v1/internal/acl/authorize",      200, 200, 200, 200, 200, 200, F,
      body=[{"Resource": "operator", "Access": "write"},
            {"Resource": "agent", "Segment": NODE, "Access": "write"},
            {"Resource": "service", "Segment": "web", "Access": "write"},
            {"Resource": "key", "Segment": "app/x", "Access": "read"}],
      view=lambda b: [e["Allow"] for e in b],
      none=[False, False, False, False], read=[False, False, False, True],
      web=[False, False, True, False], app=[False, False, False, True],
      op=[True, False, False, False], mgmt=[True, True, True, True]),
    R("POST", "/v1/internal/acl/authorize",      400, 400, 400, 400, 400, 400, 400,
      body={"Resource": "operator", "Access": "write"}),

    # ---- status and the spec: no ACL
    R("GET", "/v1/status/leader",                200, 200, 200, 200, 200, 200, 200),
    R("GET", "/v1/status/peers",                 200, 200, 200, 200, 200, 200, 200),
    R("GET", "/v1/openapi.yaml",                 200, 200, 200, 200, 200, 200, 200),

    # ---- the Connect CA: roots need nothing; configuration and rotation operator:write;
    #      certificates service:write on the service
    R("GET", "/v1/connect/ca/roots",             200, 200, 200, 200, 200, 200, 200),
    R("GET", "/v1/agent/connect/ca/roots",       200, 200, 200, 200, 200, 200, 200),
    R("GET", "/v1/connect/ca/configuration",     F,   F,   F,   F,   200, 200, F),
    R("PUT", "/v1/connect/ca/configuration",     F,   F,   F,   F,   200, 200, F,
      body={"Provider": "consul", "Config": {"LeafCertTTL": "72h"}}),
    R("POST", "/v1/connect/ca/rotate",           F,   F,   F,   F,   200, 200, F),
    R("POST", "/v1/connect/ca/sign",             F,   F,   200, F,   F,   200, F,
      body=csr_body("web")),
    R("POST", "/v1/connect/ca/sign",             F,   F,   F,   F,   F,   200, F,
      body=csr_body("db")),
    R("GET", "/v1/agent/connect/ca/leaf/web",    F,   F,   200, F,   F,   200, F),
    R("GET", "/v1/agent/connect/ca/leaf/db",     F,   F,   F,   F,   F,   200, F),

    # ---- intentions: read/write per destination (write only with intentions = "write")
    R("GET", "/v1/connect/intentions",           200, 200, 200, 200, 200, 200, F,
      view=labels, none=[], read=BOTH_IXNS, web=["api => web"], app=[], op=[], mgmt=BOTH_IXNS),
    R("POST", "/v1/connect/intentions",          F,   F,   200, F,   F,   200, F, body={
        "SourceName": "x", "DestinationName": "web", "Action": "allow"}),
    R("POST", "/v1/connect/intentions",          F,   F,   F,   F,   F,   200, F, body={
        "SourceName": "x", "DestinationName": "db", "Action": "allow"}),
    R("GET", "/v1/connect/intentions/{ixn_web}",         F,   200, 200, F,   F,   200, F),
    R("GET", "/v1/connect/intentions/{ixn_db}",  F,   200, F,   F,   F,   200, F),
    R("PUT", "/v1/connect/intentions/{ixn_web}",         F,   F,   200, F,   F,   200, F, body={
        "SourceName": "api", "DestinationName": "web", "Action": "deny"}),
    R("PUT", "/v1/connect/intentions/{ixn_db}",  F,   F,   F,   F,   F,   200, F, body={
        "SourceName": "api", "DestinationName": "db", "Action": "deny"}),
    # moving web's intention onto db needs write on both destinations
    R("PUT", "/v1/connect/intentions/{ixn_web}",         F,   F,   F,   F,   F,   200, F, body={
        "SourceName": "api2", "DestinationName": "db", "Action": "allow"}),
    R("DELETE", "/v1/connect/intentions/{ixn_web}",      F,   F,   200, F,   F,   200, F),
    R("DELETE", "/v1/connect/intentions/{ixn_db}",       F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/connect/intentions/exact?source=api&destination=web",
                                                 F,   200, 200, F,   F,   200, F),
    R("GET", "/v1/connect/intentions/exact?source=api&destination=db",
                                                 F,   200, F,   F,   F,   200, F),
    R("PUT", "/v1/connect/intentions/exact?source=api&destination=web",
                                                 F,   F,   200, F,   F,   200, F,
      body={"Action": "deny"}),
    R("PUT", "/v1/connect/intentions/exact?source=api&destination=db",
                                                 F,   F,   F,   F,   F,   200, F,
      body={"Action": "deny"}),
    R("DELETE", "/v1/connect/intentions/exact?source=api&destination=web",
                                                 F,   F,   200, F,   F,   200, F),
    R("DELETE", "/v1/connect/intentions/exact?source=api&destination=db",
                                                 F,   F,   F,   F,   F,   200, F),
    # ---- config entries: service-intentions as the intentions (intentions:read/write on the
    #      destination), service-defaults service:read/write on its name, proxy-defaults
    #      readable by any token and written with operator:write
    R("GET", "/v1/config/service-intentions",     200, 200, 200, 200, 200, 200, F,
      view=entry_names, none=[], read=["db", "web"], web=["web"], app=[], op=[],
      mgmt=["db", "web"]),
    R("GET", "/v1/config/service-intentions/web", F,   200, 200, F,   F,   200, F),
    R("GET", "/v1/config/service-intentions/db",  F,   200, F,   F,   F,   200, F),
    R("PUT", "/v1/config",                        F,   F,   200, F,   F,   200, F, body={
        "Kind": "service-intentions", "Name": "web",
        "Sources": [{"Name": "api", "Action": "deny"}]}),
    R("PUT", "/v1/config",                        F,   F,   F,   F,   F,   200, F, body={
        "Kind": "service-intentions", "Name": "db",
        "Sources": [{"Name": "api", "Action": "deny"}]}),
    R("DELETE", "/v1/config/service-intentions/web", F, F,  200, F,   F,   200, F),
    R("DELETE", "/v1/config/service-intentions/db",  F, F,  F,   F,   F,   200, F),
    R("GET", "/v1/config/service-defaults",       200, 200, 200, 200, 200, 200, F),
    R("GET", "/v1/config/service-defaults/web",   F,   404, 404, F,   F,   404, F),
    R("PUT", "/v1/config",                        F,   F,   200, F,   F,   200, F, body={
        "Kind": "service-defaults", "Name": "web", "Protocol": "http"}),
    R("PUT", "/v1/config",                        F,   F,   F,   F,   F,   200, F, body={
        "Kind": "service-defaults", "Name": "db", "Protocol": "http"}),
    R("DELETE", "/v1/config/service-defaults/web", F,  F,   200, F,   F,   200, F),
    R("GET", "/v1/config/proxy-defaults/global",  404, 404, 404, 404, 404, 404, F),
    R("PUT", "/v1/config",                        F,   F,   F,   F,   200, 200, F, body={
        "Kind": "proxy-defaults", "Name": "global", "Config": {"x": 1}}),
    R("DELETE", "/v1/config/proxy-defaults/global", F, F,   F,   F,   200, 200, F),

    R("GET", "/v1/connect/intentions/match?by=destination&name=web",
                                                 F,   200, 200, F,   F,   200, F),
    R("GET", "/v1/connect/intentions/match?by=destination&name=db",
                                                 F,   200, F,   F,   F,   200, F),
    # by source: the intentions are filtered by their destinations (an unknown token: 403)
    R("GET", "/v1/connect/intentions/match?by=source&name=api",
                                                 200, 200, 200, 200, 200, 200, F,
      view=match_labels, none={"api": []}, read={"api": BOTH_IXNS},
      web={"api": ["api => web"]}, app={"api": []}, op={"api": []}, mgmt={"api": BOTH_IXNS}),
    R("GET", "/v1/connect/intentions/check?source=api&destination=web",
                                                 F,   200, 200, F,   F,   200, F),
    R("GET", "/v1/connect/intentions/check?source=api&destination=db",
                                                 F,   200, F,   F,   F,   200, F),
    R("POST", "/v1/agent/connect/authorize",     F,   F,   200, F,   F,   200, F,
      body=authorize_body("web"), view=lambda b: b,
      web={"Authorized": True, "Reason": "Matched intention: api => web (allow)"},
      mgmt={"Authorized": True, "Reason": "Matched intention: api => web (allow)"}),
    R("POST", "/v1/agent/connect/authorize",     F,   F,   F,   F,   F,   200, F,
      body=authorize_body("db")),

    # ---- ACLs: acl:read / acl:write (only management here); token/self for any valid token
    R("PUT", "/v1/acl/bootstrap",                F,   F,   F,   F,   F,   F,   F,
      message="ACL bootstrap no longer allowed"),
    R("PUT", "/v1/acl/policy",                   F,   F,   F,   F,   F,   200, F,
      body={"Name": "made", "Rules": 'operator = "read"'}),
    R("GET", "/v1/acl/policy/{victim_policy}",   F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/policy/name/victim",       F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/acl/policy/{victim_policy}",   F,   F,   F,   F,   F,   200, F,
      body={"Name": "victim", "Rules": 'acl = "write"'}),
    R("DELETE", "/v1/acl/policy/{victim_policy}",        F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/policies",                 F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/acl/token",                    F,   F,   F,   F,   F,   200, F,
      body={"Description": "made", "Policies": [{"Name": "read"}]}),
    R("GET", "/v1/acl/token/self",               200, 200, 200, 200, 200, 200, F,
      view=description, none="Anonymous Token", read="read token", web="web token",
      app="app token", op="op token", mgmt="Bootstrap Token (Global Management)"),
    R("GET", "/v1/acl/token/{victim_token}",     F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/acl/token/{victim_token}",     F,   F,   F,   F,   F,   200, F,
      body={"Description": "changed", "Policies": [{"Name": "read"}]}),
    R("DELETE", "/v1/acl/token/{victim_token}",  F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/tokens",                   F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/tokens?role={victim_role}&policy={victim_policy}",
                                                 F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/acl/token/{victim_token}/clone",
                                                 F,   F,   F,   F,   F,   200, F,
      body={"Description": "cloned"}),
    R("PUT", "/v1/acl/role",                     F,   F,   F,   F,   F,   200, F,
      body={"Name": "made", "ServiceIdentities": [{"ServiceName": "web"}]}),
    R("GET", "/v1/acl/role/{victim_role}",       F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/role/name/victim",         F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/acl/role/{victim_role}",       F,   F,   F,   F,   F,   200, F,
      body={"Name": "victim", "Description": "changed", "Policies": [{"Name": "op"}]}),
    R("DELETE", "/v1/acl/role/{victim_role}",    F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/roles",                    F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/templated-policies",       F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/templated-policy/name/builtin/service",
                                                 F,   F,   F,   F,   F,   200, F),
    R("POST", "/v1/acl/templated-policy/preview/builtin/service",
                                                 F,   F,   F,   F,   F,   200, F,
      body={"Name": "web"}),
    # auth methods and binding rules: acl:read / acl:write
    R("PUT", "/v1/acl/auth-method",              F,   F,   F,   F,   F,   200, F,
      body=lambda w: {"Name": "made-m", "Type": "jwt", "Config": w.jwt_config()}),
    R("GET", "/v1/acl/auth-method/victim-m",     F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/acl/auth-method/victim-m",     F,   F,   F,   F,   F,   200, F,
      body=lambda w: {"Name": "victim-m", "Type": "jwt", "Description": "changed",
                      "Config": w.jwt_config()}),
    R("DELETE", "/v1/acl/auth-method/victim-m",  F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/auth-methods",             F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/acl/binding-rule",             F,   F,   F,   F,   F,   200, F,
      body={"AuthMethod": "victim-m", "BindType": "node", "BindName": "n1"}),
    R("GET", "/v1/acl/binding-rule/{victim_rule}",       F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/acl/binding-rule/{victim_rule}",       F,   F,   F,   F,   F,   200, F,
      body={"AuthMethod": "victim-m", "BindType": "service", "BindName": "changed"}),
    R("DELETE", "/v1/acl/binding-rule/{victim_rule}",    F,   F,   F,   F,   F,   200, F),
    R("GET", "/v1/acl/binding-rules?authmethod=victim-m", F,  F,   F,   F,   F,   200, F),
    # login: the bearer JWT is the credential, whatever token the request carries; logout:
    # only a token made by login (none of the matrix's tokens is)
    R("POST", "/v1/acl/login",                   200, 200, 200, 200, 200, 200, 200,
      body=lambda w: {"AuthMethod": "victim-m", "BearerToken": w.jwt()}),
    R("PUT", "/v1/acl/login",                    200, 200, 200, 200, 200, 200, 200,
      body=lambda w: {"AuthMethod": "victim-m", "BearerToken": w.jwt()}),
    R("POST", "/v1/acl/logout",                  F,   F,   F,   F,   F,   F,   F),
    R("PUT", "/v1/acl/logout",                   F,   F,   F,   F,   F,   F,   F),

    # ---- snapshots: acl:write for both (an archive holds every token); mgmt restores the
    # world's own snapshot, so the world is the same afterwards
    R("GET", "/v1/snapshot",                     F,   F,   F,   F,   F,   200, F),
    R("PUT", "/v1/snapshot",                     F,   F,   F,   F,   F,   200, F,
      body=lambda w: w.mgmt("GET", "/v1/snapshot").data),
]
# fmt: on

#: Routes that are not API endpoints (Flask's static files).
NOT_ENDPOINTS = {("GET", "/static/<path:filename>")}


def _route(app, method: str, url: str) -> tuple[str, str]:
    path = url.split("?", 1)[0].format(
        ixn_web=uuid.UUID(int=1),
        ixn_db=uuid.UUID(int=2),
        victim_policy="p",
        victim_token="t",
        victim_role="r",
        victim_rule=uuid.UUID(int=3),
        query_web="q1",
        query_db="q2",
    )
    rule, _ = app.url_map.bind("localhost").match(path, method=method, return_rule=True)
    return method, rule.rule


def test_every_endpoint_has_a_row(world):
    app = world.app
    routes = {
        (m, rule.rule)
        for rule in app.url_map.iter_rules()
        for m in rule.methods or ()
        if m not in ("HEAD", "OPTIONS")
    } - NOT_ENDPOINTS
    covered = {_route(app, row.method, row.url) for row in ROWS}
    missing = sorted(routes - covered)
    assert not missing, f"endpoints with no row in the ACL matrix (add one): {missing}"
    assert covered <= routes


def test_the_matrix_is_big_enough():
    assert len(ROWS) * len(TOKENS) >= 700


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_acl_matrix(world, row):
    failures = []
    # "anon" sends the anonymous token's well-known secret explicitly: it must be exactly
    # the same as sending no token at all ("none").
    for token in (*TOKENS, "anon"):
        same_as = "none" if token == "anon" else token
        world.restore()
        url = row.url.format(**world.values())
        body = row.body(world) if callable(row.body) else row.body
        kw: dict[str, Any] = {}
        if isinstance(body, bytes):
            kw["data"] = body
        elif body is not None:
            kw["json"] = body
        if token == "none":
            headers = {}
        elif token == "anon":
            headers = {"X-Consul-Token": "anonymous"}
        else:
            headers = {"X-Consul-Token": world.secrets[token]}
        before = world.snapshot()
        r = world.client.open(url, method=row.method, headers=headers, **kw)
        want = row.expect[same_as]
        text = r.get_data().decode("utf-8", "replace")[:300]  # a snapshot is binary
        if r.status_code != want:
            failures.append(f"{token}: {r.status_code} (want {want}): {text}")
            continue
        if want == 403:
            err = r.get_json()["error"]
            if row.message is not None and row.message not in err:
                failures.append(f"{token}: 403 but not {row.message!r}: {err}")
            elif row.message is None and token == "bogus" and "ACL not found" not in err:
                failures.append(f"{token}: 403 but not 'ACL not found': {err}")
            after = world.snapshot()
            if after != before:
                diff = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
                failures.append(f"{token}: 403, yet the store changed (parts {diff})")
        if want == 200 and row.bodies is not None and same_as in row.bodies:
            assert row.view is not None
            got = row.view(r.get_json())
            if got != row.bodies[same_as]:
                failures.append(f"{token}: 200 with {got!r}, want {row.bodies[same_as]!r}")
    assert not failures, "\n".join(failures)
