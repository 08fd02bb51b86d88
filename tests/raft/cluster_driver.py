"""A hand-driven Raft cluster for unit tests: RaftNodes over MemoryStorage and a network that moves
only when the test says so. No clock, no threads, no randomness beyond each node's seeded RNG.

Every message a node emits lands in `network` (unless its link is cut) and stays there until the
test delivers or drops it, one by one or in bulk. The application is a list of applied entries per
node; a crash keeps only what the node's MemoryStorage holds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from raft.core.config import RaftConfig
from raft.core.messages import (
    ConfState,
    Entry,
    Message,
    ReadState,
    Ready,
    RequestVote,
    RequestVoteReply,
    Snapshot,
)
from raft.core.node import RaftNode
from raft.core.storage import MemoryStorage
from raft.core.types import LogIndex, NodeId, Term

MessageTypes = type | tuple[type, ...]
VOTE_MESSAGES: tuple[type, ...] = (RequestVote, RequestVoteReply)


class Cluster:
    """Nodes 1..voters are the bootstrap voters, then the learners, then `joiners`: nodes outside
    the group whose MemoryStorage starts empty (they learn membership by replaying the log)."""

    def __init__(
        self,
        voters: int = 3,
        *,
        learners: int = 0,
        joiners: int = 0,
        seed: int = 0,
        **config: int | bool,
    ) -> None:
        self.seed = seed
        self.config_overrides = config
        voter_ids = [NodeId(i) for i in range(1, voters + 1)]
        learner_ids = [NodeId(i) for i in range(voters + 1, voters + learners + 1)]
        joiner_ids = [
            NodeId(i) for i in range(voters + learners + 1, voters + learners + joiners + 1)
        ]
        self.ids = voter_ids + learner_ids + joiner_ids
        conf = ConfState(voters=frozenset(voter_ids), learners=frozenset(learner_ids))
        self.storages: dict[NodeId, MemoryStorage] = {
            node_id: MemoryStorage(None if node_id in joiner_ids else conf) for node_id in self.ids
        }
        self.nodes: dict[NodeId, RaftNode | None] = {}
        self._restarts: dict[NodeId, int] = dict.fromkeys(self.ids, 0)
        self.applied: dict[NodeId, list[Entry]] = {}
        self.installed_snapshots: dict[NodeId, list[Snapshot]] = {}
        self.read_states: dict[NodeId, list[ReadState]] = {}
        self.readies: dict[NodeId, list[Ready]] = {node_id: [] for node_id in self.ids}
        self.network: list[Message] = []  # in flight, oldest first
        self.sent: list[Message] = []  # everything ever sent, including what the network lost
        self.delivered: list[Message] = []
        self.isolated: set[NodeId] = set()
        for node_id in self.ids:
            self._start(node_id)

    # ------------------------------------------------------------------ nodes
    def config(self, node_id: NodeId) -> RaftConfig:
        return RaftConfig(node_id=node_id, **self.config_overrides)  # type: ignore[arg-type]

    def _start(self, node_id: NodeId) -> None:
        # The application keeps its state in memory: a (re)start re-applies from the snapshot.
        rng = random.Random(self.seed * 1_000_003 + node_id * 101 + self._restarts[node_id])
        self.nodes[node_id] = RaftNode(self.config(node_id), self.storages[node_id], rng)
        self.applied[node_id] = []
        self.installed_snapshots[node_id] = []
        self.read_states[node_id] = []

    def node(self, node_id: int) -> RaftNode:
        raft = self.nodes[NodeId(node_id)]
        if raft is None:
            raise AssertionError(f"node {node_id} is crashed")
        return raft

    def storage(self, node_id: int) -> MemoryStorage:
        return self.storages[NodeId(node_id)]

    def leader(self) -> NodeId | None:
        """The live leader of the highest term, if any."""
        leaders = [raft for raft in self.nodes.values() if raft is not None and raft.is_leader]
        if not leaders:
            return None
        return max(leaders, key=lambda raft: raft.term).id

    def crash(self, node_id: int) -> None:
        """Drop the node object: everything not yet in its MemoryStorage is gone."""
        self.nodes[NodeId(node_id)] = None
        self.network = [m for m in self.network if m.recipient != node_id]

    def restart(self, node_id: int) -> RaftNode:
        self._restarts[NodeId(node_id)] += 1
        self._start(NodeId(node_id))
        return self.node(node_id)

    # ------------------------------------------------------------------ driving one node
    def process_ready(self, node_id: int) -> list[Ready]:
        """Handle Readies until the node has none, in the documented order."""
        raft = self.node(node_id)
        storage = self.storage(node_id)
        handled: list[Ready] = []
        while raft.has_ready():
            ready = raft.ready()
            handled.append(ready)
            self.readies[raft.id].append(ready)
            self.send(ready.messages)
            if ready.snapshot is not None:
                storage.apply_snapshot(ready.snapshot)
                self.installed_snapshots[raft.id].append(ready.snapshot)
            storage.append(ready.entries_to_persist)
            if ready.hard_state is not None:
                storage.set_hard_state(ready.hard_state)
            self.send(ready.messages_after_persist)
            self.applied[raft.id].extend(ready.entries_to_apply)
            self.read_states[raft.id].extend(ready.read_states)
            raft.advance(ready)
        return handled

    def tick(self, node_id: int, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.node(node_id).tick()
            self.process_ready(node_id)

    def propose(self, node_id: int, data: bytes) -> tuple[Term, LogIndex]:
        position = self.node(node_id).propose(data)
        self.process_ready(node_id)
        return position

    def elect(self, node_id: int, *, settle: bool = True, max_ticks: int | None = None) -> RaftNode:
        """Make node_id leader by ticking it alone and delivering only election messages; then,
        if `settle`, deliver everything until the network is quiet."""
        raft = self.node(node_id)
        limit = max_ticks or 20 * raft.config.election_timeout_ticks
        for _ in range(limit):
            if raft.is_leader:
                break
            self.tick(node_id)
            self.deliver_all(types=VOTE_MESSAGES)
        if not raft.is_leader:
            raise AssertionError(f"node {node_id} did not win an election in {limit} ticks")
        if settle:
            self.deliver_all()
        return raft

    # ------------------------------------------------------------------ network
    def _link_up(self, sender: NodeId, recipient: NodeId) -> bool:
        return sender not in self.isolated and recipient not in self.isolated

    def send(self, messages: Iterable[Message]) -> None:
        for message in messages:
            self.sent.append(message)
            if self._link_up(message.sender, message.recipient):
                self.network.append(message)

    def pending(
        self, sender: int | None = None, recipient: int | None = None, types: MessageTypes = object
    ) -> list[Message]:
        return _matching(self.network, sender, recipient, types)

    def sent_messages(
        self, sender: int | None = None, recipient: int | None = None, types: MessageTypes = object
    ) -> list[Message]:
        return _matching(self.sent, sender, recipient, types)

    def deliver_message(self, message: Message, *, process: bool = True) -> None:
        """Take one message off the network and step it into its recipient (then, if `process`,
        handle the recipient's Ready; otherwise its effects stay unpersisted)."""
        self.network.remove(message)
        raft = self.nodes[message.recipient]
        if raft is None or not self._link_up(message.sender, message.recipient):
            return
        self.delivered.append(message)
        raft.step(message)
        if process:
            self.process_ready(message.recipient)

    def deliver(
        self,
        sender: int,
        recipient: int,
        *,
        types: MessageTypes = object,
        process: bool = True,
    ) -> int:
        """Deliver the messages now in flight from sender to recipient, in order; not the ones
        this produces. Returns how many were delivered."""
        batch = self.pending(sender, recipient, types)
        for message in batch:
            self.deliver_message(message, process=process)
        return len(batch)

    def deliver_all(
        self,
        *,
        types: MessageTypes = object,
        drop: Callable[[Message], bool] | None = None,
        max_messages: int = 10_000,
    ) -> int:
        """Deliver (oldest first) until no message of `types` is in flight; messages for which
        `drop` answers True are lost instead. Returns how many were delivered."""
        delivered = 0
        while True:
            batch = self.pending(types=types)
            if not batch:
                return delivered
            message = batch[0]
            if drop is not None and drop(message):
                self.network.remove(message)
                continue
            self.deliver_message(message)
            delivered += 1
            if delivered > max_messages:
                raise AssertionError(f"network did not go quiet after {max_messages} messages")

    def drop(self, sender: int, recipient: int) -> int:
        """Lose the messages in flight from sender to recipient."""
        lost = self.pending(sender, recipient)
        self.network = [m for m in self.network if m not in lost]
        return len(lost)

    def isolate(self, *node_ids: int) -> None:
        """Cut every link of these nodes, losing what is in flight to or from them."""
        for node_id in node_ids:
            self.isolated.add(NodeId(node_id))
        self.network = [m for m in self.network if self._link_up(m.sender, m.recipient)]

    def heal(self, *node_ids: int) -> None:
        """Reconnect these nodes (all, if none given)."""
        if node_ids:
            self.isolated -= {NodeId(node_id) for node_id in node_ids}
        else:
            self.isolated.clear()


def _matching(
    messages: list[Message], sender: int | None, recipient: int | None, types: MessageTypes
) -> list[Message]:
    return [
        m
        for m in messages
        if (sender is None or m.sender == sender)
        and (recipient is None or m.recipient == recipient)
        and isinstance(m, types)
    ]
