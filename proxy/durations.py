"""Go-style durations ("300ms", "5m", "1h30m"), as Consul's API and config files write them.

Pure: no I/O. Shared by the server (``?wait=``), the CLI and, later, the sidecar.
"""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")


#: Longer than any duration anyone means (and short of float infinity).
MAX_SECONDS = 100 * 365 * 86400.0


class DurationError(ValueError):
    """The text is not a duration; the caller sent it, so the caller is at fault."""


def parse_duration(text: str) -> float:
    """Return the duration in seconds.

    Accepts Go's syntax (a sequence of number+unit, e.g. ``1h30m``, ``1.5s``) and, as Consul
    does for ``wait``, a bare number of seconds. Negative durations are refused.
    """
    if not isinstance(text, str):
        raise DurationError("duration must be a string")
    s = text.strip()
    if not s:
        raise DurationError("empty duration")
    if s == "0":
        return 0.0
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", s):
        if float(s) > MAX_SECONDS:
            raise DurationError(f"duration {text!r} is longer than 100 years")
        return float(s)
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            raise DurationError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if total > MAX_SECONDS:
        raise DurationError(f"duration {text!r} is longer than 100 years")
    return total


def format_duration(seconds: float) -> str:
    """Format seconds the way Go's ``time.Duration.String`` does for whole units (``72h0m0s``)."""
    if seconds < 0:
        raise DurationError("negative duration")
    if seconds == 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms"
    whole = int(seconds)
    frac = seconds - whole
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    sec = f"{s + frac:g}s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec
