"""Open a store by URL: ``sqlite:///path/to/trellis.db`` or ``postgresql://...``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from trellis.api.errors import ConfigError
from trellis.api.store.base import Store


def open_store(url: str, **kw: Any) -> Store:
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. an unbalanced '[' in the host
        raise ConfigError(f"invalid store URL: {e}") from None
    scheme = parts.scheme
    if scheme == "sqlite":
        from trellis.api.store.sqlite import SQLiteStore

        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(f"store URL {url!r} names no file (sqlite:///path/to/trellis.db)")
        return SQLiteStore(path, **kw)
    if scheme in ("postgresql", "postgres"):
        from trellis.api.store.postgres import PostgresStore, check_url

        check_url(url)
        return PostgresStore(url, **kw)
    # Only the scheme is echoed: a mistyped postgresql URL may carry a password.
    raise ConfigError(
        f"unknown store URL scheme {scheme!r}: use sqlite:///path or postgresql://..."
    )
