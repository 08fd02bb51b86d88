"""Outcomes of Raft operations the caller can act on.

RaftError
├── NotLeader(leader_hint)   retry at the hinted node (NO_NODE: unknown, retry later)
├── ProposalDropped          never entered the log or lost its slot: never applied, safe to retry
├── ConfChangeInProgress     one membership change at a time; retry once the pending one applies
└── Compacted                the requested log position was discarded behind a snapshot
"""

from __future__ import annotations

from raft.core.types import NO_NODE, NodeId


class RaftError(Exception):
    pass


class NotLeader(RaftError):
    def __init__(self, leader_hint: NodeId = NO_NODE) -> None:
        super().__init__(f"not the leader; leader hint: {leader_hint or 'unknown'}")
        self.leader_hint = leader_hint


class ProposalDropped(RaftError):
    pass


class ConfChangeInProgress(RaftError):
    pass


class Compacted(RaftError):
    pass
