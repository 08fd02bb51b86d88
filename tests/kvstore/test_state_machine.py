"""KVStateMachine on a real LMDB environment: versions, CAS, transactions, idempotency, shard
isolation, snapshots, checksums, long keys, scans and the transaction-retry contract."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterator

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.commands import (
    FAILED_INVALID,
    FAILED_NOT_FOUND,
    FAILED_PRECONDITION,
    Command,
    Delete,
    Failed,
    Put,
    Txn,
    encode_command,
)
from kvstore.service import (
    CompareOp,
    CompareTarget,
    KeyValue,
    KeyVersion,
    TxnCompare,
    TxnOp,
    TxnOpKind,
    TxnOpResult,
    TxnRequest,
    TxnResult,
)
from kvstore.state_machine import CorruptValueError, KVStateMachine
from raft.core.messages import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryKind,
    Snapshot,
    SnapshotMeta,
)
from raft.core.types import LogIndex, NodeId, Term

SHARD = 7
LONG_HEAD = "p" * 480  # long keys sharing their first 480 bytes are stored in hash order


def open_env(path) -> lmdb.Environment:
    return lmdb.open(str(path), max_dbs=64, map_size=256 << 20, sync=False)


@pytest.fixture
def make_env(tmp_path) -> Iterator[Callable[[str], lmdb.Environment]]:
    """Opens environments under tmp_path by name; closes them all at the end."""
    opened: list[lmdb.Environment] = []

    def make(name: str) -> lmdb.Environment:
        opened.append(open_env(tmp_path / name))
        return opened[-1]

    yield make
    for environment in opened:
        environment.close()


@pytest.fixture
def env(make_env) -> lmdb.Environment:
    return make_env("env")


class Driver:
    """Feeds a state machine entries with increasing indexes, one write txn per call."""

    def __init__(self, env: lmdb.Environment, machine: KVStateMachine) -> None:
        self.env = env
        self.machine = machine
        self.next_index = machine.applied_index() + 1

    def entries(self, *items: Command | Entry | None) -> list[Entry]:
        built = []
        for item in items:
            index = LogIndex(self.next_index)
            self.next_index += 1
            if item is None:
                built.append(Entry(Term(1), index))  # a leader's no-op
            elif isinstance(item, Entry):
                built.append(Entry(item.term, index, item.data, item.kind))
            else:
                built.append(Entry(Term(1), index, encode_command(item)))
        return built

    def apply_entries(self, entries: list[Entry]) -> list[object]:
        with self.env.begin(write=True) as txn:
            return self.machine.apply(txn, entries)

    def apply(self, *items: Command | Entry | None) -> list[object]:
        return self.apply_entries(self.entries(*items))

    def one(self, item: Command) -> object:
        return self.apply(item)[0]


def driver(env: lmdb.Environment, shard: int = SHARD, **options: int) -> Driver:
    return Driver(env, KVStateMachine(env, shard, **options))


def stored_key(shard: int, key: str) -> bytes:
    """The on-disk key of a short key: shard id (8 bytes, big-endian) + UTF-8 key."""
    return struct.pack(">Q", shard) + key.encode()


# ---------------------------------------------------------------- put, get, delete


def test_versions_are_the_indexes_of_the_entries_that_wrote_the_keys(env):
    d = driver(env)
    assert d.apply(Put("a", b"1"), Put("b", b"2"), Put("a", b"3")) == [
        KeyVersion("a", 1),
        KeyVersion("b", 2),
        KeyVersion("a", 3),
    ]
    assert d.machine.get("a") == KeyValue("a", b"3", 3)
    assert d.machine.get("b") == KeyValue("b", b"2", 2)
    assert d.machine.get("c") is None
    assert d.machine.count() == 2
    assert d.machine.applied_index() == 3


def test_delete_returns_the_version_it_deleted_and_refuses_absent_keys(env):
    d = driver(env)
    d.apply(Put("a", b"1"), None)
    assert d.one(Delete("a")) == KeyVersion("a", 1)
    assert d.machine.get("a") is None
    assert d.machine.count() == 0
    outcome = d.one(Delete("a"))
    assert isinstance(outcome, Failed)
    assert (outcome.code, outcome.current_version) == (FAILED_NOT_FOUND, 0)


def test_noops_and_membership_changes_only_advance_the_applied_index(env):
    d = driver(env)
    change = ConfChange(ConfChangeType.ADD_VOTER, NodeId(2)).encode()
    results = d.apply(None, Entry(Term(1), LogIndex(1), change, EntryKind.CONF_CHANGE), None)
    assert results == [None, None, None]
    assert d.machine.applied_index() == 3
    assert d.machine.count() == 0
    assert d.machine.scan("", None, None, None, 10) == []


def test_an_entry_without_a_valid_command_fails_the_same_way_everywhere(env, make_env):
    d = driver(env)
    junk = Entry(Term(1), LogIndex(1), b"\xc1junk")
    first = d.apply(junk)[0]
    assert isinstance(first, Failed)
    assert first.code == FAILED_INVALID
    assert d.machine.applied_index() == 1
    other = driver(make_env("other"))
    assert other.apply(junk) == [first]


def test_applied_index_and_data_survive_reopening(tmp_path):
    environment = open_env(tmp_path / "env")
    d = driver(environment)
    d.apply(Put("a", b"1"), None, None)
    before = d.machine.data_hash()
    environment.close()
    environment = open_env(tmp_path / "env")
    machine = KVStateMachine(environment, SHARD)
    assert machine.applied_index() == 3
    assert machine.data_hash() == before
    assert machine.count() == 1
    environment.close()


def test_applying_an_index_twice_is_a_broken_invariant(env):
    d = driver(env)
    entries = d.entries(Put("a", b"1"))
    d.apply_entries(entries)
    with pytest.raises(AssertionError, match="applied again"):
        d.apply_entries(entries)


# ---------------------------------------------------------------- compare-and-set


def test_put_if_version_zero_succeeds_only_when_the_key_is_absent(env):
    d = driver(env)
    assert d.one(Put("a", b"1", if_version=0)) == KeyVersion("a", 1)
    refused = d.one(Put("a", b"2", if_version=0))
    assert refused == Failed(FAILED_PRECONDITION, "key 'a' is at version 1, not 0", 1)
    assert d.machine.get("a") == KeyValue("a", b"1", 1)


def test_put_if_version_succeeds_on_the_current_version_only(env):
    d = driver(env)
    d.apply(Put("a", b"1"), Put("a", b"2"))
    stale = d.one(Put("a", b"x", if_version=1))
    assert isinstance(stale, Failed)
    assert (stale.code, stale.current_version) == (FAILED_PRECONDITION, 2)
    assert d.one(Put("a", b"3", if_version=2)) == KeyVersion("a", 4)
    absent = d.one(Put("b", b"x", if_version=4))
    assert isinstance(absent, Failed)
    assert (absent.code, absent.current_version) == (FAILED_PRECONDITION, 0)
    assert d.machine.get("b") is None


def test_delete_if_version_checks_the_version(env):
    d = driver(env)
    d.apply(Put("a", b"1"))
    refused = d.one(Delete("a", if_version=9))
    assert isinstance(refused, Failed)
    assert (refused.code, refused.current_version) == (FAILED_PRECONDITION, 1)
    assert d.one(Delete("a", if_version=1)) == KeyVersion("a", 1)
    gone = d.one(Delete("a", if_version=1))
    assert isinstance(gone, Failed)
    assert gone.code == FAILED_NOT_FOUND


# ---------------------------------------------------------------- transactions


def expected_compare(target, op, current, compare_to) -> bool:
    """The spec: absent (None) never equals, always differs, and is neither < nor >."""
    if current is None:
        if target is CompareTarget.VERSION:
            current = 0
        else:
            return op is CompareOp.NOT_EQUAL
    return {
        CompareOp.EQUAL: current == compare_to,
        CompareOp.NOT_EQUAL: current != compare_to,
        CompareOp.LESS: current < compare_to,
        CompareOp.GREATER: current > compare_to,
    }[op]


@pytest.mark.parametrize("target", list(CompareTarget))
@pytest.mark.parametrize("op", list(CompareOp))
@pytest.mark.parametrize("present", [True, False])
def test_txn_compares_follow_the_spec_for_every_target_and_op(env, target, op, present):
    d = driver(env)
    if present:
        d.apply(None, Put("k", b"m"))  # version 2, value b"m"
    cases: list[tuple[TxnCompare, int | bytes]]
    if target is CompareTarget.VERSION:
        current: int | bytes | None = 2 if present else None
        cases = [(TxnCompare("k", target, op, version=v), v) for v in (0, 1, 2, 3)]
    else:
        current = b"m" if present else None
        cases = [(TxnCompare("k", target, op, value=v), v) for v in (b"", b"a", b"m", b"ma", b"z")]
    for compare, operand in cases:
        result = d.one(Txn(TxnRequest(compare=(compare,))))
        assert isinstance(result, TxnResult)
        assert result.succeeded is expected_compare(target, op, current, operand), operand


def test_txn_runs_all_compares_then_one_branch_in_order(env):
    d = driver(env)
    d.apply(Put("a", b"1"), Put("b", b"2"))
    ops = (
        TxnOp(TxnOpKind.GET, "a"),
        TxnOp(TxnOpKind.PUT, "a", b"new"),
        TxnOp(TxnOpKind.GET, "a"),
        TxnOp(TxnOpKind.DELETE, "b"),
        TxnOp(TxnOpKind.GET, "b"),
        TxnOp(TxnOpKind.DELETE, "nope"),
        TxnOp(TxnOpKind.PUT, "c", b"c"),
    )
    request = TxnRequest(
        compare=(
            TxnCompare("a", CompareTarget.VERSION, CompareOp.EQUAL, version=1),
            TxnCompare("b", CompareTarget.VALUE, CompareOp.EQUAL, value=b"2"),
        ),
        success=ops,
        failure=(TxnOp(TxnOpKind.PUT, "failed", b"!"),),
    )
    assert d.one(Txn(request)) == TxnResult(
        True,
        (
            TxnOpResult(TxnOpKind.GET, "a", 1, b"1"),
            TxnOpResult(TxnOpKind.PUT, "a", 3),
            TxnOpResult(TxnOpKind.GET, "a", 3, b"new"),
            TxnOpResult(TxnOpKind.DELETE, "b", 2),
            TxnOpResult(TxnOpKind.GET, "b", 0, None),
            TxnOpResult(TxnOpKind.DELETE, "nope", 0),
            TxnOpResult(TxnOpKind.PUT, "c", 3),
        ),
    )
    assert d.machine.count() == 2  # a, c
    # The same request again: a is at version 3 now, so the failure branch runs.
    assert d.one(Txn(request)) == TxnResult(False, (TxnOpResult(TxnOpKind.PUT, "failed", 4),))
    assert d.machine.get("failed") == KeyValue("failed", b"!", 4)
    assert d.machine.get("a") == KeyValue("a", b"new", 3)


def test_an_empty_txn_succeeds_and_changes_nothing(env):
    d = driver(env)
    assert d.one(Txn(TxnRequest())) == TxnResult(True, ())
    assert d.machine.count() == 0


# ---------------------------------------------------------------- idempotency


def test_a_retried_put_returns_the_original_answer_and_applies_once(env):
    d = driver(env)
    assert d.one(Put("a", b"1", idempotency_key="req-1")) == KeyVersion("a", 1)
    assert d.one(Put("a", b"2")) == KeyVersion("a", 2)
    assert d.one(Put("a", b"1", idempotency_key="req-1")) == KeyVersion("a", 1)
    assert d.machine.get("a") == KeyValue("a", b"2", 2)
    assert d.machine.applied_index() == 3


def test_retried_failures_and_txns_replay_their_recorded_outcomes(env):
    d = driver(env)
    refused = d.one(Delete("a", idempotency_key="del"))
    d.apply(Put("a", b"1"))
    assert d.one(Delete("a", idempotency_key="del")) == refused
    assert d.machine.get("a") is not None
    request = TxnRequest(success=(TxnOp(TxnOpKind.PUT, "t", b"x"), TxnOp(TxnOpKind.GET, "t")))
    first = d.one(Txn(request, idempotency_key="txn"))
    d.apply(Put("t", b"changed"))
    assert d.one(Txn(request, idempotency_key="txn")) == first
    assert d.machine.get("t") == KeyValue("t", b"changed", 5)


def test_idempotency_records_expire_after_the_window(env):
    d = driver(env, idempotency_window_entries=10)
    assert d.one(Put("a", b"1", idempotency_key="k")) == KeyVersion("a", 1)
    d.apply(*[None] * 8)  # indexes 2..9
    assert d.one(Put("a", b"1", idempotency_key="k")) == KeyVersion("a", 1)  # 10: 10 - 1 < 10
    assert d.one(Put("a", b"1", idempotency_key="k")) == KeyVersion("a", 11)  # 11: expired
    assert d.one(Put("a", b"1", idempotency_key="k")) == KeyVersion("a", 11)  # recorded anew


def test_eviction_deletes_old_records_and_keeps_a_key_recorded_again(env):
    d = driver(env, idempotency_window_entries=5)
    d.apply(*[Put(f"k{i}", b"", idempotency_key=f"r{i}") for i in range(20)])
    assert idempotency_records(env, SHARD) == {f"r{i}" for i in range(15, 20)}
    d.apply(Put("x", b"", idempotency_key="r19"))  # 21: r19 (at 20) is still fresh
    # 26: r19 expired and is recorded anew; the same batch evicts index 20's entry, which
    # names r19, yet must keep the record made at 26.
    d.apply(*[None] * 4, Put("x", b"", idempotency_key="r19"))
    assert idempotency_records(env, SHARD) == {"r19"}
    assert d.one(Put("x", b"", idempotency_key="r19")) == KeyVersion("x", 26)


def idempotency_records(env: lmdb.Environment, shard: int) -> set[str]:
    prefix = struct.pack(">Q", shard)
    with env.begin(db=env.open_db(b"kv.idem")) as txn:
        return {k[8:].decode() for k, _ in txn.cursor() if k.startswith(prefix)}


def test_outcomes_do_not_depend_on_how_entries_are_batched(make_env):
    commands: list[Command | None] = []
    for i in range(60):
        commands.append(Put(f"k{i % 7}", bytes([i]), idempotency_key=f"r{i % 13}"))
        if i % 5 == 0:
            commands.append(Delete(f"k{i % 3}", idempotency_key=f"d{i % 4}"))
        if i % 11 == 0:
            commands.append(None)
    one_by_one = driver(make_env("a"), idempotency_window_entries=9)
    in_batches = driver(make_env("b"), idempotency_window_entries=9)
    singles = [one_by_one.apply(c)[0] for c in commands]
    batched: list[object] = []
    for first in range(0, len(commands), 17):
        batched += in_batches.apply(*commands[first : first + 17])
    assert singles == batched
    assert one_by_one.machine.data_hash() == in_batches.machine.data_hash()
    assert one_by_one.machine.snapshot() == in_batches.machine.snapshot()


# ---------------------------------------------------------------- shards sharing one env


def test_shards_in_one_environment_do_not_see_each_other(env):
    one, two = driver(env, 1), driver(env, 2)
    one.apply(Put("k", b"one"), Put("only-one", b""))
    two.apply(Put("k", b"two"), None, None, Put("z", b"", idempotency_key="r"))
    assert one.machine.get("k") == KeyValue("k", b"one", 1)
    assert two.machine.get("k") == KeyValue("k", b"two", 1)
    assert two.machine.get("only-one") is None
    assert [kv.key for kv in one.machine.scan("", None, None, None, 10)] == ["k", "only-one"]
    assert [kv.key for kv in two.machine.scan("", None, None, None, 10)] == ["k", "z"]
    assert (one.machine.count(), two.machine.count()) == (2, 2)
    assert (one.machine.applied_index(), two.machine.applied_index()) == (2, 4)
    assert one.one(Put("z", b"", idempotency_key="r")) == KeyVersion("z", 3)  # not shard 2's


def test_shard_ids_at_the_edges_of_the_id_space_stay_apart(env):
    low, high = driver(env, 0), driver(env, (1 << 64) - 1)
    low.apply(Put("a", b"low"))
    high.apply(Put("a", b"high"))
    assert low.machine.scan("", None, None, None, 10) == [KeyValue("a", b"low", 1)]
    assert high.machine.scan("", None, None, None, 10) == [KeyValue("a", b"high", 1)]


# ---------------------------------------------------------------- snapshots


def populate(d: Driver) -> None:
    d.apply(
        Put("a", b"1", idempotency_key="r1"),
        Put("b", b"2"),
        Put(LONG_HEAD + "z", b"long-z"),
        Put(LONG_HEAD + "a", b"long-a", idempotency_key="r2"),
        Delete("b"),
        None,
    )


def test_snapshot_restores_into_another_environment_with_the_same_data_hash(env, make_env):
    source = driver(env)
    populate(source)
    data = source.machine.snapshot()
    other = make_env("other")
    target = driver(other)
    target.apply(Put("stale", b"gone after restore"))
    with other.begin(write=True) as txn:
        target.machine.restore(txn, Snapshot(SnapshotMeta(index=LogIndex(6)), data))
    assert target.machine.applied_index() == 6
    assert target.machine.data_hash() == source.machine.data_hash()
    assert target.machine.count() == source.machine.count() == 3
    assert target.machine.get("stale") is None
    assert target.machine.snapshot() == data
    # Idempotency records came along: a retry is still answered from the record.
    target.next_index = 7
    assert target.one(Put("a", b"1", idempotency_key="r1")) == KeyVersion("a", 1)


def test_restore_leaves_other_shards_alone(env, make_env):
    source = driver(make_env("source"), 2)
    populate(source)
    before = [driver(env, shard) for shard in (1, 2, 3)]
    for d in before:
        populate(d)
        d.apply(Put(f"shard-{d.machine.shard_id}", b""))
    hashes = {d.machine.shard_id: d.machine.data_hash() for d in before}
    with env.begin(write=True) as txn:
        before[1].machine.restore(
            txn, Snapshot(SnapshotMeta(LogIndex(6)), source.machine.snapshot())
        )
    assert before[0].machine.data_hash() == hashes[1]
    assert before[2].machine.data_hash() == hashes[3]
    assert before[1].machine.data_hash() == source.machine.data_hash()
    assert before[0].machine.get("shard-1") is not None


def test_restore_refuses_a_damaged_or_mismatched_snapshot(env):
    d = driver(env)
    populate(d)
    data = d.machine.snapshot()
    other = KVStateMachine(env, SHARD + 1)
    flipped = data[:-1] + bytes([data[-1] ^ 1])
    cases = [
        (d.machine, Snapshot(SnapshotMeta(LogIndex(6)), flipped), "checksum"),
        (d.machine, Snapshot(SnapshotMeta(LogIndex(6)), b"abc"), "too short"),
        (other, Snapshot(SnapshotMeta(LogIndex(6)), data), "shard"),
        (d.machine, Snapshot(SnapshotMeta(LogIndex(9)), data), "index"),
    ]
    for machine, snapshot, message in cases:
        with env.begin(write=True) as txn, pytest.raises(ValueError, match=message):
            machine.restore(txn, snapshot)
    assert d.machine.get("a") is not None


# ---------------------------------------------------------------- integrity


def overwrite(env: lmdb.Environment, db: bytes, key: bytes, change) -> None:
    handle = env.open_db(db)
    with env.begin(write=True, db=handle) as txn:
        raw = txn.get(key)
        assert raw is not None
        txn.put(key, change(raw))


def flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0x40])


def test_a_corrupted_value_is_an_error_naming_shard_and_key(env):
    d = driver(env)
    d.apply(Put("apple", b"red"), Put("banana", b"yellow"))
    overwrite(env, b"kv.data", stored_key(SHARD, "apple"), flip_last_byte)
    with pytest.raises(CorruptValueError, match=r"shard 7: key 'apple'") as caught:
        d.machine.get("apple")
    assert (caught.value.shard_id, caught.value.key) == (SHARD, "apple")
    assert d.machine.get("banana") == KeyValue("banana", b"yellow", 2)
    for read in (
        lambda: d.machine.scan("", None, None, None, 10),
        d.machine.data_hash,
        d.machine.snapshot,
        lambda: d.one(Put("apple", b"x", if_version=1)),
        lambda: d.one(Txn(TxnRequest(success=(TxnOp(TxnOpKind.GET, "apple"),)))),
    ):
        with pytest.raises(CorruptValueError, match="apple"):
            read()


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: struct.pack(">Q", 99) + raw[8:],  # the version
        lambda raw: raw[:5],  # truncated header
        lambda raw: raw + b"!",  # appended byte
    ],
)
def test_any_damage_to_a_record_is_detected(env, change):
    d = driver(env)
    d.apply(Put("k", b"value"))
    overwrite(env, b"kv.data", stored_key(SHARD, "k"), change)
    with pytest.raises(CorruptValueError, match="shard 7: key 'k'"):
        d.machine.get("k")
    with pytest.raises(CorruptValueError, match="shard 7: key 'k'"), d.machine.read_view() as view:
        list(view.row_batches(b"", True))  # the query scan's own inlined checks
    with d.machine.read_view() as view:  # a scan of keys alone reads (and checks) no value
        assert list(view.row_batches(b"", False)) == [[(b"k", b"")]]


def test_corrupted_metadata_and_idempotency_records_are_detected(env):
    d = driver(env)
    d.apply(Put("k", b"v", idempotency_key="req"))
    overwrite(env, b"kv.idem", stored_key(SHARD, "req"), flip_last_byte)
    with pytest.raises(CorruptValueError, match="req"):
        d.one(Put("k", b"v", idempotency_key="req"))
    overwrite(env, b"kv.meta", struct.pack(">Q", SHARD), flip_last_byte)
    with pytest.raises(CorruptValueError, match="shard 7: key '\\(shard metadata\\)'"):
        d.machine.applied_index()


def test_a_corrupted_long_key_record_is_detected(env):
    d = driver(env)
    key = LONG_HEAD + "tail"
    d.apply(Put(key, b"v"))
    with env.begin(db=env.open_db(b"kv.data")) as txn:
        (stored,) = [k for k, _ in txn.cursor() if len(k) > 500]
    overwrite(env, b"kv.data", stored, flip_last_byte)
    with pytest.raises(CorruptValueError, match="shard 7: key 'ppp"):
        d.machine.get(key)


# ---------------------------------------------------------------- long keys and scans


def test_four_kib_keys_round_trip(env):
    d = driver(env)
    keys = ["é" * 2048, "a" * 4096, "a" * 4095 + "b", "a" * 480, "a" * 481, "\U0001f600" * 1024]
    d.apply(*[Put(key, key[-1].encode() * 3) for key in keys])
    for index, key in enumerate(keys, start=1):
        assert d.machine.get(key) == KeyValue(key, key[-1].encode() * 3, index)
    assert d.machine.get("a" * 4094) is None
    assert d.machine.get("a" * 482) is None
    assert d.one(Put("a" * 4096, b"cas", if_version=2)) == KeyVersion("a" * 4096, 7)
    assert d.one(Delete("a" * 4095 + "b")) == KeyVersion("a" * 4095 + "b", 3)
    assert d.machine.count() == 5


def test_long_keys_sharing_their_first_480_bytes_scan_in_full_key_order(env):
    d = driver(env)
    keys = [LONG_HEAD + suffix for suffix in ("", "0", "z", "a" * 3000, "b", "a", "ab", "é")]
    # A second run right behind the first: a long key follows a long key of another head.
    keys += [LONG_HEAD[:-1] + "q" + tail for tail in ("x" * 100, "y", "b" * 9, "a")]
    keys += ["p" * 479, "pz", "o"]
    d.apply(*[Put(key, b"") for key in keys])
    assert [kv.key for kv in d.machine.scan("", None, None, None, 100)] == sorted(keys)
    ordered = sorted(keys)
    for position in range(len(ordered)):
        page = d.machine.scan("p", None, None, ordered[position], 3)
        expected = [k for k in ordered if k > ordered[position] and k.startswith("p")][:3]
        assert [kv.key for kv in page] == expected
        page = d.machine.scan("", ordered[position], None, None, 2)
        assert [kv.key for kv in page] == ordered[position : position + 2]


def test_scan_pages_with_after_cover_everything_once(env):
    d = driver(env)
    keys = [f"user/{i:03}" for i in range(25)] + ["users", "user", "usex", "a"]
    d.apply(*[Put(key, key.encode()) for key in keys])
    seen: list[str] = []
    after = None
    while page := d.machine.scan("user/", None, None, after, 7):
        seen += [kv.key for kv in page]
        after = page[-1].key
    assert seen == [f"user/{i:03}" for i in range(25)]
    assert d.machine.scan("user/", None, None, None, 0) == []
    with pytest.raises(ValueError, match="limit"):
        d.machine.scan("", None, None, None, -1)


ALPHABET = "ab\u00e9\U0001f600"
key_strategy = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(["", "a", "p" * 478, LONG_HEAD, "p" * 479 + "é", "p" * 481]),
    st.text(ALPHABET, max_size=4),
)
shard_ids = itertools.count(1000)


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory) -> Iterator[lmdb.Environment]:
    environment = open_env(tmp_path_factory.mktemp("scan-model"))
    yield environment
    environment.close()


@settings(max_examples=150, deadline=None)
@given(
    data=st.dictionaries(key_strategy, st.binary(max_size=3), max_size=25),
    prefix=st.sampled_from(["", "a", "p", "p" * 479, LONG_HEAD, "p" * 481])
    | st.text(ALPHABET, max_size=2),
    start=st.none() | key_strategy,
    end=st.none() | key_strategy,
    after=st.none() | key_strategy,
    limit=st.integers(min_value=0, max_value=30),
)
def test_scan_agrees_with_a_sorted_dict_model(shared_env, data, prefix, start, end, after, limit):
    d = driver(shared_env, next(shard_ids))  # a fresh shard per example
    d.apply(*[Put(key, value) for key, value in data.items()])
    versions = {key: index for index, key in enumerate(data, start=1)}
    expected = [
        KeyValue(key, data[key], versions[key])
        for key in sorted(data, key=str.encode)
        if key.startswith(prefix)
        and (start is None or key >= start)
        and (end is None or key < end)
        and (after is None or key > after)
    ][:limit]
    assert d.machine.scan(prefix, start, end, after, limit) == expected
    assert d.machine.count() == len(data)


# ---------------------------------------------------------------- the txn-retry contract


def test_reapplying_after_an_aborted_transaction_leaves_the_same_state(make_env):
    commands: list[Command | None] = [
        Put("a", b"1", idempotency_key="r1"),
        Put("a", b"2", if_version=1),
        Put(LONG_HEAD + "x", b"long"),
        Delete("a", idempotency_key="r2"),
        Txn(TxnRequest(success=(TxnOp(TxnOpKind.PUT, "t", b"t"),)), idempotency_key="r3"),
        None,
    ]
    reference = driver(make_env("reference"), idempotency_window_entries=3)
    expected = reference.apply(*commands)
    retried = driver(make_env("retried"), idempotency_window_entries=3)
    entries = retried.entries(*commands)
    txn = retried.env.begin(write=True)
    assert retried.machine.apply(txn, entries) == expected
    txn.abort()  # e.g. the map was full: the runtime retries with a fresh transaction
    assert retried.machine.applied_index() == 0
    assert retried.machine.count() == 0
    assert retried.apply_entries(entries) == expected
    assert retried.machine.data_hash() == reference.machine.data_hash()
    assert retried.machine.snapshot() == reference.machine.snapshot()


def test_a_long_key_never_answers_for_another_with_the_same_hash(env, monkeypatch):
    import xxhash

    monkeypatch.setattr(xxhash, "xxh128_digest", lambda data: b"\0" * 16)  # force a collision
    d = driver(env)
    d.apply(Put(LONG_HEAD + "one", b"1"))
    with pytest.raises(CorruptValueError, match="another key's hash"):
        d.machine.get(LONG_HEAD + "two")
