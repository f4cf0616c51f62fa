"""The compatibility suite: py-consul, python-consul and python-consul2, unchanged, against a
real ``trellis server`` with ACLs on (default deny, a management token) and a real
``trellis agent`` in front of it, as a client's local agent on its port 8500.

Every call of theirs that Trellis serves is driven, with the token in each place the client
puts it: the constructor's token (py-consul sends it as ``X-Consul-Token``, python-consul as
``?token=``, python-consul2 as either, by endpoint) and the per-call ``token=`` where the
client has one. Where the three share an API the tests are parametrised over them; the ACL
and Connect APIs differ by client and have tests of their own. An anonymous client is refused
(a 403, which each client raises as ``ACLPermissionDenied``), so every call that succeeds
proves the token got through. Calls Trellis does not serve are not driven (the README's
compatibility list says which); where a client sends no token on a call, the test shows the
refusal Consul would give too.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.consul_clients import CLIENTS
from tests.consul_clients import load as _load
from tests.support import TrellisProcess, server_args, wait_until

pytestmark = pytest.mark.integration

ALL = list(CLIENTS)


@dataclass
class Cluster:
    server: TrellisProcess
    agent: TrellisProcess
    root: str  # the management token's secret

    @property
    def port(self) -> int:
        port = urlsplit(self.agent.url).port
        assert port is not None
        return port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    # The clients read CONSUL_HTTP_TOKEN before their constructor's token: none must be set.
    assert "CONSUL_HTTP_TOKEN" not in os.environ
    base = tmp_path_factory.mktemp("compat-clients")
    cfg = base / "server.json"
    cfg.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "deny"}}))
    started: list[TrellisProcess] = []
    try:
        s = TrellisProcess([*server_args(base / "s", workers=1, node="srv"), "-config", str(cfg)])
        started.append(s)
        s.start()
        r = httpx.put(f"{s.url}/v1/acl/bootstrap")
        assert r.status_code == 200, r.text
        root = r.json()["SecretID"]
        (base / "conf").mkdir()
        a = TrellisProcess(
            [
                *("agent", "-node", "node-a", "-http-port", "0", "-server", s.url),
                *("-data-dir", str(base / "agent"), "-config-dir", str(base / "conf")),
                *("-token", root),
            ]
        )
        started.append(a)
        a.start()
        yield Cluster(s, a, root)
    finally:
        for p in reversed(started):
            p.stop()


@dataclass
class Clients:
    name: str
    mod: Any
    root: Any  # a client made with the management token
    anon: Any  # a client made with no token

    def close(self) -> None:
        for c in (self.root, self.anon):
            # An idle keep-alive connection would hold a worker's slot at the server's stop.
            c.http.session.close()


@pytest.fixture(params=ALL)
def clients(request, cluster) -> Iterator[Clients]:
    mod = load(request.param)
    made = Clients(
        request.param,
        mod,
        mod.Consul(host="127.0.0.1", port=cluster.port, token=cluster.root),
        mod.Consul(host="127.0.0.1", port=cluster.port),
    )
    yield made
    made.close()


class _Module:
    """A client's ``consul`` module whose ``Consul`` is made without the DeprecationWarnings
    python-consul2's constructor gives (the legacy ACL API, the discovery chain API: the
    client's own notices about Consul versions, which this suite's warnings-are-errors
    setting would turn into failures)."""

    def __init__(self, mod: ModuleType) -> None:
        self._mod = mod

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mod, name)

    def Consul(self, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._mod.Consul(*args, **kwargs)


def load(client: str) -> Any:
    return _Module(_load(client))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- K/V ----------------------------------------------------------------------------------------


def test_kv_with_the_constructors_token(clients):
    c, mod = clients.root, clients.mod
    p = unique("kv")
    with pytest.raises(mod.ACLPermissionDenied):
        clients.anon.kv.put(f"{p}/a", "x")
    assert c.kv.put(f"{p}/a", "1")
    assert c.kv.put(f"{p}/b/c", b"\x00\xff")
    assert c.kv.put(f"{p}/flagged", "v", flags=42)
    index, item = c.kv.get(f"{p}/a")
    assert (item["Key"], item["Value"]) == (f"{p}/a", b"1")
    assert int(index) >= item["ModifyIndex"]
    assert c.kv.get(f"{p}/b/c")[1]["Value"] == b"\x00\xff"
    assert c.kv.get(f"{p}/flagged")[1]["Flags"] == 42
    _, items = c.kv.get(f"{p}/", recurse=True)
    assert [i["Key"] for i in items] == [f"{p}/a", f"{p}/b/c", f"{p}/flagged"]
    _, keys = c.kv.get(f"{p}/", keys=True, separator="/")
    assert keys == [f"{p}/a", f"{p}/b/", f"{p}/flagged"]
    # cas: 0 creates only; the current ModifyIndex updates; a stale one does nothing.
    assert not c.kv.put(f"{p}/a", "2", cas=0)
    assert c.kv.put(f"{p}/a", "2", cas=item["ModifyIndex"])
    assert not c.kv.put(f"{p}/a", "3", cas=item["ModifyIndex"])
    assert c.kv.get(f"{p}/a")[1]["Value"] == b"2"
    # A blocking read that times out returns the same index.
    index, _ = c.kv.get(f"{p}/a")
    assert c.kv.get(f"{p}/a", index=index, wait="100ms")[0] == index
    assert c.kv.delete(f"{p}/a")
    assert c.kv.get(f"{p}/a")[1] is None
    assert c.kv.delete(f"{p}/", recurse=True)
    assert c.kv.get(f"{p}/", recurse=True)[1] is None


def test_kv_with_the_per_call_token(clients, cluster):
    c, mod, root = clients.anon, clients.mod, cluster.root
    k = unique("kv-call")
    with pytest.raises(mod.ACLPermissionDenied):
        c.kv.get(k)
    assert c.kv.put(k, "v", token=root)
    assert c.kv.get(k, token=root)[1]["Value"] == b"v"
    assert c.kv.get(k, recurse=True, token=root)[1][0]["Key"] == k
    assert c.kv.delete(k, token=root)
    assert c.kv.get(k, token=root)[1] is None


# -- sessions and locks ---------------------------------------------------------------------------


def test_sessions_and_locks(clients, cluster):
    c, mod = clients.root, clients.mod
    key = unique("lock")
    with pytest.raises(mod.ACLPermissionDenied):
        clients.anon.session.create(name="nobody", ttl=30)
    if clients.name == "python-consul":
        # python-consul's session calls send no token (neither its constructor's nor a
        # per-call one: they take none), so under default deny they are anonymous.
        with pytest.raises(mod.ACLPermissionDenied):
            c.session.create(name="leader")
        return
    sid = c.session.create(name="leader", behavior="delete", ttl=30, lock_delay=0, checks=[])
    other = c.session.create(name="follower", lock_delay=0, checks=[])
    _, info = c.session.info(sid)
    assert (info["ID"], info["Name"], info["Behavior"], info["TTL"]) == (
        sid,
        "leader",
        "delete",
        "30s",
    )
    _, listed = c.session.list()
    assert {sid, other} <= {s["ID"] for s in listed}
    _, on_node = c.session.node(info["Node"])
    assert sid in {s["ID"] for s in on_node}
    renewed = c.session.renew(sid)
    assert renewed["ID"] == sid

    assert c.kv.put(key, "me", acquire=sid)
    assert not c.kv.put(key, "them", acquire=other)  # held by sid
    _, held = c.kv.get(key)
    assert (held["Session"], held["LockIndex"], held["Value"]) == (sid, 1, b"me")
    assert not c.kv.put(key, "x", release=other)  # not the holder
    assert c.kv.put(key, "released", release=sid)
    assert "Session" not in c.kv.get(key)[1] or not c.kv.get(key)[1]["Session"]
    assert c.kv.put(key, "them", acquire=other)
    assert c.session.destroy(other)
    # "release" (the default): the key stays, unlocked.
    _, after = c.kv.get(key)
    assert after["Value"] == b"them" and not after.get("Session")
    # "delete": destroying the session deletes the key it holds.
    assert c.kv.put(key, "mine", acquire=sid)
    assert c.session.destroy(sid)
    wait_until(lambda: c.kv.get(key)[1] is None, timeout=10)
    assert c.session.info(sid)[1] is None


def test_sessions_with_the_per_call_token(cluster):
    """python-consul has no per-call token on sessions; the other two do."""
    for name in ("py-consul", "python-consul2"):
        mod = load(name)
        c = mod.Consul(host="127.0.0.1", port=cluster.port)
        try:
            sid = c.session.create(name="per-call", token=cluster.root)
            assert c.session.info(sid, token=cluster.root)[1]["ID"] == sid
            assert sid in {s["ID"] for s in c.session.list(token=cluster.root)[1]}
            assert c.session.renew(sid, token=cluster.root)["ID"] == sid
            assert c.session.destroy(sid, token=cluster.root)
        finally:
            c.http.session.close()


# -- transactions -------------------------------------------------------------------------------


def b64(v: bytes) -> str:
    return base64.b64encode(v).decode()


def test_txn(clients, cluster):
    p = unique("txn")
    ops = [
        {"KV": {"Verb": "set", "Key": f"{p}/a", "Value": b64(b"1")}},
        {"KV": {"Verb": "set", "Key": f"{p}/b", "Value": b64(b"2")}},
        {"KV": {"Verb": "get", "Key": f"{p}/a"}},
    ]
    # As in Consul, a transaction's ACL refusals are per operation: a 409 with the Errors.
    denied = r"409.*Permission denied"
    with pytest.raises(clients.mod.ConsulException, match=denied):
        clients.anon.txn.put(ops)
    if clients.name in ("py-consul", "python-consul"):
        # py-consul's and python-consul's txn.put send no token at all (neither the
        # constructor's nor a per-call one: they take none), so under default deny they are
        # anonymous and refused, as by Consul.
        with pytest.raises(clients.mod.ConsulException, match=denied):
            clients.root.txn.put(ops)
        return
    out = clients.root.txn.put(ops)
    assert out["Errors"] is None
    assert [r["KV"]["Key"] for r in out["Results"]] == [f"{p}/a", f"{p}/b", f"{p}/a"]
    if clients.name == "python-consul2":
        out = clients.anon.txn.put([{"KV": {"Verb": "get", "Key": f"{p}/b"}}], token=cluster.root)
        assert base64.b64decode(out["Results"][0]["KV"]["Value"]) == b"2"
    assert clients.root.kv.delete(f"{p}/", recurse=True)


# -- catalog and health -------------------------------------------------------------------------


def test_catalog_and_health(clients, cluster):
    """The catalog and health reads, of an instance registered through the agent
    (``test_catalog_register_and_deregister`` drives the clients' catalog writes)."""
    c = clients.root
    svc = unique("cat-svc")
    sid = f"{svc}/1"
    check = clients.mod.Check.ttl("30s")
    assert c.agent.service.register(
        svc, service_id=sid, port=8080, tags=["v1"], check=check, token=cluster.root
    )
    # A passing check, set directly: python-consul's ttl_pass sends no token (see below).
    r = httpx.put(
        f"{cluster.agent.url}/v1/agent/check/pass/service:{sid}",
        headers={"X-Consul-Token": cluster.root},
    )
    assert r.status_code == 200, r.text
    assert c.catalog.datacenters() == ["dc1"]
    wait_until(lambda: len(c.health.service(svc, passing=True)[1]) == 1)
    _, nodes = c.catalog.nodes()
    assert "node-a" in {n["Node"] for n in nodes}
    _, services = c.catalog.services()
    assert services[svc] == ["v1"]
    if clients.name != "python-consul":  # its catalog.node fails on a token: a client bug
        _, one = c.catalog.node("node-a")
        assert sid in one["Services"]
    _, instances = c.catalog.service(svc)
    assert [(i["ServiceID"], i["ServicePort"]) for i in instances] == [(sid, 8080)]
    _, tagged = c.catalog.service(svc, tag="v1")
    assert len(tagged) == 1
    _, healthy = c.health.service(svc, passing=True)
    assert [e["Service"]["ID"] for e in healthy] == [sid]
    _, checks = c.health.checks(svc)
    assert [ch["CheckID"] for ch in checks] == [f"service:{sid}"]
    _, passing = c.health.state("passing")
    assert f"service:{sid}" in {ch["CheckID"] for ch in passing}
    _, on_node = c.health.node("node-a")
    assert f"service:{sid}" in {ch["CheckID"] for ch in on_node}
    # An anonymous client sees nothing under default deny, and everything with the per-call
    # token.
    assert clients.anon.catalog.service(svc)[1] == []
    _, anon_view = clients.anon.catalog.service(svc, token=cluster.root)
    assert len(anon_view) == 1
    _, anon_health = clients.anon.health.service(svc, token=cluster.root)
    assert len(anon_health) == 1
    r = httpx.put(
        f"{cluster.agent.url}/v1/agent/service/deregister/{sid}",
        headers={"X-Consul-Token": cluster.root},
    )
    assert r.status_code == 200, r.text
    wait_until(lambda: c.catalog.service(svc)[1] == [])


# -- the agent ----------------------------------------------------------------------------------


def test_agent_services_and_checks(clients, cluster):
    c, mod = clients.root, clients.mod
    name = unique("agent-svc")
    sid = f"{name}/member-1"  # an ID with a slash, as Patroni's
    me = c.agent.self()
    assert me["Config"]["NodeName"] == "node-a"
    if clients.name == "python-consul2":
        # The others send no token on agent.members (and take no per-call one): anonymous,
        # they get the list filtered to nothing, as from Consul under default deny.
        assert "node-a" in {m["Name"] for m in c.agent.members()}
    with pytest.raises(mod.ACLPermissionDenied):
        clients.anon.agent.service.register(name, service_id=sid)
    # The per-call token, from the anonymous client (all three have it on register).
    # enable_tag_override: all three send it as "enabletagoverride" (the node agent folds
    # field names as the servers do).
    assert clients.anon.agent.service.register(
        name,
        service_id=sid,
        port=9000,
        tags=["t"],
        check=mod.Check.ttl("30s"),
        token=cluster.root,
        enable_tag_override=True,
    )
    assert c.agent.services()[sid]["Service"] == name
    assert c.agent.services()[sid]["EnableTagOverride"] is True
    wait_until(lambda: c.catalog.service(name)[1])
    assert c.catalog.service(name)[1][0]["ServiceEnableTagOverride"] is True
    cid = f"service:{sid}"
    assert c.agent.checks()[cid]["Status"] == "critical"
    if clients.name == "python-consul":
        # python-consul's ttl_pass/warn/fail send no token (and take none): anonymous, they
        # are refused, as Consul refuses a check update without service:write.
        with pytest.raises(mod.ACLPermissionDenied):
            c.agent.check.ttl_pass(cid)
    else:
        for verb, status in (
            ("ttl_warn", "warning"),
            ("ttl_fail", "critical"),
            ("ttl_pass", "passing"),
        ):
            assert getattr(c.agent.check, verb)(cid, notes=verb)
            assert c.agent.checks()[cid]["Status"] == status
    assert c.agent.check.register("own", check=mod.Check.ttl("30s"), check_id=f"{name}/own")
    assert f"{name}/own" in c.agent.checks()
    if clients.name == "python-consul":
        # python-consul's check.deregister sends no token (and takes none): refused.
        with pytest.raises(mod.ACLPermissionDenied):
            c.agent.check.deregister(f"{name}/own")
        r = httpx.put(
            f"{cluster.agent.url}/v1/agent/check/deregister/{name}/own",
            headers={"X-Consul-Token": cluster.root},
        )
        assert r.status_code == 200, r.text
    else:
        assert c.agent.check.deregister(f"{name}/own")
    assert f"{name}/own" not in c.agent.checks()
    wait_until(lambda: [e["Service"]["ID"] for e in c.health.service(name)[1]] == [sid])
    if clients.name == "python-consul":
        # python-consul's service.deregister sends no token (and takes none): refused.
        with pytest.raises(mod.ACLPermissionDenied):
            c.agent.service.deregister(sid)
        r = httpx.put(
            f"{cluster.agent.url}/v1/agent/service/deregister/{sid}",
            headers={"X-Consul-Token": cluster.root},
        )
        assert r.status_code == 200, r.text
    else:
        assert c.agent.service.deregister(sid)
    assert sid not in c.agent.services()
    wait_until(lambda: c.health.service(name)[1] == [])


def test_status(clients):
    leader = clients.root.status.leader()
    assert leader and leader.rpartition(":")[2].isdigit()
    assert clients.root.status.peers() == [leader]


# -- ACL (the clients' APIs differ) -------------------------------------------------------------


def test_acl_through_py_consul(cluster):
    mod = load("py-consul")
    c = mod.Consul(host="127.0.0.1", port=cluster.port, token=cluster.root)
    anon = mod.Consul(host="127.0.0.1", port=cluster.port)
    try:
        with pytest.raises(mod.ACLPermissionDenied):
            anon.acl.policy.list()
        # policy.create sends lowercase "name" and "rules", and the rules as JSON (it
        # json.dumps them: a dict, as HCL's JSON form); the per-call token from anon.
        with pytest.raises(mod.ACLPermissionDenied):
            anon.acl.policy.create(unique("nobody"))
        rules = {"key_prefix": {"": {"policy": "read"}}}
        policy = anon.acl.policy.create(unique("kv-read"), token=cluster.root, rules=rules)
        assert json.loads(policy["Rules"]) == rules
        assert c.acl.policy.read(policy["ID"])["Name"] == policy["Name"]
        assert policy["ID"] in {p["ID"] for p in c.acl.policy.list()}
        token = c.acl.token.create(policies_id=[policy["ID"]], description="reader")
        assert c.acl.token.read(token["AccessorID"])["Description"] == "reader"
        assert token["AccessorID"] in {t["AccessorID"] for t in c.acl.token.list()}
        assert (
            anon.acl.token.read_self(token=token["SecretID"])["AccessorID"] == token["AccessorID"]
        )
        # The new token works where its policy allows, from a client made with it.
        reader = mod.Consul(host="127.0.0.1", port=cluster.port, token=token["SecretID"])
        try:
            assert reader.kv.get(unique("nothing"))[1] is None  # read allowed: a 404
            with pytest.raises(mod.ACLPermissionDenied):
                reader.kv.put(unique("denied"), "x")
        finally:
            reader.http.session.close()
        # An update replaces the policy (py-consul sends no Rules here: it then has none).
        updated = c.acl.policy.update(policy["ID"], policy["Name"], description="reads K/V")
        assert (updated["Description"], updated["Rules"]) == ("reads K/V", "")
        assert c.acl.token.delete(token["AccessorID"])
        assert c.acl.policy.delete(policy["ID"])
    finally:
        c.http.session.close()
        anon.http.session.close()


def test_acl_through_python_consul2(cluster):
    mod = load("python-consul2")
    c = mod.Consul(host="127.0.0.1", port=cluster.port, token=cluster.root)
    anon = mod.Consul(host="127.0.0.1", port=cluster.port)
    try:
        with pytest.raises(mod.ACLPermissionDenied):
            anon.acl.policy.list()
        name = unique("kv-read")
        policy = c.acl.policy.create(name, rules='key_prefix "" { policy = "read" }')
        assert c.acl.policy.get(policy["ID"])["Name"] == name
        assert policy["ID"] in {p["ID"] for p in c.acl.policy.list()}
        assert c.acl.policy.update(policy["ID"], name, description="reads")["Description"] == (
            "reads"
        )
        token = c.acl.tokens.create({"Policies": [{"ID": policy["ID"]}], "Description": "r"})
        assert c.acl.tokens.get(token["AccessorID"])["Description"] == "r"
        assert token["AccessorID"] in {t["AccessorID"] for t in c.acl.tokens.list()}
        assert anon.acl.tokens.self(token=token["SecretID"])["AccessorID"] == token["AccessorID"]
        assert anon.acl.self(token=cluster.root)["Policies"][0]["Name"] == "global-management"
        assert c.acl.tokens.delete(token["AccessorID"])
        assert c.acl.policy.delete(policy["ID"])
    finally:
        c.http.session.close()
        anon.http.session.close()


# -- Connect: CA and intentions -----------------------------------------------------------------


def test_connect_through_py_consul(cluster):
    mod = load("py-consul")
    c = mod.Consul(host="127.0.0.1", port=cluster.port, token=cluster.root)
    try:
        roots = c.connect.ca.roots()
        assert roots["ActiveRootID"] in {r["ID"] for r in roots["Roots"]}
        assert c.connect.ca.configuration()["Provider"]
        src, dst = unique("web"), unique("db")
        assert c.connect.intentions.upsert(src, dst, action="deny")
        assert c.connect.intentions.read(src, dst)["Action"] == "deny"
        assert (src, dst) in {
            (i["SourceName"], i["DestinationName"]) for i in c.connect.intentions.list()
        }
        assert c.connect.intentions.check(src, dst) is False  # py-consul returns Allowed
        matched = c.connect.intentions.match("destination", dst)
        assert [i["SourceName"] for i in matched[dst]] == [src]
        assert c.connect.intentions.delete(src, dst)
    finally:
        c.http.session.close()


def test_connect_through_python_consul2(cluster):
    mod = load("python-consul2")
    c = mod.Consul(host="127.0.0.1", port=cluster.port, token=cluster.root)
    try:
        roots = c.connect.certificates.list()
        assert roots["ActiveRootID"] in {r["ID"] for r in roots["Roots"]}
        assert c.connect.certificates.current()["Provider"]
        assert c.agent.connect.root_certificates()["ActiveRootID"] == roots["ActiveRootID"]
        src, dst = unique("web"), unique("db")
        iid = c.connect.intentions.create(src, dst, "consul", "allow", description="first")["ID"]
        assert c.connect.intentions.get(iid)["Action"] == "allow"
        assert iid in {i["ID"] for i in c.connect.intentions.list()}
        assert c.connect.intentions.check(src, dst) == {"Allowed": True}
        assert [i["ID"] for i in c.connect.intentions.list_match("destination", dst)[dst]] == [iid]
        assert c.connect.intentions.delete(iid)
    finally:
        c.http.session.close()


# -- events -------------------------------------------------------------------------------------


def test_events(clients, cluster):
    c, mod, root = clients.root, clients.mod, cluster.root
    name = unique("deploy")
    with pytest.raises(mod.ACLPermissionDenied):
        clients.anon.event.fire(name, "nobody")
    fired = c.event.fire(name, "v1.4.2", node="^node-")
    assert (fired["Name"], fired["NodeFilter"]) == (name, "^node-")
    assert base64.b64decode(fired["Payload"]) == b"v1.4.2"
    # Not for this node: a node agent lists the events its node processes, as Consul's.
    other = c.event.fire(name, "v1.4.2", service="^web$", tag="v2")
    assert (other["ServiceFilter"], other["TagFilter"]) == ("^web$", "v2")
    # The per-call token, from the anonymous client (all three have it on fire).
    second = clients.anon.event.fire(name, "v1.4.3", token=root)
    if clients.name in ("py-consul", "python-consul"):
        # Their event.list sends no token (neither the constructor's nor a per-call one: it
        # takes none): anonymous, the list is filtered to nothing, as by Consul (event:read).
        assert c.event.list(name=name) == ("1", [])
        r = httpx.get(
            f"{cluster.agent.url}/v1/event/list",
            params={"name": name},
            headers={"X-Consul-Token": root},
        )
        assert r.status_code == 200, r.text
        listed = r.json()
        index = None
    else:
        index, listed = c.event.list(name=name)
    assert [e["ID"] for e in listed] == [fired["ID"], second["ID"]]
    if index is not None:
        # Blocking: nothing new, the same index back after the wait.
        assert c.event.list(name=name, index=index, wait="100ms")[0] == index
    elif clients.name == "python-consul":
        # python-consul's event.list with a wait fails before it sends anything (it sets
        # params['wait'] on a list): a client bug. Without a wait it blocks up to 5 minutes.
        with pytest.raises(TypeError):
            c.event.list(name=name, index="1", wait="100ms")


# -- maintenance mode ---------------------------------------------------------------------------


def _maintenance_checks(cluster: Cluster) -> dict[str, str]:
    r = httpx.get(f"{cluster.agent.url}/v1/agent/checks", headers={"X-Consul-Token": cluster.root})
    assert r.status_code == 200, r.text
    return {k: v["Notes"] for k, v in r.json().items() if v["Type"] == "maintenance"}


def test_maintenance(clients, cluster):
    c, mod, root = clients.root, clients.mod, cluster.root
    svc = unique("maint")
    assert c.agent.service.register(svc, service_id=f"{svc}/1", token=root)
    sid = f"{svc}/1"
    try:
        with pytest.raises(mod.ACLPermissionDenied):
            clients.anon.agent.maintenance(True, "nobody")
        if clients.name == "python-consul":
            # python-consul's maintenance calls send no token (and take none): anonymous,
            # they are refused, as Consul refuses them without node:write / service:write.
            with pytest.raises(mod.ACLPermissionDenied):
                c.agent.maintenance(True, "kernel upgrade")
            with pytest.raises(mod.ACLPermissionDenied):
                c.agent.service.maintenance(sid, True, "redeploy")
            assert _maintenance_checks(cluster) == {}
            return
        assert c.agent.maintenance(True, "kernel upgrade")
        assert c.agent.service.maintenance(sid, True, "redeploy")
        assert _maintenance_checks(cluster) == {
            "_node_maintenance": "kernel upgrade",
            f"_service_maintenance:{sid}": "redeploy",
        }
        # Critical: the instance is out of passing health queries, still in the catalog.
        wait_until(lambda: c.health.service(svc, passing=True)[1] == [])
        assert len(c.catalog.service(svc)[1]) == 1
        assert c.agent.service.maintenance(sid, False)
        assert c.agent.maintenance(False)
        assert _maintenance_checks(cluster) == {}
        wait_until(lambda: len(c.health.service(svc, passing=True)[1]) == 1)
        # The per-call token, from the anonymous client.
        assert clients.anon.agent.maintenance(True, "again", token=root)
        assert clients.anon.agent.service.maintenance(sid, True, token=root)
        assert set(_maintenance_checks(cluster)) == {
            "_node_maintenance",
            f"_service_maintenance:{sid}",
        }
        assert clients.anon.agent.service.maintenance(sid, False, token=root)
        assert clients.anon.agent.maintenance(False, token=root)
        assert _maintenance_checks(cluster) == {}
    finally:
        # Node maintenance would take every instance of node-a out of the other tests' health
        # reads: off whatever happened.
        for path in ("agent/maintenance", f"agent/service/maintenance/{sid}"):
            httpx.put(
                f"{cluster.agent.url}/v1/{path}",
                params={"enable": "false"},
                headers={"X-Consul-Token": root},
            )
        httpx.put(
            f"{cluster.agent.url}/v1/agent/service/deregister/{sid}",
            headers={"X-Consul-Token": root},
        )


# -- prepared queries ---------------------------------------------------------------------------


#: Names of queries the anonymous token may write (see ``anonymous_queries``).
ANON_QUERIES = "anonq-"


@pytest.fixture(scope="module")
def anonymous_queries(cluster) -> str:
    """The anonymous token may write queries named ``anonq-...``: py-consul's and
    python-consul's query.create and query.update send the client's token only in the body,
    as the query's own ``Token`` (what it runs with), never as the request's, so they are
    anonymous requests, which Consul and Trellis authorize as such. With this rule they work
    as they would against a Consul whose anonymous token allows them."""
    headers = {"X-Consul-Token": cluster.root}
    r = httpx.put(
        f"{cluster.server.url}/v1/acl/policy",
        json={
            "Name": "anon-queries",
            "Rules": f'query_prefix "{ANON_QUERIES}" {{ policy = "write" }}',
        },
        headers=headers,
    )
    assert r.status_code == 200, r.text
    anon = "00000000-0000-0000-0000-000000000002"
    r = httpx.put(
        f"{cluster.server.url}/v1/acl/token/{anon}",
        json={"Policies": [{"Name": "anon-queries"}]},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return ANON_QUERIES


def test_prepared_queries(clients, cluster, anonymous_queries):
    c, mod, root = clients.root, clients.mod, cluster.root
    svc = unique("qsvc")
    assert c.agent.service.register(svc, service_id=f"{svc}-1", tags=["primary"], token=root)
    sends_token = clients.name == "python-consul2"
    try:
        if sends_token:
            name = unique("q")
            with pytest.raises(mod.ACLPermissionDenied):
                clients.anon.query.create(svc, name=name)
        else:
            # The token only in the body (see anonymous_queries): refused outside the names
            # the anonymous token may write, as by Consul.
            with pytest.raises(mod.ACLPermissionDenied):
                c.query.create(svc, name=unique("q"))
            name = unique(anonymous_queries + "q")
        created = c.query.create(svc, name=name, onlypassing=True, tags=["primary"], ttl="10s")
        qid = created["ID"]
        [got] = c.query.get(qid)
        assert (got["Name"], got["Service"]["Service"]) == (name, svc)
        assert (got["Service"]["OnlyPassing"], got["Service"]["Tags"]) == (True, ["primary"])
        assert got["DNS"]["TTL"] == "10s"
        assert got["Token"] == "<hidden>"  # the client sent its token as the query's
        assert qid in {q["ID"] for q in c.query.list()}
        executed = c.query.execute(name)
        assert (executed["Service"], executed["Failovers"]) == (svc, 0)
        assert [n["Service"]["ID"] for n in executed["Nodes"]] == [f"{svc}-1"]
        assert c.query.explain(name)["Query"]["ID"] == qid
        assert c.query.update(qid, svc, name=name, tags=["replica"])
        assert c.query.get(qid)[0]["Service"]["Tags"] == ["replica"]
        assert c.query.execute(qid)["Nodes"] == []
        # The per-call token, from the anonymous client (which may read anonq- queries).
        if sends_token:
            with pytest.raises(mod.ACLPermissionDenied):
                clients.anon.query.get(qid)
        assert clients.anon.query.get(qid, token=root)[0]["ID"] == qid
        assert qid in {q["ID"] for q in clients.anon.query.list(token=root)}
        assert clients.anon.query.explain(name, token=root)["Query"]["ID"] == qid
        assert clients.anon.query.execute(qid, token=root)["Service"] == svc
        assert clients.anon.query.delete(qid, token=root)
        assert qid not in {q["ID"] for q in c.query.list()}
    finally:
        httpx.put(
            f"{cluster.agent.url}/v1/agent/service/deregister/{svc}-1",
            headers={"X-Consul-Token": root},
        )


# -- coordinates --------------------------------------------------------------------------------


def test_coordinates(clients):
    c = clients.root
    # Trellis has no gossip, so no coordinates (README, "Coordinates and the Raft
    # configuration"): this datacenter with none, and no node coordinates.
    assert c.coordinate.datacenters() == [{"Datacenter": "dc1", "AreaID": "wan", "Coordinates": []}]
    index, nodes = c.coordinate.nodes()
    assert nodes == []
    assert c.coordinate.nodes(index=index, wait="100ms") == (index, [])


# -- catalog register and deregister ------------------------------------------------------------


def test_catalog_register_and_deregister(clients, cluster):
    """The clients send lowercase field names (``serviceid``, ``checkid``) and, python-consul,
    a ``WriteRequest`` body field: read as Consul reads them."""
    c, mod, root = clients.root, clients.mod, cluster.root
    node, svc = unique("ext"), unique("ext-svc")
    service = {"service": svc, "id": f"{svc}/1", "port": 80, "tags": ["v1"]}
    check = {"checkid": "alive", "name": "alive", "serviceid": f"{svc}/1", "status": "passing"}
    with pytest.raises(mod.ACLPermissionDenied):
        clients.anon.catalog.register(node, "10.0.0.9", service=service)
    assert c.catalog.register(node, "10.0.0.9", service=service, check=check)
    second = {**service, "id": f"{svc}/2", "port": 81}
    assert clients.anon.catalog.register(node, "10.0.0.9", service=second, token=root)
    _, instances = c.catalog.service(svc)
    assert sorted((i["ServiceID"], i["ServicePort"]) for i in instances) == [
        (f"{svc}/1", 80),
        (f"{svc}/2", 81),
    ]
    _, healthy = c.health.service(svc, passing=True)
    assert sorted(e["Service"]["ID"] for e in healthy) == [f"{svc}/1", f"{svc}/2"]
    assert [ch["CheckID"] for ch in c.health.checks(svc)[1]] == ["alive"]
    if clients.name == "python-consul":
        # python-consul's catalog.deregister sends its token only in the body's
        # WriteRequest.Token, which Consul ignores (it would run the request as anonymous and
        # refuse it); Trellis answers 400 and says to send it in X-Consul-Token.
        with pytest.raises(mod.ConsulException, match="X-Consul-Token"):
            c.catalog.deregister(node, service_id=f"{svc}/1")
        r = httpx.put(
            f"{cluster.agent.url}/v1/catalog/deregister",
            json={"Node": node},
            headers={"X-Consul-Token": root},
        )
        assert r.status_code == 200, r.text
    else:
        with pytest.raises(mod.ACLPermissionDenied):
            clients.anon.catalog.deregister(node, service_id=f"{svc}/1")
        assert c.catalog.deregister(node, service_id=f"{svc}/1")
        assert [i["ServiceID"] for i in c.catalog.service(svc)[1]] == [f"{svc}/2"]
        assert clients.anon.catalog.deregister(node, service_id=f"{svc}/2", token=root)
        assert c.catalog.deregister(node)
    assert c.catalog.service(svc)[1] == []
    assert node not in {n["Node"] for n in c.catalog.nodes()[1]}


# -- the other calls Trellis serves -------------------------------------------------------------


def test_operator_raft_config(clients):
    if clients.name in ("py-consul", "python-consul"):
        # Their operator.raft_config sends no token (and takes none): anonymous, refused for
        # want of operator:read, as by Consul.
        with pytest.raises(clients.mod.ACLPermissionDenied):
            clients.root.operator.raft_config()
        return
    with pytest.raises(clients.mod.ACLPermissionDenied):
        clients.anon.operator.raft_config()
    [server] = clients.root.operator.raft_config()["Servers"]
    assert (server["Node"], server["Leader"], server["Voter"]) == ("srv", True, True)


def test_more_calls_through_py_consul(cluster):
    """py-consul's Connect catalog and health reads, its agent's service definition and
    filters, its connect CA and leaf calls, token update, snapshot save."""
    mod = load("py-consul")
    c = mod.Consul(host="127.0.0.1", port=cluster.port, token=cluster.root)
    try:
        svc = unique("native")
        sid = f"{svc}/1"
        assert c.agent.service.register(
            svc, service_id=sid, port=7000, connect={"native": True}, check=mod.Check.ttl("30s")
        )
        assert c.agent.service_definition(sid)["Service"] == svc
        assert set(c.agent.services(filter_expr=f'Service == "{svc}"')) == {sid}
        assert set(c.agent.checks(filter_expr=f'ServiceID == "{sid}"')) == {f"service:{sid}"}
        wait_until(lambda: c.catalog.connect(svc)[1])
        assert [i["ServiceID"] for i in c.catalog.connect(svc)[1]] == [sid]
        assert [e["Service"]["ID"] for e in c.health.connect(svc)[1]] == [sid]
        roots = c.agent.connect.ca.roots()
        leaf = c.agent.connect.ca.leaf(svc)
        assert leaf["Service"] == svc and leaf["CertPEM"].startswith("-----BEGIN CERTIFICATE")
        assert roots["ActiveRootID"] in {r["ID"] for r in roots["Roots"]}
        # authorize: py-consul sends PUT where Consul (and Trellis) take POST, a 405 from
        # both: a client bug.
        with pytest.raises(mod.ConsulException, match="405"):
            c.agent.connect.authorize(svc, f"spiffe://x/ns/default/dc/dc1/svc/{svc}", "1")
        assert c.coordinate.node("node-a") == ("1", None)  # no coordinates: a 404
        token = c.acl.token.create(description="before")
        assert c.acl.token.update(token["AccessorID"], description="after")["Description"] == (
            "after"
        )
        assert c.acl.token.delete(token["AccessorID"])
        snap = c.snapshot.save()
        assert isinstance(snap, bytes) and len(snap) > 0
        assert c.agent.service.deregister(sid)
    finally:
        c.http.session.close()


def test_more_calls_through_python_consul2(cluster):
    """python-consul2's token update, agent connect authorize and snapshot read."""
    mod = load("python-consul2")
    c = mod.Consul(host="127.0.0.1", port=cluster.port, token=cluster.root)
    try:
        token = c.acl.tokens.create({"Description": "before"})
        updated = c.acl.tokens.update({"Description": "after"}, token["AccessorID"])
        assert updated["Description"] == "after"
        assert c.acl.tokens.delete(token["AccessorID"])
        svc = unique("authz")
        # A peer of another trust domain: refused, with Consul's reason.
        answer = c.agent.connect.authorize(svc, "spiffe://x.trellis/ns/default/dc/dc1/svc/w", "1")
        assert answer["Authorized"] is False and "trust domain" in answer["Reason"]
        assert len(c.snapshot.get()) > 0
    finally:
        c.http.session.close()
