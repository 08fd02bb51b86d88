"""Deterministic simulation of Raft groups over a faulty network, checking safety at every step.

One `random.Random(seed)` drives everything: ticks, message loss, duplication, delay and
reordering, partitions, crashes (losing all that was not persisted), restarts, membership
changes, snapshots, leadership transfers, proposals and reads. The same seed replays exactly.
"""

from __future__ import annotations

import heapq
import random
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field

from raft.core.config import RaftConfig
from raft.core.errors import ConfChangeInProgress, NotLeader, ProposalDropped
from raft.core.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    Message,
    Ready,
    Snapshot,
)
from raft.core.node import RaftNode
from raft.core.storage import MemoryStorage
from raft.core.types import LogIndex, NodeId, Term


class InvariantViolation(AssertionError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    nodes: int = 5
    groups: int = 2
    fault_ticks: int = 300
    heal_ticks: int = 400  # after faults stop: leaders and commits must come within this
    election_timeout_ticks: int = 10
    drop_rate: float = 0.05
    duplicate_rate: float = 0.03
    max_delay_ticks: int = 3
    fault_rate: float = 0.06  # chance per tick of one nemesis action
    propose_rate: float = 0.5
    read_rate: float = 0.1
    snapshot_chunk_bytes: int = 24  # tiny, so every snapshot travels in several chunks
    # Nemesis actions added to find bugs the original mix could not reach (weight = how many
    # times the action appears in the draw; 0 disables it).
    torn_crash_weight: int = 2  # crash between sending Ready.messages and persisting
    stall_disk_weight: int = 2  # a node stops persisting (and so answering) for a while
    crash_leader_weight: int = 2  # Figure 8: crash a leader, typically with entries in flight
    membership_burst: int = 3  # up to this many membership changes proposed back to back
    stale_client_rate: float = 0.3  # clients talk to a random self-believed leader, not the newest
    pause_weight: int = 2  # a whole node freezes (GC pause, SIGSTOP) and resumes later
    # AppendEntries size cap; 0 draws it per seed, so some seeds replicate one entry per message.
    max_bytes_per_message: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 9:
            raise ValueError("nodes must be between 1 and 9")
        if self.groups < 1:
            raise ValueError("groups must be >= 1")


@dataclass(slots=True)
class SimStateMachine:
    """Applies entries by chaining a checksum: two replicas agree iff their digests agree."""

    applied_index: LogIndex = LogIndex(0)
    digest: int = 0

    _HEADER = struct.Struct(">QI")

    def apply(self, entry: Entry) -> None:
        if entry.index != self.applied_index + 1:
            raise InvariantViolation(f"applied {entry.index} after {self.applied_index}")
        self.applied_index = entry.index
        self.digest = zlib.crc32(entry.data, zlib.crc32(bytes([entry.kind]), self.digest))

    def snapshot_data(self, padding: bytes) -> bytes:
        return self._HEADER.pack(self.applied_index, self.digest) + padding

    @classmethod
    def restore(cls, snapshot: Snapshot) -> SimStateMachine:
        if not snapshot.data:
            return cls(snapshot.meta.index, 0)
        index, digest = cls._HEADER.unpack_from(snapshot.data)
        if index != snapshot.meta.index:
            raise InvariantViolation(f"snapshot data at {index} labelled {snapshot.meta.index}")
        return cls(LogIndex(index), digest)


@dataclass(slots=True)
class Replica:
    node_id: NodeId
    group: int
    storage: MemoryStorage
    raft: RaftNode | None  # None while its node is crashed
    state_machine: SimStateMachine
    last_commit: LogIndex = LogIndex(0)


@dataclass(slots=True)
class SimStats:
    ticks: int = 0
    messages_delivered: int = 0
    elections: int = 0
    proposals_acknowledged: int = 0
    reads_served: int = 0
    faults: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Proposal:
    group: int
    data: bytes
    node_id: NodeId
    term: Term
    index: LogIndex


class Simulation:
    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.rng = random.Random(seed)
        self.stats = SimStats()
        self.now = 0
        node_ids = [NodeId(i) for i in range(1, self.config.nodes + 1)]
        self.node_ids = node_ids
        # With 4+ nodes one starts outside every group, so there is someone to add.
        initial = node_ids[:-1] if len(node_ids) >= 4 else node_ids
        self.crashed: set[NodeId] = set()
        self.stalled: dict[NodeId, int] = {}  # node -> tick until which its disk does nothing
        self.paused: dict[NodeId, int] = {}  # node -> tick until which it does nothing at all
        self.max_bytes_per_message = self.config.max_bytes_per_message or self.rng.choice(
            [1, 60, 200, 1000]
        )
        self._torn_crash_armed: set[NodeId] = set()
        self.blocked_links: set[tuple[NodeId, NodeId]] = set()
        self.replicas: dict[tuple[NodeId, int], Replica] = {}
        for group in range(self.config.groups):
            conf = ConfState(voters=frozenset(initial))
            for node_id in node_ids:
                storage = MemoryStorage(conf if node_id in initial else None)
                replica = Replica(node_id, group, storage, None, SimStateMachine())
                replica.raft = self._new_raft(replica)
                self.replicas[(node_id, group)] = replica
        self._network: list[tuple[int, float, int, Message]] = []  # (due, tiebreak, group, msg)
        self._sequence = 0
        # Ground truth gathered from every replica, checked incrementally.
        self._leaders: dict[tuple[int, Term], NodeId] = {}
        self._entries: dict[tuple[int, LogIndex, Term], tuple[bytes, int, Term]] = {}
        self._applied: dict[tuple[int, LogIndex], tuple[Term, int]] = {}  # term, digest after
        self._max_applied: dict[int, LogIndex] = dict.fromkeys(
            range(self.config.groups), LogIndex(0)
        )
        # Highest (index, term) known committed per group, for the durability check, and in
        # which term each stretch of the log was first seen committed: (up to index, term).
        self._committed: dict[int, tuple[LogIndex, Term]] = {}
        self._commit_terms: dict[int, list[tuple[LogIndex, Term]]] = {
            group: [] for group in range(self.config.groups)
        }
        self._proposals: dict[bytes, _Proposal] = {}
        self._acknowledged: dict[bytes, LogIndex] = {}
        self._reads: dict[bytes, LogIndex] = {}  # context -> minimum acceptable read index
        self._next_payload = 0

    # ------------------------------------------------------------------ running
    def run(self) -> SimStats:
        try:
            self._run()
        except InvariantViolation:
            raise
        except Exception as error:  # a core assertion tripped: report it with seed and tick
            raise self._violation(f"{type(error).__name__} raised: {error}") from error
        return self.stats

    def _run(self) -> None:
        config = self.config
        for _ in range(config.fault_ticks):
            if self.rng.random() < config.fault_rate:
                self._nemesis()
            self._step_tick(faulty=True)
        self._heal()
        self._await_recovery()

    def _step_tick(self, *, faulty: bool) -> None:
        self.now += 1
        self.stats.ticks += 1
        replicas = [
            r for r in self.replicas.values() if r.raft is not None and not self._is_paused(r)
        ]
        self.rng.shuffle(replicas)
        for replica in replicas:
            assert replica.raft is not None
            replica.raft.tick()
            self._after_input(replica)
        if faulty:
            self._client_traffic()
        self._deliver_due()
        # Some replicas keep unpersisted state across the tick: a crash now loses it.
        for replica in self.replicas.values():
            if replica.raft is not None and (not faulty or self.rng.random() < 0.8):
                self._process_ready(replica)
        for group in range(self.config.groups):
            self._check_commit_durable(group)

    def _deliver_due(self) -> None:
        network = self._network
        while network and network[0][0] <= self.now:
            _, _, group, message = heapq.heappop(network)
            if (message.sender, message.recipient) in self.blocked_links:
                continue
            replica = self.replicas[(message.recipient, group)]
            if replica.raft is None:
                continue
            if self._is_paused(replica):  # stays in its socket buffer until it resumes
                heapq.heappush(
                    network, (self.paused[message.recipient], self.rng.random(), group, message)
                )
                continue
            self.stats.messages_delivered += 1
            replica.raft.step(message)
            self._after_input(replica)
            if self.rng.random() < 0.7:
                self._process_ready(replica)

    def _send(self, group: int, messages: tuple[Message, ...]) -> None:
        config = self.config
        rng = self.rng
        for message in messages:
            if (message.sender, message.recipient) in self.blocked_links:
                continue
            copies = 1
            if rng.random() < config.drop_rate:
                copies = 0
            elif rng.random() < config.duplicate_rate:
                copies = 2
            for _ in range(copies):
                self._sequence += 1
                due = self.now + rng.randint(0, config.max_delay_ticks)
                heapq.heappush(self._network, (due, rng.random(), group, message))

    def _process_ready(self, replica: Replica) -> None:
        node = replica.raft
        assert node is not None
        if self.stalled.get(replica.node_id, 0) > self.now or self._is_paused(replica):
            return  # its disk hangs: nothing is persisted, so nothing that follows a Ready happens
        rounds = 0
        while node.has_ready():
            rounds += 1
            if rounds > 100:  # advance() must make progress; a node that never settles is a bug
                raise self._violation(
                    f"node {node.id} group {replica.group} still has a Ready after 100 rounds"
                )
            ready = node.ready()
            self._send(replica.group, ready.messages)
            if (
                replica.node_id in self._torn_crash_armed
                and (ready.entries_to_persist or ready.hard_state is not None or ready.snapshot)
                and self._may_crash()
            ):
                # The process dies while the fsync is in flight: `messages` are out, the rest
                # of this Ready (and of every other group's unpersisted state) is lost.
                self._crash(replica.node_id)
                self.stats.faults["torn_crash_fired"] += 1
                return
            self._persist(replica, ready)
            self._send(replica.group, ready.messages_after_persist)
            for entry in ready.entries_to_apply:
                self._apply(replica, entry)
            for read in ready.read_states:
                self._check_read(replica, read.context, read.index)
            node.advance(ready)
            self._after_input(replica)

    def _persist(self, replica: Replica, ready: Ready) -> None:
        storage = replica.storage
        if ready.snapshot is not None:
            self._check_snapshot(replica, ready.snapshot)
            storage.apply_snapshot(ready.snapshot)
            replica.state_machine = SimStateMachine.restore(ready.snapshot)
        if ready.entries_to_persist:
            storage.append(ready.entries_to_persist)
            self._check_log_matching(replica, ready.entries_to_persist)
        if ready.hard_state is not None:
            storage.set_hard_state(ready.hard_state)

    # ------------------------------------------------------------------ invariants
    def _violation(self, what: str) -> InvariantViolation:
        return InvariantViolation(f"seed {self.seed}, tick {self.now}: {what}")

    def _after_input(self, replica: Replica) -> None:
        node = replica.raft
        assert node is not None
        if node.is_leader:
            key = (replica.group, node.term)
            leader = self._leaders.get(key)
            if leader is None:
                self._leaders[key] = node.id
                self.stats.elections += 1
                self._check_leader_completeness(replica)
            elif leader != node.id:
                raise self._violation(
                    f"election safety: group {replica.group} term {node.term} has leaders "
                    f"{leader} and {node.id}"
                )
        if node.commit_index < replica.last_commit:
            raise self._violation(
                f"commit index of node {node.id} group {replica.group} went back from "
                f"{replica.last_commit} to {node.commit_index}"
            )
        replica.last_commit = node.commit_index
        known = self._committed.get(replica.group)
        if known is None or node.commit_index > known[0]:
            # The first node to see an index committed is the leader that committed it.
            self._commit_terms[replica.group].append((node.commit_index, node.term))
            term = node.log.term(node.commit_index)
            self._committed[replica.group] = (node.commit_index, term or Term(0))
        if node.is_leader:
            last = node.log.last_index()
            for peer in node.conf.members:
                progress = node.progress(peer)
                if progress is not None and not (
                    progress.match_index < progress.next_index and progress.match_index <= last
                ):
                    raise self._violation(
                        f"progress invariant: leader {node.id} group {replica.group} has "
                        f"{progress!r} for node {peer}, last index {last}"
                    )

    def _check_commit_durable(self, group: int) -> None:
        """Leader Completeness before the fact: no node lacking the newest committed entry may be
        able to win an election. A node could win if a majority of its voters would find its log
        at least as up to date as theirs, in memory or (should they crash) on disk."""
        known = self._committed.get(group)
        if known is None:
            return
        index, term = known
        if not term:
            return
        for (_, replica_group), replica in self.replicas.items():
            node = replica.raft
            if replica_group != group or node is None or node.id not in node.conf.voters:
                continue
            if node.log.pending_snapshot is not None or index < node.log.first_index():
                continue  # holds it in a snapshot, or cannot campaign
            if node.log.term(index) == term:
                continue
            last_index, last_term = node.log.last_index(), node.log.last_term()
            would_vote = []
            for voter in sorted(node.conf.voters):
                other = self.replicas[(voter, group)]
                logs = [
                    (other.storage.last_index(), other.storage.term(other.storage.last_index()))
                ]
                if other.raft is not None:
                    logs.append((other.raft.log.last_index(), other.raft.log.last_term()))
                if any(last_term > t or (last_term == t and last_index >= i) for i, t in logs):
                    would_vote.append(voter)
            if len(would_vote) > len(node.conf.voters) // 2:
                raise self._violation(
                    f"committed entry ({index}, {term}) of group {group} is not safe: node "
                    f"{node.id} lacks it but voters {would_vote} of {sorted(node.conf.voters)} "
                    f"would elect it"
                )

    def _check_log_matching(self, replica: Replica, entries: tuple[Entry, ...]) -> None:
        """Log Matching, inductively: equal (index, term) means equal entry and equal
        predecessor term, so equal (index, term) implies equal logs up to there."""
        storage = replica.storage
        for entry in entries:
            prev_index = LogIndex(entry.index - 1)
            prev_term = storage.term(prev_index) if prev_index >= storage.first_index() - 1 else -1
            fact = (entry.data, int(entry.kind), Term(prev_term))
            key = (replica.group, entry.index, entry.term)
            known = self._entries.setdefault(key, fact)
            if known[:2] != fact[:2] or (known[2] != fact[2] and -1 not in (known[2], fact[2])):
                raise self._violation(
                    f"log matching: group {replica.group} entry ({entry.index}, {entry.term}) "
                    f"differs between replicas"
                )

    def _check_leader_completeness(self, replica: Replica) -> None:
        node = replica.raft
        assert node is not None
        group = replica.group
        # Leader Completeness binds leaders of later terms only: a candidate that collected its
        # votes before a pause may still win an older term, lacking what newer terms committed.
        max_applied = LogIndex(
            min(
                self._max_applied[group],
                max(
                    (upto for upto, term in self._commit_terms[group] if term < node.term),
                    default=0,
                ),
            )
        )
        if node.log.last_index() < max_applied:
            raise self._violation(
                f"leader completeness: leader {node.id} of term {node.term} in group {group} has "
                f"log up to {node.log.last_index()}, but {max_applied} was committed"
            )
        for index in range(max(node.log.first_index(), 1), max_applied + 1):
            committed_term = self._applied[(group, LogIndex(index))][0]
            if node.log.term(LogIndex(index)) != committed_term:
                raise self._violation(
                    f"leader completeness: leader {node.id} of term {node.term} in group {group} "
                    f"lacks committed entry {index}"
                )

    def _apply(self, replica: Replica, entry: Entry) -> None:
        replica.state_machine.apply(entry)
        key = (replica.group, entry.index)
        fact = (entry.term, replica.state_machine.digest)
        known = self._applied.setdefault(key, fact)
        if known != fact:
            raise self._violation(
                f"state machine safety: group {replica.group} index {entry.index} applied as "
                f"{fact} on node {replica.node_id} but {known} elsewhere"
            )
        if entry.index > self._max_applied[replica.group]:
            self._max_applied[replica.group] = entry.index
        proposal = self._proposals.get(entry.data) if entry.data else None
        if proposal is not None:
            if (proposal.term, proposal.index) != (entry.term, entry.index):
                raise self._violation(f"proposal {entry.data!r} applied at a slot it never got")
            if replica.node_id == proposal.node_id and entry.data not in self._acknowledged:
                self._acknowledged[entry.data] = entry.index
                self.stats.proposals_acknowledged += 1

    def _check_snapshot(self, replica: Replica, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        state = SimStateMachine.restore(snapshot)
        known = self._applied.get((replica.group, meta.index))
        if known is not None and known != (meta.term, state.digest):
            raise self._violation(
                f"snapshot at {meta.index} of group {replica.group} holds another state"
            )

    def _check_read(self, replica: Replica, context: bytes, index: LogIndex) -> None:
        minimum = self._reads.pop(context, None)  # a read whose leader failed is never answered
        if minimum is None:
            raise self._violation(f"read {context!r} answered twice or never asked")
        if index < minimum:
            raise self._violation(
                f"linearizability: read {context!r} on node {replica.node_id} got read index "
                f"{index}, but {minimum} was committed before it was asked"
            )
        self.stats.reads_served += 1

    # ------------------------------------------------------------------ clients
    def _leader_of(self, group: int) -> Replica | None:
        candidates = [
            replica
            for (_, replica_group), replica in self.replicas.items()
            if replica_group == group and replica.raft is not None and replica.raft.is_leader
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda r: r.raft.term if r.raft else 0)

    def _client_target(self, group: int) -> Replica | None:
        """Usually the newest leader; sometimes any node that still believes it leads, as a real
        client with a stale leader hint would."""
        if self.rng.random() >= self.config.stale_client_rate:
            return self._leader_of(group)
        believers = [
            replica
            for (_, replica_group), replica in self.replicas.items()
            if replica_group == group and replica.raft is not None and replica.raft.is_leader
        ]
        return self.rng.choice(believers) if believers else None

    def _client_traffic(self) -> None:
        rng = self.rng
        for group in range(self.config.groups):
            if rng.random() < self.config.propose_rate:
                self._propose(group, self._client_target(group))
            if rng.random() < self.config.read_rate:
                self._read(group, self._client_target(group))

    def _propose(self, group: int, replica: Replica | None = None) -> bool:
        replica = replica or self._leader_of(group)
        if replica is None or replica.raft is None:
            return False
        self._next_payload += 1
        data = b"g%d-p%d" % (group, self._next_payload)
        try:
            term, index = replica.raft.propose(data)
        except (NotLeader, ProposalDropped):
            return False
        self._proposals[data] = _Proposal(group, data, replica.node_id, term, index)
        self._after_input(replica)
        return True

    def _read(self, group: int, replica: Replica | None = None) -> None:
        replica = replica or self._leader_of(group)
        if replica is None or replica.raft is None:
            return
        self._next_payload += 1
        context = b"r%d" % self._next_payload
        # Anything committed anywhere by now must be visible to this read.
        committed = max(
            (r.last_commit for (_, g), r in self.replicas.items() if g == group), default=0
        )
        self._reads[context] = LogIndex(committed)
        replica.raft.read_index(context)
        self._after_input(replica)

    # ------------------------------------------------------------------ nemesis
    def _nemesis(self) -> None:
        rng = self.rng
        action = rng.choice(
            [
                "crash",
                "crash",
                "restart",
                "restart",
                "partition",
                "isolate_leader",
                "one_way",
                "heal",
                "membership",
                "membership",
                "snapshot",
                "snapshot",
                "transfer",
            ]
            + ["torn_crash"] * self.config.torn_crash_weight
            + ["stall_disk"] * self.config.stall_disk_weight
            + ["crash_leader"] * self.config.crash_leader_weight
            + ["pause"] * self.config.pause_weight
        )
        if getattr(self, f"_nemesis_{action}")():
            self.stats.faults[action] += 1

    def _may_crash(self) -> bool:
        return len(self.crashed) < (len(self.node_ids) - 1) // 2 + 1

    def _crash(self, node_id: NodeId) -> None:
        self.crashed.add(node_id)
        self.stalled.pop(node_id, None)
        self.paused.pop(node_id, None)
        self._torn_crash_armed.discard(node_id)
        for group in range(self.config.groups):
            replica = self.replicas[(node_id, group)]
            replica.raft = None  # everything not in storage is gone

    def _nemesis_crash(self) -> bool:
        alive = [n for n in self.node_ids if n not in self.crashed]
        if not self._may_crash() or not alive:
            return False
        self._crash(self.rng.choice(alive))
        return True

    def _nemesis_torn_crash(self) -> bool:
        """Arm a node to die in the middle of its next Ready that has something to persist."""
        alive = [n for n in self.node_ids if n not in self.crashed]
        if not self._may_crash() or not alive:
            return False
        self._torn_crash_armed.add(self.rng.choice(alive))
        return True

    def _nemesis_stall_disk(self) -> bool:
        alive = [n for n in self.node_ids if n not in self.crashed]
        if not alive:
            return False
        timeout = self.config.election_timeout_ticks
        self.stalled[self.rng.choice(alive)] = self.now + self.rng.randint(1, 3 * timeout)
        return True

    def _is_paused(self, replica: Replica) -> bool:
        return self.paused.get(replica.node_id, 0) > self.now

    def _nemesis_pause(self) -> bool:
        """Freeze a node (leaders first): no ticks, no Ready, incoming messages wait. On waking
        it may still believe it leads and be asked for reads and writes before it learns."""
        group = self.rng.randrange(self.config.groups)
        leader = self._leader_of(group)
        alive = [n for n in self.node_ids if n not in self.crashed]
        if not alive:
            return False
        node_id = leader.node_id if leader is not None else self.rng.choice(alive)
        timeout = self.config.election_timeout_ticks
        self.paused[node_id] = self.now + self.rng.randint(timeout, 4 * timeout)
        return True

    def _nemesis_crash_leader(self) -> bool:
        leader = self._leader_of(self.rng.randrange(self.config.groups))
        if leader is None or not self._may_crash():
            return False
        self._crash(leader.node_id)
        return True

    def _nemesis_restart(self) -> bool:
        if not self.crashed:
            return False
        node_id = self.rng.choice(sorted(self.crashed))
        self._restart(node_id)
        return True

    def _restart(self, node_id: NodeId) -> None:
        self.crashed.discard(node_id)
        for group in range(self.config.groups):
            replica = self.replicas[(node_id, group)]
            replica.state_machine = SimStateMachine.restore(replica.storage.snapshot())
            replica.raft = self._new_raft(replica)
            replica.last_commit = replica.raft.commit_index

    def _new_raft(self, replica: Replica) -> RaftNode:
        config = RaftConfig(
            node_id=replica.node_id,
            election_timeout_ticks=self.config.election_timeout_ticks,
            max_inflight_messages=4,
            max_bytes_per_message=self.max_bytes_per_message,
            snapshot_chunk_bytes=self.config.snapshot_chunk_bytes,
        )
        rng = random.Random(self.rng.getrandbits(64))
        return RaftNode(config, replica.storage, rng, applied=replica.state_machine.applied_index)

    def _nemesis_partition(self) -> bool:
        nodes = list(self.node_ids)
        if len(nodes) < 2:
            return False
        self.rng.shuffle(nodes)
        cut = self.rng.randint(1, len(nodes) - 1)
        side = set(nodes[:cut])
        self.blocked_links = {
            (a, b) for a in self.node_ids for b in self.node_ids if (a in side) != (b in side)
        }
        return True

    def _nemesis_isolate_leader(self) -> bool:
        leader = self._leader_of(self.rng.randrange(self.config.groups))
        if leader is None:
            return False
        lone = leader.node_id
        self.blocked_links = {
            (a, b) for a in self.node_ids for b in self.node_ids if (a == lone) != (b == lone)
        }
        return True

    def _nemesis_one_way(self) -> bool:
        if len(self.node_ids) < 2:
            return False
        a, b = self.rng.sample(self.node_ids, 2)
        self.blocked_links.add((a, b))
        return True

    def _nemesis_heal(self) -> bool:
        self.blocked_links = set()
        return True

    def _nemesis_membership(self) -> bool:
        group = self.rng.randrange(self.config.groups)
        leader = self._leader_of(group)
        if leader is None or leader.raft is None:
            return False
        # Several changes back to back: all but the first must be refused while one is pending.
        done = False
        for _ in range(self.rng.randint(1, self.config.membership_burst)):
            if (
                leader.raft is None
                or not leader.raft.is_leader
                or not self._change_membership(leader)
            ):
                break
            done = True
        return done

    def _change_membership(self, leader: Replica) -> bool:
        node = leader.raft
        assert node is not None
        conf = node.conf
        outsiders = [n for n in self.node_ids if n not in conf.members]
        choices: list[ConfChange] = []
        for learner in sorted(conf.learners):
            choices.append(ConfChange(ConfChangeType.ADD_VOTER, learner))
        for outsider in outsiders:
            choices.append(ConfChange(ConfChangeType.ADD_LEARNER, outsider))
        if len(conf.voters) > 3 or (len(conf.voters) > 1 and not outsiders):
            for voter in sorted(conf.voters - {node.id}):
                choices.append(ConfChange(ConfChangeType.REMOVE_NODE, voter))
                choices.append(ConfChange(ConfChangeType.ADD_LEARNER, voter))
        if not choices:
            return False
        try:
            node.propose_conf_change(self.rng.choice(choices))
        except (ConfChangeInProgress, ProposalDropped):
            return False
        self._after_input(leader)
        return True

    def _nemesis_snapshot(self) -> bool:
        alive = [r for r in self.replicas.values() if r.raft is not None]
        if not alive:
            return False
        replica = self.rng.choice(alive)
        node = replica.raft
        assert node is not None
        index = node.last_applied
        if index <= replica.storage.first_index():
            return False
        padding = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 80)))
        data = replica.state_machine.snapshot_data(padding)
        replica.storage.create_snapshot(index, node.conf_at(index), data)
        return True

    def _nemesis_transfer(self) -> bool:
        group = self.rng.randrange(self.config.groups)
        leader = self._leader_of(group)
        if leader is None or leader.raft is None:
            return False
        others = sorted(leader.raft.conf.voters - {leader.node_id})
        if not others:
            return False
        leader.raft.transfer_leader(self.rng.choice(others))
        self._after_input(leader)
        return True

    # ------------------------------------------------------------------ liveness
    def _heal(self) -> None:
        self.blocked_links = set()
        self.stalled.clear()
        self.paused.clear()
        self._torn_crash_armed.clear()
        for node_id in sorted(self.crashed):
            self._restart(node_id)

    def _await_recovery(self) -> None:
        """With the network whole and every node up, each group must elect a leader, commit a
        new proposal and apply it on every member within heal_ticks."""
        deadline = self.now + self.config.heal_ticks
        markers: dict[int, bytes] = {}
        while self.now < deadline:
            self._step_tick(faulty=False)
            for group in range(self.config.groups):
                retry = self.now % (4 * self.config.election_timeout_ticks) == 0
                unsettled = group not in markers or markers[group] not in self._acknowledged
                if (group not in markers or (unsettled and retry)) and self._propose(group):
                    markers[group] = b"g%d-p%d" % (group, self._next_payload)
            if len(markers) == self.config.groups and self._all_caught_up(markers):
                return
        missing = [g for g in range(self.config.groups) if not self._caught_up(g, markers.get(g))]
        raise self._violation(
            f"liveness: groups {missing} did not elect a leader and apply a new proposal on "
            f"every member within {self.config.heal_ticks} ticks of healing"
        )

    def _all_caught_up(self, markers: dict[int, bytes]) -> bool:
        return all(self._caught_up(group, marker) for group, marker in markers.items())

    def _caught_up(self, group: int, marker: bytes | None) -> bool:
        if marker is None or marker not in self._acknowledged:
            return False
        index = self._acknowledged[marker]
        leader = self._leader_of(group)
        if leader is None or leader.raft is None:
            return False
        for member in leader.raft.conf.members:
            state = self.replicas[(member, group)].state_machine
            if state.applied_index < index:
                return False
        # Every acknowledged proposal is in the agreed history, at the index it was given.
        for data, acked_index in self._acknowledged.items():
            proposal = self._proposals[data]
            if proposal.group == group and self._applied.get((group, acked_index)) is None:
                raise self._violation(f"acknowledged proposal {data!r} lost")
        return True


def run_seed(seed: int, config: SimConfig | None = None) -> SimStats:
    return Simulation(seed, config).run()
