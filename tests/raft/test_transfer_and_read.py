"""Leadership transfer (TimeoutNow) and linearizable reads (ReadIndex, dissertation §6.4)."""

from __future__ import annotations

import pytest
from cluster_driver import Cluster

from raft.core.errors import NotLeader, ProposalDropped
from raft.core.messages import (
    AppendEntries,
    AppendEntriesReply,
    Heartbeat,
    ReadState,
    RequestVote,
    TimeoutNow,
)
from raft.core.node import Role
from raft.core.types import LogIndex, NodeId


def test_transfer_to_a_caught_up_target_sends_timeout_now_and_the_target_leads_the_next_term():
    cluster = Cluster(3)
    leader = cluster.elect(1)
    term = leader.term
    leader.transfer_leader(NodeId(2))
    (ready,) = cluster.process_ready(1)
    assert [type(m) for m in ready.messages] == [TimeoutNow]
    assert ready.messages[0].recipient == 2

    with pytest.raises(ProposalDropped):
        leader.propose(b"during the transfer")

    cluster.deliver_all()
    assert cluster.node(2).is_leader
    assert cluster.node(2).term == term + 1
    assert leader.role is Role.FOLLOWER
    assert leader.leader_id == 2
    # Node 3 had just heard from node 1: only the transfer flag got its vote past stickiness.
    requests = cluster.sent_messages(2, types=RequestVote)
    assert requests
    assert all(r.leadership_transfer and not r.pre_vote for r in requests)
    with pytest.raises(NotLeader) as raised:
        leader.propose(b"after the transfer")
    assert raised.value.leader_hint == 2


def test_a_transfer_not_done_within_an_election_timeout_is_abandoned():
    cluster = Cluster(3, election_timeout_ticks=10)
    leader = cluster.elect(1)
    leader.transfer_leader(NodeId(2))
    cluster.process_ready(1)
    cluster.drop(1, 2)  # the TimeoutNow is lost
    with pytest.raises(ProposalDropped):
        leader.propose(b"too early")
    for _ in range(10):
        cluster.tick(1)
        cluster.deliver_all()
    assert leader.is_leader
    assert leader.lead_transferee == 0
    cluster.propose(1, b"accepted again")


def test_transfer_to_a_lagging_target_first_replicates_then_sends_timeout_now():
    cluster = Cluster(3)
    leader = cluster.elect(1)
    cluster.isolate(3)
    for i in range(3):
        cluster.propose(1, b"%d" % i)
    cluster.deliver_all()
    cluster.heal(3)
    last = leader.log.last_index()
    first = len(cluster.sent)

    leader.transfer_leader(NodeId(3))
    cluster.process_ready(1)
    assert not cluster.pending(types=TimeoutNow)
    assert cluster.pending(1, 3, AppendEntries)
    cluster.deliver_all()

    traffic = [m for m in cluster.sent[first:] if 3 in (m.sender, m.recipient)]
    (timeout_now,) = [i for i, m in enumerate(traffic) if isinstance(m, TimeoutNow)]
    catch_up = [
        i
        for i, m in enumerate(traffic)
        if isinstance(m, AppendEntriesReply) and m.success and m.match_index == last
    ]
    assert catch_up
    assert catch_up[0] < timeout_now
    assert cluster.node(3).is_leader
    assert cluster.node(3).log.last_index() == last + 1  # its own no-op after everything


def test_read_index_yields_a_read_state_only_after_a_majority_acknowledges_a_heartbeat_round():
    cluster = Cluster(5)
    leader = cluster.elect(1)
    commit_at_request = leader.commit_index
    leader.read_index(b"read 1")
    cluster.process_ready(1)
    assert len(cluster.pending(1, types=Heartbeat)) == 4
    assert cluster.read_states[1] == []

    _, index = cluster.propose(1, b"written after the read was asked")
    for follower in (2, 3, 4, 5):
        cluster.deliver(1, follower)
    assert cluster.read_states[1] == []  # the followers answered, but nothing reached the leader

    cluster.deliver(2, 1, types=AppendEntriesReply)
    cluster.deliver(3, 1, types=AppendEntriesReply)
    assert leader.commit_index == index  # commit moved on; the read keeps its own index
    cluster.deliver(2, 1)  # heartbeat reply: leader + node 2 are two of five
    assert cluster.read_states[1] == []
    cluster.deliver(3, 1)  # three of five
    assert cluster.read_states[1] == [ReadState(commit_at_request, b"read 1")]


def test_reads_queued_together_are_confirmed_by_one_heartbeat_round():
    cluster = Cluster(3)
    leader = cluster.elect(1)
    first = len(cluster.sent)
    for context in (b"a", b"b", b"c"):
        leader.read_index(context)
    cluster.process_ready(1)
    cluster.deliver_all()
    assert len([m for m in cluster.sent[first:] if isinstance(m, Heartbeat)]) == 2
    (confirming,) = [r for r in cluster.readies[1] if r.read_states]
    commit = leader.commit_index
    assert confirming.read_states == (
        ReadState(commit, b"a"),
        ReadState(commit, b"b"),
        ReadState(commit, b"c"),
    )


def test_a_new_leader_delays_reads_until_its_no_op_commits():
    cluster = Cluster(3)
    leader = cluster.elect(1, settle=False)
    no_op = leader.log.last_index()
    assert leader.commit_index < no_op
    leader.read_index(b"early read")
    cluster.process_ready(1)
    assert not cluster.pending(types=Heartbeat)

    cluster.deliver_all()
    assert cluster.read_states[1] == [ReadState(no_op, b"early read")]
    assert [m.read_seq for m in cluster.sent_messages(1, types=Heartbeat)] == [1, 1]


def test_read_index_on_a_follower_raises_not_leader_with_the_leader_hint():
    cluster = Cluster(3)
    cluster.elect(1)
    with pytest.raises(NotLeader) as raised:
        cluster.node(2).read_index(b"x")
    assert raised.value.leader_hint == 1
    assert cluster.node(2).commit_index == LogIndex(4)


def test_a_node_that_may_not_campaign_never_starts_an_election_but_still_votes():
    cluster = Cluster(3, election_timeout_ticks=10)
    cluster.node(2).may_campaign = False
    cluster.tick(2, 100)
    cluster.deliver_all()
    assert cluster.leader() is None
    assert not cluster.sent_messages(2, types=RequestVote)
    cluster.crash(1)
    leader = cluster.elect(3)  # with node 1 down, only node 2's vote makes a majority
    assert leader.is_leader
    leader.transfer_leader(NodeId(2))  # nor does a TimeoutNow make it take over
    cluster.deliver_all()
    assert leader.is_leader
    assert not cluster.node(2).is_leader
