"""What the README's ACL section warns about: a token with ``acl = "write"`` can mint a
global-management token, as in Consul (issue 9, item 12). The warning must stay true: if
Trellis ever restricts it, this test fails and the README must change with it."""

from __future__ import annotations

from tests.api_fixtures import make_client  # noqa: F401 - fixture


def test_an_acl_write_token_can_mint_a_global_management_token(make_client) -> None:  # noqa: F811
    client = make_client(acl_enabled=True, acl_default_policy="deny")
    root = {"X-Consul-Token": client.put("/v1/acl/bootstrap").get_json()["SecretID"]}
    body = {"Name": "acl-admins", "Rules": 'acl = "write"'}
    assert client.put("/v1/acl/policy", json=body, headers=root).status_code == 200
    r = client.put("/v1/acl/token", json={"Policies": [{"Name": "acl-admins"}]}, headers=root)
    acl_writer = {"X-Consul-Token": r.get_json()["SecretID"]}
    # On its own it may not, say, write K/V ...
    assert client.put("/v1/kv/x", data=b"1", headers=acl_writer).status_code == 403
    # ... but it may mint a token with global-management ...
    r = client.put(
        "/v1/acl/token", json={"Policies": [{"Name": "global-management"}]}, headers=acl_writer
    )
    assert r.status_code == 200, r.get_data(as_text=True)
    minted = {"X-Consul-Token": r.get_json()["SecretID"]}
    # ... which may do anything.
    assert client.put("/v1/kv/x", data=b"1", headers=minted).status_code == 200
    assert client.put("/v1/acl/bootstrap").status_code == 403  # bootstrap is done
