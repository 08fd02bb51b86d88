"""LocalReplicas: makes this node host exactly the replicas the shard map assigns it.

A replica starts when the map names it (a founding member, or a move's joiner) and is
removed, with all its data, once the map no longer names it (its move finished). A replica
id is never reused with fresh state: a node keeps, per group, the replica id its stored
state belongs to, and wipes that state before hosting a different replica of the group.

A shard made by a split (its upper half) starts from the data its local parent replica handed
over, with the parent's replicas as voters; where the local parent has not applied the split
yet it waits; where the parent skipped it (a snapshot from after the split) it starts empty and
gets a snapshot from the new shard's leader (each replica that got the handover compacts its
log right after its bootstrap entries, before any election).
"""

from __future__ import annotations

import logging

import lmdb

from kvstore.encryption import ValueCipher
from kvstore.meta import MetaStateMachine
from kvstore.sharding import META_GROUP_ID, ShardMap, Split
from kvstore.state_machine import KVDatabases, KVStateMachine
from raft.core.messages import ConfState
from raft.core.types import NodeId
from raft.runtime.host import RaftHost
from raft.storage.lmdb_log import GroupId, LmdbLogStore

log = logging.getLogger(__name__)

_REPLICA_ID = b"replica_id"


class LocalReplicas:
    def __init__(
        self,
        node_id: NodeId,
        host: RaftHost,
        store: LmdbLogStore,
        meta: MetaStateMachine,
        shards: dict[int, KVStateMachine],
        *,
        cipher: ValueCipher | None = None,
    ) -> None:
        self._node_id = node_id
        self._host = host
        self._store = store
        self._meta = meta
        self._shards = shards  # shared with the router: the local shard state machines
        self._cipher = cipher  # None: values stored in the clear
        self._env: lmdb.Environment = store.env
        # Opened here, before the Raft host runs (see KVDatabases for why).
        self._db = self._env.open_db(b"node.replicas")  # group -> replica id its state is of
        self._kv_dbs = KVDatabases.open(self._env)

    def sync(self, shard_map: ShardMap) -> None:
        wanted = shard_map.replicas_on(self._node_id)
        for group_id in self._host.group_ids():
            if wanted.get(group_id) != self._host.replica_id(group_id):
                self._remove(group_id)
        for group_id, replica_id in sorted(wanted.items()):
            if not self._host.has_group(group_id):
                self._start(shard_map, group_id, replica_id)

    def _start(self, shard_map: ShardMap, group_id: int, replica_id: NodeId) -> None:
        stored = self._stored_replica_id(group_id)
        voters = ConfState(voters=frozenset(shard_map.group(group_id).replicas))
        split = shard_map.split_that_made(group_id)
        if split is not None and stored is None:
            # Never hosted here: the first start of a split's upper half on this node.
            self._start_upper_half(split, replica_id, voters)
            return
        is_founding = replica_id == self._node_id  # incarnation 0: a member since the start
        if stored != replica_id and (stored is not None or not is_founding):
            self._wipe(group_id)  # state of an older replica of this group, or crash residue
        self._record(group_id, replica_id)
        # Founding replicas bootstrap (a no-op when they have state); joiners start empty and
        # learn the group, from a snapshot, from its leader.
        bootstrap = voters if is_founding else None
        if group_id == META_GROUP_ID:
            machine: MetaStateMachine | KVStateMachine = self._meta
        else:
            machine = self._shards.get(group_id) or self._new_machine(group_id)
        self._add(group_id, replica_id, machine, bootstrap)

    def _start_upper_half(self, split: Split, replica_id: NodeId, voters: ConfState) -> None:
        group_id = split.child_id
        handed_over = self._shards.get(group_id) or self._new_machine(group_id)
        if handed_over.has_split_range():  # as on the parent's other replicas: bootstrap
            # Bootstrap first: a crash before the record then comes back to this same branch.
            self._add(group_id, replica_id, handed_over, voters)
            # Its data did not come through its log: a replica that starts empty (its parent
            # skipped the split) must get a snapshot, never the log from index 1.
            self._host.request_snapshot(group_id)
            self._record(group_id, replica_id)
        elif self._parent_still_holds(split):
            log.debug("group %d waits for shard %d's handover", group_id, split.shard)
        else:  # the local parent skipped the split (by a snapshot): a joiner's start
            self._wipe(group_id)
            self._record(group_id, replica_id)
            self._add(group_id, replica_id, self._new_machine(group_id), None)

    def _add(
        self,
        group_id: int,
        replica_id: NodeId,
        machine: MetaStateMachine | KVStateMachine,
        bootstrap: ConfState | None,
    ) -> None:
        if isinstance(machine, KVStateMachine):
            self._shards[group_id] = machine
        self._host.add_group(group_id, machine, bootstrap=bootstrap, replica_id=replica_id)
        log.info("node %d hosts replica %d of group %d", self._node_id, replica_id, group_id)

    def _parent_still_holds(self, split: Split) -> bool:
        """Whether the local replica of the split's parent has yet to apply its SplitShard."""
        parent = self._shards.get(split.shard)
        if parent is None or not self._host.has_group(split.shard):
            return False
        return parent.token_range()[1] > split.split_token

    def _remove(self, group_id: int) -> None:
        log.info(
            "node %d drops replica %d of group %d",
            self._node_id,
            self._host.replica_id(group_id),
            group_id,
        )
        self._host.remove_group(group_id)
        self._wipe(group_id)
        with self._env.begin(write=True, db=self._db) as txn:
            txn.delete(_key(group_id))

    def _wipe(self, group_id: int) -> None:
        self._store.drop_group(GroupId(group_id))
        if group_id == META_GROUP_ID:
            self._meta.clear_applied()
        else:
            machine = self._shards.pop(group_id, None) or self._new_machine(group_id)
            machine.clear()

    def _new_machine(self, group_id: int) -> KVStateMachine:
        return KVStateMachine(self._env, group_id, dbs=self._kv_dbs, cipher=self._cipher)

    def _stored_replica_id(self, group_id: int) -> NodeId | None:
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(_key(group_id))
        return None if raw is None else NodeId(int.from_bytes(raw, "big"))

    def _record(self, group_id: int, replica_id: NodeId) -> None:
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_key(group_id), replica_id.to_bytes(8, "big"))


def _key(group_id: int) -> bytes:
    return _REPLICA_ID + group_id.to_bytes(8, "big")
