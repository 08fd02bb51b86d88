"""The shard side of queries on a real LMDB shard: one read point while writes go on, bounded
chunks, the byte budget and its page cut, the frame stream between nodes, and stopping."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import lmdb
import pytest

from kvstore.commands import Put, encode_command
from kvstore.errors import InvalidRequest, ShardUnavailable
from kvstore.peer_client import error_from_code
from kvstore.query import PluginRegistry, ShardPlan, merge_partials, parse_query
from kvstore.query.results import Partial, RowsPartial
from kvstore.query_runner import (
    FRAME_HEADER,
    QuerySettings,
    ScanTurns,
    ShardDone,
    ShardEvent,
    encode_error,
    encode_event,
    frame,
    read_events,
    scan_shard,
)
from kvstore.state_machine import BATCH_BYTES, ROWS_PER_BATCH, KVStateMachine
from raft.core.messages import Entry
from raft.core.types import LogIndex, Term

SHARD = 3


@pytest.fixture
def env(tmp_path: Any) -> Iterator[lmdb.Environment]:
    environment = lmdb.open(str(tmp_path / "env"), max_dbs=64, map_size=256 << 20, sync=False)
    yield environment
    environment.close()


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    pool = concurrent.futures.ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


def write(env: lmdb.Environment, machine: KVStateMachine, docs: dict[str, Any]) -> None:
    write_raw(env, machine, {key: json.dumps(doc).encode() for key, doc in docs.items()})


def write_raw(env: lmdb.Environment, machine: KVStateMachine, values: dict[str, bytes]) -> None:
    first = machine.applied_index() + 1
    entries = [
        Entry(Term(1), LogIndex(first + i), encode_command(Put(key, value)))
        for i, (key, value) in enumerate(values.items())
    ]
    with env.begin(write=True) as txn:
        machine.apply(txn, entries)


def spec_of(doc: dict[str, Any]) -> Any:
    return parse_query(doc)


async def collect(events: AsyncIterator[ShardEvent]) -> tuple[list[Partial], ShardDone]:
    partials: list[Partial] = []
    async for event in events:
        if isinstance(event, ShardDone):
            return partials, event
        partials.append(event)
    raise AssertionError("no ShardDone")


def run_scan(
    machine: KVStateMachine,
    query: dict[str, Any],
    executor: concurrent.futures.Executor,
    *,
    budget: int = 1 << 30,
    settings: QuerySettings | None = None,
) -> tuple[list[Partial], ShardDone]:
    spec = spec_of(query)
    events = scan_shard(
        machine,
        ShardPlan.for_shard(spec, SHARD),
        settings=settings or QuerySettings(),
        plugins=PluginRegistry(),
        budget_bytes=budget,
        executor=executor,
    )
    return asyncio.run(collect(events))


def test_a_scan_streams_bounded_chunks_and_reports_its_read_point(env, executor) -> None:
    machine = KVStateMachine(env, SHARD)
    write(env, machine, {f"k/{i:04d}": {"n": i} for i in range(250)})
    settings = QuerySettings(chunk_rows=40)
    partials, done = run_scan(
        machine, {"prefix": "k/", "select": "*", "limit": 10_000}, executor, settings=settings
    )
    assert [len(p.rows) for p in partials if isinstance(p, RowsPartial)] == [40] * 6 + [10]
    assert done == ShardDone(applied_index=250, truncated=False)
    keys = [key for p in partials if isinstance(p, RowsPartial) for key, _ in p.rows]
    assert keys == [f"k/{i:04d}" for i in range(250)]


def test_the_scan_sees_one_applied_index_while_writes_go_on(env, executor) -> None:
    """Writes applied while the scan is paused mid-stream are not in its answer."""
    machine = KVStateMachine(env, SHARD)
    write(env, machine, {f"k/{i:04d}": {"v": 1} for i in range(100)})
    spec = spec_of({"prefix": "k/", "select": "*", "limit": 10_000})

    async def scenario() -> tuple[list[Partial], ShardDone]:
        events = scan_shard(
            machine,
            ShardPlan.for_shard(spec, SHARD),
            settings=QuerySettings(chunk_rows=10, queued_chunks=1),
            plugins=PluginRegistry(),
            budget_bytes=1 << 30,
            executor=executor,
        )
        first = await anext(events)  # the read transaction is open now
        await asyncio.to_thread(write, env, machine, {f"k/{i:04d}": {"v": 2} for i in range(100)})
        rest, done = await collect(events)
        return [first, *rest], done

    partials, done = asyncio.run(scenario())
    values = {
        json.loads(value or b"")["v"]
        for p in partials
        if isinstance(p, RowsPartial)
        for _, value in p.rows
    }
    assert values == {1}
    assert done.applied_index == 100
    assert machine.applied_index() == 200


def test_the_byte_budget_truncates_rows_and_the_merge_ends_the_page_there(env, executor) -> None:
    a, b = KVStateMachine(env, SHARD), KVStateMachine(env, SHARD + 1)
    write(env, a, {f"k/{i:03d}": {"pad": "x" * 200} for i in range(0, 200, 2)})
    write(env, b, {f"k/{i:03d}": {"pad": "y" * 200} for i in range(1, 200, 2)})
    query = {"prefix": "k/", "select": "*", "limit": 150}
    settings = QuerySettings(chunk_rows=5)
    small, done_a = run_scan(a, query, executor, budget=3000, settings=settings)
    whole, done_b = run_scan(b, query, executor, settings=settings)
    assert done_a.truncated
    assert not done_b.truncated
    sent = [row for p in small if isinstance(p, RowsPartial) for row in p.rows]
    assert 10 <= len(sent) < 100  # stopped at the budget, not at the limit
    spec = spec_of(query)
    result = merge_partials(spec, [*small, *whole], cut_after=sent[-1][0])
    keys = [row["key"] for row in result.rows]
    assert keys == sorted(keys)
    assert keys[-1] == sent[-1][0]
    assert keys == [f"k/{i:03d}" for i in range(int(sent[-1][0][2:]) + 1)]  # no gap
    # The next page continues right after the cut, with nothing skipped.
    follow = spec_of({**query, "cursor": result.next_cursor})
    after, _ = run_scan(a, follow.to_json(), executor, settings=settings)
    first_after = next(row for p in after if isinstance(p, RowsPartial) for row in p.rows)
    assert first_after[0] > keys[-1]


def test_frames_round_trip_and_bytes_moved_is_counted(env, executor) -> None:
    machine = KVStateMachine(env, SHARD)
    write(env, machine, {f"k/{i}": {"city": ["a", "b"][i % 2], "n": i} for i in range(30)})
    query = {"aggregates": {"n": {"fn": "count"}, "s": {"fn": "sum", "field": "n"}}}
    query["group_by"] = ["city"]
    partials, done = run_scan(machine, query, executor)
    wire = b"".join(encode_event(event) for event in [*partials, done])
    spec = spec_of(query)
    decoded, done_again = asyncio.run(collect(reader_of(wire, spec)))
    assert done_again == done
    assert decoded[-1].stats.bytes_moved > 0
    direct = merge_partials(spec, partials).groups
    assert merge_partials(spec, decoded).groups == direct
    assert direct[0]["aggregates"] == {"n": 15, "s": sum(range(0, 30, 2))}


def reader_of(wire: bytes, spec: Any) -> AsyncIterator[ShardEvent]:
    offset = 0

    async def read_exactly(size: int) -> bytes:  # as StreamReader.readexactly
        nonlocal offset
        chunk = wire[offset : offset + size]
        offset += size
        if len(chunk) < size:
            raise asyncio.IncompleteReadError(chunk, size)
        return chunk

    return read_events(
        read_exactly,
        spec,
        settings=QuerySettings(),
        plugins=PluginRegistry(),
        error_of=error_from_code,
    )


@pytest.mark.parametrize(
    ("wire", "error", "message"),
    [
        (encode_error(InvalidRequest("bad field")), InvalidRequest, "bad field"),
        (encode_error(ShardUnavailable("no quorum")), ShardUnavailable, "no quorum"),
        (b"", ShardUnavailable, "stopped before it was complete"),
        (FRAME_HEADER.pack(10) + b"abc", ShardUnavailable, "stopped before it was complete"),
        (FRAME_HEADER.pack(1 << 31), ShardUnavailable, "frame; refusing it"),
        (FRAME_HEADER.pack(1) + b"\xc1", ShardUnavailable, "malformed frame"),
        (frame(("z", 1, 2)), ShardUnavailable, "unknown frame kind"),
        (frame(("d", "x")), ShardUnavailable, "malformed frame"),
    ],
)
def test_bad_or_failed_streams_raise_a_kv_error(wire: bytes, error: type, message: str) -> None:
    spec = spec_of({"aggregates": {"n": {"fn": "count"}}})
    with pytest.raises(error, match=message):
        asyncio.run(collect(reader_of(wire, spec)))


def test_a_consumer_that_stops_early_stops_the_scan_thread(env) -> None:
    machine = KVStateMachine(env, SHARD)
    write(env, machine, {f"k/{i:05d}": {"n": i} for i in range(3000)})
    pool = concurrent.futures.ThreadPoolExecutor(1)
    spec = spec_of({"prefix": "k/", "select": "*", "limit": 10_000})

    async def take_one_then_leave() -> None:
        events = scan_shard(
            machine,
            ShardPlan.for_shard(spec, SHARD),
            settings=QuerySettings(chunk_rows=10, queued_chunks=1),
            plugins=PluginRegistry(),
            budget_bytes=1 << 30,
            executor=pool,
        )
        await anext(events)
        await events.aclose()

    asyncio.run(take_one_then_leave())
    # The single worker thread is free again: a new task runs promptly.
    assert pool.submit(lambda: 42).result(timeout=5) == 42
    pool.shutdown(wait=True)


def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_scans_take_turns_first_come_first_served() -> None:
    turns = ScanTurns()
    order: list[str] = []
    turns.acquire()
    threads = []
    for name in "abc":

        def scan(name: str = name) -> None:
            turns.acquire()
            order.append(name)
            turns.release()

        threads.append(threading.Thread(target=scan))
        threads[-1].start()
        wait_for(lambda: turns.waiting == len(threads))  # queued in this order
    order.append("holder")
    turns.pass_turn()  # everyone waiting goes first, in the order they came
    order.append("holder again")
    turns.release()
    for thread in threads:
        thread.join(timeout=10)
    assert order == ["holder", "a", "b", "c", "holder again"]
    turns.acquire()  # free again, and passing the turn to nobody keeps it
    turns.pass_turn()
    turns.release()


def test_a_scan_waiting_for_its_consumer_does_not_hold_up_the_others(env) -> None:
    """A select stalled by a slow client waits for room without the turn: other scans on the
    node, sharing its turns, run to the end meanwhile."""
    machine = KVStateMachine(env, SHARD)
    write(env, machine, {f"k/{i:05d}": {"n": i} for i in range(3000)})
    pool = concurrent.futures.ThreadPoolExecutor(2)
    turns = ScanTurns()

    def scan(query: dict[str, Any]) -> AsyncIterator[ShardEvent]:
        return scan_shard(
            machine,
            ShardPlan.for_shard(spec_of(query), SHARD),
            settings=QuerySettings(chunk_rows=10, queued_chunks=1),
            plugins=PluginRegistry(),
            budget_bytes=1 << 30,
            executor=pool,
            turns=turns,
        )

    async def stall_one_run_another() -> tuple[list[Partial], ShardDone]:
        stalled = scan({"prefix": "k/", "select": "*", "limit": 10_000})
        await anext(stalled)  # then never read again: its scan waits for room
        try:
            return await asyncio.wait_for(
                collect(scan({"aggregates": {"n": {"fn": "count"}}})), timeout=10
            )
        finally:
            await stalled.aclose()

    partials, _done = asyncio.run(stall_one_run_another())
    pool.shutdown(wait=True)
    assert merge_partials(spec_of({"aggregates": {"n": {"fn": "count"}}}), partials).groups == (
        {"group": {}, "aggregates": {"n": 3000}},
    )


def test_a_failing_scan_raises_in_the_consumer(env, executor) -> None:
    machine = KVStateMachine(env, SHARD)
    write(env, machine, {"k/1": {"n": 1}})
    with env.begin(write=True) as txn:  # flip the stored value's checksum
        db = env.open_db(b"kv.data", txn=txn)
        stored = struct.pack(">Q", SHARD) + b"k/1"
        raw = bytearray(txn.get(stored, db=db))
        raw[-1] ^= 0xFF
        txn.put(stored, bytes(raw), db=db)
    with pytest.raises(Exception, match="checksum"):
        run_scan(machine, {"select": "*"}, executor)


def test_the_read_view_hands_rows_over_in_bounded_batches_in_key_order(env) -> None:
    machine = KVStateMachine(env, SHARD)
    keys = [f"b/{i:05d}" for i in range(2 * ROWS_PER_BATCH + 7)] + ["c" + "x" * 600]
    write(env, machine, {key: {"i": n} for n, key in enumerate(keys)})
    neighbour = KVStateMachine(env, SHARD + 1)  # its rows follow ours in the same database
    write(env, neighbour, {"a": {"other": 1}, "z" * 600: {"other": 2}})
    for low in (b"", b"b/00600"):
        with machine.read_view() as view:
            batches = list(view.row_batches(low, True))
        assert [len(batch) for batch in batches[:-1]] == [ROWS_PER_BATCH] * (len(batches) - 1)
        rows = [(key.decode(), json.loads(value)) for batch in batches for key, value in batch]
        expected = [(key, {"i": n}) for n, key in enumerate(keys) if key.encode() >= low]
        assert rows == expected


def test_the_read_view_bounds_its_batches_by_bytes_too(env) -> None:
    """Values up to 1 MiB: 512 of them in one batch would be half a GiB per scan."""
    machine = KVStateMachine(env, SHARD)
    big = b"x" * (300 << 10)
    keys = [f"v/{i:02d}" for i in range(10)] + [f"w/{'l' * 600}{i}" for i in range(5)]
    write_raw(env, machine, {key: big for key in keys})
    with machine.read_view() as view:
        batches = list(view.row_batches(b"", True))
    assert [key.decode() for batch in batches for key, _ in batch] == keys
    assert all(value == big for batch in batches for _, value in batch)
    for batch in batches:  # at most BATCH_BYTES plus the value that crossed it
        assert sum(len(value) for _, value in batch[:-1]) < BATCH_BYTES
    assert len(batches) >= 4


def test_the_read_view_yields_what_scan_does_long_keys_included(env) -> None:
    """The query scan loop inlines the record checks for short keys and hands long keys (over
    LMDB's key size, stored by hash) to the general path; the order must stay key order."""
    machine = KVStateMachine(env, SHARD)
    head = "h" * 480
    keys = [
        "a",
        head[:479],
        head,  # exactly the stored head of the long keys below, inline
        head + "z",
        head + "a",
        head + "\u00e9" * 3,
        head + "m" * 600,
        "h" * 479 + "i",
        "i",
        "\u00e9",
    ]
    write(env, machine, {key: {"k": key[-3:]} for key in keys})
    scanned = [kv.key for kv in machine.scan(limit=100)]
    assert scanned == sorted(keys)
    values = {kv.key: kv.value for kv in machine.scan(limit=100)}
    for low in ("", "b", head, head + "b", "i"):
        for read_values in (True, False):
            with machine.read_view() as view:
                batches = list(view.row_batches(low.encode(), read_values))
            rows = [(key.decode(), value) for batch in batches for key, value in batch]
            keys = [key for key, _ in rows]
            expected = [key for key in scanned if key >= low]
            # row_batches may start a little before `low` (the query skips those), never after
            assert keys[len(keys) - len(expected) :] == expected
            assert keys == sorted(keys)
            assert all(value == (values[key] if read_values else b"") for key, value in rows)
            assert all(0 < len(batch) <= ROWS_PER_BATCH for batch in batches)
