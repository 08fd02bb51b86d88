"""Property tests of the pure vote and commit arithmetic in raft.core.quorum."""

from __future__ import annotations

from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from raft.core.quorum import VoteResult, committed_index, has_quorum, majority, vote_result
from raft.core.types import LogIndex, NodeId

_V = TypeVar("_V")


def _by_node(values: dict[int, _V]) -> dict[NodeId, _V]:
    return {NodeId(node): value for node, value in values.items()}


deterministic = settings(derandomize=True, database=None, max_examples=300)

node_ids = st.integers(1, 12).map(NodeId)
voter_sets = st.frozensets(node_ids, min_size=1, max_size=9)


def _holders(match: dict[NodeId, int], voters: frozenset[NodeId], index: int) -> int:
    return sum(1 for voter in voters if match.get(voter, 0) >= index)


@deterministic
@given(voters=voter_sets, match=st.dictionaries(node_ids, st.integers(0, 50)))
def test_committed_index_is_the_largest_index_a_majority_of_voters_holds(voters, match):
    index = committed_index(voters, match)
    needed = majority(len(voters))
    assert _holders(match, voters, index) >= needed
    assert _holders(match, voters, index + 1) < needed
    assert index == 0 or index in {match.get(voter, 0) for voter in voters}


@deterministic
@given(voters=voter_sets, match=st.dictionaries(node_ids, st.integers(0, 50)), extra=st.integers())
def test_committed_index_ignores_non_voters(voters, match, extra):
    outsiders = {NodeId(100 + i): extra for i in range(10)}
    assert committed_index(voters, match | outsiders) == committed_index(voters, match)


def test_committed_index_examples():
    voters = frozenset(NodeId(i) for i in range(1, 6))
    assert committed_index(voters, _by_node({1: 9, 2: 9, 3: 4, 4: 1})) == LogIndex(4)
    assert committed_index(voters, _by_node({1: 9, 2: 9})) == LogIndex(0)
    assert committed_index(frozenset({NodeId(1), NodeId(2)}), _by_node({1: 7, 2: 3})) == LogIndex(3)
    assert committed_index(frozenset(), _by_node({1: 7})) == LogIndex(0)


@deterministic
@given(
    voters=voter_sets,
    votes=st.dictionaries(node_ids, st.booleans()),
)
def test_vote_result_is_won_by_a_majority_lost_when_out_of_reach_pending_otherwise(voters, votes):
    granted = sum(1 for voter in voters if votes.get(voter) is True)
    undecided = sum(1 for voter in voters if voter not in votes)
    needed = majority(len(voters))
    result = vote_result(voters, votes)
    if granted >= needed:
        assert result is VoteResult.WON
    elif granted + undecided < needed:
        assert result is VoteResult.LOST
    else:
        assert result is VoteResult.PENDING


@deterministic
@given(voters=voter_sets, votes=st.dictionaries(node_ids, st.booleans()))
def test_votes_of_non_voters_do_not_count(voters, votes):
    outsiders = {NodeId(100 + i): True for i in range(10)}
    assert vote_result(voters, votes | outsiders) is vote_result(voters, votes)


def test_vote_result_examples():
    three = frozenset({NodeId(1), NodeId(2), NodeId(3)})
    assert vote_result(three, _by_node({1: True})) is VoteResult.PENDING
    assert vote_result(three, _by_node({1: True, 2: True})) is VoteResult.WON
    assert vote_result(three, _by_node({1: True, 2: False})) is VoteResult.PENDING
    assert vote_result(three, _by_node({1: True, 2: False, 3: False})) is VoteResult.LOST
    four = three | {NodeId(4)}
    # A tie is not a win.
    assert vote_result(four, _by_node({1: True, 2: True})) is VoteResult.PENDING
    assert vote_result(four, _by_node({1: True, 2: True, 3: False, 4: False})) is VoteResult.LOST


@deterministic
@given(voters=voter_sets, active=st.frozensets(st.integers(1, 20).map(NodeId)))
def test_has_quorum_iff_a_majority_of_voters_is_active(voters, active):
    assert has_quorum(voters, active) is (len(voters & active) >= majority(len(voters)))


def test_majority_is_more_than_half():
    assert [majority(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
