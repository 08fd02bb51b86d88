"""Pure vote and commit arithmetic over a set of voters. No state, no I/O."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

from raft.core.types import LogIndex, NodeId


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


def majority(voter_count: int) -> int:
    return voter_count // 2 + 1


def committed_index(voters: Collection[NodeId], match: Mapping[NodeId, int]) -> LogIndex:
    """The largest index that a majority of voters hold (missing voters count as 0)."""
    if not voters:
        return LogIndex(0)
    indexes = sorted((match.get(voter, 0) for voter in voters), reverse=True)
    return LogIndex(indexes[majority(len(voters)) - 1])


def vote_result(voters: Collection[NodeId], votes: Mapping[NodeId, bool]) -> VoteResult:
    granted = sum(1 for voter in voters if votes.get(voter) is True)
    rejected = sum(1 for voter in voters if votes.get(voter) is False)
    needed = majority(len(voters))
    if granted >= needed:
        return VoteResult.WON
    if len(voters) - rejected < needed:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: Collection[NodeId], active: Collection[NodeId]) -> bool:
    return sum(1 for voter in voters if voter in active) >= majority(len(voters))
