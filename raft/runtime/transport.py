"""TCP transport between Raft nodes: length-prefixed msgpack frames over asyncio streams.

Owns one outgoing connection per peer (opened lazily, reconnected with backoff) and the listener for
incoming ones. Raft tolerates loss, so sending never blocks and never raises on network trouble:
a peer's queue is capped and drops its oldest frames. Bad input closes one connection, nothing more.
With TLS, a peer refused at the handshake (no certificate, or one the CA did not sign, or no TLS
at all) is logged and counted, where asyncio alone would drop it silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from raft.core.messages import Message
from raft.core.types import NodeId, node_of
from raft.runtime.codec import FrameError, decode_batch, encode_batch

logger = logging.getLogger(__name__)

_FRAME_HEADER: Final = struct.Struct(">I")  # payload length, big-endian unsigned
_READ_BUFFER_BYTES: Final = 1 << 20  # fewer pause/resume cycles while reading large frames
_HANDSHAKE_TIMEOUT_S: Final = 10.0  # a peer that stalls its TLS handshake holds a socket no longer


@dataclass(slots=True)
class PeerStats:
    """Counters for one peer; mutated in place by the transport, read by metrics."""

    bytes_sent: int = 0  # including the 4-byte frame headers
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    frames_dropped: int = 0  # queue overflow, lost mid-write, or one message over max_frame_bytes


class _LinkState(enum.Enum):
    NEW = enum.auto()
    CONNECTED = enum.auto()
    DISCONNECTED = enum.auto()  # was connected, lost it
    UNREACHABLE = enum.auto()  # a connection attempt failed; retrying with backoff


@dataclass(slots=True, eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    eof_watcher: asyncio.Task[None] | None = None
    lost_reason: str | None = None  # set once the connection must not be written to anymore


@dataclass(slots=True, eq=False)
class _Peer:
    node_id: NodeId
    address: tuple[str, int]
    stats: PeerStats
    # Messages given to send() since the last flush().
    pending: list[tuple[int, Message]] = field(default_factory=list)
    # Encoded frames (header + payload) waiting for the writer task, oldest first.
    # Invariant: queued_bytes == sum(map(len, queue)).
    queue: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    writer_task: asyncio.Task[None] | None = None
    connection: _Connection | None = None
    state: _LinkState = _LinkState.NEW


class TcpTransport:
    """Sends batches of (group_id, message) to peers; delivers received ones to `on_receive`."""

    def __init__(
        self,
        node_id: NodeId,
        listen: tuple[str, int],
        peers: Mapping[NodeId, tuple[str, int]],
        on_receive: Callable[[NodeId, list[tuple[int, Message]]], None],
        *,
        max_frame_bytes: int = 64 << 20,
        ssl_server: ssl.SSLContext | None = None,
        ssl_client: ssl.SSLContext | None = None,
        max_queued_frames: int = 1024,
        max_queued_bytes: int = 128 << 20,
        connect_timeout_s: float = 2.0,
        max_inbound_connections: int = 256,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        if max_frame_bytes < 1 or max_queued_frames < 1 or max_queued_bytes < 1:
            raise ValueError("max_frame_bytes, max_queued_frames and max_queued_bytes must be >= 1")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_min_s <= backoff_max_s")
        self.node_id = node_id
        self._listen = listen
        self._on_receive = on_receive
        self._max_frame_bytes = max_frame_bytes
        self._ssl_server = ssl_server
        self._ssl_client = ssl_client
        # The newest frame is always kept, so a single frame may exceed max_queued_bytes.
        self._max_queued_frames = max_queued_frames
        self._max_queued_bytes = max_queued_bytes
        self._connect_timeout_s = connect_timeout_s
        # Peers need one connection each; the cap stops a flood of idle sockets from outsiders.
        self._max_inbound_connections = max_inbound_connections
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng if rng is not None else random.Random()
        self._peers: dict[NodeId, _Peer] = {}
        self._dirty: list[_Peer] = []  # peers with pending messages, each once
        self._stats: dict[NodeId, PeerStats] = {}
        self._unknown_recipients: set[NodeId] = set()  # logged once each
        # Inbound connections refused before any frame was read: failed TLS handshakes (a
        # peer without a certificate our CA signed, or plain TCP to a TLS port), over the cap.
        self.refused_connections: dict[str, int] = {"tls_handshake": 0, "too_many": 0}
        if ssl_server is not None:
            count_handshake_failures(ssl_server, self._note_refused_handshake)
        self._server: asyncio.Server | None = None
        self._inbound: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._retired_tasks: set[asyncio.Task[None]] = set()  # writers of removed peers, ending
        self._is_started = False
        self._is_stopped = False
        for peer_id, address in peers.items():
            self.set_peer(peer_id, address)

    # --- Lifecycle ---

    async def start(self) -> None:
        """Binds the listener (port 0 picks a free port) and starts the per-peer writer tasks."""
        if self._is_started:
            raise RuntimeError("TcpTransport.start() called twice")
        if self._is_stopped:
            raise RuntimeError("a stopped TcpTransport cannot be restarted")
        host, port = self._listen
        self._server = await asyncio.start_server(
            self._serve_connection,
            host,
            port,
            ssl=self._ssl_server,
            ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S if self._ssl_server else None,
            limit=_READ_BUFFER_BYTES,
        )
        self._is_started = True
        for peer in self._peers.values():
            self._start_writer(peer)
        logger.info("node %d listening on %s:%d", self.node_id, *self.listen_address)

    @property
    def listen_address(self) -> tuple[str, int]:
        """The bound (host, port); only valid after start()."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("TcpTransport is not listening; call start() first")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        """Closes the listener and every connection and cancels all tasks; idempotent."""
        if self._is_stopped:
            return
        self._is_stopped = True
        if self._server is not None:
            self._server.close()
        writer_tasks = [p.writer_task for p in self._peers.values() if p.writer_task is not None]
        writer_tasks.extend(self._retired_tasks)
        for task in writer_tasks:
            task.cancel()
        # Inbound handlers end by themselves once their connection is closed. (Cancelling them
        # makes Python 3.11's start_server log a spurious error.)
        for writer in self._inbound.values():
            writer.close()
        await asyncio.gather(*writer_tasks, *self._inbound, return_exceptions=True)
        self._inbound.clear()
        if self._server is not None:
            await self._server.wait_closed()
        for peer in self._peers.values():
            peer.pending.clear()
            peer.queue.clear()
            peer.queued_bytes = 0
        self._dirty.clear()

    # --- Membership ---

    def set_peer(self, node_id: NodeId, address: tuple[str, int]) -> None:
        """Adds a peer, or moves it: a changed address drops the current connection."""
        peer = self._peers.get(node_id)
        if peer is None:
            stats = self._stats.setdefault(node_id, PeerStats())
            peer = self._peers[node_id] = _Peer(node_id, address, stats)
            self._unknown_recipients.discard(node_id)
            if self._is_started and not self._is_stopped:
                self._start_writer(peer)
        elif peer.address != address:
            peer.address = address
            if peer.connection is not None:  # the writer task reconnects to the new address
                peer.connection.lost_reason = f"moved to {address[0]}:{address[1]}"
                peer.wakeup.set()

    def remove_peer(self, node_id: NodeId) -> None:
        """Forgets a peer: its queued messages are discarded and its connection closed."""
        peer = self._peers.pop(node_id, None)
        if peer is None:
            return
        if peer in self._dirty:
            self._dirty.remove(peer)
        if peer.writer_task is not None:
            peer.writer_task.cancel()  # its finally clause closes the connection
            self._retired_tasks.add(peer.writer_task)
            peer.writer_task.add_done_callback(self._retired_tasks.discard)

    @property
    def stats(self) -> Mapping[NodeId, PeerStats]:
        """Live counters per peer (kept after remove_peer, so totals never go backwards)."""
        return self._stats

    # --- Sending ---

    def send(self, group_id: int, messages: Iterable[Message]) -> None:
        """Buffers messages for their recipients until the next flush(); never blocks or raises."""
        peers = self._peers
        for message in messages:
            node = node_of(message.recipient)  # a replica id's node: see raft.core.types
            peer = peers.get(node)
            if peer is None:
                self._note_unknown_recipient(node)
                continue
            if not peer.pending:
                self._dirty.append(peer)
            peer.pending.append((group_id, message))

    def flush(self) -> None:
        """Sends everything buffered: one frame per peer (more only if over max_frame_bytes)."""
        if self._is_stopped:
            for peer in self._dirty:
                peer.pending.clear()
            self._dirty.clear()
            return
        dirty, self._dirty = self._dirty, []
        try:
            for peer in dirty:
                items, peer.pending = peer.pending, []
                for frame in self._encode_frames(peer, items):
                    peer.queue.append(frame)
                    peer.queued_bytes += len(frame)
                self._drop_overflow(peer)
                peer.wakeup.set()
        finally:  # encode_batch raised on a non-message (a bug): keep the other peers flushable
            self._dirty.extend(peer for peer in dirty if peer.pending)

    def _encode_frames(self, peer: _Peer, items: list[tuple[int, Message]]) -> list[bytes]:
        payload = encode_batch(self.node_id, items)
        if len(payload) <= self._max_frame_bytes:
            return [_FRAME_HEADER.pack(len(payload)) + payload]
        if len(items) == 1:
            group_id, message = items[0]
            logger.error(
                "dropping %s for node %d in group %d: %d bytes encoded, over max_frame_bytes=%d",
                type(message).__name__,
                peer.node_id,
                group_id,
                len(payload),
                self._max_frame_bytes,
            )
            peer.stats.frames_dropped += 1
            return []
        middle = len(items) // 2  # NB: re-encodes each half; only for batches over the limit
        return self._encode_frames(peer, items[:middle]) + self._encode_frames(peer, items[middle:])

    def _drop_overflow(self, peer: _Peer) -> None:
        queue = peer.queue
        while len(queue) > 1 and (
            len(queue) > self._max_queued_frames or peer.queued_bytes > self._max_queued_bytes
        ):
            peer.queued_bytes -= len(queue.popleft())
            peer.stats.frames_dropped += 1

    def _note_unknown_recipient(self, node_id: NodeId) -> None:
        if node_id not in self._unknown_recipients:
            self._unknown_recipients.add(node_id)
            logger.warning("dropping messages for node %d: not a known peer", node_id)

    # --- Outgoing connections: one writer task per peer ---

    def _start_writer(self, peer: _Peer) -> None:
        peer.writer_task = asyncio.create_task(
            self._run_writer(peer), name=f"raft-transport-{self.node_id}->{peer.node_id}"
        )
        if peer.queue:
            peer.wakeup.set()

    async def _run_writer(self, peer: _Peer) -> None:
        try:
            while True:
                try:
                    await self._write_until_error(peer)
                except Exception:  # a bug: keep the peer alive rather than silently lose it
                    logger.exception("writer task for node %d failed; restarting", peer.node_id)
                    await self._close_outgoing(peer)
                    await asyncio.sleep(self._backoff_max_s)
        finally:
            await self._close_outgoing(peer)

    async def _write_until_error(self, peer: _Peer) -> None:
        backoff_s = self._backoff_min_s
        while True:
            connection = peer.connection
            if connection is not None:
                if connection.lost_reason is None and connection.writer.is_closing():
                    connection.lost_reason = "closed"
                if connection.lost_reason is not None:
                    self._note_lost(peer, connection.lost_reason)
                    await self._close_outgoing(peer)
                    continue
            if not peer.queue:
                peer.wakeup.clear()
                await peer.wakeup.wait()
                continue
            if connection is None:
                try:
                    connection = await self._connect(peer)
                except Exception as error:  # OSError, ssl.SSLError, TimeoutError, bad host...
                    self._note_unreachable(peer, error)
                    await asyncio.sleep(backoff_s * self._rng.uniform(0.5, 1.0))
                    backoff_s = min(backoff_s * 2, self._backoff_max_s)
                    continue
                backoff_s = self._backoff_min_s
            await self._write_queue(peer, connection)

    async def _connect(self, peer: _Peer) -> _Connection:
        host, port = peer.address
        async with asyncio.timeout(self._connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=self._ssl_client,
                server_hostname=host if self._ssl_client is not None else None,
            )
        _set_nodelay(writer)
        connection = _Connection(reader, writer)
        connection.eof_watcher = asyncio.create_task(self._watch_eof(peer, connection))
        peer.connection = connection
        if peer.state is not _LinkState.CONNECTED:
            logger.info(
                "node %d connected to node %d at %s:%d", self.node_id, peer.node_id, *peer.address
            )
        peer.state = _LinkState.CONNECTED
        return connection

    async def _watch_eof(self, peer: _Peer, connection: _Connection) -> None:
        # Peers never write on our outgoing connection, so any read completing means it closed;
        # noticing now, rather than at the next failed write, saves the frames written meanwhile.
        reason = "closed by the remote end"
        try:
            if await connection.reader.read(1):
                reason = "unexpected data from the remote end"
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
        if connection.lost_reason is None:
            connection.lost_reason = reason
        peer.wakeup.set()

    async def _write_queue(self, peer: _Peer, connection: _Connection) -> None:
        frames = list(peer.queue)
        peer.queue.clear()
        size = peer.queued_bytes
        peer.queued_bytes = 0
        try:
            connection.writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
            await connection.writer.drain()
        except Exception as error:  # ConnectionResetError, BrokenPipeError, ssl.SSLError...
            peer.stats.frames_dropped += len(frames)
            self._note_lost(peer, f"{type(error).__name__}: {error}")
            await self._close_outgoing(peer)
            return
        peer.stats.frames_sent += len(frames)
        peer.stats.bytes_sent += size

    async def _close_outgoing(self, peer: _Peer) -> None:
        connection = peer.connection
        if connection is None:
            return
        peer.connection = None
        if connection.eof_watcher is not None:
            connection.eof_watcher.cancel()
        connection.writer.close()
        with contextlib.suppress(Exception):
            await connection.writer.wait_closed()
        if connection.eof_watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await connection.eof_watcher

    def _note_lost(self, peer: _Peer, reason: str) -> None:
        if peer.state is _LinkState.CONNECTED:
            logger.warning(
                "node %d lost its connection to node %d at %s:%d: %s",
                self.node_id,
                peer.node_id,
                *peer.address,
                reason,
            )
            peer.state = _LinkState.DISCONNECTED

    def _note_unreachable(self, peer: _Peer, error: Exception) -> None:
        if peer.state is _LinkState.UNREACHABLE:
            logger.debug("node %d still unreachable: %r", peer.node_id, error)
            return
        peer.state = _LinkState.UNREACHABLE
        logger.warning(
            "node %d cannot reach node %d at %s:%d (%s); retrying with backoff up to %.1f s",
            self.node_id,
            peer.node_id,
            *peer.address,
            f"{type(error).__name__}: {error}",
            self._backoff_max_s,
        )

    # --- Incoming connections ---

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is None or self._is_stopped:
            writer.close()
            return
        remote = _format_address(writer.get_extra_info("peername"))
        if len(self._inbound) >= self._max_inbound_connections:
            self._refuse_too_many(remote)
            writer.close()
            return
        self._inbound[task] = writer
        _set_nodelay(writer)
        try:
            await self._read_frames(reader, remote)
        except (asyncio.IncompleteReadError, OSError) as error:
            logger.debug("connection from %s closed: %r", remote, error)
        except Exception:
            logger.exception("closing connection from %s", remote)
        finally:
            self._inbound.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _note_refused_handshake(self, error: ssl.SSLError) -> None:
        # NB: the peer's address is not known at this layer; the reason is.
        self.refused_connections["tls_handshake"] += 1
        logger.warning(
            "node %d refused a peer connection at the TLS handshake: %s",
            self.node_id,
            error.reason or error,
        )

    def _refuse_too_many(self, remote: str) -> None:
        self.refused_connections["too_many"] += 1
        logger.warning(
            "refusing connection from %s: %d inbound connections already open (the cap)",
            remote,
            len(self._inbound),
        )

    async def _read_frames(self, reader: asyncio.StreamReader, remote: str) -> None:
        header_size = _FRAME_HEADER.size
        while True:
            (size,) = _FRAME_HEADER.unpack(await reader.readexactly(header_size))
            if size > self._max_frame_bytes:
                logger.error(
                    "closing connection from %s: frame of %d bytes exceeds max_frame_bytes=%d",
                    remote,
                    size,
                    self._max_frame_bytes,
                )
                return
            payload = await reader.readexactly(size)
            try:
                sender, items = decode_batch(payload)
            except FrameError as error:
                logger.error(
                    "closing connection from %s: undecodable frame of %d bytes: %s",
                    remote,
                    size,
                    error,
                )
                return
            stats = self._stats.get(sender)
            if stats is not None:
                stats.frames_received += 1
                stats.bytes_received += header_size + size
            try:
                self._on_receive(sender, items)
            except Exception:
                logger.exception("on_receive failed for a frame from node %d", sender)


def count_handshake_failures(
    context: ssl.SSLContext, on_failure: Callable[[ssl.SSLError], None]
) -> None:
    """Makes `context` call on_failure for every TLS handshake it fails (bad or missing peer
    certificate, plain text to a TLS port). asyncio and uvloop only debug-log those; both run
    the handshake through context.wrap_bio, whose SSLObject class is the hook used here."""

    class _CountingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # not a failure: the handshake needs more bytes
            except ssl.SSLError as error:
                on_failure(error)
                raise

    context.sslobject_class = _CountingSSLObject


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _format_address(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)
