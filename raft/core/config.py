"""Tunables of one Raft node. Time is counted in ticks; the runtime decides how long a tick is."""

from __future__ import annotations

from dataclasses import dataclass

from raft.core.types import NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftConfig:
    node_id: NodeId
    election_timeout_ticks: int = 10  # randomized per term in [this, 2 * this)
    heartbeat_interval_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_inflight_messages: int = 64  # AppendEntries sent but not acknowledged, per follower
    max_bytes_per_message: int = 1 << 20  # soft cap: a single larger entry still goes alone
    max_uncommitted_bytes: int = 64 << 20  # proposals beyond this are dropped (back-pressure)
    snapshot_chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.node_id < 1:
            raise ValueError(f"node_id must be >= 1, got {self.node_id}")
        if self.heartbeat_interval_ticks < 1:
            raise ValueError("heartbeat_interval_ticks must be >= 1")
        if self.election_timeout_ticks <= self.heartbeat_interval_ticks:
            raise ValueError("election_timeout_ticks must exceed heartbeat_interval_ticks")
        if self.max_inflight_messages < 1 or self.max_bytes_per_message < 1:
            raise ValueError("max_inflight_messages and max_bytes_per_message must be >= 1")
        if self.snapshot_chunk_bytes < 1:
            raise ValueError("snapshot_chunk_bytes must be >= 1")
