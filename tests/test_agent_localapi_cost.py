"""The agent's local API lists the node's services at a cost linear in their number.

Every managed sidecar watches ``/v1/agent/services`` with ``?hash=&wait=``, and each change on
the node wakes them all, each listing the services again. Building the list computed the node's
services (every managed sidecar's registration included) once per service, so a node with 250
services and 50 sidecars kept its agent at 100% CPU and its sidecars never got an answer
(found by bench/agent.py).
"""

from __future__ import annotations

from types import SimpleNamespace

from trellis.proxy.agent.definitions import ServiceDef, service_def
from trellis.proxy.agent.localapi import LocalAPI
from trellis.proxy.agent.state import LocalState


class CountingState(LocalState):
    """The real local state, counting how often the node's services are computed."""

    computed = 0

    def services(self) -> dict[str, ServiceDef]:
        self.computed += 1
        return super().services()


def test_listing_the_services_computes_them_once(tmp_path):
    state = CountingState(str(tmp_path))
    for i in range(60):
        body = {"name": f"app-{i}", "port": 8000 + i}
        if i < 20:
            body["connect"] = {"proxy": {}}
        state.add_service(service_def({"service": body}))
    state.set_proxy_ports({f"app-{i}-sidecar-proxy": 20000 + i for i in range(20)})
    api = LocalAPI(SimpleNamespace(state=state, datacenter="dc1"), on_leave=lambda: None)

    listed = api._services_json()

    assert len(listed) == 80  # 60 apps and their 20 managed sidecars
    assert listed["app-3-sidecar-proxy"]["Kind"] == "connect-proxy"
    assert listed["app-3-sidecar-proxy"]["Port"] == 20003
    assert state.computed == 1
