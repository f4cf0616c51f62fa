"""Report helpers shared by the benchmarks: the machine's description, plain-text tables, and
writing the result (tables on stdout, or JSON)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU count and model, memory, Python and OS, for the report's header."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    osname = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"') + f" (kernel {platform.release()})"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "python": platform.python_version(),
        "os": osname,
    }


def fmt(v: Any, nd: int = 1) -> str:
    """A table cell: "-" for a missing figure, floats to ``nd`` decimals."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def write_output(
    res: dict[str, Any],
    report: Callable[[dict[str, Any]], str],
    json_out: str | None,
    log: Callable[[str], None],
) -> None:
    """The tables on stdout (and every figure as JSON to ``json_out``), or JSON on stdout
    when ``json_out`` is "-"."""
    if json_out == "-":
        print(json.dumps(res, indent=2))
        return
    print(report(res))
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2) + "\n")
        log(f"JSON written to {json_out}")
