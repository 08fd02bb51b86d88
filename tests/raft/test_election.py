"""Leader election: randomized timeouts, majorities, one vote per term, the §5.4.1 up-to-date
check, PreVote, CheckQuorum and leader stickiness. Driven tick by tick and message by message."""

from __future__ import annotations

from cluster_driver import Cluster

from raft.core.messages import Heartbeat, RequestVote, RequestVoteReply
from raft.core.node import Role
from raft.core.types import NO_NODE, LogIndex, NodeId, Term

T = 10  # election_timeout_ticks


def _ticks_until_campaign(cluster: Cluster, node_id: int) -> int:
    for ticks in range(1, 4 * T):
        cluster.tick(node_id)
        if cluster.sent_messages(node_id, types=RequestVote):
            return ticks
    raise AssertionError(f"node {node_id} never campaigned")


def test_election_timeouts_are_randomized_in_one_to_two_election_timeouts():
    timeouts = [
        _ticks_until_campaign(Cluster(3, seed=seed, election_timeout_ticks=T), 1)
        for seed in range(30)
    ]
    assert all(T <= timeout < 2 * T for timeout in timeouts), timeouts
    assert len(set(timeouts)) >= 4, timeouts  # seeds spread the timeouts, avoiding split votes


def test_nodes_of_one_cluster_draw_different_election_timeouts():
    cluster = Cluster(5, election_timeout_ticks=T)
    timeouts = {_ticks_until_campaign(cluster, node_id) for node_id in range(1, 6)}
    assert len(timeouts) > 1


def test_candidate_wins_only_once_a_majority_has_voted_for_it():
    cluster = Cluster(5, pre_vote=False)
    _ticks_until_campaign(cluster, 1)
    candidate = cluster.node(1)
    assert candidate.role is Role.CANDIDATE
    assert candidate.term == 2

    cluster.deliver(1, 2)
    cluster.deliver(2, 1)  # two votes of five, counting its own
    assert candidate.role is Role.CANDIDATE

    cluster.deliver(1, 3)
    cluster.deliver(3, 1)  # three of five
    assert candidate.is_leader
    assert candidate.term == 2
    assert cluster.node(4).term == 1  # never heard of the election, yet it is decided


def test_candidate_steps_down_when_it_sees_a_higher_term():
    cluster = Cluster(3, pre_vote=False)
    _ticks_until_campaign(cluster, 1)
    candidate = cluster.node(1)
    assert (candidate.role, candidate.term) == (Role.CANDIDATE, 2)

    while cluster.node(2).term < 3:  # node 2 campaigns, hears nothing, campaigns again
        cluster.tick(2)
    cluster.deliver(2, 1, types=RequestVote)
    assert candidate.role is Role.FOLLOWER
    assert candidate.term == 3
    assert candidate.voted_for == 2  # and, its log being no better, it votes for node 2


def test_a_node_grants_at_most_one_vote_per_term_even_across_a_restart():
    cluster = Cluster(3, pre_vote=False)
    _ticks_until_campaign(cluster, 1)
    (request_from_1,) = cluster.pending(1, 3, RequestVote)
    cluster.deliver(1, 3)
    cluster.crash(3)
    cluster.restart(3)  # the vote for node 1 must have been persisted before it was sent
    assert cluster.node(3).voted_for == 1

    _ticks_until_campaign(cluster, 2)
    assert cluster.node(1).term == cluster.node(2).term == 2
    cluster.deliver(2, 3)
    cluster.send([request_from_1])  # the network duplicates node 1's request
    cluster.deliver(1, 3)  # the node it voted for gets the same answer again

    replies = cluster.sent_messages(3, types=RequestVoteReply)
    assert [(reply.recipient, reply.granted) for reply in replies] == [
        (1, True),
        (2, False),
        (1, True),
    ]


def test_a_voter_refuses_a_candidate_with_a_shorter_log_of_the_same_last_term():
    cluster = Cluster(3, pre_vote=False, check_quorum=False)
    cluster.elect(1)
    cluster.isolate(3)
    cluster.propose(1, b"x")
    cluster.deliver_all()
    assert cluster.storage(2).last_index() == 5
    assert cluster.storage(3).last_index() == 4
    assert cluster.storage(2).term(LogIndex(5)) == cluster.storage(3).term(LogIndex(4))

    cluster.heal(3)
    cluster.isolate(1)
    _ticks_until_campaign(cluster, 3)
    cluster.deliver(3, 2)

    (reply,) = cluster.sent_messages(2, 3, RequestVoteReply)
    assert not reply.granted
    assert cluster.node(2).term == cluster.node(3).term  # it adopted the term, not the candidate
    assert cluster.node(2).voted_for == NO_NODE


def test_a_voter_refuses_a_longer_log_whose_last_term_is_older_than_its_own():
    cluster = Cluster(3, pre_vote=False, check_quorum=False)
    cluster.elect(1)  # everyone's last entry is the term-2 no-op at index 4
    voter = cluster.node(2)
    voter.step(
        RequestVote(
            sender=NodeId(3),
            recipient=NodeId(2),
            term=Term(7),
            last_log_index=LogIndex(100),
            last_log_term=Term(1),
        )
    )
    cluster.process_ready(2)
    (reply,) = cluster.pending(2, 3, RequestVoteReply)
    assert not reply.granted
    assert voter.voted_for == NO_NODE


def _disturbance_by_a_rejoining_node(*, pre_vote: bool) -> Cluster:
    """Node 3 is cut off and times out many times alone, then comes back and hears the leader."""
    cluster = Cluster(3, pre_vote=pre_vote)
    cluster.elect(1)
    cluster.isolate(3)
    cluster.tick(3, 10 * T)
    cluster.heal(3)
    cluster.tick(1)  # a heartbeat round
    cluster.deliver_all()
    return cluster


def test_with_pre_vote_a_partitioned_node_that_rejoins_does_not_bump_the_term():
    cluster = _disturbance_by_a_rejoining_node(pre_vote=True)
    assert [cluster.node(i).term for i in (1, 2, 3)] == [2, 2, 2]
    assert cluster.node(1).is_leader
    assert cluster.node(3).leader_id == 1


def test_without_pre_vote_a_partitioned_node_that_rejoins_deposes_the_leader():
    cluster = _disturbance_by_a_rejoining_node(pre_vote=False)
    assert cluster.node(3).term > 2
    assert not cluster.node(1).is_leader
    assert cluster.node(1).term == cluster.node(3).term


def _leader_cut_off_from_the_cluster(*, check_quorum: bool, ticks: int) -> Cluster:
    cluster = Cluster(3, check_quorum=check_quorum, election_timeout_ticks=T)
    cluster.elect(1)
    cluster.isolate(1)
    cluster.tick(1, ticks)
    return cluster


def test_with_check_quorum_an_isolated_leader_steps_down_within_two_election_timeouts():
    assert _leader_cut_off_from_the_cluster(check_quorum=True, ticks=T - 1).node(1).is_leader
    stepped_down = _leader_cut_off_from_the_cluster(check_quorum=True, ticks=2 * T).node(1)
    assert stepped_down.role is Role.FOLLOWER
    assert stepped_down.term == 2  # it steps down without starting an election
    assert stepped_down.leader_id == NO_NODE


def test_without_check_quorum_an_isolated_leader_keeps_leading():
    assert _leader_cut_off_from_the_cluster(check_quorum=False, ticks=10 * T).node(1).is_leader


def test_a_leader_that_hears_from_a_majority_keeps_leading_with_check_quorum():
    cluster = Cluster(3, election_timeout_ticks=T)
    cluster.elect(1)
    cluster.isolate(3)
    for _ in range(5 * T):
        cluster.tick(1)
        cluster.deliver_all()
    assert cluster.node(1).is_leader


def test_followers_that_heard_from_the_leader_recently_ignore_a_vote_request_of_a_higher_term():
    cluster = Cluster(3, pre_vote=False, election_timeout_ticks=T)
    cluster.elect(1)
    cluster.network.clear()
    _ticks_until_campaign(cluster, 3)  # node 3 alone lost patience: term 3
    assert cluster.node(3).term == 3

    sent_before = len(cluster.sent)
    cluster.deliver(3, 2)
    cluster.deliver(3, 1)
    assert cluster.node(2).term == 2
    assert cluster.node(2).voted_for == 1  # still its vote of term 2
    assert cluster.node(1).is_leader
    assert cluster.node(1).term == 2
    assert cluster.sent[sent_before:] == []  # ignored: not even a rejection

    cluster.tick(2, T)  # now node 2 has not heard from the leader for an election timeout
    assert not cluster.pending(types=Heartbeat)
    cluster.tick(3, 2 * T)
    cluster.deliver(3, 2)
    assert cluster.node(2).term == cluster.node(3).term > 2
    assert cluster.node(2).voted_for == 3


def test_without_check_quorum_followers_do_not_ignore_a_higher_term_vote_request():
    cluster = Cluster(3, pre_vote=False, check_quorum=False, election_timeout_ticks=T)
    cluster.elect(1)
    cluster.network.clear()
    _ticks_until_campaign(cluster, 3)
    cluster.deliver(3, 2)
    assert cluster.node(2).term == 3
