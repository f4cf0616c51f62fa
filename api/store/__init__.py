"""Open a store by URL: ``sqlite:///path/to/trellis.db`` or ``postgresql://...``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from trellis.api.errors import ConfigError
from trellis.api.store.base import Store

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def store_kind(url: str) -> str:
    """Which store a URL names, ``SQLITE`` or ``POSTGRESQL``, from its scheme.

    The one rule, wherever the kind matters (which store class to open, whether the CA seal
    key must be shared, which poll interval applies, what ``/v1/agent/self`` reports). The
    operator is at fault for a ConfigError: a URL that does not parse, or another scheme.
    """
    try:
        scheme = urlsplit(url).scheme
    except ValueError as e:  # e.g. an unbalanced '[' in the host
        raise ConfigError(f"invalid store URL: {e}") from None
    if scheme == "sqlite":
        return SQLITE
    if scheme in ("postgresql", "postgres"):
        return POSTGRESQL
    # Only the scheme is echoed: a mistyped postgresql URL may carry a password.
    raise ConfigError(
        f"unknown store URL scheme {scheme!r}: use sqlite:///path or postgresql://..."
    )


def open_store(url: str, **kw: Any) -> Store:
    if store_kind(url) == SQLITE:
        from trellis.api.store.sqlite import SQLiteStore

        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(f"store URL {url!r} names no file (sqlite:///path/to/trellis.db)")
        return SQLiteStore(path, **kw)
    from trellis.api.store.postgres import PostgresStore, check_url

    check_url(url)
    return PostgresStore(url, **kw)
