from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from raft.core.messages import AppendEntries, Entry, Heartbeat, Message
from raft.core.types import LogIndex, NodeId, Term
from raft.runtime.codec import encode_batch
from raft.runtime.transport import TcpTransport

LOGGER = "raft.runtime.transport"
LOCALHOST = "127.0.0.1"


def heartbeat(sender: int, recipient: int, commit: int = 0) -> Heartbeat:
    return Heartbeat(
        sender=NodeId(sender), recipient=NodeId(recipient), term=Term(1), commit=LogIndex(commit)
    )


@dataclass
class Inbox:
    """Records what one transport's on_receive was called with."""

    calls: list[tuple[NodeId, list[tuple[int, Message]]]] = field(default_factory=list)

    def __call__(self, sender: NodeId, items: list[tuple[int, Message]]) -> None:
        self.calls.append((sender, items))

    @property
    def items(self) -> list[tuple[int, Message]]:
        return [item for _, items in self.calls for item in items]

    def commits_from(self, sender: int) -> list[int]:
        return [
            m.commit
            for s, items in self.calls
            if s == sender
            for _, m in items
            if isinstance(m, Heartbeat)
        ]


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Polls `condition` until it holds; fails the test after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition still false after {timeout_s} s")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused until a transport takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOCALHOST, 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


MakeTransport = Callable[..., Awaitable[TcpTransport]]


@pytest.fixture
async def make_transport() -> AsyncIterator[MakeTransport]:
    """Starts transports on loopback and stops every one of them at the end of the test."""
    transports: list[TcpTransport] = []

    async def make(
        node_id: int,
        inbox: Callable[[NodeId, list[tuple[int, Message]]], None] | None = None,
        *,
        port: int = 0,
        peers: dict[NodeId, tuple[str, int]] | None = None,
        **options: Any,
    ) -> TcpTransport:
        transport = TcpTransport(
            NodeId(node_id),
            (LOCALHOST, port),
            peers or {},
            inbox if inbox is not None else Inbox(),
            rng=random.Random(node_id),
            **options,
        )
        transports.append(transport)
        await transport.start()
        return transport

    yield make
    for transport in transports:
        await transport.stop()


def connect_all(*transports: TcpTransport) -> None:
    for transport in transports:
        for other in transports:
            if other is not transport:
                transport.set_peer(other.node_id, other.listen_address)


async def test_two_transports_exchange_batched_messages_for_several_groups(
    make_transport: MakeTransport,
):
    inbox_1, inbox_2 = Inbox(), Inbox()
    t1 = await make_transport(1, inbox_1)
    t2 = await make_transport(2, inbox_2)
    connect_all(t1, t2)

    for group_id in range(5):
        t1.send(group_id, [heartbeat(1, 2, commit=group_id), heartbeat(1, 2, commit=10 + group_id)])
    t1.flush()
    await eventually(lambda: len(inbox_2.items) == 10)
    assert len(inbox_2.calls) == 1
    sender, items = inbox_2.calls[0]
    assert sender == 1
    expected = [(g, heartbeat(1, 2, commit=c)) for g in range(5) for c in (g, 10 + g)]
    assert items == expected

    t2.send(3, [heartbeat(2, 1, commit=42)])
    t2.flush()
    await eventually(lambda: bool(inbox_1.calls))
    assert inbox_1.calls == [(2, [(3, heartbeat(2, 1, commit=42))])]


async def test_three_transports_each_receive_from_both_others(make_transport: MakeTransport):
    inboxes = {n: Inbox() for n in (1, 2, 3)}
    transports = [await make_transport(n, inboxes[n]) for n in (1, 2, 3)]
    connect_all(*transports)

    for transport in transports:
        me = transport.node_id
        for group_id in (0, 1):
            transport.send(group_id, [heartbeat(me, n, commit=me) for n in (1, 2, 3) if n != me])
        transport.flush()
    await eventually(lambda: all(len(inbox.items) == 4 for inbox in inboxes.values()))
    for n, inbox in inboxes.items():
        others = {1, 2, 3} - {n}
        assert {sender for sender, _ in inbox.calls} == others
        for sender in others:
            assert inbox.commits_from(sender) == [sender, sender]
            assert [g for s, items in inbox.calls if s == sender for g, _ in items] == [0, 1]


async def test_each_flush_sends_one_frame_per_peer(make_transport: MakeTransport):
    inbox_2, inbox_3 = Inbox(), Inbox()
    t1 = await make_transport(1)
    t2 = await make_transport(2, inbox_2)
    t3 = await make_transport(3, inbox_3)
    connect_all(t1, t2, t3)

    def delivered(rounds: int) -> Callable[[], bool]:
        return lambda: (
            t1.stats[NodeId(2)].frames_sent == rounds == t1.stats[NodeId(3)].frames_sent
            and len(inbox_2.calls) == rounds == len(inbox_3.calls)
        )

    for round_number in range(1, 4):
        for group_id in range(10):
            t1.send(group_id, [heartbeat(1, 2, round_number), heartbeat(1, 3, round_number)])
            t1.send(group_id, [heartbeat(1, 2, round_number)])
        t1.flush()
        await eventually(delivered(round_number))

    assert [len(items) for _, items in inbox_2.calls] == [20, 20, 20]
    assert [len(items) for _, items in inbox_3.calls] == [10, 10, 10]
    assert t2.stats[NodeId(1)].frames_received == 3
    assert t2.stats[NodeId(1)].bytes_received == t1.stats[NodeId(2)].bytes_sent
    assert t1.stats[NodeId(2)].frames_dropped == 0


async def test_flush_without_pending_messages_sends_nothing(make_transport: MakeTransport):
    t1 = await make_transport(1)
    t2 = await make_transport(2)
    connect_all(t1, t2)
    t1.flush()
    t1.send(0, [])
    t1.flush()
    assert t1.stats[NodeId(2)].frames_sent == 0
    assert t1.stats[NodeId(2)].frames_dropped == 0


async def test_a_peer_that_starts_later_is_reached_after_reconnect(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    inbox_2 = Inbox()
    with reserved_port() as port:
        t1 = await make_transport(1, peers={NodeId(2): (LOCALHOST, port)})
        t1.send(0, [heartbeat(1, 2, commit=5)])
        t1.flush()
        await eventually(
            lambda: sum("still unreachable" in r.getMessage() for r in caplog.records) >= 2
        )
    t2 = await make_transport(2, inbox_2, port=port)
    await eventually(lambda: bool(inbox_2.calls))
    assert inbox_2.calls == [(1, [(0, heartbeat(1, 2, commit=5))])]
    assert t2.listen_address == (LOCALHOST, port)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, "one warning per state change, not one per failed attempt"
    assert "cannot reach node 2" in warnings[0].getMessage()


async def test_a_restarted_peer_is_reconnected(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    inbox_2, inbox_2_again = Inbox(), Inbox()
    t1 = await make_transport(1)
    t2 = await make_transport(2, inbox_2)
    connect_all(t1, t2)
    t1.send(0, [heartbeat(1, 2, commit=1)])
    t1.flush()
    await eventually(lambda: bool(inbox_2.calls))

    port = t2.listen_address[1]
    await t2.stop()
    await eventually(lambda: any("lost its connection" in r.getMessage() for r in caplog.records))
    await make_transport(2, inbox_2_again, port=port)

    deadline = asyncio.get_running_loop().time() + 5
    commit = 2
    while not inbox_2_again.calls:  # raft retries; so does this test, until the deadline
        assert asyncio.get_running_loop().time() < deadline, "not reconnected"
        t1.send(0, [heartbeat(1, 2, commit=commit)])
        t1.flush()
        commit += 1
        with contextlib.suppress(AssertionError):
            await eventually(lambda: bool(inbox_2_again.calls), timeout_s=0.2)
    assert inbox_2_again.calls[0][0] == 1


async def test_the_eof_of_a_restarting_peer_loses_no_frame(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    inbox_2_again = Inbox()
    t1 = await make_transport(1)
    t2 = await make_transport(2)
    connect_all(t1, t2)
    t1.send(0, [heartbeat(1, 2, commit=1)])
    t1.flush()
    await eventually(lambda: t2.stats[NodeId(1)].frames_received == 1)
    port = t2.listen_address[1]
    await t2.stop()
    await make_transport(2, inbox_2_again, port=port)
    # The outgoing side notices the old connection's EOF without having to write to it.
    await eventually(lambda: any("lost its connection" in r.getMessage() for r in caplog.records))
    t1.send(0, [heartbeat(1, 2, commit=2)])
    t1.flush()
    await eventually(lambda: bool(inbox_2_again.calls))
    assert inbox_2_again.commits_from(1) == [2]


async def send_raw(address: tuple[str, int], data: bytes) -> tuple[str, bytes]:
    """Connects, writes `data` and reads until the transport closes; returns (our address, read)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        local = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            received = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return local, received


async def assert_still_serves(t2: TcpTransport, inbox_2: Inbox, make_transport: MakeTransport):
    t1 = await make_transport(1)
    connect_all(t1, t2)
    t1.send(0, [heartbeat(1, 2, commit=77)])
    t1.flush()
    await eventually(lambda: inbox_2.commits_from(1) == [77])


async def test_an_oversized_frame_closes_only_that_connection(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
):
    inbox_2 = Inbox()
    t2 = await make_transport(2, inbox_2, max_frame_bytes=1000)
    local, received = await send_raw(t2.listen_address, struct.pack(">I", 1001) + b"x" * 100)
    assert received == b""
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert local in errors[0]
    assert "1001 bytes" in errors[0]
    assert inbox_2.calls == []
    await assert_still_serves(t2, inbox_2, make_transport)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1not msgpack",
        b"",
        b"\x93\x01\x01",  # truncated array
        encode_batch(NodeId(1), [(0, heartbeat(1, 2))])[:-1] + b"\xc0",  # a field is nil
    ],
    ids=["garbage", "empty", "truncated", "wrong-type"],
)
async def test_an_undecodable_frame_closes_only_that_connection(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture, payload: bytes
):
    inbox_2 = Inbox()
    t2 = await make_transport(2, inbox_2)
    _, other_writer = await asyncio.open_connection(*t2.listen_address)
    try:
        local, received = await send_raw(
            t2.listen_address, struct.pack(">I", len(payload)) + payload
        )
        assert received == b""
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert local in errors[0]
        assert "undecodable frame" in errors[0]
        assert not other_writer.is_closing(), "other connections stay open"
        frame = encode_batch(NodeId(3), [(0, heartbeat(3, 2, commit=9))])
        other_writer.write(struct.pack(">I", len(frame)) + frame)
        await other_writer.drain()
        await eventually(lambda: inbox_2.commits_from(3) == [9])
    finally:
        other_writer.close()
        await other_writer.wait_closed()
    await assert_still_serves(t2, inbox_2, make_transport)


async def test_a_connection_closed_mid_frame_is_not_an_error(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
):
    inbox_2 = Inbox()
    t2 = await make_transport(2, inbox_2)
    _, writer = await asyncio.open_connection(*t2.listen_address)
    writer.write(struct.pack(">I", 500) + b"partial")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await assert_still_serves(t2, inbox_2, make_transport)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_queue_of_an_unreachable_peer_drops_its_oldest_frames(
    make_transport: MakeTransport,
):
    inbox_2 = Inbox()
    with reserved_port() as port:
        t1 = await make_transport(1, peers={NodeId(2): (LOCALHOST, port)}, max_queued_frames=3)
        for commit in range(10):
            t1.send(0, [heartbeat(1, 2, commit=commit)])
            t1.flush()
        assert t1.stats[NodeId(2)].frames_dropped == 7
        assert t1.stats[NodeId(2)].frames_sent == 0
    await make_transport(2, inbox_2, port=port)
    await eventually(lambda: len(inbox_2.items) == 3)
    assert inbox_2.commits_from(1) == [7, 8, 9]
    assert t1.stats[NodeId(2)].frames_sent == 3


async def test_the_queue_byte_cap_keeps_at_least_the_newest_frame(make_transport: MakeTransport):
    with reserved_port() as port:
        t1 = await make_transport(1, peers={NodeId(2): (LOCALHOST, port)}, max_queued_bytes=10)
        for commit in range(4):
            t1.send(0, [heartbeat(1, 2, commit=commit)])
            t1.flush()
        assert t1.stats[NodeId(2)].frames_dropped == 3


async def test_a_batch_over_max_frame_bytes_is_split_and_one_huge_message_dropped(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
):
    inbox_2 = Inbox()
    t1 = await make_transport(1, max_frame_bytes=2000)
    t2 = await make_transport(2, inbox_2, max_frame_bytes=2000)
    connect_all(t1, t2)

    def append(index: int, size: int) -> AppendEntries:
        return AppendEntries(
            sender=NodeId(1),
            recipient=NodeId(2),
            term=Term(1),
            prev_log_index=LogIndex(index - 1),
            prev_log_term=Term(1),
            entries=(Entry(Term(1), LogIndex(index), bytes(size)),),
            leader_commit=LogIndex(0),
        )

    small = [append(i, 300) for i in range(1, 11)]
    t1.send(0, small[:5])
    t1.send(0, [append(99, 5000)])
    t1.send(0, small[5:])
    t1.flush()
    await eventually(lambda: len(inbox_2.items) == 10)
    assert [m for _, m in inbox_2.items] == small
    assert len(inbox_2.calls) > 1
    assert t1.stats[NodeId(2)].frames_sent == len(inbox_2.calls)
    assert t1.stats[NodeId(2)].frames_dropped == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "AppendEntries" in errors[0]
    assert "max_frame_bytes=2000" in errors[0]


async def test_a_moved_peer_is_reached_at_its_new_address(make_transport: MakeTransport):
    inbox_old, inbox_new = Inbox(), Inbox()
    t1 = await make_transport(1)
    old = await make_transport(2, inbox_old)
    new = await make_transport(2, inbox_new)
    t1.set_peer(NodeId(2), old.listen_address)
    t1.send(0, [heartbeat(1, 2, commit=1)])
    t1.flush()
    await eventually(lambda: bool(inbox_old.calls))

    t1.set_peer(NodeId(2), new.listen_address)
    t1.send(0, [heartbeat(1, 2, commit=2)])
    t1.flush()
    await eventually(lambda: bool(inbox_new.calls))
    assert inbox_new.commits_from(1) == [2]
    assert inbox_old.commits_from(1) == [1]


async def test_messages_for_unknown_or_removed_peers_are_dropped_with_one_warning(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
):
    inbox_2 = Inbox()
    t1 = await make_transport(1)
    t2 = await make_transport(2, inbox_2)
    connect_all(t1, t2)
    t1.send(0, [heartbeat(1, 5), heartbeat(1, 5), heartbeat(1, 2, commit=1)])
    t1.flush()
    await eventually(lambda: bool(inbox_2.calls))
    assert inbox_2.commits_from(1) == [1]

    t1.remove_peer(NodeId(2))
    t1.send(0, [heartbeat(1, 2, commit=2)])
    t1.flush()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("node 5" in w for w in warnings) == 1
    assert sum("node 2: not a known peer" in w for w in warnings) == 1
    assert t1.stats[NodeId(2)].frames_sent == 1  # counters outlive the peer


async def test_on_receive_raising_is_logged_and_the_connection_kept(
    make_transport: MakeTransport, caplog: pytest.LogCaptureFixture
):
    received: list[int] = []

    def on_receive(sender: NodeId, items: list[tuple[int, Message]]) -> None:
        received.append(sender)
        if len(received) == 1:
            raise RuntimeError("bug in the runtime")

    t1 = await make_transport(1)
    t2 = await make_transport(2, on_receive)
    connect_all(t1, t2)
    for commit in (1, 2):
        t1.send(0, [heartbeat(1, 2, commit)])
        t1.flush()
    await eventually(lambda: len(received) == 2)
    assert any("on_receive failed" in r.getMessage() for r in caplog.records)
    assert t1.stats[NodeId(2)].frames_dropped == 0


async def test_stop_is_idempotent_and_works_before_start():
    never_started = TcpTransport(NodeId(1), (LOCALHOST, 0), {}, Inbox())
    await never_started.stop()
    transport = TcpTransport(NodeId(1), (LOCALHOST, 0), {NodeId(2): (LOCALHOST, 9)}, Inbox())
    await transport.start()
    transport.send(0, [heartbeat(1, 2)])
    transport.flush()
    await transport.stop()
    await transport.stop()
    transport.send(0, [heartbeat(1, 2)])
    transport.flush()  # after stop: a no-op, not an error
    with pytest.raises(RuntimeError):
        await transport.start()


async def test_stop_closes_established_connections(make_transport: MakeTransport):
    inbox_2 = Inbox()
    t1 = await make_transport(1)
    t2 = await make_transport(2, inbox_2)
    connect_all(t1, t2)
    t1.send(0, [heartbeat(1, 2)])
    t1.flush()
    await eventually(lambda: bool(inbox_2.calls))
    await t1.stop()
    await t2.stop()


def make_tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    command = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    subprocess.run(
        [*command.split(), "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_transports_talk_over_tls(make_transport: MakeTransport, tmp_path: Path):
    server, client = make_tls_contexts(tmp_path)
    inbox_1, inbox_2 = Inbox(), Inbox()
    t1 = await make_transport(1, inbox_1, ssl_server=server, ssl_client=client)
    t2 = await make_transport(2, inbox_2, ssl_server=server, ssl_client=client)
    connect_all(t1, t2)
    t1.send(4, [heartbeat(1, 2, commit=3)])
    t1.flush()
    t2.send(5, [heartbeat(2, 1, commit=4)])
    t2.flush()
    await eventually(lambda: bool(inbox_1.calls and inbox_2.calls))
    assert inbox_2.calls == [(1, [(4, heartbeat(1, 2, commit=3))])]
    assert inbox_1.calls == [(2, [(5, heartbeat(2, 1, commit=4))])]
