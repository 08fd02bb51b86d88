"""RaftHost.quarantine: a replica the application found corrupt hands leadership away, never
leads again, and still votes (three real hosts on LMDB, wired by an in-memory transport)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from raft.core.messages import ConfState, Message
from raft.core.types import NodeId
from raft.demo import LogStateMachine
from raft.runtime.host import HostConfig, RaftHost
from raft.storage.lmdb_log import LmdbLogStore

GROUP = 1
NODES = (NodeId(1), NodeId(2), NodeId(3))
DEADLINE_S = 20.0


class MemoryTransport:
    """Delivers each flush's messages to the recipients' hosts on the next loop turn; messages
    to a stopped host are lost."""

    def __init__(self, sender: NodeId, hosts: dict[NodeId, RaftHost]) -> None:
        self._sender = sender
        self._hosts = hosts
        self._outbox: list[tuple[int, Message]] = []

    def send(self, group_id: int, messages: object) -> None:
        self._outbox.extend((group_id, message) for message in messages)  # type: ignore[attr-defined]

    def flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        loop = asyncio.get_running_loop()
        for group_id, message in outbox:
            host = self._hosts.get(message.recipient)
            if host is not None:
                loop.call_soon(host.receive, self._sender, [(group_id, message)])


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[dict[NodeId, RaftHost]]:
    running: dict[NodeId, RaftHost] = {}
    stores = []
    for node in NODES:
        store = LmdbLogStore(tmp_path / f"node{node}", sync=False)
        stores.append(store)
        host = RaftHost(HostConfig(node_id=node, tick_interval_s=0.01), store, seed=node)
        host.add_group(GROUP, LogStateMachine(store), bootstrap=ConfState(voters=frozenset(NODES)))
        running[node] = host
    for node, host in running.items():
        await host.start(MemoryTransport(node, running))
    try:
        yield running
    finally:
        for host in list(running.values()):
            await host.stop()
        for store in stores:
            store.close()


async def wait_until(what: str, condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def leader_of(hosts: dict[NodeId, RaftHost]) -> NodeId | None:
    leaders = [node for node, host in hosts.items() if host.is_leader(GROUP)]
    return leaders[0] if len(leaders) == 1 else None


async def test_a_quarantined_leader_hands_over_never_leads_again_and_still_votes(hosts):
    await wait_until("a leader", lambda: leader_of(hosts) is not None)
    corrupt = leader_of(hosts)
    assert corrupt is not None
    hosts[corrupt].quarantine(GROUP)
    assert hosts[corrupt].status(GROUP).is_quarantined
    await wait_until("another leader", lambda: leader_of(hosts) not in (None, corrupt))
    successor = leader_of(hosts)
    assert successor is not None
    assert await asyncio.wait_for(hosts[successor].propose(GROUP, b"after"), DEADLINE_S)

    # Stop the new leader: the third node can only win with the quarantined node's vote, and
    # the quarantined node, though its election timer keeps running, never campaigns.
    stopped = hosts.pop(successor)
    await stopped.stop()
    (third,) = [node for node in NODES if node not in (corrupt, successor)]
    await wait_until("the third node to lead", lambda: hosts[third].is_leader(GROUP))
    for _ in range(30):  # many election timeouts
        assert not hosts[corrupt].is_leader(GROUP)
        await asyncio.sleep(0.02)
