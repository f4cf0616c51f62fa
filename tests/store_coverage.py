"""A pytest plugin for ``tests/test_both_stores.py``: at collection, print which store each test
that drives the app in-process runs on. Loaded only there (``-p tests.store_coverage``)."""

from __future__ import annotations

import json

#: The fixtures that build the app in-process, each on the store its test is given.
APP_FIXTURES = frozenset({"app_client", "client", "make_client", "world"})
MARK = "STORE-COVERAGE "


def pytest_collection_finish(session) -> None:
    for item in session.items:
        uses = sorted(APP_FIXTURES & set(getattr(item, "fixturenames", ())))
        if not uses:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        store = params.get("store_url") or params.get("world")
        name = item.nodeid.split("[", 1)[0]
        print(MARK + json.dumps({"test": name, "fixtures": uses, "store": store}))
