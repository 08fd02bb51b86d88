"""A Raft host whose storage fails stops its loop and says so, instead of limping on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from raft.core.messages import ConfState
from raft.core.types import NodeId
from raft.demo import LogStateMachine
from raft.runtime.host import HostConfig, RaftHost
from raft.storage.lmdb_log import LmdbLogStore, StorageFullError


class NullTransport:
    def send(self, group_id, messages):
        pass

    def flush(self):
        pass


async def test_a_storage_failure_stops_the_loop_and_fails_waiting_proposals(tmp_path: Path):
    store = LmdbLogStore(tmp_path, sync=False)
    host = RaftHost(HostConfig(node_id=NodeId(1), tick_interval_s=0.01), store, seed=1)
    host.add_group(1, LogStateMachine(store), bootstrap=ConfState(voters=frozenset({NodeId(1)})))
    await host.start(NullTransport())
    for _ in range(500):
        if host.is_leader(1):
            break
        await asyncio.sleep(0.01)
    assert host.is_leader(1)
    assert await asyncio.wait_for(host.propose(1, b"fine"), timeout=5)

    def full(*args, **kwargs):
        raise StorageFullError(str(tmp_path), "the disk is full (test)")

    store.write = full  # type: ignore[method-assign]
    proposal = host.propose(1, b"doomed")
    error = await asyncio.wait_for(host.wait_failed(), timeout=5)
    assert isinstance(error, StorageFullError)
    with pytest.raises(Exception, match="raft host stopped"):
        await asyncio.wait_for(proposal, timeout=5)
    await host.stop()
    store.close()
