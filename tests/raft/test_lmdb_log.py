"""LmdbLogStore: the same answers as MemoryStorage, durable across reopen, loud on corruption."""

from __future__ import annotations

import errno
import random
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb
import pytest

import raft.storage
from raft.core.errors import Compacted
from raft.core.messages import ConfState, Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from raft.core.storage import LogStorage, MemoryStorage
from raft.core.types import LogIndex, NodeId, Term
from raft.storage import (
    CorruptLogError,
    GroupId,
    GroupWrite,
    LmdbGroupStorage,
    LmdbLogStore,
    StorageFullError,
    lmdb_log,
)

G1, G2, G3 = GroupId(1), GroupId(2), GroupId(3)
CONF = ConfState(frozenset({NodeId(1), NodeId(2), NodeId(3)}), frozenset({NodeId(4)}))


def make_entries(first: int, last: int, term: int, size: int = 8) -> tuple[Entry, ...]:
    return tuple(
        Entry(Term(term), LogIndex(i), bytes([i % 256]) * size, EntryKind.NORMAL)
        for i in range(first, last + 1)
    )


def answer(call: Any, *args: Any) -> Any:
    """A read's result, or its exception type: what equivalence compares."""
    try:
        return call(*args)
    except (Compacted, IndexError) as exc:
        return type(exc)


def assert_same_reads(store: LmdbGroupStorage, model: MemoryStorage) -> None:
    assert store.initial_state() == model.initial_state()
    assert store.first_index() == model.first_index()
    assert store.last_index() == model.last_index()
    assert store.snapshot() == model.snapshot()
    first, last = model.first_index(), model.last_index()
    for index in range(max(0, first - 2), last + 3):
        assert answer(store.term, LogIndex(index)) == answer(model.term, LogIndex(index)), index
    bounds = sorted({max(0, first - 1), first, first + 1, (first + last) // 2, last, last + 1})
    bounds.append(last + 2)
    for low in bounds:
        for high in bounds:
            if high < low:  # NB: MemoryStorage slices with a negative bound here; not a contract
                continue
            for max_bytes in (None, 0, 40, 100, 1000):
                got = answer(store.entries, LogIndex(low), LogIndex(high), max_bytes)
                want = answer(model.entries, LogIndex(low), LogIndex(high), max_bytes)
                assert got == want, (low, high, max_bytes)


class Model:
    """A random workload applied to LmdbLogStore and to one MemoryStorage per group."""

    def __init__(self, path: Path, rng: random.Random, group_ids: list[GroupId]) -> None:
        self.path = path
        self.rng = rng
        self.store = LmdbLogStore(path, sync=False)
        self.models = {group_id: MemoryStorage() for group_id in group_ids}
        self.persisted = dict.fromkeys(group_ids, False)
        self.max_term = 1

    def random_conf(self) -> ConfState:
        nodes = self.rng.sample(range(1, 8), self.rng.randint(1, 5))
        split = self.rng.randint(0, len(nodes))
        return ConfState(
            frozenset(map(NodeId, nodes[:split])), frozenset(map(NodeId, nodes[split:]))
        )

    def random_group_write(self, group_id: GroupId) -> GroupWrite:
        rng, model = self.rng, self.models[group_id]
        snapshot = None
        snapshot_applied = False
        if rng.random() < 0.1:
            index = max(0, model.last_index() + rng.randint(-5, 8))
            term = max(model.snapshot().meta.term, rng.randint(1, self.max_term + 1))
            meta = SnapshotMeta(LogIndex(index), Term(term), self.random_conf())
            snapshot = Snapshot(meta, rng.randbytes(rng.randint(0, 40)))
            snapshot_applied = index > model.snapshot().meta.index
            model.apply_snapshot(snapshot)
        entries: tuple[Entry, ...] = ()
        if rng.random() < 0.8:
            first = rng.randint(max(1, model.first_index() - 3), model.last_index() + 1)
            if rng.random() < 0.3:
                self.max_term += 1
            entries = tuple(
                Entry(
                    Term(self.max_term - rng.randint(0, 1)),
                    LogIndex(first + offset),
                    rng.randbytes(rng.choice((0, 5, 30, 90))),
                    rng.choice(list(EntryKind)),
                )
                for offset in range(rng.randint(0, 12))
            )
            model.append(entries)
        hard_state = None
        if rng.random() < 0.5:
            hard_state = HardState(
                Term(self.max_term), NodeId(rng.randint(0, 5)), LogIndex(rng.randint(0, 50))
            )
            model.set_hard_state(hard_state)
        if (
            snapshot_applied
            or hard_state
            or any(e.index > model.first_index() - 1 for e in entries)
        ):
            self.persisted[group_id] = True
        return GroupWrite(group_id, hard_state, entries, snapshot)

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        group_id = rng.choice(list(self.models))
        model = self.models[group_id]
        if roll < 0.6:
            chosen = rng.sample(list(self.models), rng.randint(1, len(self.models)))
            if rng.random() < 0.2:
                chosen.append(rng.choice(chosen))  # the same group twice in one batch
            self.store.write([self.random_group_write(g) for g in chosen])
        elif roll < 0.8:
            index = rng.randint(max(0, model.first_index() - 2), model.last_index())
            conf, data = self.random_conf(), rng.randbytes(rng.randint(0, 20))
            model.create_snapshot(LogIndex(index), conf, data)
            self.store.create_snapshot(group_id, LogIndex(index), conf, data)
        elif roll < 0.88:
            self.store.close()
            self.store = LmdbLogStore(self.path, sync=False)
        elif roll < 0.94:
            conf = self.random_conf()
            self.store.bootstrap(group_id, conf)
            if not self.persisted[group_id]:
                self.models[group_id] = MemoryStorage(conf)
                self.persisted[group_id] = bool(conf.voters)
        else:
            self.store.drop_group(group_id)
            self.models[group_id] = MemoryStorage()
            self.persisted[group_id] = False

    def check(self) -> None:
        for group_id, model in self.models.items():
            assert_same_reads(self.store.group(group_id), model)
        assert self.store.group_ids() == sorted(g for g, p in self.persisted.items() if p)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("tail_max_entries", [1024, 3])
def test_store_answers_every_read_exactly_as_memory_storage_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, tail_max_entries: int
) -> None:
    monkeypatch.setattr(lmdb_log, "_TAIL_MAX_ENTRIES", tail_max_entries)
    monkeypatch.setattr(lmdb_log, "_TAIL_MAX_BYTES", 256 << 10 if tail_max_entries > 3 else 150)
    model = Model(tmp_path / "log", random.Random(seed), [G1, G2, GroupId(2**64 - 1)])
    try:
        for _ in range(150):
            model.step()
            model.check()
    finally:
        model.store.close()


def test_the_in_memory_tail_stays_bounded(tmp_path: Path) -> None:
    with LmdbLogStore(tmp_path / "log", sync=False) as store:
        for phase_start, entry_size in ((1, 100), (3001, 1000)):  # count-bound, then byte-bound
            for first in range(phase_start, phase_start + 3000, 50):
                # each batch overwrites the last 50 entries of the one before
                entries = make_entries(first, first + 99, 1, entry_size)
                store.write([GroupWrite(G1, entries=entries)])
                view = store.group(G1)._view
                assert view.tail[-1].index == first + 99
                assert view.tail_bytes == sum(entry.size_bytes for entry in view.tail)
                assert len(view.tail) <= lmdb_log._TAIL_MAX_ENTRIES
                assert view.tail_bytes <= lmdb_log._TAIL_MAX_BYTES
            fitting = min(lmdb_log._TAIL_MAX_ENTRIES, lmdb_log._TAIL_MAX_BYTES // (entry_size + 24))
            assert len(view.tail) == fitting
        assert len(store.group(G1)._view.run_starts) == 1


def test_many_groups_in_one_write_do_not_interfere(tmp_path: Path) -> None:
    with LmdbLogStore(tmp_path / "log") as store:
        groups = [GroupId(g) for g in range(8)]
        store.write(
            GroupWrite(g, HardState(Term(g + 1), NodeId(1), LogIndex(g)), make_entries(1, 50, g))
            for g in groups
        )
        store.write([GroupWrite(g, entries=make_entries(41, 45, 100)) for g in groups[::2]])
        store.drop_group(GroupId(3))
        for g in groups:
            group = store.group(g)
            if g == 3:
                assert group.last_index() == 0
                assert group.initial_state() == (HardState(), ConfState())
                continue
            assert group.initial_state()[0] == HardState(Term(g + 1), NodeId(1), LogIndex(g))
            assert group.last_index() == (45 if g % 2 == 0 else 50)
            assert group.term(LogIndex(41)) == (100 if g % 2 == 0 else g)
            assert group.entries(LogIndex(1), LogIndex(41)) == list(make_entries(1, 40, g))
        assert store.group_ids() == [g for g in groups if g != 3]


def reads(group: LmdbGroupStorage) -> tuple[Any, ...]:
    last = group.last_index()
    terms = [group.term(LogIndex(i)) for i in range(group.first_index() - 1, last + 1)]
    entries = group.entries(group.first_index(), LogIndex(last + 1))
    return group.initial_state(), group.snapshot(), group.first_index(), last, terms, entries


def test_reopening_the_store_gives_back_everything_a_restarting_node_needs(
    tmp_path: Path,
) -> None:
    hard_state = HardState(Term(7), NodeId(2), LogIndex(30))
    snapshot = Snapshot(SnapshotMeta(LogIndex(20), Term(5), CONF), b"app state")
    with LmdbLogStore(tmp_path / "log") as store:
        store.bootstrap(G1, CONF)
        store.write([GroupWrite(G1, entries=make_entries(1, 60, 5))])
        store.write([GroupWrite(G1, hard_state, make_entries(41, 70, 7))])
        store.create_snapshot(G1, LogIndex(30), CONF, b"compacted")
        store.write([GroupWrite(G2, hard_state, make_entries(21, 25, 7), snapshot)])
        expected = {g: reads(store.group(g)) for g in (G1, G2)}
    with LmdbLogStore(tmp_path / "log") as store:
        assert store.group_ids() == [G1, G2]
        assert {g: reads(store.group(g)) for g in (G1, G2)} == expected
        g1: LogStorage = store.group(G1)  # mypy checks the protocol
        assert g1.initial_state() == (hard_state, CONF)
        assert g1.snapshot() == Snapshot(SnapshotMeta(LogIndex(30), Term(5), CONF), b"compacted")
        assert (g1.first_index(), g1.last_index()) == (31, 70)
        assert [g1.term(LogIndex(i)) for i in (30, 31, 40, 41, 70)] == [5, 5, 5, 7, 7]
        g2 = store.group(G2)
        assert g2.initial_state() == (hard_state, CONF)
        assert g2.snapshot() == snapshot
        assert g2.entries(LogIndex(21), LogIndex(26)) == list(make_entries(21, 25, 7))
        assert store.group(G3).initial_state() == (HardState(), ConfState())


def test_bootstrap_starts_a_new_group_exactly_as_memory_storage_does(tmp_path: Path) -> None:
    with LmdbLogStore(tmp_path / "log") as store:
        store.bootstrap(G1, CONF)
        store.bootstrap(G1, ConfState(frozenset({NodeId(9)})))  # has state already: no-op
        store.bootstrap(G2, ConfState())  # no voters: joins an existing group, nothing to write
        assert_same_reads(store.group(G1), MemoryStorage(CONF))
        assert store.group(G1).entries(LogIndex(1), LogIndex(2))[0].kind is EntryKind.CONF_CHANGE
        assert store.group_ids() == [G1]
    with LmdbLogStore(tmp_path / "log") as store:
        assert_same_reads(store.group(G1), MemoryStorage(CONF))
        assert_same_reads(store.group(G2), MemoryStorage())


def test_a_failed_write_changes_nothing_in_any_group(tmp_path: Path) -> None:
    with LmdbLogStore(tmp_path / "log") as store:
        app_db = store.env.open_db(b"app")
        store.write([GroupWrite(G1, entries=make_entries(1, 3, 1))])

        def app_writes(txn: lmdb.Transaction[bytes]) -> None:
            txn.put(b"key", b"value", db=app_db)

        gap = GroupWrite(G2, entries=make_entries(5, 6, 1))
        with pytest.raises(AssertionError, match="gap in log"):
            store.write([GroupWrite(G1, entries=make_entries(4, 9, 1)), gap], app_writes)
        assert store.group(G1).last_index() == 3
        assert store.group(G2).last_index() == 0
        with store.env.begin(db=app_db) as txn:
            assert txn.get(b"key") is None
        store.write([GroupWrite(G1, entries=make_entries(4, 4, 1))], app_writes)
        with store.env.begin(db=app_db) as txn:
            assert txn.get(b"key") == b"value"
    with LmdbLogStore(tmp_path / "log") as store:
        assert store.group(G1).last_index() == 4
        assert store.group_ids() == [G1]


def test_group_write_rejects_entries_that_are_not_contiguous() -> None:
    with pytest.raises(ValueError, match="not contiguous"):
        GroupWrite(G1, entries=(*make_entries(1, 2, 1), *make_entries(4, 4, 1)))


def corrupt(store: LmdbLogStore, db_name: bytes, key: bytes, flip_byte: int = -1) -> None:
    with store.env.begin(write=True) as txn:
        db = store.env.open_db(db_name, txn=txn)
        value = bytearray(txn.get(key, db=db) or b"")
        value[flip_byte] ^= 0x01
        txn.put(key, bytes(value), db=db)


def test_a_corrupt_log_entry_raises_instead_of_answering(tmp_path: Path) -> None:
    with LmdbLogStore(tmp_path / "log") as store:
        store.write([GroupWrite(G1, entries=make_entries(1, 10, 3))])
        corrupt(store, lmdb_log._LOG_DB, struct.pack(">QQ", G1, 4))
    with LmdbLogStore(tmp_path / "log") as store:  # reopen: only the last entry is cached
        group = store.group(G1)
        assert group.term(LogIndex(3)) == 3
        with pytest.raises(CorruptLogError) as caught:
            group.term(LogIndex(4))
        assert (caught.value.group_id, caught.value.index) == (G1, 4)
        with pytest.raises(CorruptLogError):
            group.entries(LogIndex(2), LogIndex(8))
        with store.env.begin(write=True) as txn:  # garbage, and then a missing entry
            log_db = store.env.open_db(lmdb_log._LOG_DB, txn=txn)
            txn.put(struct.pack(">QQ", G1, 5), b"garbage", db=log_db)
            txn.delete(struct.pack(">QQ", G1, 6), db=log_db)
        with pytest.raises(CorruptLogError):
            group.term(LogIndex(5))
        with pytest.raises(CorruptLogError) as caught:
            group.entries(LogIndex(6), LogIndex(8))
        assert caught.value.index == 6


def test_an_entry_moved_to_another_index_or_group_is_detected(tmp_path: Path) -> None:
    with LmdbLogStore(tmp_path / "log") as store:
        store.write([GroupWrite(g, entries=make_entries(1, 5, 1)) for g in (G1, G2)])
        with store.env.begin(write=True) as txn:
            log_db = store.env.open_db(lmdb_log._LOG_DB, txn=txn)
            value = txn.get(struct.pack(">QQ", G1, 2), db=log_db) or b""
            txn.put(struct.pack(">QQ", G1, 3), value, db=log_db)
            txn.put(struct.pack(">QQ", G2, 2), value, db=log_db)
    with LmdbLogStore(tmp_path / "log") as store:
        for group_id, index in ((G1, 3), (G2, 2)):
            with pytest.raises(CorruptLogError):
                store.group(group_id).term(LogIndex(index))


def test_corrupt_hard_state_and_snapshot_records_are_detected(tmp_path: Path) -> None:
    snapshot = Snapshot(SnapshotMeta(LogIndex(5), Term(2), CONF), b"state")
    with LmdbLogStore(tmp_path / "log") as store:
        store.write([GroupWrite(g, HardState(Term(2)), snapshot=snapshot) for g in (G1, G2, G3)])
        corrupt(store, lmdb_log._STATE_DB, struct.pack(">QB", G1, lmdb_log._HARD_STATE))
        corrupt(store, lmdb_log._STATE_DB, struct.pack(">QB", G2, lmdb_log._SNAPSHOT_META))
        corrupt(store, lmdb_log._SNAP_DB, struct.pack(">Q", G3), flip_byte=0)
    with LmdbLogStore(tmp_path / "log") as store:
        with pytest.raises(CorruptLogError, match="hard state"):
            store.group(G1)
        with pytest.raises(CorruptLogError, match="snapshot meta"):
            store.group(G2)
        with pytest.raises(CorruptLogError, match="snapshot data"):
            store.group(G3).snapshot()


def test_the_map_grows_when_full_instead_of_failing(tmp_path: Path) -> None:
    with LmdbLogStore(tmp_path / "log", map_size_bytes=64 << 10) as store:
        for batch in range(8):
            first = batch * 64 + 1
            store.write(
                [GroupWrite(g, entries=make_entries(first, first + 63, 1, 4096)) for g in (G1, G2)]
            )
        assert store.env.info()["map_size"] > 4 << 20
        assert store.group(G2).entries(LogIndex(1), LogIndex(513)) == list(
            make_entries(1, 512, 1, 4096)
        )
    with LmdbLogStore(tmp_path / "log", map_size_bytes=64 << 10) as store:
        assert store.group(G1).entries(LogIndex(500), LogIndex(513)) == list(
            make_entries(500, 512, 1, 4096)
        )


@pytest.mark.parametrize(
    "disk_error",
    [OSError(errno.ENOSPC, "No space left on device"), lmdb.DiskError("mdb_txn_commit", 28)],
)
def test_a_full_disk_fails_the_write_with_a_clear_error(
    tmp_path: Path, disk_error: Exception
) -> None:
    def full_disk(txn: lmdb.Transaction[bytes]) -> None:
        raise disk_error

    with LmdbLogStore(tmp_path / "log") as store:
        with pytest.raises(StorageFullError, match="disk is full") as caught:
            store.write([GroupWrite(G1, entries=make_entries(1, 3, 1))], full_disk)
        assert str(tmp_path / "log") in str(caught.value)
        assert store.group(G1).last_index() == 0


def test_create_snapshot_compacts_like_memory_storage(tmp_path: Path) -> None:
    model = MemoryStorage(CONF)
    with LmdbLogStore(tmp_path / "log") as store:
        store.bootstrap(G1, CONF)
        store.write([GroupWrite(G1, entries=make_entries(1, 10, 2))])
        model.append(make_entries(1, 10, 2))
        with pytest.raises(AssertionError, match="beyond last index"):
            store.create_snapshot(G1, LogIndex(11), CONF, b"")
        for index in (4, 3, 10):
            store.create_snapshot(G1, LogIndex(index), CONF, b"s%d" % index)
            model.create_snapshot(LogIndex(index), CONF, b"s%d" % index)
            assert_same_reads(store.group(G1), model)
        with store.env.begin() as txn:
            log_db = store.env.open_db(lmdb_log._LOG_DB, txn=txn)
            assert txn.stat(log_db)["entries"] == 0


def test_dropped_group_leaves_no_trace(tmp_path: Path) -> None:
    with LmdbLogStore(tmp_path / "log") as store:
        store.bootstrap(G2, CONF)
        store.write([GroupWrite(G2, HardState(Term(3)), make_entries(1, 5, 3))])
        store.create_snapshot(G2, LogIndex(2), CONF, b"snap")
        store.write([GroupWrite(G1, entries=make_entries(1, 2, 1))])
        store.drop_group(G2)
        assert store.group_ids() == [G1]
        assert_same_reads(store.group(G2), MemoryStorage())
        with store.env.begin() as txn:
            for name in (lmdb_log._LOG_DB, lmdb_log._STATE_DB, lmdb_log._SNAP_DB):
                db = store.env.open_db(name, txn=txn)
                keys = [key for key, _ in txn.cursor(db=db)]
                assert all(struct.unpack_from(">Q", key)[0] == G1 for key in keys)
    with LmdbLogStore(tmp_path / "log") as store:
        assert store.group_ids() == [G1]
        assert store.group(G2).last_index() == 0


def test_package_exports_exactly_its_public_names() -> None:
    assert sorted(raft.storage.__all__) == sorted(
        name
        for name in vars(raft.storage)
        if not name.startswith("_") and name not in {"annotations", "lmdb_log"}
    )
    for name in raft.storage.__all__:
        assert getattr(raft.storage, name) is getattr(lmdb_log, name)


def test_only_entries_snapshots_terms_and_votes_must_survive_an_os_crash():
    must_be_durable = lmdb_log.must_be_durable
    group = G1
    persisted = HardState(term=Term(3), voted_for=NodeId(2), commit=LogIndex(10))
    entry = Entry(Term(3), LogIndex(11), b"x")
    commit_only = HardState(term=Term(3), voted_for=NodeId(2), commit=LogIndex(11))
    assert not must_be_durable(GroupWrite(group), persisted)
    assert not must_be_durable(GroupWrite(group, hard_state=commit_only), persisted)
    assert must_be_durable(GroupWrite(group, entries=(entry,)), persisted)
    assert must_be_durable(
        GroupWrite(group, hard_state=replace(persisted, term=Term(4))), persisted
    )
    new_vote = replace(persisted, voted_for=NodeId(3))
    assert must_be_durable(GroupWrite(group, hard_state=new_vote), persisted)
