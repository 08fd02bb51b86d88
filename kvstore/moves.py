"""MoveExecutor: on the leader of each group this node leads, takes the group's move one
Raft membership step further, and hands leadership to the map's preferred leader.

Every step is derived from the group's current membership, never from memory, so a step
that was lost (crash, lost leadership, timeout) is simply taken again by whoever leads next:
  joiner absent         -> add it as a learner (the leader streams it a snapshot)
  joiner a learner      -> promote it once it holds every committed entry
  joiner a voter, leaver still a member -> remove the leaver (leader first hands off)
  joiner a voter, leaver gone           -> record the finished move in the shard map
A joiner whose node was declared down before promotion is removed and the move aborted.

A shard being split (docs/architecture.md, "Shard split") is taken on the same way:
  the leader's replica still holds the upper half -> propose SplitShard in the shard's log
  it handed the upper half over                   -> record FinishSplit in the shard map

A hand-off can be refused silently (a quarantined replica never campaigns), and a transfer in
progress refuses the group's proposals for up to an election timeout; so a hand-off to the same
target that keeps not happening is asked again only after a doubling back-off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from kvstore.commands import Failed, SplitApplied, SplitShard, encode_command
from kvstore.errors import KVError
from kvstore.map_changes import AbortMove, FinishMove, FinishSplit, MapChange, encode_change
from kvstore.service import RequestContext
from kvstore.sharding import META_GROUP_ID, Move, ShardMap, Split
from kvstore.state_machine import KVStateMachine
from raft.core.errors import RaftError
from raft.core.messages import ConfChange, ConfChangeType
from raft.core.types import NO_NODE, NodeId, node_of
from raft.runtime.host import RaftHost

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 5.0
TRANSFER_RETRY_S = 3.0  # a hand-off not done by then is tried again (the core gives up)
FREE_HAND_OFF_RETRIES = 3  # a target catching up after a restart is asked at that pace at first
MAX_HAND_OFF_WAIT_S = 240.0  # then the wait doubles, up to this


@dataclass(frozen=True, slots=True)
class _HandOff:
    target: NodeId
    asked_at: float  # monotonic
    failures: int  # earlier asks for this target that did not hand over

    @property
    def wait_s(self) -> float:
        doublings = max(0, self.failures - FREE_HAND_OFF_RETRIES + 1)
        return min(TRANSFER_RETRY_S * (1 << min(doublings, 16)), MAX_HAND_OFF_WAIT_S)


class MetaProposer(Protocol):
    """What the executor needs from the router: propose a shard map change."""

    async def propose(self, shard_id: int, command: bytes, ctx: RequestContext) -> object: ...


async def propose_map_change(router: MetaProposer, change: MapChange) -> bool:
    """Whether the meta group accepted the change (False: refused, or not reachable now)."""
    try:
        await router.propose(META_GROUP_ID, encode_change(change), RequestContext())
    except KVError as error:
        log.info("map change %s not applied: %s", change, error)
        return False
    return True


class MoveExecutor:
    def __init__(
        self,
        host: RaftHost,
        router: MetaProposer,
        clock: Callable[[], float] = time.monotonic,
        *,
        shards: Mapping[int, KVStateMachine] | None = None,  # the local shard state machines
    ) -> None:
        self._host = host
        self._router = router
        self._clock = clock
        self._shards: Mapping[int, KVStateMachine] = shards if shards is not None else {}
        self._hand_offs: dict[int, _HandOff] = {}  # group -> the last hand-off asked, as leader

    async def run_once(self, shard_map: ShardMap) -> None:
        for group_id in self._host.group_ids():
            if not self._host.has_group(group_id) or not self._host.is_leader(group_id):
                self._hand_offs.pop(group_id, None)  # handed over, or never ours
                continue
            move = shard_map.move_of(group_id)
            split = shard_map.split_of(group_id)
            try:
                if move is not None:
                    await self._step(shard_map, move)
                elif split is not None:
                    await self._split_step(split)
                else:
                    await self._tidy(shard_map, group_id)
            except (RaftError, ValueError, KeyError, TimeoutError) as error:
                # Lost leadership, a change already in flight, a group removed meanwhile:
                # the next round looks again.
                log.debug("group %d: move step deferred: %r", group_id, error)

    async def _step(self, shard_map: ShardMap, move: Move) -> None:
        group = move.group
        status = self._host.status(group)
        voters, learners = set(status.voters), set(status.learners)
        joining, leaving = move.joining, move.leaving
        if joining == NO_NODE:  # the meta group shrinks: only remove the leaver
            await self._remove_leaver(group, move, voters | learners)
            return
        if joining not in voters and _is_down(shard_map, joining):
            if joining in learners:
                await self._change(group, ConfChangeType.REMOVE_NODE, joining)
            else:
                await propose_map_change(self._router, AbortMove(move))
            return
        if joining not in voters | learners:
            if leaving not in voters:
                log.warning("group %d: move %s lost its leaver; aborting it", group, move)
                await propose_map_change(self._router, AbortMove(move))
                return
            if group == META_GROUP_ID:
                # The meta map is initialised outside the log: a new member must start from
                # a snapshot, never replay the log from index 1.
                await self._host.compact(group)
            await self._change(group, ConfChangeType.ADD_LEARNER, joining)
        elif joining in learners:
            if self._host.is_caught_up(group, joining):
                await self._change(group, ConfChangeType.ADD_VOTER, joining)
        else:
            await self._remove_leaver(group, move, voters | learners)

    async def _split_step(self, split: Split) -> None:
        machine = self._shards.get(split.shard)
        if machine is None:
            return
        if machine.token_range()[1] > split.split_token:  # the upper half is still here
            command = encode_command(SplitShard(split.child_id, split.split_token))
            outcome = await asyncio.wait_for(
                self._host.propose(split.shard, command), STEP_TIMEOUT_S
            )
            if isinstance(outcome, SplitApplied):
                log.info(
                    "shard %d: handed %d keys to shard %d (kept %d)",
                    *(split.shard, outcome.moved_keys, split.child_id, outcome.kept_keys),
                )
            elif isinstance(outcome, Failed):
                # An earlier SplitShard applied after this leader last looked: fine if the
                # range now ends at the split token, checked below.
                log.info("shard %d: SplitShard refused: %s", split.shard, outcome.message)
            if machine.token_range()[1] > split.split_token:
                return
        if await propose_map_change(self._router, FinishSplit(split)):
            log.info(
                "shard %d: split done; shard %d holds its upper half", split.shard, split.child_id
            )

    async def _remove_leaver(self, group: int, move: Move, members: set[NodeId]) -> None:
        """Once the joiner votes (or there is none): remove the leaver, then record it."""
        if move.leaving in members:
            if move.leaving != self._host.replica_id(group):
                await self._change(group, ConfChangeType.REMOVE_NODE, move.leaving)
            elif move.joining != NO_NODE:
                self._hand_off(group, move.joining)
            else:
                others = sorted(members - {move.leaving})
                caught_up = [r for r in others if self._host.is_caught_up(group, r)]
                if caught_up:
                    self._hand_off(group, caught_up[0])
        elif await propose_map_change(self._router, FinishMove(move)):
            log.info("group %d: move %s finished", group, move)

    async def _tidy(self, shard_map: ShardMap, group: int) -> None:
        status = self._host.status(group)
        members = set(shard_map.group(group).replicas)
        for learner in status.learners:
            if learner not in members:  # left over from an aborted move
                await self._change(group, ConfChangeType.REMOVE_NODE, learner)
                return
        preferred = shard_map.group(group).replicas[0]
        if (
            group != META_GROUP_ID
            and preferred != self._host.replica_id(group)
            and preferred in status.voters
            and not _is_down(shard_map, preferred)
        ):
            self._hand_off(group, preferred)

    def _hand_off(self, group: int, target: NodeId) -> None:
        now = self._clock()
        last = self._hand_offs.get(group)
        failures = 0
        if last is not None and last.target == target:
            if now - last.asked_at < last.wait_s:
                return
            failures = last.failures + 1  # we asked, and still lead: it did not happen
        if self._host.is_caught_up(group, target):
            self._hand_offs[group] = _HandOff(target, now, failures)
            log.info("group %d: handing leadership to replica %d", group, target)
            self._host.request_leader_transfer(group, target)
        else:
            log.debug("group %d: replica %d not caught up for a hand-off", group, target)

    async def _change(self, group: int, change_type: ConfChangeType, replica: NodeId) -> None:
        log.info("group %d: %s replica %d", group, change_type.name, replica)
        future = self._host.propose_conf_change(group, ConfChange(change_type, replica))
        await asyncio.wait_for(future, STEP_TIMEOUT_S)


def _is_down(shard_map: ShardMap, replica: NodeId) -> bool:
    node = node_of(replica)
    return not shard_map.has_node(node) or shard_map.node(node).down
