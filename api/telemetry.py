"""What ``/v1/agent/metrics`` and ``/v1/agent/host`` report: this process's own figures.

Theory of operation. Consul's agent keeps an in-memory sink (go-metrics) of counters, gauges
and samples over a 10-second interval and dumps it as JSON, or as Prometheus text. Trellis
keeps only figures it really has:

* counters and samples recorded by this process (``Metrics.count`` / ``Metrics.sample``): the
  HTTP requests it answered, by method, and how long they took (a sample, in milliseconds).
  Counters are cumulative since the process started (no interval), so a Prometheus scrape
  can take rates itself;
* gauges computed when asked (``gauges`` passed to ``to_json``/``to_prometheus``): blocking
  queries parked in this process, the store's change index, the catalog's nodes, services,
  instances and checks by status, the sessions. Nothing is estimated or made up.

A server runs several worker processes; each answers with its own counters (the request
that asked says which: the ``worker_pid`` label), while the store-wide gauges are the same in
every worker. Host information is read from ``/proc`` and ``os.uname`` (no psutil), in the
shape of Consul's ``/v1/agent/host``; a figure the kernel does not offer is left out.

Pure but for the ``/proc`` reads in ``host_info``; no Flask.
"""

from __future__ import annotations

import math
import os
import platform
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Consul's metric names start with its service name; Trellis answers for Consul clients.
PREFIX = "consul"


@dataclass
class _Sample:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.total_sq += value * value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value


Labels = tuple[tuple[str, str], ...]


@dataclass
class Metrics:
    """This process's counters and samples (thread-safe: gthread workers share it)."""

    started: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counters: dict[tuple[str, Labels], _Sample] = field(default_factory=dict)
    _samples: dict[tuple[str, Labels], _Sample] = field(default_factory=dict)

    def count(self, name: str, labels: Mapping[str, str] | None = None, n: float = 1.0) -> None:
        self.count_key((name, tuple(sorted((labels or {}).items()))), n)

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        self.sample_key((name, tuple(sorted((labels or {}).items()))), value)

    def count_key(self, key: tuple[str, Labels], n: float = 1.0) -> None:
        """``count`` with the key made by the caller (labels sorted by name): the per-request
        hook's way, which keeps its keys."""
        with self._lock:
            s = self._counters.get(key)
            if s is None:
                s = self._counters[key] = _Sample()
            s.add(n)

    def sample_key(self, key: tuple[str, Labels], value: float) -> None:
        with self._lock:
            s = self._samples.get(key)
            if s is None:
                s = self._samples[key] = _Sample()
            s.add(value)

    def _copy(self) -> tuple[dict, dict]:
        with self._lock:
            return (
                {k: _Sample(**vars(v)) for k, v in self._counters.items()},
                {k: _Sample(**vars(v)) for k, v in self._samples.items()},
            )

    def to_json(
        self, gauges: Iterable[tuple[str, float, Mapping[str, str]]], now: float
    ) -> dict[str, Any]:
        """Consul's ``/v1/agent/metrics`` body: Timestamp, Gauges, Points, Counters, Samples."""
        counters, samples = self._copy()
        elapsed = max(now - self.started, 1e-9)
        return {
            "Timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(now)),
            "Gauges": [{"Name": _full(n), "Value": v, "Labels": dict(lb)} for n, v, lb in gauges],
            "Points": [],
            "Counters": [_aggregate(k, s, elapsed) for k, s in sorted(counters.items())],
            "Samples": [_aggregate(k, s, elapsed) for k, s in sorted(samples.items())],
        }

    def to_prometheus(self, gauges: Iterable[tuple[str, float, Mapping[str, str]]]) -> str:
        """The same figures in Prometheus's text format (version 0.0.4): gauges as gauges,
        counters as counters, samples as summaries (``_sum`` and ``_count``)."""
        counters, samples = self._copy()
        out: list[str] = []
        typed: set[str] = set()

        def line(name: str, kind: str, labels: Mapping[str, str] | Labels, value: float) -> None:
            if name not in typed:
                typed.add(name)
                out.append(f"# TYPE {name} {kind}")
            out.append(f"{name}{_prom_labels(dict(labels))} {_prom_value(value)}")

        for n, v, lb in gauges:
            line(_prom_name(n), "gauge", lb, v)
        for (n, lb), s in sorted(counters.items()):
            line(_prom_name(n), "counter", lb, s.total)
        for (n, lb), s in sorted(samples.items()):
            name = _prom_name(n)
            if name not in typed:
                typed.add(name)
                out.append(f"# TYPE {name} summary")
            out.append(f"{name}_sum{_prom_labels(dict(lb))} {_prom_value(s.total)}")
            out.append(f"{name}_count{_prom_labels(dict(lb))} {s.count}")
        return "\n".join(out) + "\n"


def _full(name: str) -> str:
    return f"{PREFIX}.{name}"


def _aggregate(key: tuple[str, Labels], s: _Sample, elapsed: float) -> dict[str, Any]:
    name, labels = key
    mean = s.total / s.count if s.count else 0.0
    var = max(s.total_sq / s.count - mean * mean, 0.0) if s.count else 0.0
    return {
        "Name": _full(name),
        "Count": s.count,
        "Rate": s.total / elapsed,
        "Sum": s.total,
        "Min": s.min if s.count else 0.0,
        "Max": s.max if s.count else 0.0,
        "Mean": mean,
        "Stddev": math.sqrt(var),
        "Labels": dict(labels),
    }


_NOT_PROM = re.compile(r"[^a-zA-Z0-9_:]")


def _prom_name(name: str) -> str:
    return _NOT_PROM.sub("_", _full(name))


def _prom_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for k, v in sorted(labels.items()):
        esc = v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{_NOT_PROM.sub("_", k)}="{esc}"')
    return "{" + ",".join(parts) + "}"


def _prom_value(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return str(int(v))
    return repr(float(v))


# -- host ------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _meminfo(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _leading_int(text: str) -> int:
    """The number a /proc field starts with ("491520 KB" -> 491520); 0 when there is none."""
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else 0


def _cpus(text: str) -> list[dict[str, Any]]:
    cpus: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
        if "processor" not in fields:
            continue
        mhz = fields.get("cpu MHz", "")
        cpus.append(
            {
                "cpu": _leading_int(fields["processor"]),
                "vendorId": fields.get("vendor_id", ""),
                "family": fields.get("cpu family", ""),
                "model": fields.get("model", ""),
                "stepping": _leading_int(fields.get("stepping", "")),
                "physicalId": fields.get("physical id", ""),
                "coreId": fields.get("core id", ""),
                "cores": 1,
                "modelName": fields.get("model name", ""),
                "mhz": float(mhz) if re.fullmatch(r"[0-9]+(\.[0-9]+)?", mhz) else 0.0,
                "cacheSize": _leading_int(fields.get("cache size", "")),
                "flags": fields.get("flags", "").split(),
                "microcode": fields.get("microcode", ""),
            }
        )
    return cpus


def host_info(now: float, started: float) -> dict[str, Any]:
    """Consul's ``/v1/agent/host`` body (Memory, CPU, Host, Disk, CollectionTime, Errors),
    from ``/proc`` and ``os``; ``Errors`` names what could not be read (never a 500)."""
    errors: list[str] = []
    mem = _meminfo(_read("/proc/meminfo"))
    if not mem:
        errors.append("memory: /proc/meminfo unreadable")
    total, avail = mem.get("MemTotal", 0), mem.get("MemAvailable", mem.get("MemFree", 0))
    used = max(total - avail, 0)
    memory = {
        "total": total,
        "available": avail,
        "used": used,
        "usedPercent": (used * 100.0 / total) if total else 0.0,
        "free": mem.get("MemFree", 0),
    }
    cpu = _cpus(_read("/proc/cpuinfo"))
    if not cpu:
        errors.append("cpu: /proc/cpuinfo unreadable")
    u = os.uname()
    boot = 0
    for line in _read("/proc/stat").splitlines():
        if line.startswith("btime "):
            boot = _leading_int(line[len("btime ") :])
    uptime = _leading_int(_read("/proc/uptime"))
    host = {
        "hostname": u.nodename,
        "uptime": uptime,
        "bootTime": boot,
        "procs": sum(1 for d in _listdir("/proc") if d.isdigit()),
        "os": u.sysname.lower(),
        "platform": platform.system().lower(),
        "kernelVersion": u.release,
        "kernelArch": u.machine,
        "hostId": _read("/etc/machine-id").strip(),
    }
    disk: dict[str, Any] = {}
    try:
        st = os.statvfs("/")
        dtotal, dfree = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        dused = (st.f_blocks - st.f_bfree) * st.f_frsize
        disk = {
            "path": "/",
            "total": dtotal,
            "free": dfree,
            "used": dused,
            "usedPercent": (dused * 100.0 / dtotal) if dtotal else 0.0,
        }
    except OSError as e:
        errors.append(f"disk: {e.strerror}")
    return {
        "Memory": memory,
        "CPU": cpu,
        "Host": host,
        "Disk": disk,
        "CollectionTime": int(now * 1_000_000_000),
        "Errors": errors or None,
        "AgentUptime": int(now - started),
    }


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def process_gauges() -> list[tuple[str, float, Mapping[str, str]]]:
    """This process's resident memory and open files, from ``/proc/self``."""
    out: list[tuple[str, float, Mapping[str, str]]] = []
    mem = _meminfo(_read("/proc/self/status"))
    if "VmRSS" in mem:
        out.append(("runtime.rss_bytes", float(mem["VmRSS"]), {}))
    fds = _listdir("/proc/self/fd")
    if fds:
        out.append(("runtime.open_files", float(len(fds)), {}))
    return out
