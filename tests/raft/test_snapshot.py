"""Snapshots: once the application compacts the leader's log, a lagging follower is caught up with
InstallSnapshot in chunks; a lost chunk is resent; afterwards plain AppendEntries resume."""

from __future__ import annotations

from cluster_driver import Cluster

from raft.core.messages import AppendEntries, InstallSnapshot, Message, SnapshotMeta
from raft.core.types import LogIndex, NodeId

CHUNK = 16
SNAPSHOT_DATA = bytes(range(100))  # 7 chunks of 16 bytes, the last one 4 bytes


def _lagging_follower_behind_a_compacted_log() -> Cluster:
    """Node 3 misses entries 5..14, then the leader's application snapshots at 14."""
    cluster = Cluster(3, snapshot_chunk_bytes=CHUNK)
    leader = cluster.elect(1)
    cluster.isolate(3)
    for i in range(10):
        cluster.propose(1, b"entry %d" % i)
    cluster.deliver_all()
    index = leader.last_applied
    assert index == 14
    cluster.storage(1).create_snapshot(index, leader.conf_at(index), SNAPSHOT_DATA)
    assert cluster.storage(1).first_index() == 15  # entries 5..14 are gone from the leader
    cluster.heal(3)
    return cluster


def _chunks(messages: list[Message]) -> list[tuple[int, int, bool]]:
    return [(m.offset, len(m.data), m.done) for m in messages if isinstance(m, InstallSnapshot)]


def test_a_lagging_follower_is_caught_up_with_a_snapshot_sent_in_several_chunks():
    cluster = _lagging_follower_behind_a_compacted_log()
    cluster.tick(1)  # the heartbeat round finds node 3 behind the compacted prefix
    cluster.deliver_all()

    assert _chunks(cluster.sent_messages(1, 3)) == [
        (0, 16, False),
        (16, 16, False),
        (32, 16, False),
        (48, 16, False),
        (64, 16, False),
        (80, 16, False),
        (96, 4, True),
    ]
    (snapshot,) = [r.snapshot for r in cluster.readies[3] if r.snapshot is not None]
    assert snapshot.data == SNAPSHOT_DATA
    assert snapshot.meta == SnapshotMeta(LogIndex(14), cluster.node(1).term, cluster.node(1).conf)
    assert cluster.storage(3).snapshot() == snapshot
    assert cluster.node(3).commit_index == cluster.node(3).last_applied == 14
    assert cluster.node(1).progress(NodeId(3)).match_index == 14


def test_a_lost_snapshot_chunk_is_resent_after_the_next_heartbeat():
    cluster = _lagging_follower_behind_a_compacted_log()
    cluster.tick(1)
    lost: list[Message] = []

    def lose_the_chunk_at_32(message: Message) -> bool:
        if isinstance(message, InstallSnapshot) and message.offset == 32 and not lost:
            lost.append(message)
            return True
        return False

    cluster.deliver_all(drop=lose_the_chunk_at_32)
    assert lost
    assert not cluster.installed_snapshots[3]  # the network is quiet; the transfer is stuck

    cluster.tick(1)  # heartbeat; its reply makes the leader resend from where it stood
    cluster.deliver_all()
    offsets = [offset for offset, _, _ in _chunks(cluster.sent_messages(1, 3))]
    assert offsets == [0, 16, 32, 32, 48, 64, 80, 96]  # resumed at 32, not restarted at 0
    (snapshot,) = cluster.installed_snapshots[3]
    assert snapshot.data == SNAPSHOT_DATA


def test_after_a_snapshot_the_follower_receives_later_entries_by_append_entries():
    cluster = _lagging_follower_behind_a_compacted_log()
    cluster.tick(1)
    cluster.deliver_all()
    first = len(cluster.sent)
    for i in range(3):
        cluster.propose(1, b"later %d" % i)
        cluster.tick(1)
        cluster.deliver_all()

    later = cluster.sent[first:]
    assert not any(isinstance(m, InstallSnapshot) for m in later)
    carried = [
        entry.data
        for message in later
        if isinstance(message, AppendEntries) and message.recipient == 3
        for entry in message.entries
    ]
    assert carried == [b"later 0", b"later 1", b"later 2"]
    applied_after_snapshot = [e for e in cluster.applied[3] if e.index > 14]
    assert [e.data for e in applied_after_snapshot] == [b"later 0", b"later 1", b"later 2"]
    assert cluster.storage(3).first_index() == 15
    assert cluster.storage(3).last_index() == 17


def test_a_follower_caught_up_by_snapshot_gets_the_next_entry_without_waiting_for_a_heartbeat():
    """With node 2 down, committing needs node 3. Once node 3 has the snapshot (and acked the
    leader's probe right after it), a new entry must reach it at once, like any replicating
    follower, not one heartbeat later."""
    cluster = _lagging_follower_behind_a_compacted_log()
    cluster.tick(1)
    cluster.deliver_all()
    assert cluster.installed_snapshots[3]
    cluster.isolate(2)

    _, index = cluster.propose(1, b"after the snapshot")
    cluster.deliver_all()  # no tick: only the replication traffic itself
    assert cluster.storage(3).last_index() == index
    assert cluster.node(1).commit_index == index
