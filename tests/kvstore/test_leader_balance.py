"""Leader balancing asks each non-preferred leader to hand its shard to replicas[0], and backs
off from a target that silently refuses (a transfer in progress stalls proposals)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from kvstore.leader_balance import FREE_RETRIES, MAX_BACKOFF_ROUNDS, LeaderBalancer
from kvstore.sharding import TOKEN_SPACE, NodeInfo, ShardMap, ShardSpec
from raft.core.types import NodeId

ME = NodeId(1)


@dataclass
class FakeHost:
    leading: set[int]
    asked: list[tuple[int, NodeId]] = field(default_factory=list)

    def has_group(self, group_id: int) -> bool:
        return True

    def is_leader(self, group_id: int) -> bool:
        return group_id in self.leading

    def request_leader_transfer(self, group_id: int, target: NodeId) -> None:
        self.asked.append((group_id, target))


@dataclass
class FixedMap:
    shard_map: ShardMap | None


def _map(preferred: list[int]) -> ShardMap:
    step = TOKEN_SPACE // len(preferred)
    shards = tuple(
        ShardSpec(
            i + 1,
            i * step,
            TOKEN_SPACE if i == len(preferred) - 1 else (i + 1) * step,
            tuple(NodeId(n) for n in (p, *({1, 2, 3} - {p}))),
        )
        for i, p in enumerate(preferred)
    )
    nodes = tuple(NodeInfo(NodeId(n), f"http://127.0.0.1:{n}", ("127.0.0.1", n)) for n in (1, 2, 3))
    return ShardMap(1, shards, nodes, (NodeId(1), NodeId(2), NodeId(3)))


def test_only_shards_led_here_but_preferred_elsewhere_are_handed_over() -> None:
    host = FakeHost(leading={1, 2, 3})
    balancer = LeaderBalancer(ME, host, FixedMap(_map([1, 2, 3])))
    assert balancer.round() == 2
    assert host.asked == [(2, NodeId(2)), (3, NodeId(3))]


def test_nothing_is_asked_before_the_shard_map_is_known() -> None:
    host = FakeHost(leading={1})
    assert LeaderBalancer(ME, host, FixedMap(None)).round() == 0
    assert host.asked == []


def test_a_refusing_target_is_asked_ever_less_often_and_a_success_resets_it() -> None:
    host = FakeHost(leading={2})
    balancer = LeaderBalancer(ME, host, FixedMap(_map([1, 2])))
    asked_in_rounds = []
    for round_number in range(400):  # the target never takes over
        if balancer.round():
            asked_in_rounds.append(round_number)
    assert asked_in_rounds[: FREE_RETRIES + 1] == list(range(FREE_RETRIES + 1))
    gaps = [b - a for a, b in itertools.pairwise(asked_in_rounds)]
    assert gaps[FREE_RETRIES:] == sorted(gaps[FREE_RETRIES:])  # never more often again
    assert max(gaps) == MAX_BACKOFF_ROUNDS + 1
    assert len(asked_in_rounds) < 15  # versus 400 without the back-off

    host.leading.clear()  # the hand-off finally happened
    balancer.round()
    host.leading.add(2)  # leadership came back later: asked at once again
    host.asked.clear()
    assert balancer.round() == 1
