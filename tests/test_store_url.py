"""Which store a URL names: one rule (``trellis.api.store.store_kind``) for every place that
needs to know, and ``open_store`` agrees with it."""

from __future__ import annotations

import pytest

from trellis.api.errors import ConfigError
from trellis.api.store import POSTGRESQL, SQLITE, open_store, store_kind


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("sqlite:////var/lib/trellis/trellis.db", SQLITE),
        ("sqlite:///relative.db", SQLITE),
        ("postgresql://trellis@db.internal/trellis", POSTGRESQL),
        ("postgres://trellis@db.internal/trellis", POSTGRESQL),
        ("postgresql:///trellis?host=/run/postgresql", POSTGRESQL),
    ],
)
def test_store_kind(url, kind):
    assert store_kind(url) == kind


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:hunter2@db/trellis",
        "postgresqlx://db/trellis",
        "sqlite3:///x.db",
        "/var/lib/trellis/trellis.db",
        "",
        "postgresql://[::1/trellis",
    ],
)
def test_any_other_url_is_a_configuration_error_that_keeps_secrets(url):
    with pytest.raises(ConfigError) as e:
        store_kind(url)
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError) as opened:
        open_store(url)
    assert str(opened.value) == str(e.value)


def test_open_store_opens_the_kind_it_names(tmp_path, pg_url):
    from trellis.api.store.postgres import PostgresStore
    from trellis.api.store.sqlite import SQLiteStore

    cases = (
        (f"sqlite:///{tmp_path / 't.db'}", SQLITE, SQLiteStore),
        (pg_url, POSTGRESQL, PostgresStore),
    )
    for url, kind, cls in cases:
        store = open_store(url)
        try:
            assert store_kind(url) == kind
            assert isinstance(store, cls)
        finally:
            store.close()
