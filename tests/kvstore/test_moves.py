"""MoveExecutor's leadership hand-offs: asked again while they do not happen, but after a
doubling wait, since a transfer in progress refuses the group's proposals."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from kvstore.balancer import founding_shard_map
from kvstore.map_changes import SetPreferredLeader, apply_change
from kvstore.moves import FREE_HAND_OFF_RETRIES, MAX_HAND_OFF_WAIT_S, TRANSFER_RETRY_S, MoveExecutor
from kvstore.service import RequestContext
from kvstore.sharding import NodeInfo, ShardMap
from raft.core.types import LogIndex, NodeId, Term
from raft.runtime.host import GroupStatus


@dataclass
class RefusedHandOffsHost:
    """Node 1 leads shard 1, whose preferred leader is another replica that never takes over
    (as a quarantined one would not)."""

    shard_map: ShardMap
    leads: bool = True
    transfers: list[tuple[int, NodeId]] = field(default_factory=list)

    def group_ids(self) -> list[int]:
        return [1]

    def has_group(self, group_id: int) -> bool:
        return group_id == 1

    def is_leader(self, group_id: int) -> bool:
        return self.leads

    def replica_id(self, group_id: int) -> NodeId:
        return NodeId(1)

    def status(self, group_id: int) -> GroupStatus:
        replicas = self.shard_map.shard(group_id).replicas
        return GroupStatus(
            group_id=group_id,
            role="leader",
            term=Term(1),
            leader_id=NodeId(1),
            commit_index=LogIndex(5),
            applied_index=LogIndex(5),
            last_index=LogIndex(5),
            voters=tuple(sorted(replicas)),
            learners=(),
        )

    def is_caught_up(self, group_id: int, member: NodeId) -> bool:
        return True

    def request_leader_transfer(self, group_id: int, target: NodeId) -> None:
        self.transfers.append((group_id, target))


class NoProposals:
    async def propose(self, shard_id: int, command: bytes, ctx: RequestContext) -> Any:
        raise AssertionError("a hand-off proposes nothing")


def led_by_node_1_preferring_another() -> ShardMap:
    nodes = [NodeInfo(NodeId(i), f"http://n{i}", ("127.0.0.1", 7000 + i)) for i in (1, 2, 3)]
    return apply_change(founding_shard_map(nodes, 1, 3), SetPreferredLeader(1, NodeId(2)))


async def test_a_hand_off_that_never_happens_is_asked_again_ever_less_often():
    shard_map = led_by_node_1_preferring_another()
    host = RefusedHandOffsHost(shard_map)
    now = [0.0]
    executor = MoveExecutor(host, NoProposals(), clock=lambda: now[0])  # type: ignore[arg-type]
    asked_at = []
    for _ in range(4000):  # 4000 rounds of 0.5 s: over half an hour
        before = len(host.transfers)
        await executor.run_once(shard_map)
        if len(host.transfers) > before:
            asked_at.append(now[0])
        now[0] += 0.5
    gaps = [later - earlier for earlier, later in itertools.pairwise(asked_at)]
    assert gaps[: FREE_HAND_OFF_RETRIES - 1] == [TRANSFER_RETRY_S] * (FREE_HAND_OFF_RETRIES - 1)
    assert all(later >= earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] == MAX_HAND_OFF_WAIT_S
    assert len(asked_at) < 20  # against 600 at a fixed 3 s


async def test_a_new_leadership_starts_with_a_prompt_hand_off():
    shard_map = led_by_node_1_preferring_another()
    host = RefusedHandOffsHost(shard_map)
    now = [0.0]
    executor = MoveExecutor(host, NoProposals(), clock=lambda: now[0])  # type: ignore[arg-type]
    for _ in range(200):
        await executor.run_once(shard_map)
        now[0] += 0.5
    host.leads = False  # it handed over at last ...
    await executor.run_once(shard_map)
    host.leads = True  # ... and leads again later
    host.transfers.clear()
    await executor.run_once(shard_map)
    assert len(host.transfers) == 1
