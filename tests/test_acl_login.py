"""Auth methods, binding rules, ``acl/login`` and ``acl/logout`` (the ``jwt`` method), in-process
on SQLite and on PostgreSQL, every response checked against openapi.yaml.

Keys are made here (RSA, EC P-256, Ed25519) and tokens signed here; nothing is fetched.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from tests import api_fixtures
from tests.api_fixtures import assert_error
from tests.jwt_support import b64, pem, sign
from trellis.api.acl.cache import AuthorizerCache, dns_authorizer
from trellis.api.acl.jwtauth import JWTConfig, LoginError
from trellis.api.errors import ConfigError, PermissionDenied
from trellis.api.settings import build, load_file

make_client = api_fixtures.make_client

DENY = {"acl_enabled": True, "acl_default_policy": "deny"}
ISSUER = "https://issuer.example"


def claims(**extra) -> dict:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": ["trellis"],
        "sub": "web",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "service": "web",
        "env": "prod",
        "groups": ["a", "b"],
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def tok(secret: str) -> dict[str, str]:
    return {"X-Consul-Token": secret}


def setup(
    c, keys, *, ttl="", selector='value.env == "prod"', bind=("service", "${value.svc}"), **cfg
):
    """Bootstrap, then a jwt method ``m`` trusting ``keys`` and one binding rule."""
    boot = c.put("/v1/acl/bootstrap").get_json()["SecretID"]
    config = {
        "JWTValidationPubKeys": [pem(k) for k in keys],
        "BoundIssuer": ISSUER,
        "BoundAudiences": ["trellis"],
        "ClaimMappings": {"service": "svc", "env": "env"},
        "ListClaimMappings": {"groups": "groups"},
        "JWTSupportedAlgs": ["RS256", "ES256", "EdDSA"],
        **cfg,
    }
    body = {"Name": "m", "Type": "jwt", "Config": config}
    if ttl:
        body["MaxTokenTTL"] = ttl
    r = c.put("/v1/acl/auth-method", json=body, headers=tok(boot))
    assert r.status_code == 200, r.get_data(as_text=True)
    r = c.put(
        "/v1/acl/binding-rule",
        json={"AuthMethod": "m", "Selector": selector, "BindType": bind[0], "BindName": bind[1]},
        headers=tok(boot),
    )
    assert r.status_code == 200, r.get_data(as_text=True)
    return boot


def login(c, bearer: str, method: str = "m"):
    return c.post("/v1/acl/login", json={"AuthMethod": method, "BearerToken": bearer})


# -- login with RSA and EC keys ---------------------------------------------------------------


def test_login_with_rsa_and_ec_keys_binds_a_service_identity(make_client, rsa_key, ec_key):
    c = make_client(**DENY)
    boot = setup(c, [rsa_key, ec_key], ttl="10m")
    for key in (rsa_key, ec_key):
        r = login(c, sign(key, claims()))
        assert r.status_code == 200, r.get_data(as_text=True)
        t = r.get_json()
        assert t["AuthMethod"] == "m"
        assert t["ServiceIdentities"] == [{"ServiceName": "web"}]
        assert t["ExpirationTime"]
        secret = t["SecretID"]
        # The identity's rights: write web and its sidecar, read the rest; nothing else.
        reg = {"Name": "web", "ID": "web-1", "Port": 80}
        assert c.put("/v1/agent/service/register", json=reg, headers=tok(secret)).status_code == 200
        denied = c.put(
            "/v1/agent/service/register", json={"Name": "db", "Port": 5432}, headers=tok(secret)
        )
        assert_error(denied, 403)
        assert_error(c.get("/v1/kv/x", headers=tok(secret)), 403)
        # Read back without the secret: the accessor carries the login's fields.
        r = c.get(f"/v1/acl/token/{t['AccessorID']}", headers=tok(boot))
        assert r.get_json()["AuthMethod"] == "m" and "SecretID" not in r.get_json()


def test_ed25519_key_from_a_jwks_file(make_client, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(
        json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64(raw), "kid": "k1"}]})
    )
    c = make_client(**DENY)
    boot = c.put("/v1/acl/bootstrap").get_json()["SecretID"]
    body = {
        "Name": "files",
        "Type": "jwt",
        "Config": {
            "JWKSFile": str(jwks),
            "JWTSupportedAlgs": ["EdDSA"],
            "ClaimMappings": {"sub": "sub"},
        },
    }
    assert c.put("/v1/acl/auth-method", json=body, headers=tok(boot)).status_code == 200
    rule = {"AuthMethod": "files", "BindType": "node", "BindName": "${value.sub}"}
    assert c.put("/v1/acl/binding-rule", json=rule, headers=tok(boot)).status_code == 200
    r = login(c, sign(key, claims(sub="node-7"), kid="k1"), "files")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["NodeIdentities"] == [{"NodeName": "node-7", "Datacenter": "dc1"}]


def test_jwks_url_is_refused_and_bad_config_is_a_400(make_client, rsa_key):
    c = make_client(**DENY)
    boot = c.put("/v1/acl/bootstrap").get_json()["SecretID"]
    for config in (
        {"JWKSURL": "https://keys.example/jwks"},
        {"JWTValidationPubKeys": ["not a pem"]},
        {"JWTValidationPubKeys": [pem(rsa_key)], "JWTSupportedAlgs": ["HS256"]},
        {"JWTValidationPubKeys": [pem(rsa_key)], "ClaimMappings": {"a": "bad name"}},
        {"JWKSFile": "/nonexistent/jwks.json"},
        {},
    ):
        r = c.put(
            "/v1/acl/auth-method",
            json={"Name": "x", "Type": "jwt", "Config": config},
            headers=tok(boot),
        )
        assert_error(r, 400)
    r = c.put("/v1/acl/auth-method", json={"Name": "x", "Type": "kubernetes"}, headers=tok(boot))
    assert_error(r, 400)


@pytest.mark.parametrize(
    "why, change",
    [
        ("expired", {"exp": int(time.time()) - 3600}),
        ("not yet valid", {"nbf": int(time.time()) + 3600}),
        ("wrong issuer", {"iss": "https://other.example"}),
        ("wrong audience", {"aud": "other"}),
    ],
)
def test_bad_tokens_are_refused(make_client, rsa_key, why, change):
    c = make_client(**DENY)
    setup(c, [rsa_key])
    assert_error(login(c, sign(rsa_key, claims(**change))), 403)


def test_wrong_key_alg_none_and_garbage_are_refused(make_client, rsa_key, ec_key):
    c = make_client(**DENY)
    setup(c, [rsa_key])
    assert_error(login(c, sign(ec_key, claims())), 403)  # a key the method does not trust
    good = sign(rsa_key, claims())
    head, body, _sig = good.split(".")
    none_head = b64(json.dumps({"alg": "none"}).encode())
    assert_error(login(c, none_head + "." + body + "."), 403)
    tampered = b64(json.dumps(claims(svc="db", service="db")).encode())
    assert_error(login(c, head + "." + tampered + "." + _sig), 403)
    for garbage in ("x", "a.b.c", "...", "é.é.é"):
        assert_error(login(c, garbage), 403)
    assert_error(login(c, good, "no-such-method"), 403)
    assert_error(c.post("/v1/acl/login", json={"AuthMethod": "m"}), 400)
    assert_error(c.post("/v1/acl/login", json=["x"]), 400)


def test_selector_over_mapped_claims_decides(make_client, rsa_key):
    c = make_client(**DENY)
    setup(c, [rsa_key], selector='value.env == "prod" and "b" in list.groups')
    assert login(c, sign(rsa_key, claims())).status_code == 200
    assert_error(login(c, sign(rsa_key, claims(env="dev"))), 403)  # no rule matches
    assert_error(login(c, sign(rsa_key, claims(groups=["a"]))), 403)


def test_policy_bind_type_links_the_named_policy(make_client, rsa_key):
    c = make_client(**DENY)
    boot = setup(c, [rsa_key], bind=("policy", "kv-${value.env}"))
    r = c.put(
        "/v1/acl/policy",
        json={"Name": "kv-prod", "Rules": 'key_prefix "prod/" { policy = "write" }'},
        headers=tok(boot),
    )
    assert r.status_code == 200
    t = login(c, sign(rsa_key, claims())).get_json()
    assert [p["Name"] for p in t["Policies"]] == ["kv-prod"]
    assert c.put("/v1/kv/prod/a", data=b"1", headers=tok(t["SecretID"])).status_code == 200
    assert_error(c.put("/v1/kv/dev/a", data=b"1", headers=tok(t["SecretID"])), 403)


def test_binding_rule_validation(make_client, rsa_key):
    c = make_client(**DENY)
    boot = setup(c, [rsa_key])
    for rule in (
        {"AuthMethod": "m", "BindType": "service", "BindName": "${value.nope}"},
        {"AuthMethod": "m", "BindType": "service", "BindName": "${value.svc"},
        {"AuthMethod": "m", "BindType": "service", "BindName": "Not_A Service"},
        {"AuthMethod": "m", "BindType": "role", "BindName": "r"},
        {"AuthMethod": "m", "BindType": "bogus", "BindName": "x"},
        {"AuthMethod": "m", "BindType": "service", "BindName": "x", "Selector": "value.env =="},
        {"AuthMethod": "m", "BindType": "service", "BindName": "x", "Selector": 'value.nv == "p"'},
        {"AuthMethod": "m", "BindType": "service", "BindName": "x", "Selector": '"a" in list.grp'},
        {"AuthMethod": "gone", "BindType": "service", "BindName": "x"},
        {"AuthMethod": "m", "BindType": "service"},
    ):
        assert_error(c.put("/v1/acl/binding-rule", json=rule, headers=tok(boot)), 400)
    rules = c.get("/v1/acl/binding-rules?authmethod=m", headers=tok(boot)).get_json()
    assert len(rules) == 1
    rid = rules[0]["ID"]
    upd = {**rules[0], "BindName": "api"}
    r = c.put(f"/v1/acl/binding-rule/{rid}", json=upd, headers=tok(boot))
    assert r.status_code == 200 and r.get_json()["BindName"] == "api"
    assert c.get("/v1/acl/binding-rules?authmethod=other", headers=tok(boot)).get_json() == []
    assert_error(c.get("/v1/acl/binding-rule/not-a-uuid", headers=tok(boot)), 400)
    assert_error(c.get(f"/v1/acl/binding-rule/{uuid.uuid4()}", headers=tok(boot)), 404)
    assert c.delete(f"/v1/acl/binding-rule/{rid}", headers=tok(boot)).get_json() is True
    assert c.get("/v1/acl/binding-rules", headers=tok(boot)).get_json() == []


def test_auth_method_crud_and_delete_takes_its_tokens(make_client, rsa_key):
    c = make_client(**DENY)
    boot = setup(c, [rsa_key], ttl="1h")
    m = c.get("/v1/acl/auth-method/m", headers=tok(boot)).get_json()
    assert m["MaxTokenTTL"] == "1h0m0s" and m["Config"]["BoundIssuer"] == ISSUER
    listed = c.get("/v1/acl/auth-methods", headers=tok(boot)).get_json()
    assert [x["Name"] for x in listed] == ["m"] and "Config" not in listed[0]
    upd = {**m, "Description": "changed"}
    r = c.put("/v1/acl/auth-method/m", json=upd, headers=tok(boot))
    assert r.status_code == 200 and r.get_json()["Description"] == "changed"
    assert_error(c.put("/v1/acl/auth-method", json=upd, headers=tok(boot)), 409)
    secret = login(c, sign(rsa_key, claims())).get_json()["SecretID"]
    assert c.get("/v1/acl/token/self", headers=tok(secret)).status_code == 200
    assert c.delete("/v1/acl/auth-method/m", headers=tok(boot)).get_json() is True
    assert_error(c.get("/v1/acl/token/self", headers=tok(secret)), 403)
    assert_error(c.get("/v1/acl/auth-method/m", headers=tok(boot)), 404)
    assert c.get("/v1/acl/binding-rules", headers=tok(boot)).get_json() == []


def test_logout_deletes_the_login_token_and_only_it(make_client, rsa_key):
    c = make_client(**DENY)
    boot = setup(c, [rsa_key])
    secret = login(c, sign(rsa_key, claims())).get_json()["SecretID"]
    assert_error(c.post("/v1/acl/logout", headers=tok(boot)), 403)  # not a login token
    assert_error(c.post("/v1/acl/logout"), 403)  # the anonymous token
    assert c.post("/v1/acl/logout", headers=tok(secret)).get_json() is True
    assert_error(c.get("/v1/acl/token/self", headers=tok(secret)), 403)
    assert_error(c.post("/v1/acl/logout", headers=tok(secret)), 403)


def test_acls_off_login_is_a_401(make_client):
    c = make_client()
    assert_error(c.post("/v1/acl/login", json={"AuthMethod": "m", "BearerToken": "x"}), 401)
    assert_error(c.get("/v1/acl/auth-methods"), 401)


def test_an_expired_login_token_stops_at_once_even_when_cached(make_client, rsa_key):
    """The cache's clock is injected: the token works, then at its expiry it is "ACL not
    found" although the cache still holds it."""
    c = make_client(**DENY)
    setup(c, [rsa_key], ttl="5m")
    t = login(c, sign(rsa_key, claims())).get_json()
    svc = c.application.extensions["trellis"]
    now = [time.time()]
    cache = AuthorizerCache(
        svc.store, default_allow=False, fresh=svc.fresh.get, clock=lambda: now[0]
    )
    token, authz = cache.resolve(t["SecretID"])
    assert authz.service_write("web") and token.login.auth_method == "m"
    now[0] += 301
    with pytest.raises(PermissionDenied, match="ACL not found"):
        cache.resolve(t["SecretID"])


# -- the pure part ------------------------------------------------------------------------------


def test_leeways_and_claim_pointers(rsa_key):
    cfg = JWTConfig.parse(
        {
            "JWTValidationPubKeys": [pem(rsa_key)],
            "ExpirationLeeway": -1,
            "ClockSkewLeeway": -1,
            "ClaimMappings": {"/k8s/ns": "ns", "flag": "flag"},
        }
    )
    now = time.time()
    just_expired = sign(rsa_key, {"exp": int(now) - 2, "k8s": {"ns": "default"}})
    with pytest.raises(LoginError, match="expired"):
        cfg.verify(just_expired, list(cfg.pem_keys), now)
    ok = sign(rsa_key, {"exp": int(now) + 60, "k8s": {"ns": "default"}, "flag": True})
    got = cfg.map_claims(cfg.verify(ok, list(cfg.pem_keys), now))
    assert got == {"value": {"ns": "default", "flag": "true"}, "list": {}}
    # With the default leeway (150s plus 60s of skew) a token 2s past exp still logs in.
    lenient = JWTConfig.parse({"JWTValidationPubKeys": [pem(rsa_key)]})
    assert lenient.verify(just_expired, list(lenient.pem_keys), now)["exp"] == int(now) - 2


# -- acl.tokens.* in the config file -------------------------------------------------------------


def test_acl_tokens_in_json_and_hcl_config_files(tmp_path):
    secret = str(uuid.uuid4())
    j = tmp_path / "c.json"
    j.write_text(
        json.dumps(
            {
                "acl": {
                    "enabled": True,
                    "tokens": {"initial_management": secret, "dns": "d", "agent": "a"},
                }
            }
        )
    )
    h = tmp_path / "c.hcl"
    h.write_text(
        f'acl {{\n  enabled = true\n  tokens {{\n    master = "{secret}"\n'
        '    dns = "d"\n    agent = "a"\n  }\n}\n'
    )
    for f in (j, h):
        s = build({**load_file(str(f)), "data_dir": str(tmp_path)})
        assert (s.acl_initial_management_token, s.acl_dns_token, s.acl_agent_token) == (
            secret,
            "d",
            "a",
        )
        assert secret not in repr(s)  # secrets stay out of logs of the settings
    bad = tmp_path / "bad.json"
    for tokens, msg in (
        ({"default": "x"}, "acl.tokens.default"),
        ({"initial_management": "nope"}, "UUID"),
    ):
        bad.write_text(json.dumps({"acl": {"tokens": tokens}}))
        with pytest.raises(ConfigError, match=msg):
            build({**load_file(str(bad)), "data_dir": str(tmp_path)})


def test_initial_management_bootstraps_once_and_a_mismatch_is_logged(make_client, caplog):
    first, other = str(uuid.uuid4()), str(uuid.uuid4())
    c = make_client(**DENY, acl_initial_management_token=first)
    me = c.get("/v1/acl/token/self", headers=tok(first))
    assert me.status_code == 200
    assert [p["Name"] for p in me.get_json()["Policies"]] == ["global-management"]
    assert_error(c.put("/v1/acl/bootstrap"), 403)  # bootstrapped already
    # The same secret again (a restart, another worker): nothing to say.
    with caplog.at_level(logging.WARNING, logger="trellis.api.acl.service"):
        make_client(**DENY, acl_initial_management_token=first)
    assert "initial_management" not in caplog.text
    # Another secret on the bootstrapped store: logged, not installed.
    with caplog.at_level(logging.WARNING, logger="trellis.api.acl.service"):
        c2 = make_client(**DENY, acl_initial_management_token=other)
    assert "acl.tokens.initial_management" in caplog.text and other not in caplog.text
    assert_error(c2.get("/v1/acl/token/self", headers=tok(other)), 403)
    assert c2.get("/v1/acl/token/self", headers=tok(first)).status_code == 200


def test_dns_authorizer_uses_the_dns_token(make_client):
    c = make_client(**DENY)
    boot = c.put("/v1/acl/bootstrap").get_json()["SecretID"]
    pid = c.put(
        "/v1/acl/policy",
        json={"Name": "dns", "Rules": 'service_prefix "" { policy = "read" }'},
        headers=tok(boot),
    ).get_json()["ID"]
    secret = c.put("/v1/acl/token", json={"Policies": [{"ID": pid}]}, headers=tok(boot)).get_json()[
        "SecretID"
    ]
    svc = c.application.extensions["trellis"]
    assert dns_authorizer(True, svc.acls, secret)().service_read("web")
    assert not dns_authorizer(True, svc.acls)().service_read("web")  # the anonymous token
    # A configured token that names no token answers nothing (not the anonymous rules).
    assert not dns_authorizer(True, svc.acls, "no-such-secret")().service_read("web")


def test_expired_login_tokens_are_reaped(make_client, rsa_key):
    """The reaper (the maintenance loop's reaper process) deletes login tokens past their
    expiry, and only those."""
    c = make_client(**DENY)
    boot = setup(c, [rsa_key], ttl="5m")
    short = login(c, sign(rsa_key, claims())).get_json()
    store = c.application.extensions["trellis"].store
    assert store.acl_login_tokens_reap(time.time()) == 0
    assert store.acl_login_tokens_reap(time.time() + 301) == 1
    assert store.acl_token(accessor_id=short["AccessorID"]) is None
    assert c.get("/v1/acl/token/self", headers=tok(boot)).status_code == 200


def test_auth_methods_rules_and_login_tokens_are_in_a_snapshot(make_client, rsa_key):
    c = make_client(**DENY)
    boot = setup(c, [rsa_key], ttl="5m")
    t = login(c, sign(rsa_key, claims())).get_json()
    snap = c.get("/v1/snapshot", headers=tok(boot))
    assert snap.status_code == 200
    assert c.delete("/v1/acl/auth-method/m", headers=tok(boot)).status_code == 200
    assert_error(c.get("/v1/acl/token/self", headers=tok(t["SecretID"])), 403)
    assert c.put("/v1/snapshot", data=snap.data, headers=tok(boot)).status_code == 200
    me = c.get("/v1/acl/token/self", headers=tok(t["SecretID"])).get_json()
    assert me["AuthMethod"] == "m" and me["ExpirationTime"] == t["ExpirationTime"]
    assert len(c.get("/v1/acl/binding-rules", headers=tok(boot)).get_json()) == 1


@pytest.mark.parametrize("exp", ["NaN", "Infinity", "1e999", '"soon"', "true"])
def test_a_signed_token_with_a_non_finite_or_non_numeric_exp_is_refused(rsa_key, exp):
    """Python's JSON reader takes NaN and Infinity, and NaN compares false with every time:
    an ``exp`` of NaN would pass the expiry check unless refused."""
    cfg = JWTConfig.parse({"JWTValidationPubKeys": [pem(rsa_key)]})
    head = b64(json.dumps({"alg": "RS256"}).encode())
    body = b64(('{"sub": "x", "exp": ' + exp + "}").encode())
    signed = f"{head}.{body}".encode()
    sig = b64(rsa_key.sign(signed, padding.PKCS1v15(), hashes.SHA256()))
    with pytest.raises(LoginError):
        cfg.verify(f"{head}.{body}.{sig}", list(cfg.pem_keys), time.time())
