"""Running kvstore.query plans against real shards: the shard side and its wire.

The shard side scans one LMDB read transaction (one applied index) in a worker thread, so a long
scan never stalls the Raft loop, and hands chunks to the event loop through a small bounded
queue: a slow coordinator slows the scan instead of growing memory. Between nodes the chunks
travel as a stream of length-prefixed msgpack frames (the body of /v1/internal/query):

    ("p", partial wire)                          a chunk of rows or aggregate states
    ("d", applied index, truncated)              the shard's answer is complete
    ("e", error code, message)                   the shard failed after the stream started

A select query's rows stop early at the per-shard byte budget: the frame "d" then says
`truncated`, and the coordinator ends the page at that shard's last row (merge_partials
cut_after), so a page of huge values costs bounded memory everywhere.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import struct
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import msgpack

from kvstore.errors import InvalidRequest, KVError, ShardUnavailable, StaleShardMap
from kvstore.query import PluginRegistry, ShardPlan, iter_partials
from kvstore.query.plan import (
    RowBatches,
    key_bounds,
    partial_from_wire,
    partial_to_wire,
    reads_values,
)
from kvstore.query.results import Partial, RowsPartial
from kvstore.query.spec import DEFAULT_LIMITS, QueryLimits, QuerySpec
from kvstore.state_machine import KVStateMachine, RangeMovedError

FRAME_HEADER: Final = struct.Struct(">I")
FRAME_PARTIAL: Final = "p"
FRAME_DONE: Final = "d"
FRAME_ERROR: Final = "e"
TURN_S: Final = 0.005  # a scan's turn on its node; CPython's own switch interval is 5 ms too


@dataclass(frozen=True, slots=True)
class QuerySettings:
    """Node-level bounds on query execution ([query] in the node config)."""

    timeout_s: float = 60.0  # a whole query, including the slowest shard's scan
    max_response_bytes: int = 32 << 20  # select rows of one page, split evenly across shards
    chunk_rows: int = 1000  # rows (or groups) per streamed chunk
    chunk_bytes: int = 1 << 20  # value bytes per streamed chunk
    queued_chunks: int = 4  # chunks a scan may run ahead of the coordinator
    scan_threads: int = 4  # shard scans running at once on this node; more wait
    limits: QueryLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"query.timeout_s must be positive, got {self.timeout_s!r}")
        for name in ("max_response_bytes", "chunk_rows", "chunk_bytes", "queued_chunks"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"query.{name} must be a positive integer, got {value!r}")
        if type(self.scan_threads) is not int or self.scan_threads < 1:
            raise ValueError(f"query.scan_threads must be >= 1, got {self.scan_threads!r}")

    @property
    def max_frame_bytes(self) -> int:
        """A frame holds one chunk: at most chunk_bytes of values plus one oversized row (a
        chunk closes after the row that crosses chunk_bytes), plus keys and framing."""
        return 2 * self.chunk_bytes + (64 << 20)

    def shard_budget_bytes(self, shards: int) -> int:
        return max(self.max_response_bytes // max(shards, 1), 1 << 20)


class ScanTurns:
    """The shard scans of one node take turns of TURN_S, first come first served. py-lmdb
    releases the GIL around every cursor step, so scans running at once in threads hand the
    GIL to each other on every row, through the OS: three threads scanning at once were 2.5x
    slower in all than one. A scan holding the turn runs alone; the others sleep
    on a lock of their own (woken one at a time, never all to find it is not their turn), not
    on the GIL, and each waits about TURN_S per scan ahead of it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._queue: collections.deque[threading.Lock] = collections.deque()  # head: the turn

    def acquire(self) -> None:
        ticket = threading.Lock()
        ticket.acquire()  # released by the scan before this one in the queue, when done
        with self._mutex:
            self._queue.append(ticket)
            first = len(self._queue) == 1
        if not first:
            ticket.acquire()

    def release(self) -> None:
        with self._mutex:
            self._queue.popleft()
            if self._queue:
                self._queue[0].release()

    @property
    def waiting(self) -> int:
        """Scans waiting for their turn (the holder excluded)."""
        with self._mutex:
            return max(len(self._queue) - 1, 0)

    def pass_turn(self) -> None:
        """From the holder: let every scan waiting now have its turn first."""
        if self.waiting:
            self.release()
            self.acquire()

    def batches(self, batches: RowBatches) -> Iterator[Sequence[tuple[bytes, bytes]]]:
        """`batches`, read by a scan that holds the turn, passing it on between two batches
        once it has held it for TURN_S (each hand-over costs a GIL hand-over between threads,
        which after every batch of 512 rows came to several percent of a scan's time)."""
        turn_ends = time.monotonic() + TURN_S
        for batch in batches:
            if time.monotonic() >= turn_ends:
                self.pass_turn()
                turn_ends = time.monotonic() + TURN_S
            yield batch


@dataclass(frozen=True, slots=True)
class ShardDone:
    applied_index: int  # the index the shard's read transaction held
    truncated: bool  # rows stopped at the byte budget; more may follow the last one


ShardEvent = Partial | ShardDone


class _Stopped(Exception):
    """The consumer went away; the scan thread stops."""


def _rows_bytes(partial: Partial) -> int:
    if not isinstance(partial, RowsPartial):
        return 0
    return sum(len(key) + (0 if value is None else len(value)) for key, value in partial.rows)


async def scan_shard(
    machine: KVStateMachine,
    plan: ShardPlan,
    *,
    settings: QuerySettings,
    plugins: PluginRegistry,
    budget_bytes: int,
    executor: concurrent.futures.Executor,
    must_hold: tuple[int, int] | None = None,
    drop_outside: bool = False,
    turns: ScanTurns | None = None,
) -> AsyncGenerator[ShardEvent, None]:
    """The shard's partials, then ShardDone. The caller established the read point (ReadIndex)
    before calling: the snapshot is taken when the scan starts, at or after it. must_hold: the
    token span the caller's shard map gives this shard; a replica that a split has left
    holding less fails with StaleShardMap, checked in the scan's own read transaction; with
    drop_outside, one holding more leaves out the keys outside it (KVStateMachine.scan).
    turns: shared by the scans of this node (a scan alone takes turns with nobody)."""
    loop = asyncio.get_running_loop()
    turns = turns or ScanTurns()
    queue: asyncio.Queue[ShardEvent | BaseException] = asyncio.Queue()
    room = threading.Semaphore(settings.queued_chunks)  # chunks the scan may run ahead
    stop = threading.Event()

    def hand_over(item: ShardEvent | BaseException) -> None:
        while not room.acquire(timeout=0.25):
            if stop.is_set():
                raise _Stopped
        if stop.is_set():
            raise _Stopped
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            raise _Stopped from None

    def produce() -> None:
        try:
            with machine.read_view(must_hold=must_hold, drop_outside=drop_outside) as view:
                sent, truncated = 0, False
                lower, _upper = key_bounds(plan.spec)
                chunks = iter_partials(
                    plan,
                    turns.batches(view.row_batches(lower, reads_values(plan.spec))),
                    max_items_per_chunk=settings.chunk_rows,
                    max_chunk_bytes=settings.chunk_bytes,
                    plugins=plugins,
                )
                while True:
                    turns.acquire()  # scanning is done holding the turn; waiting never is
                    try:
                        partial = next(chunks, None)
                    finally:
                        turns.release()
                    if partial is None:
                        break
                    hand_over(partial)
                    sent += _rows_bytes(partial)
                    if sent >= budget_bytes:
                        truncated = True
                        break
                hand_over(ShardDone(view.applied_index, truncated))
        except _Stopped:
            return
        except RangeMovedError as moved:
            try:
                hand_over(
                    StaleShardMap(
                        f"shard {machine.shard_id} split: it holds tokens {moved.held}, the "
                        f"map gives it {must_hold}; refresh the map"
                    )
                )
            except _Stopped:
                return
        except BaseException as error:  # handed to the event loop, which raises it
            try:
                hand_over(error)
            except _Stopped:
                return

    worker = loop.run_in_executor(executor, produce)
    try:
        while True:
            item = await queue.get()
            room.release()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, ShardDone):
                return
    finally:
        stop.set()
        worker.add_done_callback(lambda done: done.exception())


def shard_failure(error: BaseException, shard_id: int) -> KVError:
    """What a failed shard scan tells the client (a bug stays a bug: it is re-raised). A
    checksum failure is the router's to handle (it quarantines the replica)."""
    if isinstance(error, KVError):
        return error
    if isinstance(error, ValueError):  # a plan the shard refused, e.g. a plugin not installed
        return InvalidRequest(f"shard {shard_id} refused the query: {error}")
    raise error


# ---- the wire ---------------------------------------------------------------------------------


def frame(payload: Any) -> bytes:
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return FRAME_HEADER.pack(len(body)) + body


def encode_event(event: ShardEvent) -> bytes:
    if isinstance(event, ShardDone):
        return frame((FRAME_DONE, event.applied_index, event.truncated))
    return frame((FRAME_PARTIAL, partial_to_wire(event)))


def encode_error(error: KVError) -> bytes:
    return frame((FRAME_ERROR, error.code, error.message))


async def read_events(
    read_exactly: Callable[[int], Any],
    spec: QuerySpec,
    *,
    settings: QuerySettings,
    plugins: PluginRegistry,
    error_of: Callable[[str, str], KVError],
) -> AsyncGenerator[ShardEvent, None]:
    """Decode a shard's frame stream; ends after ShardDone. A malformed frame, or a stream that
    ends before ShardDone, raises ShardUnavailable; an error frame raises error_of(code, msg)."""
    while True:
        try:
            (length,) = FRAME_HEADER.unpack(await read_exactly(FRAME_HEADER.size))
            if length > settings.max_frame_bytes:
                raise ShardUnavailable(f"a shard sent a {length}-byte frame; refusing it")
            payload = await read_exactly(length)
        except asyncio.IncompleteReadError:
            raise ShardUnavailable("the shard's answer stopped before it was complete") from None
        try:
            kind, *body = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
            if kind == FRAME_PARTIAL:
                partial = partial_from_wire(spec, body[0], limits=settings.limits, plugins=plugins)
                stats = partial.stats
                yield _with_stats(partial, bytes_moved=stats.bytes_moved + len(payload))
                continue
            if kind == FRAME_DONE:
                applied_index, truncated = body
                yield ShardDone(int(applied_index), bool(truncated))
                return
            if kind == FRAME_ERROR:
                code, message = body
                raise error_of(str(code), str(message))
            raise ValueError(f"unknown frame kind {kind!r}")
        except (ValueError, TypeError, msgpack.UnpackException) as error:
            raise ShardUnavailable(f"a shard answered a malformed frame: {error}") from error


def _with_stats(partial: Partial, **changes: Any) -> Partial:
    return replace(partial, stats=replace(partial.stats, **changes))


__all__ = [
    "QuerySettings",
    "ScanTurns",
    "ShardDone",
    "ShardEvent",
    "encode_error",
    "encode_event",
    "read_events",
    "scan_shard",
    "shard_failure",
]
