"""The managed sidecar's registration (from the one-line ``connect.proxy`` form, both
spellings), the spec that runs it, and the public port allocator."""

from __future__ import annotations

import socket

import pytest

from trellis.proxy.agent import managed
from trellis.proxy.config import ConfigError, from_proxy_service

API_FORM = {
    "ID": "web-1",
    "Name": "web",
    "Port": 8080,
    "Address": "127.0.0.1",
    "Tags": ["v1"],
    "Meta": {"team": "a"},
    "Connect": {
        "Proxy": {
            "Config": {
                "upstreams": [
                    {"destination_name": "db", "local_bind_port": 9191},
                    {
                        "DestinationName": "cache",
                        "LocalBindPort": 9192,
                        "Datacenter": "dc2",
                        "Config": {"connect_timeout_ms": 500},
                    },
                ]
            }
        }
    },
}
FILE_FORM = {
    "id": "web-1",
    "name": "web",
    "port": 8080,
    "address": "127.0.0.1",
    "tags": ["v1"],
    "meta": {"team": "a"},
    "connect": {
        "proxy": {
            "config": {
                "upstreams": [
                    {"destination_name": "db", "local_bind_port": 9191},
                    {
                        "destination_name": "cache",
                        "local_bind_port": 9192,
                        "datacenter": "dc2",
                        "config": {"connect_timeout_ms": 500},
                    },
                ]
            }
        }
    },
}


@pytest.mark.parametrize("app", [API_FORM, FILE_FORM], ids=["api", "file"])
def test_the_registration_has_consuls_sidecar_defaults(app):
    reg = managed.registration(app, 20000)
    assert reg == {
        "ID": "web-1-sidecar-proxy",
        "Name": "web-sidecar-proxy",
        "Kind": "connect-proxy",
        "Port": 20000,
        "Address": "127.0.0.1",
        "Tags": ["v1"],
        "Meta": {"team": "a"},
        "Proxy": {
            "DestinationServiceName": "web",
            "DestinationServiceID": "web-1",
            "LocalServiceAddress": "127.0.0.1",
            "LocalServicePort": 8080,
            "Upstreams": [
                {
                    "DestinationType": "service",
                    "DestinationName": "db",
                    "LocalBindAddress": "127.0.0.1",
                    "LocalBindPort": 9191,
                },
                {
                    "DestinationType": "service",
                    "DestinationName": "cache",
                    "LocalBindAddress": "127.0.0.1",
                    "LocalBindPort": 9192,
                    "Datacenter": "dc2",
                    "Config": {"connect_timeout_ms": 500},
                },
            ],
        },
        "Checks": [
            {"Name": "Connect Sidecar Listening", "TCP": "127.0.0.1:20000", "Interval": "10s"},
            {"Name": "Connect Sidecar Aliasing web-1", "AliasService": "web-1"},
        ],
    }
    assert managed.proxy_id(app) == "web-1-sidecar-proxy"
    assert managed.is_managed(app)


@pytest.mark.parametrize("app", [API_FORM, FILE_FORM], ids=["api", "file"])
def test_the_sidecar_reads_the_registration_as_written(app):
    """``trellis connect proxy -proxy-id`` reads it with ``from_proxy_service``, unchanged."""
    cfg = from_proxy_service(managed.registration(app, 20000))
    assert cfg.service == "web"
    assert cfg.proxy_id == "web-1-sidecar-proxy"
    assert cfg.public == ("127.0.0.1", 20000)
    assert cfg.local_app == ("127.0.0.1", 8080)
    assert [(u.destination, u.listen, u.datacenter, u.connect_timeout) for u in cfg.upstreams] == [
        ("db", ("127.0.0.1", 9191), "", 10.0),
        ("cache", ("127.0.0.1", 9192), "dc2", 0.5),
    ]


def test_the_bare_one_line_form():
    """``{"service": {"name": "web", "port": 8080, "connect": {"proxy": {}}}}``: no ID, no
    address (the listener binds every address, as ``from_managed`` does; the TCP check
    dials loopback), no upstreams."""
    app = {"name": "web", "port": 8080, "connect": {"proxy": {}}}
    reg = managed.registration(app, 20001)
    assert reg["ID"] == "web-sidecar-proxy"
    assert "Address" not in reg
    assert reg["Proxy"]["Upstreams"] == []
    assert reg["Checks"][0]["TCP"] == "127.0.0.1:20001"
    cfg = from_proxy_service(reg)
    assert cfg.public == ("0.0.0.0", 20001)
    assert managed.bind_address(app) == "0.0.0.0"


def test_the_agent_services_read_form_and_connect_proxy_upstreams():
    """As ``/v1/agent/service/<id>`` returns an app (``Service`` for the name), with the
    upstreams beside ``Config`` (Consul 1.3's managed proxy)."""
    app = {
        "ID": "api",
        "Service": "api",
        "Port": 7000,
        "Connect": {
            "Proxy": {
                "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
                "Config": {"bind_address": "127.0.0.2", "local_service_address": "127.0.0.3:7001"},
            }
        },
    }
    reg = managed.registration(app, 20002)
    assert reg["Proxy"]["LocalServiceAddress"] == "127.0.0.3"
    assert reg["Proxy"]["LocalServicePort"] == 7001
    assert reg["Proxy"]["Config"] == {"bind_address": "127.0.0.2"}
    assert reg["Checks"][0]["TCP"] == "127.0.0.2:20002"
    cfg = from_proxy_service(reg)
    assert cfg.public == ("127.0.0.2", 20002)
    assert cfg.local_app == ("127.0.0.3", 7001)
    assert [u.destination for u in cfg.upstreams] == ["db"]


def test_a_bind_port_in_the_config_is_the_public_port():
    app = {"name": "web", "port": 8080, "connect": {"proxy": {"config": {"bind_port": 21500}}}}
    assert managed.fixed_port(app) == 21500
    assert managed.registration(app, 20000)["Port"] == 21500
    assert managed.fixed_port({"name": "x", "port": 1, "connect": {"proxy": {}}}) is None


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ({"name": "web", "connect": {"proxy": {}}}, "has no port for its sidecar"),
        ({"port": 80, "connect": {"proxy": {}}}, "has no name"),
        ({"name": "web", "port": 80}, "has no connect.proxy block"),
        ({"name": "web", "port": 80, "connect": {"proxy": {"config": []}}}, "must be an object"),
        (
            {"name": "web", "port": 80, "connect": {"proxy": {"config": {"bind_port": "x"}}}},
            "bind_port must be a port number",
        ),
        (
            {"name": "web", "port": 80, "address": "web.local", "connect": {"proxy": {}}},
            "the address its sidecar listens on .* must be an IP address, not 'web.local'",
        ),
        (
            {
                "name": "web",
                "port": 80,
                "connect": {"proxy": {"config": {"upstreams": [{"destination_name": "db"}]}}},
            },
            "service 'web': config upstream 1: local_bind_port is required",
        ),
        (
            {
                "name": "web",
                "port": 80,
                "connect": {
                    "proxy": {
                        "config": {
                            "upstreams": [
                                {"destination_name": "db", "local_bind_port": 9191},
                                {"destination_name": "cache", "local_bind_port": 9191},
                            ]
                        }
                    }
                },
            },
            "service 'web': upstreams 'db' and 'cache' both listen on 127.0.0.1:9191",
        ),
    ],
)
def test_what_cannot_be_served_is_refused_with_the_apps_name(app, message):
    with pytest.raises(ConfigError, match=message):
        managed.registration(app, 20000)


def test_the_spec_runs_the_proxy_by_id_with_the_token_in_the_environment():
    reg = managed.registration(API_FORM, 20000)
    spec = managed.sidecar_spec(
        reg, http_addr="http://127.0.0.1:8500", token="secret", ca_file="/etc/ca.pem"
    )
    assert spec.proxy_id == "web-1-sidecar-proxy"
    assert spec.service_id == "web-1"
    assert spec.args == (
        "connect",
        "proxy",
        "-proxy-id",
        "web-1-sidecar-proxy",
        "-http-addr",
        "http://127.0.0.1:8500",
        "-ca-file",
        "/etc/ca.pem",
    )
    assert "secret" not in " ".join(spec.args)
    assert spec.env == {"TRELLIS_HTTP_TOKEN": "secret"}
    assert managed.sidecar_spec(reg, http_addr="http://x:1").env == {}


# -- the port allocator -----------------------------------------------------------------------


class Busy:
    """An injected probe: these (address, port) pairs are in use; it records every probe."""

    def __init__(self, *busy: tuple[str, int]) -> None:
        self.busy = set(busy)
        self.probed: list[tuple[str, int]] = []

    def __call__(self, address: str, port: int) -> bool:
        self.probed.append((address, port))
        return (address, port) not in self.busy


def test_ports_are_given_in_order_and_kept_per_proxy():
    alloc = managed.PortAllocator(20000, 20255, is_free=Busy())
    assert alloc.assign("a") == 20000
    assert alloc.assign("b") == 20001
    assert alloc.assign("a") == 20000  # a reload: the same port
    assert alloc.assigned() == {"a": 20000, "b": 20001}


def test_ports_in_use_are_skipped_on_loopback_and_on_the_bind_address():
    probe = Busy(("127.0.0.1", 20000), ("10.0.0.5", 20001))
    alloc = managed.PortAllocator(20000, 20255, is_free=probe)
    assert alloc.assign("a", "10.0.0.5") == 20002
    assert ("10.0.0.5", 20002) in probe.probed and ("127.0.0.1", 20002) in probe.probed
    assert alloc.assign("b") == 20001  # free on loopback, the only address b binds


def test_a_previous_assignment_survives_a_restart_without_a_probe():
    """Its own sidecar may still be draining on it; the other proxies keep away from it."""
    probe = Busy(("127.0.0.1", 20003))
    alloc = managed.PortAllocator(20000, 20255, previous={"a": 20003, "old": 19999}, is_free=probe)
    assert alloc.assign("a") == 20003
    assert ("127.0.0.1", 20003) not in probe.probed
    assert alloc.assign("b") == 20000
    assert alloc.assigned() == {"a": 20003, "b": 20000}  # outside the range: dropped


def test_released_ports_go_to_the_next_sidecar():
    alloc = managed.PortAllocator(20000, 20002, is_free=Busy())
    for p in ("a", "b", "c"):
        alloc.assign(p)
    alloc.release("b")
    alloc.retain(["a", "d"])
    assert alloc.assigned() == {"a": 20000}
    assert alloc.assign("d") == 20001


def test_an_exhausted_range_is_a_clear_error():
    alloc = managed.PortAllocator(20000, 20001, is_free=Busy(("127.0.0.1", 20001)))
    alloc.assign("a")
    with pytest.raises(ConfigError) as e:
        alloc.assign("b")
    assert str(e.value) == (
        "no free port left for sidecar 'b' in 20000-20001 (1 given to other sidecars, the rest"
        " in use): widen ports.proxy_min_port..proxy_max_port"
    )


@pytest.mark.parametrize(("low", "high"), [(0, 10), (20, 10), (60000, 70000)])
def test_a_bad_range_is_refused(low, high):
    with pytest.raises(ConfigError, match="sidecar port range"):
        managed.PortAllocator(low, high)


def test_the_default_probe_sees_a_bound_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert managed.port_is_free("127.0.0.1", port) is False
        alloc = managed.PortAllocator(port, min(port + 5, 65535))
        assert alloc.assign("a") != port
    # An address this node does not have leaves the decision to the loopback probe.
    assert managed.port_is_free("192.0.2.1", port) is True
