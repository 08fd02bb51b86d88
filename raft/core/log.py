"""RaftLog = the durable prefix in LogStorage + the tail (and maybe a snapshot) not yet persisted.

Pure bookkeeping: the node decides what to append; the runtime persists what `unstable_entries`
holds and reports back through `stable_to`.
"""

from __future__ import annotations

from raft.core.errors import Compacted
from raft.core.messages import Entry, Snapshot
from raft.core.storage import LogStorage, limit_size
from raft.core.types import LogIndex, Term


class RaftLog:
    # Invariant: last_applied <= commit_index <= last_index()
    # Invariant: unstable entries are contiguous from unstable_offset; entries of storage at or
    # beyond unstable_offset are stale (about to be overwritten) and never read.

    def __init__(self, storage: LogStorage, commit_index: LogIndex, last_applied: LogIndex) -> None:
        self.storage = storage
        self.unstable_entries: list[Entry] = []
        self.unstable_offset = LogIndex(storage.last_index() + 1)
        self.pending_snapshot: Snapshot | None = None  # received, not yet persisted
        snapshot_index = storage.first_index() - 1
        self.commit_index = LogIndex(max(commit_index, snapshot_index))
        self.last_applied = LogIndex(max(last_applied, snapshot_index))
        if self.commit_index > self.last_index():
            raise AssertionError(
                f"commit index {self.commit_index} beyond last index {self.last_index()}"
            )
        self.last_applied = LogIndex(min(self.last_applied, self.commit_index))

    # -- positions --
    def first_index(self) -> LogIndex:
        if self.pending_snapshot is not None:
            return LogIndex(self.pending_snapshot.meta.index + 1)
        return self.storage.first_index()

    def last_index(self) -> LogIndex:
        if self.unstable_entries:
            return self.unstable_entries[-1].index
        if self.pending_snapshot is not None:
            return self.pending_snapshot.meta.index
        return LogIndex(min(self.storage.last_index(), self.unstable_offset - 1))

    def last_term(self) -> Term:
        term = self.term(self.last_index())
        if term is None:
            raise AssertionError("last entry's term is unknown")
        return term

    def term(self, index: LogIndex) -> Term | None:
        """Term of the entry at index; None if compacted or beyond the last index."""
        if index < self.first_index() - 1 or index > self.last_index():
            return None
        if index >= self.unstable_offset:
            return self.unstable_entries[index - self.unstable_offset].term
        if self.pending_snapshot is not None and index == self.pending_snapshot.meta.index:
            return self.pending_snapshot.meta.term
        try:
            return self.storage.term(index)
        except Compacted:
            return None

    def match_term(self, index: LogIndex, term: Term) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: LogIndex, last_term: Term) -> bool:
        """§5.4.1: a candidate's log is at least as up to date as ours."""
        our_term = self.last_term()
        return last_term > our_term or (last_term == our_term and last_index >= self.last_index())

    def entries(self, low: LogIndex, high: LogIndex, max_bytes: int | None = None) -> list[Entry]:
        """Entries [low, high). Raises Compacted if low is behind the first index."""
        if low < self.first_index():
            raise Compacted(f"index {low} is compacted")
        high = LogIndex(min(high, self.last_index() + 1))
        if low >= high:
            return []
        result: list[Entry] = []
        if low < self.unstable_offset:
            result = self.storage.entries(low, LogIndex(min(high, self.unstable_offset)), max_bytes)
            if len(result) < min(high, self.unstable_offset) - low:
                return result  # cut by max_bytes
        if high > self.unstable_offset:
            start = max(low, self.unstable_offset) - self.unstable_offset
            result = result + self.unstable_entries[start : high - self.unstable_offset]
        return limit_size(result, max_bytes)

    def find_conflict_by_term(self, index: LogIndex, term: Term) -> LogIndex:
        """The largest index <= `index` whose term is <= `term` (fast backtracking)."""
        while index > 0:
            our_term = self.term(index)
            if our_term is None or our_term <= term:
                break
            index = LogIndex(index - 1)
        return index

    # -- changes --
    def append(self, entries: list[Entry]) -> None:
        """Append entries; the first one may overwrite an existing (uncommitted) suffix."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.commit_index:
            raise AssertionError(
                f"overwriting committed entry {first} (commit {self.commit_index})"
            )
        if first > self.last_index() + 1:
            raise AssertionError(f"gap: appending {first} after {self.last_index()}")
        if first >= self.unstable_offset:
            del self.unstable_entries[first - self.unstable_offset :]
            self.unstable_entries.extend(entries)
        else:
            # Overwrites part of the durable log: the new tail becomes unstable from `first`.
            self.unstable_entries = list(entries)
            self.unstable_offset = first

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Position in entries of the first one not already in our log (len if all present)."""
        for position, entry in enumerate(entries):
            if not self.match_term(entry.index, entry.term):
                return position
        return len(entries)

    def commit_to(self, index: LogIndex) -> bool:
        if index <= self.commit_index:
            return False
        if index > self.last_index():
            raise AssertionError(f"commit {index} beyond last index {self.last_index()}")
        self.commit_index = index
        return True

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self.pending_snapshot = snapshot
        self.unstable_entries = []
        self.unstable_offset = LogIndex(snapshot.meta.index + 1)
        self.commit_index = snapshot.meta.index

    def stable_to(self, index: LogIndex, term: Term) -> None:
        """Entries up to index (with this term) are now durable."""
        if index < self.unstable_offset or not self.unstable_entries:
            return
        if self.term(index) != term or index > self.unstable_entries[-1].index:
            return  # overwritten since it was handed out; the newer entries come in a later Ready
        del self.unstable_entries[: index - self.unstable_offset + 1]
        self.unstable_offset = LogIndex(index + 1)

    def stable_snapshot_to(self, index: LogIndex) -> None:
        if self.pending_snapshot is not None and self.pending_snapshot.meta.index == index:
            self.pending_snapshot = None

    def applied_to(self, index: LogIndex) -> None:
        if index > self.commit_index or index < self.last_applied:
            raise AssertionError(
                f"applied {index} outside ({self.last_applied}, {self.commit_index}]"
            )
        self.last_applied = index

    def snapshot(self) -> Snapshot:
        if self.pending_snapshot is not None:
            return self.pending_snapshot
        return self.storage.snapshot()
