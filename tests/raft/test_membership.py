"""Single-server membership changes: learners, promotion, removal, one change at a time, the new
leader's wait for its no-op, and membership derived from the log by a node that joins empty."""

from __future__ import annotations

import pytest
from cluster_driver import Cluster

from raft.core.errors import ConfChangeInProgress
from raft.core.messages import ConfChange, ConfChangeType, ConfState, RequestVote
from raft.core.node import Role
from raft.core.types import LogIndex, NodeId

N4 = NodeId(4)


def _ids(*node_ids: int) -> frozenset[NodeId]:
    return frozenset(NodeId(i) for i in node_ids)


def _change(cluster: Cluster, change_type: ConfChangeType, node_id: int) -> LogIndex:
    """Propose a membership change on leader 1 and let it commit and apply everywhere."""
    _, index = cluster.node(1).propose_conf_change(ConfChange(change_type, NodeId(node_id)))
    cluster.process_ready(1)
    cluster.deliver_all()
    assert cluster.node(1).last_applied >= index
    return index


def _cluster_with_learner_4() -> Cluster:
    cluster = Cluster(3, joiners=1)
    cluster.elect(1)
    _change(cluster, ConfChangeType.ADD_LEARNER, 4)
    return cluster


def test_an_added_learner_receives_the_whole_log():
    cluster = _cluster_with_learner_4()
    assert cluster.node(1).conf == ConfState(_ids(1, 2, 3), _ids(4))
    cluster.propose(1, b"x")
    cluster.deliver_all()
    assert [e.index for e in cluster.applied[4]] == [1, 2, 3, 4, 5, 6]
    assert cluster.applied[4] == cluster.applied[1]


def test_learners_are_not_counted_toward_commit():
    cluster = Cluster(3, joiners=2)
    cluster.elect(1)
    _change(cluster, ConfChangeType.ADD_LEARNER, 4)
    _change(cluster, ConfChangeType.ADD_LEARNER, 5)
    cluster.isolate(2, 3)
    _, index = cluster.propose(1, b"x")
    cluster.deliver_all()
    assert cluster.storage(4).last_index() == cluster.storage(5).last_index() == index
    # Three of five members hold it, but only one of the three voters.
    assert cluster.node(1).commit_index == index - 1

    cluster.heal(2)
    cluster.tick(1)
    cluster.deliver_all()
    assert cluster.node(1).commit_index == index


def test_a_learner_never_campaigns():
    cluster = _cluster_with_learner_4()
    cluster.isolate(4)
    cluster.tick(4, 100)
    assert cluster.node(4).role is Role.FOLLOWER
    assert not cluster.sent_messages(4, types=RequestVote)


def test_a_promoted_learner_votes_counts_toward_commit_and_campaigns():
    cluster = _cluster_with_learner_4()
    _change(cluster, ConfChangeType.ADD_VOTER, 4)
    for node_id in (1, 2, 3, 4):
        assert cluster.node(node_id).conf == ConfState(_ids(1, 2, 3, 4))

    cluster.isolate(2, 3)
    _, index = cluster.propose(1, b"x")
    cluster.deliver_all()
    assert cluster.node(1).commit_index == index - 1  # two of four voters: not yet
    cluster.heal(2)
    cluster.tick(1)
    cluster.deliver_all()
    assert cluster.node(1).commit_index == index  # three of four

    cluster.tick(4, 40)
    assert cluster.sent_messages(4, types=RequestVote)


def test_after_removing_a_voter_a_majority_of_the_remaining_voters_commits():
    cluster = Cluster(4)
    cluster.elect(1)
    _change(cluster, ConfChangeType.REMOVE_NODE, 4)
    assert cluster.node(1).conf == ConfState(_ids(1, 2, 3))
    cluster.isolate(3, 4)
    first = len(cluster.sent)

    _, index = cluster.propose(1, b"x")
    cluster.deliver_all()
    assert cluster.node(1).commit_index == index  # 2 of {1, 2, 3}; it would be 2 of 4 before
    assert cluster.node(1).progress(N4) is None
    assert not [m for m in cluster.sent[first:] if m.recipient == 4]


def test_a_second_membership_change_waits_until_the_first_is_applied():
    cluster = Cluster(3, joiners=2)
    leader = cluster.elect(1)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, N4))
    with pytest.raises(ConfChangeInProgress):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, NodeId(5)))

    cluster.process_ready(1)
    cluster.deliver(1, 2)  # replicated but not yet committed: still in progress
    with pytest.raises(ConfChangeInProgress):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, NodeId(5)))

    cluster.deliver_all()
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, NodeId(5)))
    assert leader.conf.learners == _ids(4, 5)


def test_a_new_leader_refuses_a_membership_change_until_its_no_op_is_applied():
    cluster = Cluster(3, joiners=1)
    leader = cluster.elect(1, settle=False)
    no_op = leader.log.last_index()
    assert leader.log.term(no_op) == leader.term
    with pytest.raises(ConfChangeInProgress):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, N4))

    cluster.deliver(1, 2)
    cluster.deliver(2, 1)  # the no-op commits here; the leader applies it in this Ready
    assert leader.last_applied == no_op
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, N4))


def test_removing_or_demoting_the_leader_itself_raises_value_error():
    cluster = Cluster(3)
    leader = cluster.elect(1)
    for change_type in (ConfChangeType.REMOVE_NODE, ConfChangeType.ADD_LEARNER):
        with pytest.raises(ValueError, match="transfer leadership"):
            leader.propose_conf_change(ConfChange(change_type, NodeId(1)))
    assert not leader.has_ready()


def test_a_node_joining_with_an_empty_log_derives_the_same_membership_by_replaying_it():
    cluster = Cluster(3, joiners=2)
    cluster.elect(1)
    joiner = cluster.node(4)
    assert joiner.conf == ConfState()
    _change(cluster, ConfChangeType.ADD_LEARNER, 4)
    _change(cluster, ConfChangeType.ADD_VOTER, 4)
    _change(cluster, ConfChangeType.REMOVE_NODE, 3)
    _change(cluster, ConfChangeType.ADD_LEARNER, 5)

    expected = ConfState(_ids(1, 2, 4), _ids(5))
    last = cluster.node(1).log.last_index()
    for node_id in (1, 2, 4, 5):
        node = cluster.node(node_id)
        assert node.conf == expected
        assert [node.conf_at(LogIndex(i)) for i in range(1, last + 1)] == [
            cluster.node(1).conf_at(LogIndex(i)) for i in range(1, last + 1)
        ]
    cluster.crash(5)
    assert cluster.restart(5).conf == expected  # from its own storage alone
