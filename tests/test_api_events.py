"""User events (``PUT /v1/event/fire/{name}``, ``GET /v1/event/list``), on SQLite and on
PostgreSQL: Consul's shapes, the filters kept, the bounded history, Consul's ID-derived index
and blocking lists woken by a fire, also one fired through another server process."""

from __future__ import annotations

import base64
import uuid

import pytest

from tests import api_fixtures
from tests.api_fixtures import InThread, assert_error, index_of, parked, wait_until
from trellis.api import events
from trellis.api.store.events import UserEvent

client = api_fixtures.client
make_client = api_fixtures.make_client


def fire(client, name: str, payload: bytes | None = None, query: str = "") -> dict:
    r = client.put(f"/v1/event/fire/{name}{query}", data=payload or b"")
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def test_fire_answers_consuls_shape_and_list_returns_it(client):
    ev = fire(client, "deploy", b"v1.2.3", "?node=^web&service=api&tag=canary")
    assert set(ev) == {
        "ID",
        "Name",
        "Payload",
        "NodeFilter",
        "ServiceFilter",
        "TagFilter",
        "Version",
        "LTime",
    }
    assert str(uuid.UUID(ev["ID"])) == ev["ID"]
    assert ev["Name"] == "deploy"
    assert base64.b64decode(ev["Payload"]) == b"v1.2.3"
    assert (ev["NodeFilter"], ev["ServiceFilter"], ev["TagFilter"]) == ("^web", "api", "canary")
    assert ev["Version"] == 1 and ev["LTime"] > 0
    r = client.get("/v1/event/list")
    assert r.status_code == 200
    assert r.get_json() == [ev]
    assert index_of(r) == events.id_to_index(ev["ID"])


def test_no_body_is_a_null_payload(client):
    assert fire(client, "ping")["Payload"] is None


def test_list_is_oldest_first_with_growing_ltimes_and_a_name_filter(client):
    fired = [fire(client, n, n.encode()) for n in ("a", "b", "a", "c")]
    listed = client.get("/v1/event/list").get_json()
    assert [e["ID"] for e in listed] == [e["ID"] for e in fired]
    ltimes = [e["LTime"] for e in listed]
    assert ltimes == sorted(ltimes) and len(set(ltimes)) == 4
    only_a = client.get("/v1/event/list?name=a")
    assert [e["ID"] for e in only_a.get_json()] == [fired[0]["ID"], fired[2]["ID"]]
    assert index_of(only_a) == events.id_to_index(fired[2]["ID"])
    none = client.get("/v1/event/list?name=nothing")
    assert none.get_json() == [] and index_of(none) == 1


def test_the_history_keeps_the_newest_events(store):
    kept = 5
    ids = []
    for i in range(kept + 3):
        ev = store.event_fire(UserEvent(id=str(uuid.uuid4()), name=f"e{i}"), keep=kept)
        ids.append(ev.id)
        assert len(store.events()) == min(i + 1, kept)
    assert [e.id for e in store.events()] == ids[-kept:]


def test_the_server_keeps_256(client):
    for i in range(events.HISTORY + 2):
        fire(client, "many", str(i).encode())
    listed = client.get("/v1/event/list").get_json()
    assert len(listed) == events.HISTORY
    assert base64.b64decode(listed[0]["Payload"]) == b"2"
    assert base64.b64decode(listed[-1]["Payload"]) == str(events.HISTORY + 1).encode()


def test_bad_fires_are_400_or_413_and_store_nothing(client, subtests):
    cases = [
        ("/v1/event/fire/_internal", b"", 400, "reserved"),
        ("/v1/event/fire/x?node=(", b"", 400, "'node': invalid regular expression"),
        ("/v1/event/fire/x?service=a&tag=[", b"", 400, "'tag': invalid regular expression"),
        ("/v1/event/fire/x?tag=v1", b"", 400, "without a service filter"),
        ("/v1/event/fire/x?node=a%01", b"", 400, "control characters"),
        ("/v1/event/fire/" + "n" * 300, b"", 400, "at most 256"),
        ("/v1/event/fire/x?dc=elsewhere", b"", 400, "datacenter"),
        ("/v1/event/fire/x", b"p" * (events.MAX_PAYLOAD + 1), 413, "payload"),
    ]
    for url, body, status, contains in cases:
        with subtests.test(url=url[:60]):
            assert_error(client.put(url, data=body), status, contains=contains)
    assert client.get("/v1/event/list").get_json() == []
    assert client.post("/v1/event/fire/x").status_code == 405
    assert_error(client.get("/v1/event/list?index=soon"), 400)


def test_a_blocking_list_waits_while_its_index_is_the_same_and_wakes_on_a_fire(client):
    first = fire(client, "deploy", b"1")
    idx = index_of(client.get("/v1/event/list?name=deploy"))
    waiter = InThread(lambda: client.get(f"/v1/event/list?name=deploy&index={idx}&wait=20s"))
    waiter.start()
    wait_until(lambda: parked(client) >= 1, timeout=10)
    # An event of another name wakes the query, which finds nothing new and parks again.
    fire(client, "other")
    assert not waiter.done()
    second = fire(client, "deploy", b"2")
    r = waiter.result(timeout=10)
    assert r.status_code == 200
    assert [e["ID"] for e in r.get_json()] == [first["ID"], second["ID"]]
    assert index_of(r) == events.id_to_index(second["ID"])
    assert waiter.elapsed < 10


def test_an_index_the_listing_does_not_have_answers_at_once(client):
    # Consul's index is a digest, not a position: any other index is news, even a larger one.
    ev = fire(client, "deploy")
    held = events.id_to_index(ev["ID"]) ^ 1
    r = client.get(f"/v1/event/list?index={held}&wait=20s")
    assert r.status_code == 200 and [e["ID"] for e in r.get_json()] == [ev["ID"]]


def test_a_fire_through_another_server_process_wakes_a_blocking_list(make_client):
    one, two = make_client(), make_client()
    idx = index_of(one.get("/v1/event/list"))
    waiter = InThread(lambda: one.get(f"/v1/event/list?index={idx}&wait=20s")).start()
    wait_until(lambda: parked(one) >= 1, timeout=10)
    ev = fire(two, "from-two", b"x")
    r = waiter.result(timeout=15)
    assert [e["ID"] for e in r.get_json()] == [ev["ID"]]


@pytest.mark.parametrize(
    ("event", "node", "services", "expected"),
    [
        ({}, "web-1", [], True),
        ({"NodeFilter": "^web"}, "web-1", [], True),
        ({"NodeFilter": "^web"}, "db-1", [], False),
        ({"NodeFilter": "eb-"}, "web-1", [], True),  # unanchored, as Go's MatchString
        ({"ServiceFilter": "api"}, "n", [("api", [])], True),
        ({"ServiceFilter": "api"}, "n", [("db", [])], False),
        ({"ServiceFilter": "api"}, "n", [], False),
        ({"ServiceFilter": "api", "TagFilter": "^v2$"}, "n", [("api", ["v1", "v2"])], True),
        ({"ServiceFilter": "api", "TagFilter": "^v2$"}, "n", [("api", ["v1"])], False),
        # The tag must be on a service that matches the service filter.
        (
            {"ServiceFilter": "api", "TagFilter": "v2"},
            "n",
            [("api", ["v1"]), ("db", ["v2"])],
            False,
        ),
        ({"NodeFilter": "^web", "ServiceFilter": "api"}, "db-1", [("api", [])], False),
        ({"NodeFilter": "("}, "web-1", [], False),  # unreadable: matches nothing
        # RE2: a pattern that makes a backtracking engine run for ever is linear here.
        ({"NodeFilter": "(a+)+$"}, "a" * 5000 + "b", [], False),
    ],
)
def test_which_events_an_agent_processes(event, node, services, expected):
    assert events.processes(event, node, services) is expected


def test_id_to_index_is_consuls():
    # The first 64 bits of the UUID XOR the last 64 (Consul's uuidToUint64).
    assert events.id_to_index("00000000-0000-0001-0000-000000000003") == 2
    assert events.id_to_index("ffffffff-ffff-ffff-0000-000000000000") == (1 << 64) - 1
    assert events.id_to_index("not-a-uuid") == 0
    assert events.list_index([]) == 1
