"""The open-files limit: servers and proxies hold a descriptor per connection (two per relayed
connection), and the usual soft limit of 1,024 ends them at EMFILE long before their own caps."""

from __future__ import annotations

import resource


def raise_open_files(need: int) -> int:
    """Raise the soft limit towards ``need``, up to the hard limit (as Go programs do at
    start). Returns the limit now in force (below ``need`` when the hard limit is lower: the
    caller says so, in its own terms)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return need
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
