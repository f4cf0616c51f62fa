"""The agent's watch of its node in the catalog (``Agent._watch_loop``) against an injected
fake of ``Servers``: what it asks for after the server went away."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from trellis.proxy.agent import wiring
from trellis.proxy.agent.core import Agent, Options
from trellis.proxy.agent.upstream import Unreachable


class Answer:
    def __init__(self, index: int) -> None:
        self.index = index

    def header(self, name: bytes) -> str | None:
        return str(self.index) if name == b"x-consul-index" else None


class RestartedEmpty:
    """A server at index 5 that goes away and comes back with a new, empty store: its node
    view is at index 3 and a read with a higher index blocks (as Consul's would) for the
    whole wait."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.gone = False
        self.restarted = False

    async def call(self, method: str, target: str, **_: Any) -> tuple[int, Any, Answer]:
        self.reads.append(target)
        index = int(target.split("index=")[1].split("&")[0])
        if not self.restarted:
            if self.gone:
                self.restarted = True
                raise Unreachable("connection refused")
            if index >= 5:
                self.gone = True  # the server stops while the read is parked
                raise Unreachable("connection reset")
            return 200, {}, Answer(5)
        if index >= 3:
            await trio.sleep(60)  # parked for the whole wait
            return 200, {}, Answer(3)
        return 404, None, Answer(3)  # the new store has no such node


def test_after_the_server_went_away_the_watch_reads_without_blocking_and_asks_for_a_sync(
    tmp_path,
):
    agent = Agent(
        Options(servers=["http://127.0.0.1:9"], node="node-a", data_dir=str(tmp_path)),
        make_runner=wiring.make_runner,
        make_supervisor=wiring.make_supervisor,
        out=lambda line: None,
    )
    fake = RestartedEmpty()
    agent.servers = fake  # type: ignore[assignment]
    synced_at: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(agent._watch_loop)
            await trio.sleep(0.01)  # the first read: index 5, then the parked one fails
            agent._sync_wanted = trio.Event()  # what startup asked for does not count
            began = trio.current_time()
            with trio.move_on_after(30):
                await agent._sync_wanted.wait()
                synced_at.append(trio.current_time() - began)
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert fake.restarted
    # The read after the failure did not block on the old index on the new server...
    after = fake.reads[fake.reads.index(next(r for r in fake.reads if "index=5" in r)) + 2 :]
    assert after and "index=0" in after[0], fake.reads
    # ...and the watch asked for a full sync at once, not after a wait or a heartbeat.
    assert synced_at and synced_at[0] < 5, (synced_at, fake.reads)
