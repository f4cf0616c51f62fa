"""One service-name rule for the catalog, intentions and certificates (issue 9, item 12).

``/v1/connect/ca/sign`` signed certificates for names the catalog refuses (``-``, ``web.``,
1,900 characters: all valid SPIFFE path segments) while the agent leaf endpoint refused them.
``trellis.proxy.names`` now holds the rule, and the catalog (``valid_name``), intentions
(``check_name``) and the CSR policy (``check_csr``) all apply it.
"""

from __future__ import annotations

import pytest

from tests.ca_support import service_csr
from trellis.proxy import authz, names, spiffe
from trellis.proxy import x509 as px

TD = "11111111-2222-3333-4444-555555555555.consul"
BAD = ["-", "web.", "x" * 1900, ".web", "_web", "web-", "x" * 129, "a..", "-web"]
GOOD = ["web", "a", "7", "web.v2", "web-1", "web_1", "Web", "x" * 128, "a.b_c-d"]


@pytest.mark.parametrize("name", BAD + GOOD, ids=lambda n: n if len(n) < 20 else f"{len(n)}ch")
def test_the_csr_policy_takes_the_catalogs_names(name: str) -> None:
    csr = px.load_csr(service_csr(TD, name))
    assert spiffe.parse_service(px._uri_sans(csr.extensions)[0]).service == name  # SPIFFE-valid
    if name in GOOD:
        assert names.is_service_name(name)
        assert px.check_csr(csr, trust_domain=TD).identity.service == name
        assert authz.check_name(name) == name
    else:
        assert not names.is_service_name(name)
        with pytest.raises(px.PolicyError, match="is not valid: use 1-128 letters"):
            px.check_csr(csr, trust_domain=TD)
        with pytest.raises(authz.IntentionError):
            authz.check_name(name)


@pytest.mark.parametrize("name", ["-", "web.", "x" * 1900, "web", "x" * 128], ids=len)
def test_sign_leaf_and_catalog_agree_on_every_name(app_client, name: str) -> None:
    td = app_client.get("/v1/connect/ca/roots").get_json()["TrustDomain"]
    sign = app_client.post("/v1/connect/ca/sign", json={"CSR": service_csr(td, name)})
    leaf = app_client.get(f"/v1/agent/connect/ca/leaf/{name}")
    register = app_client.put("/v1/agent/service/register", json={"Name": name})
    statuses = (sign.status_code, leaf.status_code, register.status_code)
    if names.is_service_name(name):
        assert statuses == (200, 200, 200), sign.get_data(as_text=True)
        assert sign.get_json()["Service"] == name
    else:
        assert statuses == (400, 400, 400), sign.get_data(as_text=True)
        for r in (sign, leaf, register):
            assert "is not valid: use 1-128 letters" in r.get_json()["error"]
