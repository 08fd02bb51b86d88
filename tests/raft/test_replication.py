"""Log replication: the leader's no-op, pipelining and its bounds, fast backtracking, the Figure 8
commit rule, and the persistence contract of Ready (what may leave before the fsync)."""

from __future__ import annotations

from cluster_driver import Cluster

from raft.core.messages import (
    AppendEntries,
    AppendEntriesReply,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatReply,
    InstallSnapshotReply,
    Message,
    RequestVote,
    RequestVoteReply,
)
from raft.core.progress import ProgressState
from raft.core.types import LogIndex, NodeId, Term


def _entries(cluster: Cluster, node_id: int) -> list[Entry]:
    storage = cluster.storage(node_id)
    return storage.entries(storage.first_index(), LogIndex(storage.last_index() + 1))


def _carried(messages: list[Message]) -> list[tuple[int, ...]]:
    """The entry indexes of each AppendEntries that carries entries (not just a commit index)."""
    return [
        tuple(entry.index for entry in message.entries)
        for message in messages
        if isinstance(message, AppendEntries) and message.entries
    ]


def test_a_new_leader_appends_an_empty_no_op_entry_of_its_term():
    cluster = Cluster(3)
    leader = cluster.elect(1, settle=False)
    assert leader.term == 2
    (first_ready, *_) = [r for r in cluster.readies[1] if r.entries_to_persist]
    assert first_ready.entries_to_persist == (Entry(Term(2), LogIndex(4), b"", EntryKind.NORMAL),)

    cluster.deliver_all()
    for node_id in (1, 2, 3):
        assert cluster.node(node_id).commit_index == 4
        assert cluster.applied[node_id][-1] == Entry(Term(2), LogIndex(4))


def test_a_leader_pipelines_appends_to_a_replicating_follower_up_to_max_inflight_messages():
    cluster = Cluster(3, max_inflight_messages=3)
    leader = cluster.elect(1)
    assert leader.progress(NodeId(2)).state is ProgressState.REPLICATE
    for i in range(10):
        cluster.propose(1, b"entry %d" % i)

    # No reply has come back, yet three appends are in flight, and not one more.
    assert _carried(cluster.pending(1, 2)) == [(5,), (6,), (7,)]
    assert not cluster.pending(2, 1)

    cluster.deliver(1, 2)
    cluster.deliver(2, 1)  # the acks open the window again: the rest goes at once
    assert _carried(cluster.pending(1, 2))[0] == tuple(range(8, 15))
    cluster.deliver_all()
    assert _entries(cluster, 2) == _entries(cluster, 1)
    assert cluster.node(2).commit_index == 14


def test_a_probing_follower_gets_one_append_at_a_time():
    cluster = Cluster(3, max_inflight_messages=3)
    cluster.elect(1)
    cluster.isolate(2)
    cluster.propose(1, b"lost")
    cluster.heal(2)
    cluster.tick(1)  # heartbeat, reply, an append past node 2's end, rejected: probing
    for _ in range(2):
        cluster.deliver(1, 2)
        cluster.deliver(2, 1)
    assert cluster.node(1).progress(NodeId(2)).state is ProgressState.PROBE
    assert _carried(cluster.pending(1, 2)) == [(5,)]
    for i in range(5):
        cluster.propose(1, b"entry %d" % i)
    assert _carried(cluster.pending(1, 2)) == [(5,)]  # still only the probe
    cluster.deliver(1, 2)
    cluster.deliver(2, 1)  # the probe matched: replicating again, all the rest at once
    assert _carried(cluster.pending(1, 2)) == [tuple(range(6, 11))]


def test_max_bytes_per_message_caps_an_append_but_a_single_larger_entry_still_goes_alone():
    cluster = Cluster(3, max_bytes_per_message=100)  # Entry.size_bytes = len(data) + 24
    leader = cluster.elect(1)
    first = len(cluster.sent_messages(1, 2))
    for _ in range(6):
        leader.propose(b"s" * 26)  # 50 bytes each: two fit in a message
    _, big = leader.propose(b"B" * 500)
    leader.propose(b"s" * 26)
    cluster.process_ready(1)
    cluster.deliver_all()

    assert _carried(cluster.sent_messages(1, 2)[first:]) == [
        (5, 6),
        (7, 8),
        (9, 10),
        (big,),
        (12,),
    ]
    assert _entries(cluster, 2) == _entries(cluster, 1)


def test_fast_backtracking_repairs_a_long_divergent_suffix_in_one_rejection():
    cluster = Cluster(3, check_quorum=False)
    cluster.elect(1)
    cluster.isolate(1)
    for i in range(50):  # node 1, cut off, keeps appending entries of term 2 no one else has
        cluster.propose(1, b"stale %d" % i)
    cluster.elect(2)
    for i in range(60):
        cluster.propose(2, b"fresh %d" % i)
    cluster.deliver_all()
    cluster.elect(3)  # a leader that has never talked to node 1: it starts probing at its end
    assert cluster.storage(1).last_index() == 54
    assert cluster.storage(1).term(LogIndex(54)) == 2
    assert cluster.storage(3).last_index() == 66

    cluster.heal(1)
    first = len(cluster.sent)
    cluster.tick(3)
    cluster.deliver_all()

    replies = [m for m in cluster.sent[first:] if isinstance(m, AppendEntriesReply)]
    rejections = [m for m in replies if m.sender == 1 and not m.success]
    assert len(rejections) == 1  # one-by-one backtracking would take 61
    probes = [m for m in cluster.sent[first:] if isinstance(m, AppendEntries) and m.recipient == 1]
    # Straight to the last matching entry (4, the old leader's no-op): no matching prefix resent.
    assert [m.prev_log_index for m in probes[:2]] == [65, 4]
    assert _entries(cluster, 1) == _entries(cluster, 3)


def _figure_8_up_to_the_old_entry_on_a_majority() -> tuple[Cluster, LogIndex]:
    """Raft paper, Figure 8 (a)-(c), with five servers S1..S5 (indexes shifted by the bootstrap
    entries 1..5 and the term-2 no-op at 6). max_bytes_per_message=1 makes each append carry one
    entry, so the old entry can be replicated without the new leader's no-op."""
    cluster = Cluster(5, pre_vote=False, check_quorum=False, max_bytes_per_message=1)
    cluster.elect(1)
    # (a) S1 leads term 2 and replicates X at index 7 to S2 only.
    _, x = cluster.propose(1, b"X")
    for node_id in (3, 4, 5):
        cluster.drop(1, node_id)
    cluster.deliver(1, 2)
    cluster.deliver(2, 1)
    # (b) S1 crashes; S5 wins term 3 with S3 and S4 and appends its own entry (its no-op) at 7.
    cluster.crash(1)
    s5 = cluster.elect(5, settle=False)
    assert (s5.term, s5.log.term(x)) == (3, 3)
    # (c) S5 crashes; S1 restarts and wins term 4 with S2, S3, S4 (S4 then falls behind).
    cluster.crash(5)
    cluster.restart(1)
    s1 = cluster.elect(1, settle=False)
    assert s1.term == 4
    cluster.isolate(4)
    cluster.deliver(1, 2)  # S2 takes S1's no-op at index 8
    cluster.deliver(2, 1)
    cluster.deliver(1, 3)  # S3 lacks index 7: rejects
    cluster.deliver(3, 1)
    cluster.deliver(1, 3)  # the retry carries only X (term 2) at index 7
    cluster.deliver(3, 1)
    assert cluster.storage(3).term(x) == 2
    assert [s1.progress(NodeId(i)).match_index for i in (1, 2, 3)] == [8, 8, 7]
    return cluster, x


def test_figure_8_a_leader_does_not_commit_an_old_term_entry_by_counting_replicas():
    cluster, x = _figure_8_up_to_the_old_entry_on_a_majority()
    s1 = cluster.node(1)
    # X is on S1, S2 and S3, a majority, but it is of term 2: counting replicas is not enough.
    assert s1.commit_index == x - 1

    # (e) Once S1's own term-4 entry is on a majority, it commits, and X with it.
    cluster.deliver(1, 3)
    cluster.deliver(3, 1)
    assert s1.commit_index == x + 1
    assert [e.data for e in cluster.applied[1] if e.index == x] == [b"X"]


def test_figure_8_an_old_term_entry_on_a_majority_can_still_be_overwritten():
    """Why the rule above matters: from the same state, (d) S5 can still be elected and replace
    X everywhere, so committing X would have broken State Machine Safety."""
    cluster, x = _figure_8_up_to_the_old_entry_on_a_majority()
    cluster.crash(1)
    cluster.heal(4)
    cluster.restart(5)
    cluster.elect(5)
    for node_id in (2, 3, 4, 5):
        assert cluster.storage(node_id).term(x) == 3


def test_votes_and_append_acks_leave_only_after_persist_while_appends_leave_at_once():
    cluster = Cluster(3, pre_vote=False)
    for _ in range(20):
        cluster.tick(1)
        if cluster.pending(1):
            break
    (campaign,) = [r for r in cluster.readies[1] if r.hard_state is not None]
    assert campaign.hard_state == HardState(Term(2), NodeId(1), LogIndex(3))
    assert campaign.messages == ()
    assert {type(m) for m in campaign.messages_after_persist} == {RequestVote}

    cluster.deliver(1, 2)
    (vote,) = cluster.readies[2]
    assert vote.hard_state == HardState(Term(2), NodeId(1), LogIndex(3))
    assert vote.messages == ()
    assert [type(m) for m in vote.messages_after_persist] == [RequestVoteReply]

    cluster.deliver(2, 1)
    assert cluster.node(1).is_leader
    leading = cluster.readies[1][-1]
    assert [e.index for e in leading.entries_to_persist] == [4]
    assert {m.recipient for m in leading.messages if isinstance(m, AppendEntries)} == {2, 3}
    assert leading.messages_after_persist == ()

    cluster.deliver(1, 2)
    ack = cluster.readies[2][-1]
    assert [e.index for e in ack.entries_to_persist] == [4]
    assert ack.messages == ()
    assert [type(m) for m in ack.messages_after_persist] == [AppendEntriesReply]


def test_no_reply_or_vote_ever_leaves_before_persist():
    cluster = Cluster(3)
    cluster.elect(1)
    for i in range(5):
        cluster.propose(1, b"%d" % i)
        cluster.tick(1)
    cluster.deliver_all()
    promises = (
        RequestVote,
        RequestVoteReply,
        AppendEntriesReply,
        HeartbeatReply,
        InstallSnapshotReply,
    )
    readies = [ready for node_readies in cluster.readies.values() for ready in node_readies]
    early = [m for r in readies for m in r.messages]
    late = [m for r in readies for m in r.messages_after_persist]
    assert not [m for m in early if isinstance(m, promises)]
    assert not [m for m in late if isinstance(m, (AppendEntries, Heartbeat))]
    assert len(late) > 10


def test_a_crash_before_persisting_loses_unpersisted_entries_but_never_acknowledged_ones():
    cluster = Cluster(3)
    leader = cluster.elect(1)
    _, acked = cluster.propose(1, b"acknowledged")
    cluster.deliver(1, 2)
    assert [m.match_index for m in cluster.pending(2, 1, AppendEntriesReply)] == [acked]

    _, unpersisted = cluster.propose(1, b"not yet persisted")
    cluster.deliver(1, 2, process=False)  # stepped into node 2, which crashes before its Ready
    assert cluster.node(2).log.last_index() == unpersisted
    cluster.crash(2)

    restarted = cluster.restart(2)
    assert restarted.log.last_index() == acked
    assert [e.data for e in _entries(cluster, 2)[-1:]] == [b"acknowledged"]
    assert restarted.term == leader.term

    cluster.deliver_all()
    cluster.tick(1)  # the next heartbeat round repairs node 2
    cluster.deliver_all()
    assert _entries(cluster, 2) == _entries(cluster, 1)


def test_a_leader_counts_its_own_entry_toward_commit_only_after_advance():
    cluster = Cluster(1)
    leader = cluster.elect(1)
    _, index = leader.propose(b"x")
    assert leader.commit_index == index - 1

    ready = leader.ready()
    assert [e.index for e in ready.entries_to_persist] == [index]
    assert ready.entries_to_apply == ()  # the sole voter has not persisted it yet
    assert ready.hard_state is None or ready.hard_state.commit < index
    assert leader.commit_index == index - 1
    cluster.storage(1).append(ready.entries_to_persist)
    leader.advance(ready)
    assert leader.commit_index == index

    applying = leader.ready()
    assert [e.index for e in applying.entries_to_apply] == [index]
    leader.advance(applying)
