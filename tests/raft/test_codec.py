from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raft.core.messages import (
    MESSAGE_TYPES,
    AppendEntries,
    AppendEntriesReply,
    ConfState,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatReply,
    InstallSnapshot,
    InstallSnapshotReply,
    Message,
    RequestVote,
    RequestVoteReply,
    SnapshotMeta,
    TimeoutNow,
)
from raft.core.types import LogIndex, NodeId, Term
from raft.runtime.codec import FORMAT_VERSION, FrameError, decode_batch, encode_batch

U64 = 2**64 - 1
node_ids = st.integers(0, U64).map(NodeId)
terms = st.integers(0, U64).map(Term)
indexes = st.integers(0, U64).map(LogIndex)
counts = st.integers(0, U64)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    return Entry(
        term=draw(terms),
        index=LogIndex(draw(st.integers(1, U64))),
        data=draw(st.binary(max_size=64)),
        kind=draw(st.sampled_from(EntryKind)),
    )


@st.composite
def conf_states(draw: st.DrawFn) -> ConfState:
    voters = draw(st.frozensets(node_ids, max_size=5))
    learners = draw(st.frozensets(node_ids, max_size=5)) - voters
    return ConfState(voters, learners)


common = {"sender": node_ids, "recipient": node_ids, "term": terms}
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        RequestVote,
        **common,
        last_log_index=indexes,
        last_log_term=terms,
        pre_vote=st.booleans(),
        leadership_transfer=st.booleans(),
    ),
    st.builds(RequestVoteReply, **common, granted=st.booleans(), pre_vote=st.booleans()),
    st.builds(
        AppendEntries,
        **common,
        prev_log_index=indexes,
        prev_log_term=terms,
        entries=st.lists(entries(), max_size=5).map(tuple),
        leader_commit=indexes,
    ),
    st.builds(
        AppendEntriesReply,
        **common,
        success=st.booleans(),
        match_index=indexes,
        conflict_term=terms,
        conflict_index=indexes,
    ),
    st.builds(Heartbeat, **common, commit=indexes, read_seq=counts),
    st.builds(HeartbeatReply, **common, read_seq=counts),
    st.builds(
        InstallSnapshot,
        **common,
        meta=st.builds(SnapshotMeta, index=indexes, term=terms, conf=conf_states()),
        offset=counts,
        data=st.binary(max_size=64),
        done=st.booleans(),
    ),
    st.builds(
        InstallSnapshotReply,
        **common,
        snapshot_index=indexes,
        next_offset=st.integers(-1, U64),
        done=st.booleans(),
    ),
    st.builds(TimeoutNow, **common),
)
batches = st.lists(st.tuples(st.integers(0, U64), messages), max_size=8)

# One of each message type, with distinct non-zero values, for the targeted corruption tests.
SAMPLES: list[Message] = [
    RequestVote(
        sender=NodeId(1),
        recipient=NodeId(2),
        term=Term(3),
        last_log_index=LogIndex(4),
        last_log_term=Term(5),
        pre_vote=True,
        leadership_transfer=False,
    ),
    RequestVoteReply(sender=NodeId(1), recipient=NodeId(2), term=Term(3), granted=True),
    AppendEntries(
        sender=NodeId(1),
        recipient=NodeId(2),
        term=Term(3),
        prev_log_index=LogIndex(4),
        prev_log_term=Term(5),
        entries=(
            Entry(Term(3), LogIndex(5), b"put"),
            Entry(Term(3), LogIndex(6), b"\x00\x01", EntryKind.CONF_CHANGE),
        ),
        leader_commit=LogIndex(6),
    ),
    AppendEntriesReply(
        sender=NodeId(1),
        recipient=NodeId(2),
        term=Term(3),
        success=False,
        match_index=LogIndex(4),
        conflict_term=Term(5),
        conflict_index=LogIndex(6),
    ),
    Heartbeat(sender=NodeId(1), recipient=NodeId(2), term=Term(3), commit=LogIndex(4), read_seq=5),
    HeartbeatReply(sender=NodeId(1), recipient=NodeId(2), term=Term(3), read_seq=4),
    InstallSnapshot(
        sender=NodeId(1),
        recipient=NodeId(2),
        term=Term(3),
        meta=SnapshotMeta(
            LogIndex(4), Term(5), ConfState(frozenset({NodeId(1)}), frozenset({NodeId(2)}))
        ),
        offset=6,
        data=b"snapshot bytes",
        done=True,
    ),
    InstallSnapshotReply(
        sender=NodeId(1),
        recipient=NodeId(2),
        term=Term(3),
        snapshot_index=LogIndex(4),
        next_offset=-1,
        done=False,
    ),
    TimeoutNow(sender=NodeId(1), recipient=NodeId(2), term=Term(3)),
]


def raw_batch(message: Message, group_id: int = 7) -> list[Any]:
    """The batch as plain msgpack values, for corrupting one field at a time."""
    raw: list[Any] = msgpack.unpackb(encode_batch(NodeId(1), [(group_id, message)]))
    return raw


def pack(raw: object) -> bytes:
    packed: bytes = msgpack.packb(raw, use_bin_type=True)
    return packed


def wrong_values_for(value: object) -> list[object]:
    common: list[object] = [None, 1.5, "x", [], {}]
    if isinstance(value, bool):
        return [*common, 0, 1, b"\x01"]
    if isinstance(value, int):
        return [*common, True, False, -2, b"1"]
    if isinstance(value, bytes):
        return [*common, 1, True]
    if isinstance(value, list):
        return [None, 1, "x", b"x", {1: 2}]
    raise AssertionError(f"no wrong values known for {value!r}")


def test_every_message_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_each_message_type_round_trips(message: Message):
    assert decode_batch(encode_batch(NodeId(9), [(3, message)])) == (9, [(3, message)])


@given(sender=node_ids, items=batches)
def test_any_batch_round_trips(sender: NodeId, items: list[tuple[int, Message]]):
    assert decode_batch(encode_batch(sender, items)) == (sender, items)


def test_decoded_entry_kinds_are_enum_members():
    (_, [(_, message)]) = decode_batch(encode_batch(NodeId(1), [(0, SAMPLES[2])]))
    assert isinstance(message, AppendEntries)
    assert [e.kind for e in message.entries] == [EntryKind.NORMAL, EntryKind.CONF_CHANGE]
    assert all(type(e.kind) is EntryKind for e in message.entries)


def test_an_empty_batch_round_trips():
    assert decode_batch(encode_batch(NodeId(4), [])) == (4, [])


def test_encoding_a_non_message_raises_type_error():
    with pytest.raises(TypeError, match="not a Raft message type"):
        encode_batch(NodeId(1), [(0, "hello")])  # type: ignore[list-item]


def test_the_wire_format_is_a_flat_list_per_message():
    assert raw_batch(SAMPLES[4]) == [FORMAT_VERSION, 1, [[7, 4, 1, 2, 3, 4, 5]]]


@given(st.binary(max_size=200))
def test_random_bytes_raise_frame_error_or_decode(payload: bytes):
    with contextlib.suppress(FrameError):
        decode_batch(payload)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), U64) | st.floats() | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=10),
    max_leaves=30,
)


@given(st.lists(msgpack_values, max_size=4))
def test_random_msgpack_values_raise_frame_error_or_decode(value: list[object]):
    with contextlib.suppress(FrameError):
        decode_batch(pack(value))


@given(st.lists(msgpack_values, max_size=3))
def test_random_items_in_a_valid_header_raise_frame_error_or_decode(items: list[object]):
    with contextlib.suppress(FrameError):
        decode_batch(pack([FORMAT_VERSION, 1, items]))


@given(items=batches.filter(bool), data=st.data())
def test_corrupted_bytes_raise_frame_error_or_decode(
    items: list[tuple[int, Message]], data: st.DataObject
):
    payload = bytearray(encode_batch(NodeId(1), items))
    position = data.draw(st.integers(0, len(payload) - 1))
    payload[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(FrameError):
        decode_batch(bytes(payload))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_truncation_raises_frame_error(message: Message):
    payload = encode_batch(NodeId(1), [(0, message), (1, message)])
    for length in range(len(payload)):
        with pytest.raises(FrameError):
            decode_batch(payload[:length])


def test_trailing_bytes_raise_frame_error():
    with pytest.raises(FrameError):
        decode_batch(encode_batch(NodeId(1), [(0, SAMPLES[0])]) + b"\x00")


@pytest.mark.parametrize(
    "raw",
    [
        None,
        1,
        b"",
        [],
        [FORMAT_VERSION, 1],
        [FORMAT_VERSION, 1, [], 4],
        [FORMAT_VERSION + 1, 1, []],
        [True, 1, []],
        [float(FORMAT_VERSION), 1, []],
        [FORMAT_VERSION, -1, []],
        [FORMAT_VERSION, True, []],
        [FORMAT_VERSION, "1", []],
        [FORMAT_VERSION, 1, None],
        [FORMAT_VERSION, 1, {}],
        [FORMAT_VERSION, 1, [None]],
        [FORMAT_VERSION, 1, [[]]],
        [FORMAT_VERSION, 1, [[0]]],
        {"version": FORMAT_VERSION, "sender": 1, "items": []},
    ],
)
def test_a_malformed_batch_header_raises_frame_error(raw: object):
    with pytest.raises(FrameError):
        decode_batch(pack(raw))


@pytest.mark.parametrize("tag", [9, 100, -1, 2**64 - 1, True, 1.0, "2", None])
def test_an_unknown_message_tag_raises_frame_error(tag: object):
    raw = raw_batch(SAMPLES[8])
    raw[2][0][1] = tag
    with pytest.raises(FrameError):
        decode_batch(pack(raw))


@pytest.mark.parametrize("group_id", [-1, True, 1.0, "1", None, b"1"])
def test_a_malformed_group_id_raises_frame_error(group_id: object):
    raw = raw_batch(SAMPLES[8])
    raw[2][0][0] = group_id
    with pytest.raises(FrameError):
        decode_batch(pack(raw))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_a_missing_or_extra_field_raises_frame_error(message: Message):
    raw = raw_batch(message)
    item = raw[2][0]
    for fields in (item[:-1], [*item, 0], [*item, False]):
        raw[2][0] = fields
        with pytest.raises(FrameError):
            decode_batch(pack(raw))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_a_field_of_the_wrong_type_or_range_raises_frame_error(message: Message):
    original = raw_batch(message)
    fields = original[2][0]
    assert len(fields) > 2
    for position in range(2, len(fields)):
        for wrong in wrong_values_for(fields[position]):
            raw = raw_batch(message)
            raw[2][0][position] = wrong
            with pytest.raises(FrameError):
                decode_batch(pack(raw))


@pytest.mark.parametrize(
    "entry",
    [
        [3, 0, 0, b""],  # index 0: Entry rejects it
        [-1, 5, 0, b""],
        [3, 5, 2, b""],  # no such EntryKind
        [3, 5, -1, b""],
        [3, 5, True, b""],
        [3, 5, 0, "text"],
        [3, 5, 0, None],
        [3.0, 5, 0, b""],
        [3, 5, 0],
        [3, 5, 0, b"", 1],
        None,
        b"abcd",
    ],
)
def test_a_malformed_entry_raises_frame_error(entry: object):
    raw = raw_batch(SAMPLES[2])
    raw[2][0][-1][1] = entry
    with pytest.raises(FrameError):
        decode_batch(pack(raw))


@pytest.mark.parametrize(
    ("voters", "learners"),
    [([1, 2], [2]), ([1, -2], []), ([1], [True]), ([1], [1.5]), ([1], None), ({1: 1}, [])],
)
def test_a_malformed_snapshot_configuration_raises_frame_error(voters: object, learners: object):
    raw = raw_batch(SAMPLES[6])
    raw[2][0][7] = voters
    raw[2][0][8] = learners
    with pytest.raises(FrameError):
        decode_batch(pack(raw))


def test_a_map_with_non_string_keys_in_place_of_the_batch_raises_frame_error():
    with pytest.raises(FrameError):
        decode_batch(pack({1: 2, 3: 4, 5: 6}))


def test_frame_error_is_a_value_error():
    assert issubclass(FrameError, ValueError)
