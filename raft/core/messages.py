"""Values that cross the network or the persistence boundary: frozen, validated on construction.

The wire encoding lives in raft.runtime.codec, not here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from raft.core.types import NO_NODE, LogIndex, NodeId, Term


class EntryKind(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    term: Term
    index: LogIndex
    data: bytes = b""
    kind: EntryKind = EntryKind.NORMAL

    def __post_init__(self) -> None:
        if self.term < 0 or self.index < 1:
            raise ValueError(f"invalid entry position (term={self.term}, index={self.index})")

    @property
    def size_bytes(self) -> int:
        return len(self.data) + 24


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it leaves the node."""

    term: Term = Term(0)
    voted_for: NodeId = NO_NODE
    commit: LogIndex = LogIndex(0)


@dataclass(frozen=True, slots=True)
class ConfState:
    """Cluster membership: voters decide elections and commits; learners only receive the log."""

    voters: frozenset[NodeId] = frozenset()
    learners: frozenset[NodeId] = frozenset()

    def __post_init__(self) -> None:
        if self.voters & self.learners:
            raise ValueError(f"nodes both voter and learner: {sorted(self.voters & self.learners)}")

    @property
    def members(self) -> frozenset[NodeId]:
        return self.voters | self.learners


class ConfChangeType(enum.IntEnum):
    ADD_VOTER = 0  # also promotes an existing learner
    ADD_LEARNER = 1  # also demotes an existing voter
    REMOVE_NODE = 2


_CONF_CHANGE = struct.Struct(">BQ")


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A single-server membership change (dissertation §4.1), carried in a CONF_CHANGE entry."""

    change_type: ConfChangeType
    node_id: NodeId

    def __post_init__(self) -> None:
        if self.node_id < 1:
            raise ValueError(f"node id must be >= 1, got {self.node_id}")

    def encode(self) -> bytes:
        return _CONF_CHANGE.pack(self.change_type, self.node_id)

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        change_type, node_id = _CONF_CHANGE.unpack(data)
        return cls(ConfChangeType(change_type), NodeId(node_id))

    def applied_to(self, conf: ConfState) -> ConfState:
        voters, learners = set(conf.voters), set(conf.learners)
        voters.discard(self.node_id)
        learners.discard(self.node_id)
        if self.change_type is ConfChangeType.ADD_VOTER:
            voters.add(self.node_id)
        elif self.change_type is ConfChangeType.ADD_LEARNER:
            learners.add(self.node_id)
        return ConfState(frozenset(voters), frozenset(learners))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: LogIndex = LogIndex(0)
    term: Term = Term(0)
    conf: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The application's state as of `meta.index`; the log before it may be discarded."""

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""


# --- Messages. Every message has sender, recipient and the sender's term. ---


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestVote:
    sender: NodeId
    recipient: NodeId
    term: Term  # for a pre-vote: the term the candidate would campaign in (not yet adopted)
    last_log_index: LogIndex
    last_log_term: Term
    pre_vote: bool = False
    leadership_transfer: bool = False  # sent after TimeoutNow: bypasses leader stickiness


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestVoteReply:
    sender: NodeId
    recipient: NodeId
    term: Term
    granted: bool
    pre_vote: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEntries:
    sender: NodeId
    recipient: NodeId
    term: Term
    prev_log_index: LogIndex
    prev_log_term: Term
    entries: tuple[Entry, ...]
    leader_commit: LogIndex


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEntriesReply:
    sender: NodeId
    recipient: NodeId
    term: Term
    success: bool
    # On success: the index of the last entry now matching the leader's log.
    # On rejection: the index the leader probed (prev_log_index), so stale rejections are ignored.
    match_index: LogIndex
    # Fast backtracking hint on rejection (§5.3 optimization): the largest index in the follower's
    # log, at or below the probed one, whose term is <= the leader's prev_log_term, and that term.
    # Every entry above conflict_index is known not to match, so the leader skips them in one step.
    conflict_term: Term = Term(0)
    conflict_index: LogIndex = LogIndex(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    sender: NodeId
    recipient: NodeId
    term: Term
    commit: LogIndex  # min(leader commit, follower's match index): never beyond what it holds
    read_seq: int = 0  # ReadIndex round being confirmed; echoed back


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatReply:
    sender: NodeId
    recipient: NodeId
    term: Term
    read_seq: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshot:
    """One chunk of the leader's snapshot; `offset` is the byte position of `data` in the whole."""

    sender: NodeId
    recipient: NodeId
    term: Term
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshotReply:
    sender: NodeId
    recipient: NodeId
    term: Term
    snapshot_index: LogIndex
    # Bytes received so far (the next offset wanted); -1 asks the leader to restart from 0.
    next_offset: int
    done: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutNow:
    """Leadership transfer: the target campaigns at once, skipping pre-vote."""

    sender: NodeId
    recipient: NodeId
    term: Term


Message = (
    RequestVote
    | RequestVoteReply
    | AppendEntries
    | AppendEntriesReply
    | Heartbeat
    | HeartbeatReply
    | InstallSnapshot
    | InstallSnapshotReply
    | TimeoutNow
)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    RequestVote,
    RequestVoteReply,
    AppendEntries,
    AppendEntriesReply,
    Heartbeat,
    HeartbeatReply,
    InstallSnapshot,
    InstallSnapshotReply,
    TimeoutNow,
)


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex request that became safe: serve `context`'s read once applied >= `index`."""

    index: LogIndex
    context: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the caller must do now, in this order, then call `node.advance(ready)`.

    1. send `messages` (safe at once);
    2. persist `snapshot` (if any), `entries_to_persist` and `hard_state` (if not None), with fsync;
    3. send `messages_after_persist` (votes and append acks: they promise what was just persisted);
    4. apply `entries_to_apply` in order; serve `read_states` once applied reaches their index.
    """

    hard_state: HardState | None = None
    entries_to_persist: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    messages: tuple[Message, ...] = ()
    messages_after_persist: tuple[Message, ...] = ()
    entries_to_apply: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()

    def is_empty(self) -> bool:
        return not (
            self.hard_state
            or self.entries_to_persist
            or self.snapshot
            or self.messages
            or self.messages_after_persist
            or self.entries_to_apply
            or self.read_states
        )
