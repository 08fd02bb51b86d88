"""The leader's view of one follower: how far it matches, what to send next, flow control."""

from __future__ import annotations

import enum
from collections import deque

from raft.core.types import LogIndex


class ProgressState(enum.Enum):
    PROBE = "probe"  # finding the match point: one AppendEntries in flight at a time
    REPLICATE = "replicate"  # pipelining: up to max_inflight AppendEntries in flight
    SNAPSHOT = "snapshot"  # sending a snapshot in chunks; log replication paused


class Progress:
    # Invariant: match_index < next_index
    __slots__ = (
        "_inflight",
        "match_index",
        "max_inflight",
        "next_index",
        "probe_sent",
        "read_seq_acked",
        "recent_active",
        "snapshot_index",
        "snapshot_offset",
        "state",
    )

    def __init__(self, next_index: LogIndex, max_inflight: int) -> None:
        self.match_index = LogIndex(0)
        self.next_index = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.recent_active = False  # heard from since the last CheckQuorum round
        self.read_seq_acked = 0  # highest ReadIndex round this follower confirmed
        self.snapshot_index = LogIndex(0)  # the snapshot being sent, in SNAPSHOT state
        self.snapshot_offset = 0  # next byte of it to send
        self.max_inflight = max_inflight
        self._inflight: deque[LogIndex] = deque()  # last index of each unacknowledged message

    def __repr__(self) -> str:
        return (
            f"Progress({self.state.value}, match={self.match_index}, next={self.next_index}, "
            f"inflight={len(self._inflight)})"
        )

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            self.next_index = LogIndex(max(self.match_index + 1, self.snapshot_index + 1))
        else:
            self.next_index = LogIndex(self.match_index + 1)
        self._reset(ProgressState.PROBE)

    def become_replicate(self) -> None:
        self.next_index = LogIndex(self.match_index + 1)
        self._reset(ProgressState.REPLICATE)

    def become_snapshot(self, snapshot_index: LogIndex) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.snapshot_index = snapshot_index
        self.snapshot_offset = 0

    def _reset(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.snapshot_index = LogIndex(0)
        self.snapshot_offset = 0
        self._inflight.clear()

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self._inflight) >= self.max_inflight
        return True

    def sent_entries(self, last_index: LogIndex) -> None:
        """Record an AppendEntries whose last entry is last_index (prev index if it had none)."""
        if self.state is ProgressState.REPLICATE:
            if last_index >= self.next_index:
                self.next_index = LogIndex(last_index + 1)
                self._inflight.append(last_index)
        else:
            self.probe_sent = True

    def free_one_inflight(self) -> None:
        """The follower answered a heartbeat while our window is full: some appends were probably
        lost. Sending one more reveals the gap (it is rejected) and drops us back to probing."""
        if self._inflight:
            self._inflight.popleft()

    def maybe_update(self, index: LogIndex) -> bool:
        """A follower acknowledged entries up to index. Returns whether match_index grew."""
        updated = index > self.match_index
        if updated:
            self.match_index = index
            self.probe_sent = False
        if index >= self.next_index:
            self.next_index = LogIndex(index + 1)
        while self._inflight and self._inflight[0] <= index:
            self._inflight.popleft()
        return updated

    def maybe_decrease_to(self, rejected: LogIndex, match_hint: LogIndex) -> bool:
        """A follower rejected an append probing `rejected`. Returns False for a stale rejection."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match_index:
                return False
            self.next_index = LogIndex(self.match_index + 1)
            return True
        if self.next_index - 1 != rejected:
            return False
        self.next_index = LogIndex(max(min(rejected, match_hint + 1), self.match_index + 1))
        self.probe_sent = False
        return True
