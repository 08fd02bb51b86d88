"""RaftHost: one asyncio task drives every Raft group (shard replica) of this process.

Each iteration: tick, step the received messages, take the queued proposals, collect every
group's Ready, send what may leave at once, persist ALL groups' state and apply committed
entries in ONE LMDB transaction (one fsync), send what had to wait for it, resolve waiters,
advance. Requests arriving during the fsync queue up and share the next one: group commit.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from raft.core.config import RaftConfig
from raft.core.errors import NotLeader, ProposalDropped, RaftError
from raft.core.messages import ConfChange, ConfState, Entry, Message, Ready, Snapshot
from raft.core.node import RaftNode
from raft.core.progress import ProgressState
from raft.core.types import NO_NODE, LogIndex, NodeId, Term, node_of
from raft.storage.lmdb_log import GroupId, GroupWrite, LmdbLogStore

log = logging.getLogger(__name__)


class OutcomeUnknown(RaftError):
    """The proposal may or may not have been applied (its slot was covered by a snapshot)."""


class StateMachine(Protocol):
    """The application's side of one group. All durable state goes through `txn`, the same
    LMDB write transaction that persists the log, so log and state commit together."""

    def applied_index(self) -> LogIndex:
        """The last index applied durably (read once, when the group starts)."""
        ...

    def apply(self, txn: Any, entries: Sequence[Entry]) -> list[object]:
        """Apply committed entries in order; one result per entry. Deterministic. Called again
        with a fresh txn if the transaction had to be retried, so keep no state outside txn."""
        ...

    def snapshot(self) -> bytes:
        """The state as of the last applied index."""
        ...

    def restore(self, txn: Any, snapshot: Snapshot) -> None:
        """Replace the whole state by a snapshot received from the leader."""
        ...


class Transport(Protocol):
    def send(self, group_id: int, messages: Iterable[Message]) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    node_id: NodeId
    tick_interval_s: float = 0.05
    election_timeout_ticks: int = 10  # 0.5 s to 1 s with the default tick
    heartbeat_interval_ticks: int = 2
    max_inflight_messages: int = 64
    max_bytes_per_message: int = 1 << 20
    snapshot_chunk_bytes: int = 1 << 20
    snapshot_every_entries: int = 10_000  # compact a group's log once this many are applied

    def raft_config(self, replica_id: NodeId) -> RaftConfig:
        return RaftConfig(
            node_id=replica_id,
            election_timeout_ticks=self.election_timeout_ticks,
            heartbeat_interval_ticks=self.heartbeat_interval_ticks,
            max_inflight_messages=self.max_inflight_messages,
            max_bytes_per_message=self.max_bytes_per_message,
            snapshot_chunk_bytes=self.snapshot_chunk_bytes,
        )


@dataclass(frozen=True, slots=True)
class GroupStatus:
    group_id: int
    role: str
    term: Term
    leader_id: NodeId
    commit_index: LogIndex
    applied_index: LogIndex
    last_index: LogIndex
    voters: tuple[NodeId, ...]
    learners: tuple[NodeId, ...]
    is_quarantined: bool = False


FSYNC_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(slots=True)
class HostMetrics:
    iterations: int = 0
    fsyncs: int = 0
    fsync_seconds_total: float = 0.0
    # fsyncs per latency bucket (upper bounds FSYNC_BUCKETS_S, then +Inf), not cumulative
    fsync_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(FSYNC_BUCKETS_S) + 1))
    entries_persisted: int = 0
    entries_applied: int = 0
    proposals: int = 0
    snapshots_created: int = 0


@dataclass(slots=True)
class _Group:
    id: GroupId
    node: RaftNode
    state_machine: StateMachine
    # Proposals in the log, waiting for their index to be applied: index -> (term, future)
    waiting: dict[LogIndex, tuple[Term, asyncio.Future[object]]] = field(default_factory=dict)
    queued: list[tuple[bytes | ConfChange, asyncio.Future[object]]] = field(default_factory=list)
    reads_new: dict[bytes, asyncio.Future[None]] = field(default_factory=dict)  # not yet asked
    reads: dict[bytes, asyncio.Future[None]] = field(default_factory=dict)  # ReadIndex asked
    reads_to_apply: list[tuple[LogIndex, asyncio.Future[None]]] = field(default_factory=list)
    snapshot_index: LogIndex = LogIndex(0)
    snapshot_wanted: bool = False  # compact at the next chance, whatever the log's length
    # The application found this replica's state corrupt: it keeps voting and replicating
    # (its log is sound) but never leads again; a leader hands leadership to a peer.
    is_quarantined: bool = False
    quarantine_ticks: int = 0
    transfer_wanted_to: NodeId = NO_NODE  # see RaftHost.request_leader_transfer


@dataclass(slots=True)
class _Step:
    """One group's share of an iteration, between ready() and advance()."""

    group: _Group
    ready: Ready
    results: list[object] = field(default_factory=list)


class RaftHost:
    def __init__(self, config: HostConfig, store: LmdbLogStore, seed: int | None = None) -> None:
        import random  # the runtime may use real randomness; the core gets it injected

        self.config = config
        self.metrics = HostMetrics()
        self._store = store
        self._rng = random.Random(seed)
        self._groups: dict[GroupId, _Group] = {}
        self._inbox: list[tuple[int, Message]] = []
        self._transport: Transport | None = None
        self._wake = asyncio.Event()
        self._tick_due = False
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raft-fsync")
        self._read_ids = itertools.count(1)
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def add_group(
        self,
        group_id: int,
        state_machine: StateMachine,
        *,
        bootstrap: ConfState | None = None,
        replica_id: NodeId | None = None,
    ) -> None:
        """Start a replica of group_id here. `bootstrap` gives the membership of a brand-new
        group; a replica joining an existing group starts empty and learns it from the leader.
        `replica_id` is its member id in the group (default: this node's id); its node bits
        must be this node's."""
        member = self.config.node_id if replica_id is None else replica_id
        if node_of(member) != self.config.node_id:
            raise ValueError(f"replica {member} does not belong on node {self.config.node_id}")
        gid = GroupId(group_id)
        if gid in self._groups:
            raise ValueError(f"group {group_id} already runs on node {self.config.node_id}")
        if bootstrap is not None:
            self._store.bootstrap(gid, bootstrap)
        storage = self._store.group(gid)
        applied = state_machine.applied_index()
        node = RaftNode(
            self.config.raft_config(member),
            storage,
            self._new_rng(),
            applied=applied,
        )
        group = _Group(gid, node, state_machine, snapshot_index=LogIndex(storage.first_index() - 1))
        self._groups[gid] = group
        self._wake.set()

    def remove_group(self, group_id: int) -> None:
        group = self._groups.pop(GroupId(group_id), None)
        if group is None:
            return
        self._fail_all(group, NotLeader())
        self._store.drop_group(group.id)

    def _new_rng(self) -> Any:
        import random

        return random.Random(self._rng.getrandbits(64))

    async def start(self, transport: Transport) -> None:
        self._transport = transport
        self._task = asyncio.create_task(self._run(), name=f"raft-host-{self.config.node_id}")
        self._ticker = asyncio.create_task(self._tick_forever(), name="raft-ticker")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in (self._ticker, self._task):
            if task is not None:
                task.cancel()
                # A loop that already failed re-raises its error here; it was logged then.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for group in self._groups.values():
            self._fail_all(group, NotLeader())
        self._executor.shutdown(wait=True)

    async def wait_failed(self) -> BaseException:
        """Returns the error that stopped the Raft loop (a storage failure or a broken
        invariant); never returns while it runs. The process should exit then."""
        assert self._task is not None, "start() first"
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            return error
        return RuntimeError("the raft loop ended")

    def receive(self, sender: NodeId, items: list[tuple[int, Message]]) -> None:
        """Transport callback: messages for any of our groups, from one peer node."""
        self._inbox.extend(items)
        self._wake.set()

    # ------------------------------------------------------------------ requests
    def group_ids(self) -> list[int]:
        return list(self._groups)

    def has_group(self, group_id: int) -> bool:
        return GroupId(group_id) in self._groups

    def status(self, group_id: int) -> GroupStatus:
        node = self._group(group_id).node
        conf = node.conf
        return GroupStatus(
            group_id=group_id,
            role=node.role.value,
            term=node.term,
            leader_id=node.leader_id,
            commit_index=node.commit_index,
            applied_index=node.last_applied,
            last_index=node.log.last_index(),
            voters=tuple(sorted(conf.voters)),
            learners=tuple(sorted(conf.learners)),
            is_quarantined=self._group(group_id).is_quarantined,
        )

    def replica_id(self, group_id: int) -> NodeId:
        """This node's member id in the group."""
        return self._group(group_id).node.id

    def is_caught_up(self, group_id: int, member: NodeId) -> bool:
        """Leader only: `member` answered recently, has no snapshot in flight and holds
        every committed entry: safe to promote, or to hand leadership to. (Not "REPLICATE":
        a follower that never needed an append since a probe stays in PROBE, caught up.)"""
        return _is_caught_up(self._group(group_id).node, member)

    def leader_id(self, group_id: int) -> NodeId:
        return self._group(group_id).node.leader_id

    def is_leader(self, group_id: int) -> bool:
        return self._group(group_id).node.is_leader

    def propose(self, group_id: int, data: bytes) -> asyncio.Future[object]:
        """Resolves with the state machine's result once applied; fails with NotLeader or
        ProposalDropped (never applied: safe to retry). Await it with a timeout: on timeout the
        outcome is unknown."""
        return self._enqueue(group_id, data)

    def propose_conf_change(self, group_id: int, change: ConfChange) -> asyncio.Future[object]:
        return self._enqueue(group_id, change)

    def _enqueue(self, group_id: int, item: bytes | ConfChange) -> asyncio.Future[object]:
        group = self._group(group_id)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if not group.node.is_leader:
            future.set_exception(NotLeader(group.node.leader_id))
            return future
        group.queued.append((item, future))
        self._wake.set()
        return future

    async def read_barrier(self, group_id: int) -> None:
        """Returns once this replica may serve a linearizable read (ReadIndex, §6.4): leadership
        confirmed by a quorum and every entry committed before the call applied here."""
        group = self._group(group_id)
        if not group.node.is_leader:
            raise NotLeader(group.node.leader_id)
        context = next(self._read_ids).to_bytes(8, "big")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        group.reads_new[context] = future
        self._wake.set()
        await future

    async def compact(self, group_id: int, *, timeout_s: float = 5.0) -> None:
        """Take a snapshot of what the group applied now and compact the log behind it, so a
        replica that joins later starts from a snapshot rather than replaying the log."""
        group = self._group(group_id)
        target = group.node.last_applied
        deadline = time.monotonic() + timeout_s
        while group.snapshot_index < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group_id} did not compact to {target}")
            group.snapshot_wanted = True  # taken after the group's next Ready (a heartbeat)
            await asyncio.sleep(0.02)

    def request_snapshot(self, group_id: int) -> None:
        """Snapshot the group and compact its log behind it as soon as it applies an entry
        (a new group: its bootstrap entries, before any election), so no replica is ever sent
        its log from index 1, only a snapshot."""
        self._group(group_id).snapshot_wanted = True
        self._wake.set()

    def quarantine(self, group_id: int) -> None:
        """This replica must stop leading group_id for good (until the process restarts): it
        never campaigns again, and if it leads it hands leadership to another voter."""
        group = self._group(group_id)
        group.is_quarantined = True
        group.node.may_campaign = False
        self._wake.set()

    def is_quarantined(self, group_id: int) -> bool:
        return self._group(group_id).is_quarantined

    def request_leader_transfer(self, group_id: int, target: NodeId) -> None:
        """Hand leadership to `target` at the next iteration, but only if we lead and it is a
        caught-up voter (`is_caught_up`): then the transfer ends within a round trip or so, and
        a dead or lagging target never stalls proposals (which a transfer in progress refuses)
        for an election timeout. Best effort: the caller asks again if nothing happened. Taken
        by the loop, like a proposal: the core takes no input while a Ready is persisted."""
        self._group(group_id).transfer_wanted_to = target
        self._wake.set()

    def _maybe_start_transfer(self, group: _Group) -> None:
        target, group.transfer_wanted_to = group.transfer_wanted_to, NO_NODE
        node = group.node
        if not node.is_leader or node.lead_transferee != NO_NODE or target == node.leader_id:
            return
        if target not in node.conf.voters or not _is_caught_up(node, target):
            return
        node.transfer_leader(target)

    def _group(self, group_id: int) -> _Group:
        found = self._groups.get(GroupId(group_id))
        if found is None:
            raise KeyError(f"group {group_id} has no replica on node {self.config.node_id}")
        return found

    # ------------------------------------------------------------------ the loop
    async def _tick_forever(self) -> None:
        interval = self.config.tick_interval_s
        while True:
            await asyncio.sleep(interval)
            self._tick_due = True  # missed ticks coalesce, like a dropped timer signal
            self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._iterate()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A storage failure or a broken invariant: stop rather than limp on.
                log.critical("raft host stopped by an unrecoverable error", exc_info=True)
                for group in self._groups.values():
                    self._fail_all(group, ProposalDropped("raft host stopped"))
                raise

    async def _iterate(self) -> None:
        self.metrics.iterations += 1
        self._take_inputs()
        steps = [
            _Step(group, group.node.ready())
            for group in self._groups.values()
            if group.node.has_ready()
        ]
        if not steps:
            return
        transport = self._transport
        assert transport is not None
        for step in steps:
            if step.ready.messages:
                transport.send(step.group.id, step.ready.messages)
        transport.flush()
        await self._persist_and_apply(steps)
        for step in steps:
            if step.ready.messages_after_persist:
                transport.send(step.group.id, step.ready.messages_after_persist)
        transport.flush()
        for step in steps:
            self._resolve(step)
            step.group.node.advance(step.ready)
            self._maybe_snapshot(step.group)
        if any(group.node.has_ready() for group in self._groups.values()):
            self._wake.set()

    def _take_inputs(self) -> None:
        if self._tick_due:
            self._tick_due = False
            for group in self._groups.values():
                group.node.tick()
                if group.is_quarantined:
                    self._hand_off_leadership(group)
        inbox, self._inbox = self._inbox, []
        for group_id, message in inbox:
            target = self._groups.get(GroupId(group_id))
            if target is None:
                continue  # a replica not (yet, or any more) here: Raft tolerates the loss
            try:
                target.node.step(message)
            except ValueError as error:  # a malformed message from a peer
                log.error(
                    "group %s: dropped a bad message from %s: %s", group_id, message.sender, error
                )
        for group in self._groups.values():
            if group.transfer_wanted_to != NO_NODE:
                self._maybe_start_transfer(group)
            if group.queued:
                self._propose_queued(group)
            if group.reads_new:
                self._start_reads(group)
            self._fail_reads_if_not_leader(group)

    def _hand_off_leadership(self, group: _Group) -> None:
        """A quarantined leader asks each other voter in turn to take over, one election
        timeout each (the core abandons a transfer that long)."""
        node = group.node
        others = sorted(voter for voter in node.conf.voters if voter != node.id)
        if not node.is_leader or not others:
            return
        turn = group.quarantine_ticks // self.config.election_timeout_ticks
        group.quarantine_ticks += 1
        target = others[turn % len(others)]
        if node.lead_transferee != target:
            node.transfer_leader(target)

    def _propose_queued(self, group: _Group) -> None:
        queued, group.queued = group.queued, []
        node = group.node
        for item, future in queued:
            if future.done():
                continue
            try:
                if isinstance(item, ConfChange):
                    term, index = node.propose_conf_change(item)
                else:
                    term, index = node.propose(item)
            except (RaftError, ValueError) as error:
                future.set_exception(error)
                continue
            self.metrics.proposals += 1
            group.waiting[index] = (term, future)

    def _start_reads(self, group: _Group) -> None:
        """Hand each new read to the core once; its ReadState resolves it later."""
        new, group.reads_new = group.reads_new, {}
        for context, future in new.items():
            if future.done():
                continue
            try:
                group.node.read_index(context)
            except NotLeader as error:
                future.set_exception(error)
                continue
            group.reads[context] = future

    def _fail_reads_if_not_leader(self, group: _Group) -> None:
        # A read the core accepted but never confirmed dies with the leadership (the core
        # drops it too); a confirmed one (reads_to_apply) is still linearizable and is served.
        if group.node.is_leader or not (group.reads or group.reads_new):
            return
        error = NotLeader(group.node.leader_id)
        for future in [*group.reads.values(), *group.reads_new.values()]:
            if not future.done():
                future.set_exception(error)
        group.reads.clear()
        group.reads_new.clear()

    async def _persist_and_apply(self, steps: list[_Step]) -> None:
        writes = [
            GroupWrite(
                step.group.id,
                hard_state=step.ready.hard_state,
                entries=step.ready.entries_to_persist,
                snapshot=step.ready.snapshot,
            )
            for step in steps
            if step.ready.hard_state or step.ready.entries_to_persist or step.ready.snapshot
        ]
        applying = [step for step in steps if step.ready.entries_to_apply or step.ready.snapshot]
        loop = asyncio.get_running_loop()

        def apply_in(txn: Any) -> None:
            for step in applying:
                if step.ready.snapshot is not None:
                    step.group.state_machine.restore(txn, step.ready.snapshot)
                entries = step.ready.entries_to_apply
                step.results = step.group.state_machine.apply(txn, entries) if entries else []
                if entries:
                    # Answer proposers now, while this transaction's fsync runs: the entries
                    # are committed (durable on a quorum) and their results deterministic, so a
                    # crash before our commit only replays them to the same results. No read
                    # sees the state before the commit: read barriers resolve after it.
                    loop.call_soon_threadsafe(
                        self._resolve_proposals, step.group, entries, step.results
                    )

        if not writes and not applying:
            return
        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._store.write, writes, apply_in if applying else None
        )
        elapsed = time.perf_counter() - started
        metrics = self.metrics
        metrics.fsyncs += 1
        metrics.fsync_seconds_total += elapsed
        metrics.fsync_bucket_counts[bisect.bisect_left(FSYNC_BUCKETS_S, elapsed)] += 1
        metrics.entries_persisted += sum(len(w.entries) for w in writes)

    def _resolve(self, step: _Step) -> None:
        group, ready = step.group, step.ready
        waiting = group.waiting
        if ready.snapshot is not None:
            covered = ready.snapshot.meta.index
            group.snapshot_index = LogIndex(max(group.snapshot_index, covered))
            for index in [i for i in waiting if i <= covered]:
                _, future = waiting.pop(index)
                if not future.done():
                    future.set_exception(
                        OutcomeUnknown(f"entry {index} was covered by a snapshot from the leader")
                    )
        self._resolve_proposals(group, ready.entries_to_apply, step.results)
        self.metrics.entries_applied += len(ready.entries_to_apply)
        applied = ready.entries_to_apply[-1].index if ready.entries_to_apply else LogIndex(0)
        if ready.snapshot is not None:
            applied = LogIndex(max(applied, ready.snapshot.meta.index))
        for read in ready.read_states:
            read_future = group.reads.pop(read.context, None)
            if read_future is not None:
                group.reads_to_apply.append((read.index, read_future))
        if group.reads_to_apply:
            applied = LogIndex(max(applied, group.node.last_applied))
            still_waiting = []
            for index, read_future in group.reads_to_apply:
                if read_future.done():
                    continue
                if index <= applied:
                    read_future.set_result(None)
                else:
                    still_waiting.append((index, read_future))
            group.reads_to_apply = still_waiting

    def _resolve_proposals(
        self, group: _Group, entries: Sequence[Entry], results: Sequence[object]
    ) -> None:
        """Hand each applied entry's result to its proposer (once: a second call finds none)."""
        waiting = group.waiting
        for entry, result in zip(entries, results, strict=True):
            pending = waiting.pop(entry.index, None)
            if pending is None:
                continue
            term, future = pending
            if future.done():
                continue
            if entry.term == term:
                future.set_result(result)
            else:
                future.set_exception(ProposalDropped(f"entry {entry.index} went to another term"))

    def _maybe_snapshot(self, group: _Group) -> None:
        node = group.node
        applied = node.last_applied
        if applied <= group.snapshot_index:
            return  # nothing new: a wanted snapshot waits for the next applied entry
        wanted = group.snapshot_wanted
        if not wanted and applied - group.snapshot_index < self.config.snapshot_every_entries:
            return
        data = group.state_machine.snapshot()
        self._store.create_snapshot(group.id, applied, node.conf_at(applied), data)
        group.snapshot_wanted = False
        group.snapshot_index = applied
        self.metrics.snapshots_created += 1

    def _fail_all(self, group: _Group, error: Exception) -> None:
        futures: list[asyncio.Future[Any]] = [f for _, f in group.waiting.values()]
        futures += [f for _, f in group.queued]
        futures += [*group.reads.values(), *group.reads_new.values()]
        futures += [f for _, f in group.reads_to_apply]
        for future in futures:
            if not future.done():
                future.set_exception(error)
        group.waiting.clear()
        group.queued.clear()
        group.reads.clear()
        group.reads_new.clear()
        group.reads_to_apply.clear()


def _is_caught_up(node: RaftNode, member: NodeId) -> bool:
    progress = node.progress(member)
    return (
        progress is not None
        and progress.recent_active
        and progress.state is not ProgressState.SNAPSHOT
        and progress.match_index >= node.commit_index
    )
