"""The command and outcome codec: exact round trips, compact tuples, and ValueError on garbage."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.commands import (
    FAILED_INVALID,
    FAILED_NOT_FOUND,
    FAILED_PRECONDITION,
    BatchWritten,
    Delete,
    Failed,
    Put,
    PutBatch,
    Txn,
    decode_command,
    decode_outcome,
    encode_command,
    encode_outcome,
)
from kvstore.errors import InvalidRequest, NotFound, PreconditionFailed
from kvstore.service import (
    CompareOp,
    CompareTarget,
    KeyVersion,
    TxnCompare,
    TxnOp,
    TxnOpKind,
    TxnOpResult,
    TxnRequest,
    TxnResult,
)

keys = st.text(max_size=40)
values = st.binary(max_size=64)
versions = st.integers(min_value=0, max_value=(1 << 64) - 1)
idempotency_keys = st.none() | st.text(max_size=20)

compares = st.builds(
    TxnCompare,
    key=keys,
    target=st.sampled_from(CompareTarget),
    op=st.sampled_from(CompareOp),
    version=versions,
    value=values,
)
ops = st.builds(TxnOp, kind=st.sampled_from(TxnOpKind), key=keys, value=values)
requests = st.builds(
    TxnRequest,
    compare=st.lists(compares, max_size=4).map(tuple),
    success=st.lists(ops, max_size=4).map(tuple),
    failure=st.lists(ops, max_size=4).map(tuple),
)
commands = st.one_of(
    st.builds(
        Put,
        key=keys,
        value=values,
        if_version=st.none() | versions,
        idempotency_key=idempotency_keys,
    ),
    st.builds(Delete, key=keys, if_version=st.none() | versions, idempotency_key=idempotency_keys),
    st.builds(Txn, request=requests, idempotency_key=idempotency_keys),
    st.builds(PutBatch, items=st.lists(st.tuples(keys, values), min_size=1, max_size=5).map(tuple)),
)
op_results = st.builds(
    TxnOpResult,
    kind=st.sampled_from(TxnOpKind),
    key=keys,
    version=versions,
    value=st.none() | values,
)
outcomes = st.one_of(
    st.builds(KeyVersion, key=keys, version=versions),
    st.builds(
        Failed,
        code=st.sampled_from([FAILED_PRECONDITION, FAILED_NOT_FOUND, FAILED_INVALID]),
        message=st.text(max_size=40),
        current_version=versions,
    ),
    st.builds(
        TxnResult, succeeded=st.booleans(), results=st.lists(op_results, max_size=4).map(tuple)
    ),
    st.builds(BatchWritten, version=versions),
)


@given(commands)
def test_every_command_survives_a_round_trip(command):
    assert decode_command(encode_command(command)) == command


@given(outcomes)
def test_every_outcome_survives_a_round_trip(outcome):
    assert decode_outcome(encode_outcome(outcome)) == outcome


@given(outcomes)
def test_outcome_encoding_is_deterministic(outcome):
    assert encode_outcome(outcome) == encode_outcome(decode_outcome(encode_outcome(outcome)))


def test_commands_are_compact_tuples_with_an_int_tag():
    encoded = encode_command(Put("k", b"v", None, None))
    fields = msgpack.unpackb(encoded)
    assert isinstance(fields, list)
    assert isinstance(fields[0], int)
    assert len(encoded) == 9  # array header, tag, "k", b"v", two nils


@given(st.binary(max_size=64))
def test_garbage_never_decodes_to_anything_but_a_value_error(data):
    for decode in (decode_command, decode_outcome):
        with contextlib.suppress(ValueError):
            decode(data)


@pytest.mark.parametrize(
    "fields",
    [
        (),
        (9, "k", b"v", None, None),  # unknown tag
        (1, "k", b"v", None),  # too few fields
        (1, "k", b"v", None, None, 7),  # too many fields
        (1, b"k", b"v", None, None),  # key not text
        (1, "k", "v", None, None),  # value not bytes
        (1, "k", b"v", -1, None),  # negative version
        (1, "k", b"v", True, None),  # bool is not a version
        (1, "k", b"v", None, 5),  # idempotency key not text
        (2, "k", "x", None),  # if_version not int
        (3, [("k", 2, 0, 0, b"")], [], [], None),  # unknown compare target
        (3, [("k", 0, -1, 0, b"")], [], [], None),  # negative enum code
        (3, [("k", 0, True, 0, b"")], [], [], None),  # bool enum code
        (3, [], [(7, "k", b"")], [], None),  # unknown op kind
        (3, [], "abc", [], None),  # ops not a list of tuples
        (3, 5, [], [], None),  # compares not a list
        ("1", "k", b"v", None, None),  # tag not an int
    ],
)
def test_malformed_command_tuples_raise_value_error(fields):
    with pytest.raises(ValueError, match=r"command|tag|msgpack|tuple"):
        decode_command(msgpack.packb(fields))


@pytest.mark.parametrize(
    "fields",
    [
        (9, "k", 1),
        (1, "k"),
        (1, "k", -5),
        (1, b"k", 5),
        (2, "bogus_code", "m", 0),
        (2, "not_found", b"m", 0),
        (3, 1, []),  # succeeded not bool
        (3, True, [(0, "k", 1)]),  # op result too short
        (3, True, [(0, "k", 1, "text")]),  # value not bytes
        (3, True, [(3, "k", 1, None)]),  # unknown kind
    ],
)
def test_malformed_outcome_tuples_raise_value_error(fields):
    with pytest.raises(ValueError, match=r"outcome|tag"):
        decode_outcome(msgpack.packb(fields))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", b"\x01\x02", b"\xa3abc", b"\x90"])
def test_non_tuples_and_broken_msgpack_raise_value_error(data):
    with pytest.raises(ValueError, match=r"msgpack|tuple"):
        decode_command(data)
    with pytest.raises(ValueError, match=r"msgpack|tuple"):
        decode_outcome(data)


def test_trailing_bytes_are_refused():
    with pytest.raises(ValueError, match="msgpack"):
        decode_command(encode_command(Delete("k", None, None)) + b"\x00")


def test_invalid_commands_cannot_be_constructed():
    with pytest.raises(TypeError):
        Put("k", "not bytes", None, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Put(b"k", b"v", None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="if_version"):
        Delete("k", -1, None)
    with pytest.raises(TypeError):
        Delete("k", None, b"idem")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Txn(TxnRequest(success=(TxnOp("put", "k"),)), None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Txn("not a request", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="failure code"):
        Failed("teapot", "m", 0)


def test_failures_turn_into_the_matching_kv_errors():
    error = Failed(FAILED_PRECONDITION, "key 'k' is at version 7, not 3", 7).to_error()
    assert isinstance(error, PreconditionFailed)
    assert error.current_version == 7
    assert isinstance(Failed(FAILED_NOT_FOUND, "gone", 0).to_error(), NotFound)
    assert isinstance(Failed(FAILED_INVALID, "junk", 0).to_error(), InvalidRequest)
    for code in (FAILED_PRECONDITION, FAILED_NOT_FOUND, FAILED_INVALID):
        assert Failed(code, "m", 0).to_error().code == code


@pytest.mark.parametrize(
    "items",
    [(), [("k", b"v")], (("k",),), (("k", "not bytes"),), ((b"k", b"v"),), (("k", b"v", 1),)],
)
def test_a_put_batch_holds_only_a_non_empty_tuple_of_key_value_pairs(items):
    with pytest.raises(TypeError):
        PutBatch(items)


def test_a_put_batch_with_a_malformed_pair_does_not_decode():
    with pytest.raises(ValueError, match="malformed"):
        decode_command(msgpack.packb((4, [("k", b"v"), ("k2",)])))
