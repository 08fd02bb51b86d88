"""RaftNode: the pure Raft state machine. tick / step / propose in, a Ready batch out.

Nothing here awaits, sleeps, reads a clock, touches the disk or the network: time arrives as
ticks, randomness from the injected RNG, and everything to persist or send leaves through Ready.
"""

from __future__ import annotations

import enum
import random

from raft.core.config import RaftConfig
from raft.core.errors import ConfChangeInProgress, NotLeader, ProposalDropped
from raft.core.log import RaftLog
from raft.core.messages import (
    AppendEntries,
    AppendEntriesReply,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatReply,
    InstallSnapshot,
    InstallSnapshotReply,
    Message,
    ReadState,
    Ready,
    RequestVote,
    RequestVoteReply,
    Snapshot,
    SnapshotMeta,
    TimeoutNow,
)
from raft.core.progress import Progress, ProgressState
from raft.core.quorum import VoteResult, committed_index, has_quorum, vote_result
from raft.core.storage import LogStorage
from raft.core.types import NO_NODE, LogIndex, NodeId, Term


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


# Leader-to-follower replication traffic depends on nothing the leader has yet to persist (the
# leader's own entries count for commit only once durable), so it may leave before the fsync.
_SEND_BEFORE_PERSIST = (AppendEntries, Heartbeat, InstallSnapshot, TimeoutNow)


class RaftNode:
    def __init__(
        self,
        config: RaftConfig,
        storage: LogStorage,
        rng: random.Random,
        *,
        applied: LogIndex = LogIndex(0),
    ) -> None:
        self.config = config
        self.id = config.node_id
        self._rng = rng
        hard_state, snapshot_conf = storage.initial_state()
        self.log = RaftLog(storage, hard_state.commit, applied)
        self.term = hard_state.term
        self.voted_for = hard_state.voted_for
        self.leader_id = NO_NODE
        self.role = Role.FOLLOWER

        # Membership takes effect when its entry is appended (dissertation §4.1), so it is derived
        # from the log: the snapshot's conf, then every CONF_CHANGE entry after it, in order.
        self._base_conf = snapshot_conf
        self._conf_history: list[tuple[LogIndex, ConfState]] = []
        first, last = storage.first_index(), storage.last_index()
        if last >= first:
            self._track_conf_entries(self.log.entries(first, LogIndex(last + 1)))

        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = 0
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, Progress] = {}
        self._pending_conf_index = LogIndex(0)
        self._lead_transferee = NO_NODE
        self._uncommitted_bytes = 0
        # False: never starts an election nor takes over on TimeoutNow, yet still votes and
        # replicates (the runtime sets it for a replica whose applied state is known corrupt).
        self.may_campaign = True
        self._needs_broadcast = False

        # ReadIndex (§6.4): reads wait for a heartbeat round confirming leadership.
        self._read_seq = 0
        self._read_seq_sent = 0
        self._pending_reads: list[tuple[int, LogIndex, bytes]] = []  # (seq, read index, context)
        self._reads_awaiting_term_commit: list[bytes] = []
        self._ready_reads: list[ReadState] = []

        self._incoming_snapshot: tuple[SnapshotMeta, bytearray] | None = None
        self._messages: list[Message] = []
        self._persisted_hard_state = hard_state
        self._ready_outstanding = False
        self._become_follower(self.term, NO_NODE)

    # ------------------------------------------------------------------ queries
    @property
    def conf(self) -> ConfState:
        return self._conf_history[-1][1] if self._conf_history else self._base_conf

    def conf_at(self, index: LogIndex) -> ConfState:
        """Membership in force at log index `index` (what a snapshot taken there must record)."""
        conf = self._base_conf
        for conf_index, entry_conf in self._conf_history:
            if conf_index > index:
                break
            conf = entry_conf
        return conf

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def commit_index(self) -> LogIndex:
        return self.log.commit_index

    @property
    def last_applied(self) -> LogIndex:
        return self.log.last_applied

    @property
    def lead_transferee(self) -> NodeId:
        return self._lead_transferee

    def progress(self, node_id: NodeId) -> Progress | None:
        return self._progress.get(node_id)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.voted_for, self.log.commit_index)

    def _is_promotable(self) -> bool:
        return (
            self.may_campaign and self.id in self.conf.voters and self.log.pending_snapshot is None
        )

    # ------------------------------------------------------------------ inputs
    def tick(self) -> None:
        self._check_no_ready_outstanding()
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._election_elapsed >= self._randomized_election_timeout and self._is_promotable():
            self._election_elapsed = 0
            self._campaign(transfer=False)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.config.election_timeout_ticks:
            self._election_elapsed = 0
            if self.config.check_quorum and not self._check_quorum_active():
                self._become_follower(self.term, NO_NODE)  # §6.2: lost contact with a majority
                return
            self._lead_transferee = (
                NO_NODE  # a transfer not done in an election timeout is abandoned
            )
        if self._heartbeat_elapsed >= self.config.heartbeat_interval_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def propose(self, data: bytes) -> tuple[Term, LogIndex]:
        """Append a command. Returns its (term, index): it is applied iff an entry with this term
        is applied at this index. Raises NotLeader or ProposalDropped."""
        self._check_no_ready_outstanding()
        self._check_can_propose(len(data))
        return self._append_as_leader(data, EntryKind.NORMAL)

    def propose_conf_change(self, change: ConfChange) -> tuple[Term, LogIndex]:
        """One single-server membership change at a time (dissertation §4.1)."""
        self._check_no_ready_outstanding()
        self._check_can_propose(0)
        # The leader must have committed an entry of its own term (its no-op) and the previous
        # change before another (the known fix to single-server changes, Ongaro 2015).
        if self._pending_conf_index > self.log.last_applied:
            raise ConfChangeInProgress(
                f"membership change at index {self._pending_conf_index} not yet applied"
            )
        new_conf = change.applied_to(self.conf)
        if not new_conf.voters:
            raise ValueError("a membership change may not remove the last voter")
        if new_conf == self.conf:
            raise ValueError(f"{change} changes nothing in {self.conf}")
        if change.node_id == self.id and change.change_type is not ConfChangeType.ADD_VOTER:
            # A leader demoting or removing itself would be left leading without a vote; the
            # caller should transfer leadership first.
            raise ValueError("transfer leadership away before removing or demoting the leader")
        term, index = self._append_as_leader(change.encode(), EntryKind.CONF_CHANGE)
        self._pending_conf_index = index
        return term, index

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point; a ReadState(index, context) comes out of a later
        Ready once leadership is confirmed by a quorum. Leader only."""
        self._check_no_ready_outstanding()
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if not self._has_committed_in_term():
            # §6.4: the read index must be at least an entry of this term; wait for the no-op.
            self._reads_awaiting_term_commit.append(context)
            return
        self._start_read(context)

    def transfer_leader(self, target: NodeId) -> None:
        self._check_no_ready_outstanding()
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if target == self.id or target == self._lead_transferee:
            return
        if target not in self.conf.voters:
            raise ValueError(f"node {target} is not a voter of this group")
        self._lead_transferee = target
        self._election_elapsed = 0
        progress = self._progress[target]
        if progress.match_index == self.log.last_index():
            self._send(TimeoutNow(sender=self.id, recipient=target, term=self.term))
        else:
            self._maybe_send_append(target, send_if_empty=True)

    def step(self, message: Message) -> None:
        self._check_no_ready_outstanding()
        if message.recipient != self.id:
            raise ValueError(f"message for node {message.recipient} stepped into node {self.id}")
        if message.term > self.term:
            if not self._accept_higher_term(message):
                return
        elif message.term < self.term:
            self._answer_stale_term(message)
            return
        self._step_any_role(message)

    # ------------------------------------------------------------------ step helpers
    def _accept_higher_term(self, message: Message) -> bool:
        """Shared rule for a message from a higher term. Returns False if it must be ignored."""
        if isinstance(message, RequestVote):
            in_lease = (
                self.config.check_quorum
                and self.leader_id != NO_NODE
                and self._election_elapsed < self.config.election_timeout_ticks
            )
            if in_lease and not message.leadership_transfer:
                # §4.2.3: a node that hears from a leader ignores vote requests, so a removed or
                # partitioned node cannot depose a working leader.
                return False
            if message.pre_vote:
                return True  # a pre-vote never changes our term
        if isinstance(message, RequestVoteReply) and message.pre_vote and message.granted:
            return True  # granted pre-votes carry the future term we have not adopted yet
        if isinstance(message, (AppendEntries, Heartbeat, InstallSnapshot)):
            self._become_follower(message.term, message.sender)
        else:
            self._become_follower(message.term, NO_NODE)
        return True

    def _answer_stale_term(self, message: Message) -> None:
        """A message from a lower term: tell stale leaders and candidates about our term."""
        if isinstance(message, AppendEntries):
            self._send(
                AppendEntriesReply(
                    sender=self.id,
                    recipient=message.sender,
                    term=self.term,
                    success=False,
                    match_index=message.prev_log_index,
                )
            )
        elif isinstance(message, Heartbeat):
            self._send(HeartbeatReply(sender=self.id, recipient=message.sender, term=self.term))
        elif isinstance(message, RequestVote):
            self._send(
                RequestVoteReply(
                    sender=self.id,
                    recipient=message.sender,
                    term=self.term,
                    granted=False,
                    pre_vote=message.pre_vote,
                )
            )

    def _step_any_role(self, message: Message) -> None:
        if isinstance(message, RequestVote):
            self._handle_request_vote(message)
        elif self.role is Role.LEADER:
            self._step_leader(message)
        elif self.role is Role.FOLLOWER:
            self._step_follower(message)
        else:
            self._step_candidate(message)

    def _step_follower(self, message: Message) -> None:
        match message:
            case AppendEntries() | Heartbeat() | InstallSnapshot():
                self._election_elapsed = 0
                self.leader_id = message.sender
                self._handle_from_leader(message)
            case TimeoutNow():
                if self._is_promotable():
                    self._campaign(transfer=True)
            case _:
                pass  # replies to a role we no longer hold

    def _step_candidate(self, message: Message) -> None:
        match message:
            case AppendEntries() | Heartbeat() | InstallSnapshot():
                # §5.2: a leader exists in our term (a pre-candidate has not bumped its term).
                self._become_follower(message.term, message.sender)
                self._handle_from_leader(message)
            case RequestVoteReply():
                if message.pre_vote != (self.role is Role.PRE_CANDIDATE):
                    return
                self._votes[message.sender] = message.granted
                result = vote_result(self.conf.voters, self._votes)
                if result is VoteResult.WON:
                    if self.role is Role.PRE_CANDIDATE:
                        self._campaign(transfer=False, pre_vote_won=True)
                    else:
                        self._become_leader()
                elif result is VoteResult.LOST:
                    self._become_follower(self.term, NO_NODE)
            case _:
                pass

    def _step_leader(self, message: Message) -> None:
        progress = self._progress.get(message.sender)
        if progress is None:
            return  # not a member (any more)
        progress.recent_active = True
        match message:
            case AppendEntriesReply():
                self._handle_append_reply(message, progress)
            case HeartbeatReply():
                self._handle_heartbeat_reply(message, progress)
            case InstallSnapshotReply():
                self._handle_snapshot_reply(message, progress)
            case _:
                pass

    def _handle_from_leader(self, message: AppendEntries | Heartbeat | InstallSnapshot) -> None:
        if isinstance(message, AppendEntries):
            self._handle_append_entries(message)
        elif isinstance(message, Heartbeat):
            self.log.commit_to(LogIndex(min(message.commit, self.log.last_index())))
            self._send(
                HeartbeatReply(
                    sender=self.id,
                    recipient=message.sender,
                    term=self.term,
                    read_seq=message.read_seq,
                )
            )
        else:
            self._handle_install_snapshot(message)

    # ------------------------------------------------------------------ elections
    def _campaign(self, *, transfer: bool, pre_vote_won: bool = False) -> None:
        if self.config.pre_vote and not transfer and not pre_vote_won:
            self._become_pre_candidate()
            term = Term(self.term + 1)
        else:
            self._become_candidate()
            term = self.term
        pre_vote = self.role is Role.PRE_CANDIDATE
        self._votes = {self.id: True}
        if vote_result(self.conf.voters, self._votes) is VoteResult.WON:
            if pre_vote:
                self._campaign(transfer=False, pre_vote_won=True)
            else:
                self._become_leader()
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for voter in sorted(self.conf.voters - {self.id}):
            self._send(
                RequestVote(
                    sender=self.id,
                    recipient=voter,
                    term=term,
                    last_log_index=last_index,
                    last_log_term=last_term,
                    pre_vote=pre_vote,
                    leadership_transfer=transfer,
                )
            )

    def _handle_request_vote(self, message: RequestVote) -> None:
        can_vote = (
            self.voted_for == message.sender
            or (self.voted_for == NO_NODE and self.leader_id == NO_NODE)
            or (message.pre_vote and message.term > self.term)
        )
        granted = can_vote and self.log.is_up_to_date(message.last_log_index, message.last_log_term)
        if granted and not message.pre_vote:
            self._election_elapsed = 0
            self.voted_for = message.sender
        self._send(
            RequestVoteReply(
                sender=self.id,
                recipient=message.sender,
                # A granted pre-vote answers in the term asked about; otherwise ours.
                term=message.term if granted and message.pre_vote else self.term,
                granted=granted,
                pre_vote=message.pre_vote,
            )
        )

    def _reset_timers(self, term: Term) -> None:
        if self.term != term:
            self.term = term
            self.voted_for = NO_NODE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        timeout = self.config.election_timeout_ticks
        self._randomized_election_timeout = timeout + self._rng.randrange(timeout)
        self._votes = {}
        self._lead_transferee = NO_NODE
        self._progress = {}
        self._pending_reads = []
        self._reads_awaiting_term_commit = []
        self._needs_broadcast = False

    def _become_follower(self, term: Term, leader_id: NodeId) -> None:
        self._reset_timers(term)
        self.role = Role.FOLLOWER
        self.leader_id = leader_id

    def _become_pre_candidate(self) -> None:
        # Neither term nor vote changes: a pre-vote round is harmless if it fails (§9.6).
        self._votes = {}
        self.role = Role.PRE_CANDIDATE
        self.leader_id = NO_NODE

    def _become_candidate(self) -> None:
        self._reset_timers(Term(self.term + 1))
        self.voted_for = self.id
        self.role = Role.CANDIDATE
        self.leader_id = NO_NODE

    def _become_leader(self) -> None:
        if self.role is not Role.CANDIDATE:
            raise AssertionError(f"node {self.id} became leader from {self.role}")
        self._reset_timers(self.term)
        self.role = Role.LEADER
        self.leader_id = self.id
        self._uncommitted_bytes = 0
        last = self.log.last_index()
        for member in self.conf.members:
            self._progress[member] = self._new_progress(last)
        ours = self._progress[self.id]
        ours.become_replicate()
        ours.maybe_update(self._persisted_last_index())
        # §8: a no-op of the new term lets the leader commit (and learn) everything before it.
        # Membership changes wait until it applies, so any change left uncommitted in the log
        # by an earlier leader is settled first.
        _, self._pending_conf_index = self._append_as_leader(b"", EntryKind.NORMAL)

    def _new_progress(self, last_index: LogIndex) -> Progress:
        progress = Progress(LogIndex(last_index + 1), self.config.max_inflight_messages)
        progress.recent_active = True  # a fresh member gets a full CheckQuorum round
        return progress

    def _check_quorum_active(self) -> bool:
        active = {node for node, pr in self._progress.items() if pr.recent_active}
        active.add(self.id)
        for node, progress in self._progress.items():
            progress.recent_active = node == self.id
        return has_quorum(self.conf.voters, active)

    # ------------------------------------------------------------------ replication (leader)
    def _check_can_propose(self, size: int) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if self._lead_transferee != NO_NODE:
            raise ProposalDropped(f"leadership is moving to node {self._lead_transferee}")
        if self._uncommitted_bytes and self._uncommitted_bytes + size > (
            self.config.max_uncommitted_bytes
        ):
            raise ProposalDropped("too many uncommitted bytes; retry when the group catches up")

    def _append_as_leader(self, data: bytes, kind: EntryKind) -> tuple[Term, LogIndex]:
        entry = Entry(self.term, LogIndex(self.log.last_index() + 1), data, kind)
        self._append_entries([entry])
        self._uncommitted_bytes += len(data)
        self._needs_broadcast = True
        return entry.term, entry.index

    def _append_entries(self, entries: list[Entry]) -> None:
        """Every append goes through here, so membership follows the log."""
        if not entries:
            return
        first = entries[0].index
        truncated = first <= self.log.last_index()
        self.log.append(entries)
        if truncated and self._conf_history and self._conf_history[-1][0] >= first:
            self._conf_history = [(i, c) for i, c in self._conf_history if i < first]
            self._on_conf_changed()
        if self._track_conf_entries(entries):
            self._on_conf_changed()

    def _track_conf_entries(self, entries: list[Entry]) -> bool:
        changed = False
        for entry in entries:
            if entry.kind is EntryKind.CONF_CHANGE:
                conf = ConfChange.decode(entry.data).applied_to(self.conf)
                self._conf_history.append((entry.index, conf))
                changed = True
        return changed

    def _on_conf_changed(self) -> None:
        if self.role is not Role.LEADER:
            if self.role is not Role.FOLLOWER and self.id not in self.conf.voters:
                self._become_follower(self.term, NO_NODE)
            return
        members = self.conf.members
        for node in list(self._progress):
            if node not in members:
                del self._progress[node]
        for node in members:
            if node not in self._progress:
                self._progress[node] = self._new_progress(self.log.last_index())
        if self._lead_transferee not in self.conf.voters:
            self._lead_transferee = NO_NODE
        self._maybe_commit()

    def _persisted_last_index(self) -> LogIndex:
        return LogIndex(min(self.log.last_index(), self.log.unstable_offset - 1))

    def _maybe_commit(self) -> bool:
        """§5.3/§5.4.2: commit the largest index a majority holds, only if it is of our term."""
        voters = self.conf.voters
        match = {node: pr.match_index for node, pr in self._progress.items()}
        index = committed_index(voters, match)
        if index <= self.log.commit_index or self.log.term(index) != self.term:
            return False
        previous = self.log.commit_index
        self.log.commit_to(index)
        self._needs_broadcast = True
        self._on_commit_advanced(previous)
        return True

    def _on_commit_advanced(self, previous: LogIndex) -> None:
        if self._uncommitted_bytes:
            for entry in self.log.entries(
                LogIndex(previous + 1), LogIndex(self.log.commit_index + 1)
            ):
                self._uncommitted_bytes = max(0, self._uncommitted_bytes - len(entry.data))
        if self._reads_awaiting_term_commit and self._has_committed_in_term():
            waiting, self._reads_awaiting_term_commit = self._reads_awaiting_term_commit, []
            for context in waiting:
                self._start_read(context)

    def _has_committed_in_term(self) -> bool:
        return self.log.term(self.log.commit_index) == self.term

    def _broadcast_append(self) -> None:
        for node in self._progress:
            if node != self.id:
                self._maybe_send_append(node, send_if_empty=True)

    def _broadcast_heartbeat(self) -> None:
        self._read_seq_sent = self._read_seq
        for node, progress in self._progress.items():
            if node == self.id:
                continue
            self._send(
                Heartbeat(
                    sender=self.id,
                    recipient=node,
                    term=self.term,
                    commit=LogIndex(min(progress.match_index, self.log.commit_index)),
                    read_seq=self._read_seq,
                )
            )

    def _maybe_send_append(self, node: NodeId, *, send_if_empty: bool) -> bool:
        """Send the next AppendEntries (or snapshot chunk) to node if flow control allows."""
        progress = self._progress[node]
        if progress.is_paused():
            return False
        prev_index = LogIndex(progress.next_index - 1)
        prev_term = self.log.term(prev_index)
        if prev_term is None or prev_index < self.log.first_index() - 1:
            return self._start_snapshot(node, progress)
        entries = self.log.entries(
            progress.next_index,
            LogIndex(self.log.last_index() + 1),
            self.config.max_bytes_per_message,
        )
        if not entries and not send_if_empty:
            return False
        self._send(
            AppendEntries(
                sender=self.id,
                recipient=node,
                term=self.term,
                prev_log_index=prev_index,
                prev_log_term=prev_term,
                entries=tuple(entries),
                leader_commit=self.log.commit_index,
            )
        )
        progress.sent_entries(entries[-1].index if entries else prev_index)
        return True

    def _handle_append_reply(self, message: AppendEntriesReply, progress: Progress) -> None:
        node = message.sender
        if not message.success:
            next_probe = self.log.find_conflict_by_term(
                message.conflict_index, message.conflict_term
            )
            if progress.maybe_decrease_to(message.match_index, next_probe):
                if progress.state is ProgressState.REPLICATE:
                    progress.become_probe()
                self._maybe_send_append(node, send_if_empty=True)
            return
        was_paused = progress.is_paused()
        # A probe acknowledged at the match we already know (e.g. right after a snapshot) also
        # ends probing; without this the follower waits for the next heartbeat.
        probe_confirmed = (
            progress.state is ProgressState.PROBE and progress.match_index == message.match_index
        )
        if not progress.maybe_update(message.match_index) and not probe_confirmed:
            return
        if progress.state is ProgressState.PROBE:
            progress.become_replicate()
        elif (
            progress.state is ProgressState.SNAPSHOT
            and progress.match_index >= progress.snapshot_index
        ):
            progress.become_probe()
            progress.become_replicate()
        if self._maybe_commit():
            self._broadcast_append()
        elif was_paused:
            self._maybe_send_append(node, send_if_empty=True)
        while self._maybe_send_append(node, send_if_empty=False):
            pass  # pipelining: fill the in-flight window
        if node == self._lead_transferee and progress.match_index == self.log.last_index():
            self._send(TimeoutNow(sender=self.id, recipient=node, term=self.term))

    def _handle_heartbeat_reply(self, message: HeartbeatReply, progress: Progress) -> None:
        progress.probe_sent = False
        if progress.state is ProgressState.REPLICATE and progress.is_paused():
            progress.free_one_inflight()
        if progress.state is ProgressState.SNAPSHOT:
            self._send_snapshot_chunk(message.sender, progress)  # resend a possibly lost chunk
        elif progress.match_index < self.log.last_index():
            self._maybe_send_append(message.sender, send_if_empty=True)
        if message.read_seq > progress.read_seq_acked:
            progress.read_seq_acked = message.read_seq
            self._release_confirmed_reads()

    # ------------------------------------------------------------------ snapshots
    def _start_snapshot(self, node: NodeId, progress: Progress) -> bool:
        snapshot = self.log.snapshot()
        progress.become_snapshot(snapshot.meta.index)
        self._send_snapshot_chunk(node, progress)
        return True

    def _send_snapshot_chunk(self, node: NodeId, progress: Progress) -> None:
        snapshot = self.log.snapshot()
        if snapshot.meta.index != progress.snapshot_index:
            # A newer snapshot replaced the one being sent: start over with it.
            progress.become_snapshot(snapshot.meta.index)
        offset = progress.snapshot_offset
        chunk = snapshot.data[offset : offset + self.config.snapshot_chunk_bytes]
        self._send(
            InstallSnapshot(
                sender=self.id,
                recipient=node,
                term=self.term,
                meta=snapshot.meta,
                offset=offset,
                data=chunk,
                done=offset + len(chunk) >= len(snapshot.data),
            )
        )

    def _handle_snapshot_reply(self, message: InstallSnapshotReply, progress: Progress) -> None:
        if (
            progress.state is not ProgressState.SNAPSHOT
            or message.snapshot_index != progress.snapshot_index
        ):
            return
        if message.done:
            progress.maybe_update(message.snapshot_index)
            progress.become_probe()
            self._maybe_send_append(message.sender, send_if_empty=True)
            return
        new_offset = max(message.next_offset, 0)
        if message.next_offset < 0 or new_offset > progress.snapshot_offset:
            progress.snapshot_offset = new_offset
            self._send_snapshot_chunk(message.sender, progress)

    def _handle_install_snapshot(self, message: InstallSnapshot) -> None:
        meta = message.meta
        incoming = self._incoming_snapshot
        if message.offset == 0:
            incoming = (meta, bytearray())
        if incoming is None or incoming[0] != meta or len(incoming[1]) < message.offset:
            self._reply_snapshot(message, next_offset=-1, done=False)  # lost our place: restart
            self._incoming_snapshot = None
            return
        buffer = incoming[1]
        if len(buffer) == message.offset:
            buffer.extend(message.data)
        self._incoming_snapshot = incoming
        if not message.done or len(buffer) != message.offset + len(message.data):
            self._reply_snapshot(message, next_offset=len(buffer), done=False)
            return
        self._incoming_snapshot = None
        self._restore(Snapshot(meta, bytes(buffer)))
        self._reply_snapshot(message, next_offset=len(buffer), done=True)

    def _reply_snapshot(self, message: InstallSnapshot, *, next_offset: int, done: bool) -> None:
        self._send(
            InstallSnapshotReply(
                sender=self.id,
                recipient=message.sender,
                term=self.term,
                snapshot_index=message.meta.index,
                next_offset=next_offset,
                done=done,
            )
        )

    def _restore(self, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        if meta.index <= self.log.commit_index:
            return  # we already hold (and have committed) everything it covers
        if self.log.match_term(meta.index, meta.term):
            self.log.commit_to(meta.index)  # our log already has it: just fast-forward
            return
        self.log.restore(snapshot)
        self._base_conf = meta.conf
        self._conf_history = []
        self._on_conf_changed()

    # ------------------------------------------------------------------ replication (follower)
    def _handle_append_entries(self, message: AppendEntries) -> None:
        if message.prev_log_index < self.log.commit_index:
            # Already committed here; answer with what we know matches (our commit index).
            self._reply_append(message, success=True, match_index=self.log.commit_index)
            return
        if not self.log.match_term(message.prev_log_index, message.prev_log_term):
            hint_index = LogIndex(min(message.prev_log_index, self.log.last_index()))
            hint_index = self.log.find_conflict_by_term(hint_index, message.prev_log_term)
            hint_term = self.log.term(hint_index) or Term(0)
            self._reply_append(
                message,
                success=False,
                match_index=message.prev_log_index,
                conflict_index=hint_index,
                conflict_term=hint_term,
            )
            return
        position = self.log.find_conflict(message.entries)
        if position < len(message.entries):
            self._append_entries(list(message.entries[position:]))
        last_new = LogIndex(message.prev_log_index + len(message.entries))
        self.log.commit_to(LogIndex(min(message.leader_commit, last_new)))
        self._reply_append(message, success=True, match_index=last_new)

    def _reply_append(
        self,
        message: AppendEntries,
        *,
        success: bool,
        match_index: LogIndex,
        conflict_index: LogIndex = LogIndex(0),
        conflict_term: Term = Term(0),
    ) -> None:
        self._send(
            AppendEntriesReply(
                sender=self.id,
                recipient=message.sender,
                term=self.term,
                success=success,
                match_index=match_index,
                conflict_index=conflict_index,
                conflict_term=conflict_term,
            )
        )

    # ------------------------------------------------------------------ reads
    def _start_read(self, context: bytes) -> None:
        if len(self.conf.voters) == 1 and self.id in self.conf.voters:
            self._ready_reads.append(ReadState(self.log.commit_index, context))
            return
        self._read_seq += 1
        self._pending_reads.append((self._read_seq, self.log.commit_index, context))

    def _release_confirmed_reads(self) -> None:
        acked = {node: pr.read_seq_acked for node, pr in self._progress.items()}
        acked[self.id] = self._read_seq
        confirmed = committed_index(self.conf.voters, acked)
        while self._pending_reads and self._pending_reads[0][0] <= confirmed:
            _, index, context = self._pending_reads.pop(0)
            self._ready_reads.append(ReadState(index, context))

    # ------------------------------------------------------------------ output
    def _send(self, message: Message) -> None:
        self._messages.append(message)

    def has_ready(self) -> bool:
        return bool(
            self._messages
            or self._ready_reads
            or self._needs_broadcast
            or (self._pending_reads and self._read_seq_sent < self._read_seq)
            or self.log.unstable_entries
            or self.log.pending_snapshot is not None
            or self.hard_state() != self._persisted_hard_state
            or self._apply_range()[0] < self._apply_range()[1]
        )

    def _apply_range(self) -> tuple[LogIndex, LogIndex]:
        """[low, high) of committed entries that the application should apply now."""
        low = self.log.last_applied + 1
        if self.log.pending_snapshot is not None:
            low = max(low, self.log.pending_snapshot.meta.index + 1)
        return LogIndex(low), LogIndex(self.log.commit_index + 1)

    def ready(self) -> Ready:
        """Everything to persist, send and apply now. Call advance(ready) after handling it."""
        self._check_no_ready_outstanding()
        if self.role is Role.LEADER:
            if self._needs_broadcast:
                self._broadcast_append()
            if self._pending_reads and self._read_seq_sent < self._read_seq:
                self._broadcast_heartbeat()  # one round confirms every read queued since
        self._needs_broadcast = False
        hard_state = self.hard_state()
        low, high = self._apply_range()
        messages = self._messages
        self._messages = []
        ready = Ready(
            hard_state=hard_state if hard_state != self._persisted_hard_state else None,
            entries_to_persist=tuple(self.log.unstable_entries),
            snapshot=self.log.pending_snapshot,
            messages=tuple(m for m in messages if isinstance(m, _SEND_BEFORE_PERSIST)),
            messages_after_persist=tuple(
                m for m in messages if not isinstance(m, _SEND_BEFORE_PERSIST)
            ),
            entries_to_apply=tuple(self.log.entries(low, high)) if low < high else (),
            read_states=tuple(self._ready_reads),
        )
        self._ready_reads = []
        self._ready_outstanding = True
        return ready

    def advance(self, ready: Ready) -> None:
        """The caller persisted, sent and applied everything in `ready`."""
        if not self._ready_outstanding:
            raise AssertionError("advance() without a ready() to acknowledge")
        self._ready_outstanding = False
        if ready.hard_state is not None:
            self._persisted_hard_state = ready.hard_state
        if ready.snapshot is not None:
            self.log.stable_snapshot_to(ready.snapshot.meta.index)
            if ready.snapshot.meta.index > self.log.last_applied:
                self.log.last_applied = ready.snapshot.meta.index
        if ready.entries_to_persist:
            last = ready.entries_to_persist[-1]
            self.log.stable_to(last.index, last.term)
        if ready.entries_to_apply:
            self.log.applied_to(ready.entries_to_apply[-1].index)
        if self.role is Role.LEADER:
            ours = self._progress.get(self.id)
            if ours is not None and ours.maybe_update(self._persisted_last_index()):
                self._maybe_commit()

    def _check_no_ready_outstanding(self) -> None:
        if self._ready_outstanding:
            raise AssertionError("call advance(ready) before giving the node new input")
