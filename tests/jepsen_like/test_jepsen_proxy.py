"""The link proxy process, against a tiny echo server on loopback: no cluster needed."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from jepsen_like.proxy import LinkProxy, LinkStats, ProxyError

DEADLINE_S = 5.0


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.accepted = 0
        self.received = 0
        self.lock = threading.Lock()


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _EchoServer)
        with server.lock:
            server.accepted += 1
        while data := self.request.recv(65536):
            with server.lock:
                server.received += len(data)
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    server = _EchoServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def proxy(echo: _EchoServer) -> Iterator[tuple[LinkProxy, dict]]:
    target = echo.server_address[:2]
    link_proxy = LinkProxy()
    try:
        listen = link_proxy.start(
            {(1, 2): {"raft": target, "http": target}, (2, 1): {"raft": target, "http": target}}
        )
        yield link_proxy, listen
    finally:
        pid = link_proxy.pid
        link_proxy.stop()
        if pid is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # stopped and reaped: the PID names nothing any more


def _connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=DEADLINE_S)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _poll(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S}s: {what}")
        time.sleep(0.02)


def _is_closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _stats(link_proxy: LinkProxy, pair: tuple[int, int], kind: str = "raft") -> LinkStats:
    return link_proxy.stats()[pair][kind]


def test_an_open_link_forwards_bytes_both_ways_and_counts_them(proxy) -> None:
    link_proxy, listen = proxy
    assert set(listen) == {(1, 2), (2, 1)}
    for kind in ("raft", "http"):
        with _connect(listen[(1, 2)][kind]) as sock:
            sock.sendall(b"hello " + kind.encode())
            assert _recv_exactly(sock, 6 + len(kind)) == b"hello " + kind.encode()
    stats = link_proxy.stats()[(1, 2)]
    assert stats["raft"].bytes_forwarded == 10
    assert stats["raft"].bytes_returned == 10
    assert stats["http"].bytes_forwarded == 10
    assert not stats["raft"].blocked
    assert link_proxy.stats()[(2, 1)]["raft"].bytes_forwarded == 0


def test_a_blocked_link_accepts_but_delivers_nothing(proxy, echo: _EchoServer) -> None:
    link_proxy, listen = proxy
    link_proxy.block([(1, 2)])
    assert link_proxy.blocked() == {(1, 2)}
    with _connect(listen[(1, 2)]["raft"]) as sock:
        sock.sendall(b"x" * 100_000)
        _poll(
            lambda: _stats(link_proxy, (1, 2)).bytes_dropped == 100_000,
            "the proxy read and dropped everything sent",
        )
        # The proxy never even connected upstream: nothing can arrive later.
        assert echo.accepted == 0
        assert echo.received == 0
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # a blackhole: no answer and no close while blocked
    assert _stats(link_proxy, (1, 2)).bytes_forwarded == 0


def test_blocking_a_link_closes_its_live_connections(proxy, echo: _EchoServer) -> None:
    link_proxy, listen = proxy
    with _connect(listen[(1, 2)]["http"]) as sock:
        sock.sendall(b"ping")
        assert _recv_exactly(sock, 4) == b"ping"
        link_proxy.block([(1, 2)])
        assert _is_closed_by_peer(sock)
    assert echo.received == 4


def test_blocking_one_direction_leaves_the_other_open(proxy) -> None:
    link_proxy, listen = proxy
    link_proxy.block([(1, 2)], kinds=["raft"])
    with _connect(listen[(2, 1)]["raft"]) as sock:
        sock.sendall(b"reverse")
        assert _recv_exactly(sock, 7) == b"reverse"
    with _connect(listen[(1, 2)]["http"]) as sock:  # only the raft kind was blocked
        sock.sendall(b"http")
        assert _recv_exactly(sock, 4) == b"http"
    assert _stats(link_proxy, (1, 2), "raft").blocked
    assert not _stats(link_proxy, (1, 2), "http").blocked


def test_unblocking_closes_blackholed_connections_and_restores_new_ones(proxy) -> None:
    link_proxy, listen = proxy
    link_proxy.block([(1, 2), (2, 1)])
    with _connect(listen[(1, 2)]["raft"]) as blackholed:
        blackholed.sendall(b"lost")
        _poll(lambda: _stats(link_proxy, (1, 2)).bytes_dropped == 4, "the bytes were dropped")
        link_proxy.unblock([(1, 2)])
        assert _is_closed_by_peer(blackholed)  # a stream that lost bytes never resumes
    with _connect(listen[(1, 2)]["raft"]) as sock:
        sock.sendall(b"again")
        assert _recv_exactly(sock, 5) == b"again"
    assert link_proxy.blocked() == {(2, 1)}
    link_proxy.heal()
    assert link_proxy.blocked() == set()


def test_an_unknown_link_is_refused_and_changes_nothing(proxy) -> None:
    link_proxy, _ = proxy
    with pytest.raises(ProxyError, match="no link 1->3"):
        link_proxy.block([(1, 2), (1, 3)])
    assert link_proxy.blocked() == set()


def test_the_proxy_exits_when_its_harness_closes_stdin(echo: _EchoServer) -> None:
    link_proxy = LinkProxy()
    target = echo.server_address[:2]
    try:
        link_proxy.start({(1, 2): {"raft": target, "http": target}})
        assert link_proxy.is_running()
        process = link_proxy._process
        assert process is not None
        assert process.stdin is not None
        process.stdin.close()  # what the OS does when the harness dies
        assert process.wait(timeout=DEADLINE_S) == 0  # no signal was needed
    finally:
        link_proxy.stop()
    assert not link_proxy.is_running()
    link_proxy.stop()  # idempotent
