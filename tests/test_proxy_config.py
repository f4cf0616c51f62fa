"""A proxy's configuration from its registration (both spellings) and from flags. Pure."""

from __future__ import annotations

import pytest

from trellis.proxy import config as pc


def sidecar(**proxy) -> dict:
    """A connect-proxy as ``/v1/agent/service/<id>`` returns it."""
    return {
        "ID": "web-sidecar-proxy",
        "Service": "web-sidecar-proxy",
        "Kind": "connect-proxy",
        "Address": "127.0.0.1",
        "Port": 21000,
        "Proxy": {
            "DestinationServiceName": "web",
            "DestinationServiceID": "web",
            "LocalServiceAddress": "127.0.0.1",
            "LocalServicePort": 8080,
            **proxy,
        },
    }


def test_a_sidecar_registration_gives_listeners_app_and_upstreams():
    cfg = pc.from_proxy_service(
        sidecar(
            Upstreams=[
                {"DestinationName": "db", "LocalBindPort": 9191},
                {"DestinationName": "cache", "LocalBindPort": 9192,
                 "LocalBindAddress": "127.0.0.2", "Config": {"connect_timeout_ms": 250}},
            ]
        )
    )  # fmt: skip
    assert cfg.service == "web" and cfg.proxy_id == "web-sidecar-proxy"
    assert cfg.public == ("127.0.0.1", 21000)
    assert cfg.local_app == ("127.0.0.1", 8080)
    assert cfg.upstreams == (
        pc.Upstream("db", 9191),
        pc.Upstream("cache", 9192, "127.0.0.2", connect_timeout=0.25),
    )
    assert cfg.describe() == [
        ("Service", "web"),
        ("Upstream", "db => :9191"),
        ("Upstream", "cache => 127.0.0.2:9192"),
        ("Public listener", "127.0.0.1:21000 => 127.0.0.1:8080"),
    ]


def test_upstreams_in_the_opaque_config_keep_the_config_file_spelling():
    # Consul 1.2 kept them in Proxy.Config, which the catalog stores as written.
    cfg = pc.from_proxy_service(
        sidecar(Config={"upstreams": [{"destination_name": "db", "local_bind_port": 9191}]})
    )
    assert cfg.upstreams == (pc.Upstream("db", 9191),)


def test_the_one_line_managed_form_reads_connect_proxy_config():
    svc = {
        "ID": "web",
        "Service": "web",
        "Port": 8080,
        "Connect": {"Proxy": {"Config": {
            "bind_port": 20000,
            "upstreams": [{"destination_name": "db", "local_bind_port": 9191}],
        }}},
    }  # fmt: skip
    cfg = pc.from_managed(svc)
    assert cfg.service == "web"
    assert cfg.public == ("0.0.0.0", 20000)
    assert cfg.local_app == ("127.0.0.1", 8080)
    assert cfg.upstreams == (pc.Upstream("db", 9191),)


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        ({"Upstreams": [{"LocalBindPort": 1}]}, "destination_name is required"),
        ({"Upstreams": [{"DestinationName": "db"}]}, "local_bind_port is required"),
        ({"Upstreams": [{"DestinationName": "db", "LocalBindPort": 70000}]}, "between 1 and"),
        ({"Upstreams": [{"DestinationName": "db", "LocalBindPort": "x"}]}, "port number"),
        ({"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9, "LocalBindAddress": "h"}]},
         "IP address"),
        ({"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9,
                         "DestinationType": "prepared_query"}]}, "only destination_type"),
        ({"Upstreams": [{"DestinationName": "a", "LocalBindPort": 9},
                        {"DestinationName": "b", "LocalBindPort": 9}]}, "both listen on"),
        ({"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9,
                         "Config": {"connect_timeout_ms": 0}}]}, "milliseconds"),
        ({"LocalServicePort": None}, "no LocalServicePort"),
    ],
)  # fmt: skip
def test_a_registration_that_cannot_be_served_says_why(proxy, message):
    with pytest.raises(pc.ConfigError, match=message):
        pc.from_proxy_service(sidecar(**proxy))


def test_a_service_that_is_not_a_proxy_is_refused():
    with pytest.raises(pc.ConfigError, match="not a connect-proxy"):
        pc.from_proxy_service({"ID": "web", "Kind": ""})
    with pytest.raises(pc.ConfigError, match="bind_port is required"):
        pc.from_managed({"ID": "web", "Service": "web", "Port": 1, "Connect": {"Proxy": {}}})


def test_the_developer_proxy_from_flags():
    cfg = pc.from_flags("alice", ["postgresql:9191", "db:127.0.0.3:9292"])
    assert cfg.service == "alice" and cfg.public is None and cfg.local_app is None
    assert cfg.upstreams == (
        pc.Upstream("postgresql", 9191),
        pc.Upstream("db", 9292, "127.0.0.3"),
    )
    assert cfg.describe() == [
        ("Service", "alice"),
        ("Upstream", "postgresql => :9191"),
        ("Upstream", "db => 127.0.0.3:9292"),
        ("Public listener", "Disabled"),
    ]
    listening = pc.from_flags("alice", [], listen="127.0.0.1:20000", service_addr="127.0.0.1:8080")
    assert listening.public == ("127.0.0.1", 20000)
    assert listening.local_app == ("127.0.0.1", 8080)


@pytest.mark.parametrize(
    ("upstreams", "kw", "message"),
    [
        (["postgresql"], {}, "expected DEST:PORT"),
        ([":9191"], {}, "expected DEST:PORT"),
        (["db:0"], {}, "between 1 and"),
        (["a:9191", "b:9191"], {}, "both listen on"),
        ([], {"listen": "127.0.0.1:20000"}, "-listen needs -service-addr"),
        ([], {"service_addr": "127.0.0.1:1"}, "-service-addr needs -listen"),
        ([], {"listen": "nowhere", "service_addr": "127.0.0.1:1"}, "expected ADDR:PORT"),
    ],
)
def test_bad_flags_say_what_is_wrong(upstreams, kw, message):
    with pytest.raises(pc.ConfigError, match=message):
        pc.from_flags("alice", upstreams, **kw)
