"""Starting and stopping real ``trellis`` processes: refusals with one clear line, the banner,
clean stops on SIGINT and SIGTERM, and both config file forms (JSON and HCL).

A refusal must come quickly, exit non-zero, say what is wrong on one ``Error: ...`` line, and
never show a Python traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dnslib
import httpx
import pytest

from tests.support import TRELLIS, TrellisProcess, alive, child_pids, wait_until

pytestmark = pytest.mark.integration

#: A refusal happens before anything is served: interpreter start-up plus imports, at most.
QUICK = 10.0


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def error_line(self) -> str:
        """The one ``Error: ...`` line, after checking that there is exactly one and no
        traceback."""
        assert "Traceback" not in self.output, self.output
        errors = [ln for ln in self.output.splitlines() if ln.startswith("Error")]
        assert len(errors) == 1, self.output
        # ... and it is the last word: no continuation lines (hints, causes) after it.
        assert self.stderr.rstrip("\n").splitlines()[-1] == errors[0], self.output
        return errors[0]


def run_trellis(*args: str, timeout: float = 30.0) -> Outcome:
    start = time.monotonic()
    # start_new_session: if the refusal regressed into a running server, the timeout below
    # kills the whole group, not just the master.
    p = subprocess.Popen(
        [TRELLIS, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"trellis {' '.join(args)} did not exit:\n{out}{err}") from None
    return Outcome(p.returncode, out, err, time.monotonic() - start)


def refused(*args: str) -> str:
    """Run ``trellis`` expecting a quick refusal; return its one error line."""
    r = run_trellis(*args)
    assert r.returncode != 0, r.output
    assert r.elapsed < QUICK, f"took {r.elapsed:.1f}s to refuse"
    assert "==> Trellis" not in r.output, "printed the banner before refusing:\n" + r.output
    return r.error_line()


def server_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["server", "-data-dir", str(tmp_path / "data"), *extra]


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("broken.json", '{"ports": {"http": 8500,', "does not parse"),
        ("broken.hcl", "ports {\n  http =\n", "does not parse"),
        ("list.json", "[1, 2]", "must hold an object"),
    ],
)
def test_config_file_that_does_not_parse(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    line = refused("server", "-config", str(path), "-data-dir", str(tmp_path / "data"))
    assert line.startswith("Error: invalid configuration:"), line
    assert expected in line
    assert name in line


def test_missing_config_file(tmp_path):
    line = refused("server", "-config", str(tmp_path / "nope.json"))
    assert "cannot read config file" in line
    assert "nope.json" in line
    assert "No such file or directory" in line


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"bogus_setting": 1}, "unknown setting 'bogus_setting'"),
        ({"ports": {"htttp": 8500}}, "unknown setting ports.htttp"),
        ({"acl": {"enabled": "yes"}}, "acl.enabled must be true or false, not 'yes'"),
        (
            {"acl": {"enable_key_list_policy": 1}},
            "acl.enable_key_list_policy must be true or false, not 1",
        ),
    ],
)
def test_unknown_or_mistyped_setting(tmp_path, config, expected):
    path = tmp_path / "trellis.json"
    path.write_text(json.dumps(config))
    line = refused("server", "-config", str(path), "-data-dir", str(tmp_path / "data"))
    assert expected in line, line


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (("config", {"ports": {"http": "eighty"}}), "ports.http: 'eighty' is not a port number"),
        (("config", {"ports": {"http": 65536}}), "ports.http: 65536 is not a port number"),
        (("flag", ["-http-port", "70000"]), "ports.http: 70000 is not a port number"),
        (("flag", ["-dns-port", "-2"]), "ports.dns: -2 is not a port number (-1..65535)"),
    ],
    ids=["config-text", "config-too-big", "flag-too-big", "flag-dns-negative"],
)
def test_bad_port_value(tmp_path, source, expected):
    kind, value = source
    if kind == "config":
        path = tmp_path / "trellis.json"
        path.write_text(json.dumps(value))
        args = server_args(tmp_path, "-config", str(path))
    else:
        args = server_args(tmp_path, *value)
    line = refused(*args)
    assert expected in line, line


def test_port_flag_that_is_not_a_number(tmp_path):
    r = run_trellis(*server_args(tmp_path, "-http-port", "eighty"))
    assert r.returncode != 0
    assert r.elapsed < QUICK
    assert "Traceback" not in r.output
    # A usage error: the message first, then the usage text.
    first = r.stderr.splitlines()[0]
    assert first == "invalid value for flag -http-port: 'eighty' is not a whole number", r.stderr


def test_unreachable_store(tmp_path):
    url = "postgresql://postgres@/postgres?host=/nonexistent"
    line = refused(*server_args(tmp_path, "-store", url, "-http-port", "0", "-dns-port", "-1"))
    assert line.startswith(f"Error: cannot open the store {url}:"), line
    assert "/nonexistent/.s.PGSQL.5432" in line


def test_shared_store_without_a_ca_seal_key(tmp_path, pg_url):
    line = refused(*server_args(tmp_path, "-store", pg_url, "-http-port", "0", "-dns-port", "-1"))
    assert line.startswith("Error: invalid configuration: set connect.ca_seal_key"), line


def test_busy_http_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = refused(*server_args(tmp_path, "-http-port", str(port), "-dns-port", "-1"))
    assert line == f"Error: cannot listen for HTTP on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize("proto", ["UDP", "TCP"])
def test_busy_dns_port(tmp_path, proto):
    kind = socket.SOCK_DGRAM if proto == "UDP" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as busy:
        busy.bind(("127.0.0.1", 0))
        if proto == "TCP":
            busy.listen()
        port = busy.getsockname()[1]
        line = refused(*server_args(tmp_path, "-http-port", "0", "-dns-port", str(port)))
    assert f"cannot bind {proto} 127.0.0.1:{port}" in line, line
    assert "Address already in use" in line
    assert "[Errno" not in line


# -- trellis dev: banner, serving, stopping -------------------------------------------------


def gone(pid: int) -> bool:
    return not alive(pid)


def dns_query(port: int, name: str, *, tcp: bool, timeout: float = 5.0) -> list[str]:
    q = dnslib.DNSRecord.question(name, "A")
    reply = dnslib.DNSRecord.parse(q.send("127.0.0.1", port, tcp=tcp, timeout=timeout))
    return [str(rr.rdata) for rr in reply.rr]


def banner_value(p: TrellisProcess, label: str) -> str:
    for line in p.lines:
        m = re.match(rf"\s*{re.escape(label)}: (.*)$", line)
        if m:
            return m.group(1)
    raise AssertionError(f"no {label!r} line in the banner:\n{p.output()}")


@pytest.fixture
def dev_process():
    """``trellis dev`` as a user runs it: no data dir given (it makes a temporary one)."""
    p = TrellisProcess(["dev", "-http-port", "0", "-dns-port", "0", "-node", "laptop"]).start()
    yield p
    p.stop()


def test_dev_prints_where_everything_listens_and_serves_there(dev_process):
    p = dev_process
    assert "==> Trellis dev mode running" in p.lines
    http = banner_value(p, "HTTP API")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", http), http
    assert http == p.url
    # dev's node agent owns the HTTP API address; the server has a loopback port of its own.
    server = banner_value(p, "Server API")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server) and server != http, server
    assert httpx.get(server + "/v1/status/leader").status_code == 200
    dns = banner_value(p, "DNS")
    m = re.fullmatch(r"127\.0\.0\.1:(\d+) \(UDP and TCP\), domain trellis\.", dns)
    assert m, dns
    assert int(m.group(1)) == p.dns_port
    assert banner_value(p, "Node name") == "laptop"
    assert banner_value(p, "Store").startswith("sqlite:///")

    # ... and it does listen there: HTTP, and DNS over both protocols.
    r = httpx.get(p.url + "/v1/agent/self")
    assert r.status_code == 200
    assert r.json()["Config"]["NodeName"] == "laptop"
    assert dns_query(p.dns_port, "laptop.node.trellis", tcp=False) == ["127.0.0.1"]
    assert dns_query(p.dns_port, "laptop.node.trellis", tcp=True) == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGINT, True), (signal.SIGINT, False), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigint", "sigterm"],
)
def test_dev_stops_cleanly(dev_process, sig, to_group):
    p = dev_process
    assert p.proc is not None
    data_dir = Path(banner_value(p, "Store").removeprefix("sqlite:///")).parent
    assert data_dir.is_dir()
    workers = wait_until(lambda: child_pids(p.pid), timeout=10)
    # Some state, so that the stop has something to close.
    assert httpx.put(p.url + "/v1/kv/k", content=b"v").json() is True

    start = time.monotonic()
    if to_group:  # what Ctrl-C in a terminal does
        os.killpg(p.pid, sig)
    else:
        p.proc.send_signal(sig)
    p.proc.wait(15)
    elapsed = time.monotonic() - start
    assert p.proc.returncode == 0, p.output()
    assert elapsed < 7.0, f"took {elapsed:.1f}s to stop"
    wait_until(lambda: all(gone(w) for w in workers), timeout=5)
    p._close()
    assert "Traceback" not in p.output(), p.output()
    # dev's throw-away data dir goes with it.
    assert not data_dir.exists()


def test_server_stops_on_sigterm_with_a_parked_blocking_query(tmp_path):
    """A long-poll in flight must not keep the server from stopping (gunicorn's graceful
    timeout bounds it), and the client gets an answer or a closed connection, not a hang."""
    p = TrellisProcess(server_args(tmp_path, "-http-port", "0", "-dns-port", "-1"))
    try:
        p.start()
        assert httpx.put(p.url + "/v1/kv/k", content=b"v").json() is True
        index = httpx.get(p.url + "/v1/kv/k").headers["X-Consul-Index"]
        done = threading.Event()

        def block() -> None:
            try:
                httpx.get(p.url + f"/v1/kv/k?index={index}&wait=60s", timeout=30)
            except httpx.HTTPError:
                pass
            done.set()

        threading.Thread(target=block, daemon=True).start()
        wait_until(
            lambda: (
                sum(
                    int(httpx.get(p.url + "/v1/agent/self").json()["Stats"]["blocking"]["waiting"])
                    for _ in range(4)
                )
                >= 1
            ),
            timeout=10,
        )
        start = time.monotonic()
        rc = p.stop(signal.SIGTERM, timeout=20)
        elapsed = time.monotonic() - start
    finally:
        p.stop()
    assert rc == 0, p.output()
    assert elapsed < 10.0, f"took {elapsed:.1f}s to stop"
    assert done.wait(5), "the parked client was left hanging"


# -- config file forms ----------------------------------------------------------------------


def _check_config_form(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    p = TrellisProcess(["server", "-config", str(path)])
    try:
        p.start()
        assert banner_value(p, "Node name") == "cfg-node"
        assert banner_value(p, "Datacenter") == "east-1"
        assert banner_value(p, "DNS") == "disabled"
        assert banner_value(p, "Workers") == "1 x gthread"
        assert banner_value(p, "Store") == f"sqlite:///{tmp_path / 'cfgdata' / 'trellis.db'}"
        me = httpx.get(p.url + "/v1/agent/self").json()
        assert me["Config"]["NodeName"] == "cfg-node"
        assert me["Config"]["Datacenter"] == "east-1"
    finally:
        p.stop()


def test_json_config_form(tmp_path):
    config = {
        "datacenter": "east-1",
        "node_name": "cfg-node",
        "data_dir": str(tmp_path / "cfgdata"),
        "addresses": {"http": "127.0.0.1"},
        "ports": {"http": 0, "dns": -1},
        "server": {"workers": 1, "worker_class": "gthread"},
    }
    _check_config_form(tmp_path, "trellis.json", json.dumps(config))


def test_hcl_config_form(tmp_path):
    text = f"""
# Trellis server configuration
datacenter = "east-1"
node_name  = "cfg-node"
data_dir   = "{tmp_path / "cfgdata"}"

addresses {{
  http = "127.0.0.1"
}}

ports {{
  http = 0
  dns  = -1
}}

server {{
  workers      = 1
  worker_class = "gthread"
}}
"""
    _check_config_form(tmp_path, "trellis.hcl", text)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "trellis.json"
    path.write_text(
        json.dumps(
            {
                "node_name": "from-file",
                "data_dir": str(tmp_path / "cfgdata"),
                "ports": {"http": 1, "dns": 1},  # privileged: would fail if not overridden
            }
        )
    )
    p = TrellisProcess(
        [
            *("server", "-config", str(path), "-node", "from-flag"),
            *("-http-port", "0", "-dns-port", "-1", "-workers", "1"),
        ]
    )
    try:
        p.start()
        assert banner_value(p, "Node name") == "from-flag"
        assert banner_value(p, "DNS") == "disabled"
        assert httpx.get(p.url + "/v1/agent/self").json()["Config"]["NodeName"] == "from-flag"
    finally:
        p.stop()


# -- a worker replaced --------------------------------------------------------------------


def test_dns_keeps_serving_when_a_worker_is_replaced(tmp_path):
    """The DNS sockets are shared by the master and every worker: one worker exiting (here a
    SIGTERM to it alone; gunicorn forks a replacement) must not close them for the rest."""
    p = TrellisProcess(
        server_args(
            tmp_path, "-http-port", "0", "-dns-port", "0", "-workers", "2", "-node", "dns-node"
        )
    )
    try:
        p.start()
        assert p.dns_port

        def two_workers() -> list[int] | None:
            w = child_pids(p.pid)
            return w if len(w) == 2 else None

        first = wait_until(two_workers)

        def answers() -> int:
            ok = 0
            for _ in range(10):  # over both protocols, spread over both workers
                for tcp in (False, True):
                    try:
                        got = dns_query(p.dns_port, "dns-node.node.trellis", tcp=tcp, timeout=1)
                        ok += got == ["127.0.0.1"]
                    except OSError:
                        pass
            return ok

        assert answers() == 20
        os.kill(first[0], signal.SIGTERM)
        wait_until(lambda: gone(first[0]), timeout=10)
        wait_until(lambda: (w := two_workers()) is not None and first[0] not in w, timeout=15)
        # The replacement has booted once it serves HTTP; then DNS must answer every query.
        wait_until(lambda: httpx.get(p.url + "/v1/status/leader").status_code == 200)
        assert answers() == 20
    finally:
        p.stop()
