"""The durable log as the core sees it (read-only), and an in-memory implementation for tests.

The core only reads storage; the runtime writes to it after each Ready (see Ready's docstring).
Positions: entries [first_index, last_index] are readable; the snapshot covers everything up to
first_index - 1, whose term is still answerable by `term()`.
"""

from __future__ import annotations

from typing import Protocol

from raft.core.errors import Compacted
from raft.core.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from raft.core.types import NO_NODE, LogIndex, Term

BOOTSTRAP_TERM = Term(1)


def bootstrap_state(conf: ConfState) -> tuple[HardState, list[Entry]]:
    """How a brand-new group starts: its membership as committed CONF_CHANGE entries of term 1.

    Membership lives in the log (not only in a snapshot header), so a replica that joins later
    with an empty log replays the very same history and derives the same configuration.
    """
    changes = [ConfChange(ConfChangeType.ADD_VOTER, v) for v in sorted(conf.voters)]
    changes += [ConfChange(ConfChangeType.ADD_LEARNER, n) for n in sorted(conf.learners)]
    entries = [
        Entry(BOOTSTRAP_TERM, LogIndex(i), change.encode(), EntryKind.CONF_CHANGE)
        for i, change in enumerate(changes, start=1)
    ]
    return HardState(BOOTSTRAP_TERM, NO_NODE, LogIndex(len(entries))), entries


class LogStorage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]: ...

    def first_index(self) -> LogIndex: ...

    def last_index(self) -> LogIndex: ...

    def term(self, index: LogIndex) -> Term:
        """Term of the entry at `index`; valid from first_index - 1 up to last_index."""
        ...

    def entries(self, low: LogIndex, high: LogIndex, max_bytes: int | None = None) -> list[Entry]:
        """Entries [low, high); at least one entry is returned even if it exceeds max_bytes."""
        ...

    def snapshot(self) -> Snapshot: ...


def limit_size(entries: list[Entry], max_bytes: int | None) -> list[Entry]:
    """The longest prefix within max_bytes, but never empty when entries is not."""
    if max_bytes is None or not entries:
        return entries
    total = 0
    for count, entry in enumerate(entries):
        total += entry.size_bytes
        if total > max_bytes and count > 0:
            return entries[:count]
    return entries


class MemoryStorage:
    """LogStorage kept in memory, plus the write side the runtime (or the simulator) drives."""

    def __init__(self, conf: ConfState | None = None) -> None:
        """`conf`: bootstrap a new group with this membership; None: join an existing one."""
        self._hard_state = HardState()
        self._snapshot = Snapshot()
        # _entries[0] is entry snapshot.index + 1
        self._entries: list[Entry] = []
        if conf is not None and conf.voters:
            self._hard_state, self._entries = bootstrap_state(conf)

    # -- read side (LogStorage) --
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.meta.conf

    def first_index(self) -> LogIndex:
        return LogIndex(self._snapshot.meta.index + 1)

    def last_index(self) -> LogIndex:
        return LogIndex(self._snapshot.meta.index + len(self._entries))

    def term(self, index: LogIndex) -> Term:
        offset = self._snapshot.meta.index
        if index < offset:
            raise Compacted(f"index {index} is compacted (snapshot at {offset})")
        if index == offset:
            return self._snapshot.meta.term
        if index > self.last_index():
            raise IndexError(f"index {index} beyond last index {self.last_index()}")
        return self._entries[index - offset - 1].term

    def entries(self, low: LogIndex, high: LogIndex, max_bytes: int | None = None) -> list[Entry]:
        offset = self._snapshot.meta.index
        if low <= offset:
            raise Compacted(f"index {low} is compacted (snapshot at {offset})")
        if high > self.last_index() + 1:
            raise IndexError(f"entries up to {high - 1} requested, last is {self.last_index()}")
        if low >= high:
            return []
        return limit_size(self._entries[low - offset - 1 : high - offset - 1], max_bytes)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- write side --
    def set_hard_state(self, hard_state: HardState) -> None:
        self._hard_state = hard_state

    def append(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Append, truncating any existing suffix that the first new entry replaces."""
        if not entries:
            return
        offset = self._snapshot.meta.index
        first = entries[0].index
        if first <= offset:
            entries = [e for e in entries if e.index > offset]
            if not entries:
                return
            first = entries[0].index
        if first > self.last_index() + 1:
            raise AssertionError(f"gap in log: appending {first} after {self.last_index()}")
        del self._entries[first - offset - 1 :]
        self._entries.extend(entries)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Install a snapshot received from the leader: it replaces the whole log."""
        if snapshot.meta.index <= self._snapshot.meta.index:
            return
        self._snapshot = snapshot
        self._entries = []

    def create_snapshot(self, index: LogIndex, conf: ConfState, data: bytes) -> None:
        """Record the application's snapshot at `index` (<= last_index) and compact behind it."""
        if index <= self._snapshot.meta.index:
            return
        if index > self.last_index():
            raise AssertionError(f"snapshot at {index} beyond last index {self.last_index()}")
        term = self.term(index)
        offset = self._snapshot.meta.index
        self._entries = self._entries[index - offset :]
        self._snapshot = Snapshot(SnapshotMeta(index, term, conf), data)
