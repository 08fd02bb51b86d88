"""TCP proxies for every directed node-to-node link, run in their own process, so that a partition
really cuts traffic. Node `src` reaches peer `dst` only through the listeners of link (src, dst):
one for Raft (to dst's peer_listen), one for HTTP forwarding (to dst's client_listen).

A blocked link is a blackhole: live connections are closed at once; a new connection is accepted,
everything it sends is read and thrown away, nothing is ever written back or forwarded, and it is
closed when the link is unblocked (a stream that lost bytes must not resume). So a sender sees a
peer that went silent, not a refusal. Never imports kvstore or raft: the cluster is a black box.

Control protocol (one JSON object per line; the harness side is `LinkProxy`):
  stdin first line  {"op": "listen", "links": [{"src": 1, "dst": 2, "raft": [host, port],
                     "http": [host, port]}, ...]}  (targets: the real addresses of dst)
  stdout reply      {"ok": true, "listen": [{"src": 1, "dst": 2, "raft": [h, p], "http": [h, p]}]}
  then              {"op": "block" | "unblock", "links": [[1, 2], ...], "kinds": ["raft", "http"]}
                    {"op": "heal"}   {"op": "stats"}   {"op": "ping"}
  each answered by  {"ok": true, ...} or {"ok": false, "error": "..."}.
The process exits when its stdin closes, so a harness that dies takes its proxies with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

Address = tuple[str, int]
Pair = tuple[int, int]

KINDS: Final = ("raft", "http")
HOST: Final = "127.0.0.1"
_CHUNK_BYTES: Final = 64 * 1024
_CONNECT_TIMEOUT_S: Final = 2.0
_REPLY_TIMEOUT_S: Final = 15.0
_EXIT_TIMEOUT_S: Final = 5.0
_REPO_ROOT: Final = Path(__file__).resolve().parent.parent


class ProxyError(RuntimeError):
    """The proxy process refused a request, did not answer in time, or is gone."""


@dataclass(frozen=True, slots=True)
class LinkStats:
    blocked: bool
    bytes_forwarded: int  # src -> dst, delivered while open
    bytes_returned: int  # dst -> src replies on connections src opened
    bytes_dropped: int  # read from src while blocked and thrown away
    connections_accepted: int
    connections_open: int  # forwarding or blackholed right now


# ---------------------------------------------------------------------------- proxy process


@dataclass(eq=False)
class _Forwarded:
    """One proxied connection: the client side (src) and the upstream side (dst)."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    is_closed: bool = False

    def abort(self) -> None:
        self.is_closed = True
        self.client.transport.abort()
        self.upstream.transport.abort()


@dataclass(eq=False)
class _Link:
    src: int
    dst: int
    kind: str
    target: Address
    server: asyncio.Server | None = None
    blocked: bool = False
    forwarding: set[_Forwarded] = field(default_factory=set)
    blackholed: set[asyncio.StreamWriter] = field(default_factory=set)
    bytes_forwarded: int = 0
    bytes_returned: int = 0
    bytes_dropped: int = 0
    connections_accepted: int = 0

    def block(self) -> None:
        self.blocked = True
        for connection in list(self.forwarding):
            connection.abort()

    def unblock(self) -> None:
        self.blocked = False
        for writer in list(self.blackholed):
            writer.transport.abort()  # the sender reconnects to a link that forwards again

    def stats(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "kind": self.kind,
            "blocked": self.blocked,
            "bytes_forwarded": self.bytes_forwarded,
            "bytes_returned": self.bytes_returned,
            "bytes_dropped": self.bytes_dropped,
            "connections_accepted": self.connections_accepted,
            "connections_open": len(self.forwarding) + len(self.blackholed),
        }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self.blocked:
            await self._blackhole(reader, writer)
            return
        try:
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.target), _CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            writer.transport.abort()  # dst is down: src sees a dead peer, as without a proxy
            return
        connection = _Forwarded(writer, upstream)
        if self.blocked:  # blocked while we were connecting
            connection.abort()
            return
        self.forwarding.add(connection)
        try:
            await asyncio.gather(
                self._pump(reader, upstream, connection, to_dst=True),
                self._pump(upstream_reader, writer, connection, to_dst=False),
            )
        finally:
            self.forwarding.discard(connection)
            connection.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Forwarded,
        *,
        to_dst: bool,
    ) -> None:
        try:
            while not connection.is_closed:
                chunk = await reader.read(_CHUNK_BYTES)
                # Invariant: nothing is written once the link was blocked (block() runs on this
                # loop, between our awaits, and marks every live connection closed).
                if connection.is_closed:
                    return
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()  # half-close: HTTP clients may still await a reply
                    return
                writer.write(chunk)
                if to_dst:
                    self.bytes_forwarded += len(chunk)
                else:
                    self.bytes_returned += len(chunk)
                await writer.drain()
        except (OSError, RuntimeError):  # reset by a peer, or written after abort
            connection.abort()

    async def _blackhole(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.blackholed.add(writer)
        try:
            while chunk := await reader.read(_CHUNK_BYTES):
                self.bytes_dropped += len(chunk)
        except OSError:
            pass
        finally:
            self.blackholed.discard(writer)
            writer.transport.abort()


class _ProxyServer:
    def __init__(self) -> None:
        self.links: dict[tuple[int, int, str], _Link] = {}

    async def listen(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        listening = []
        for spec in specs:
            src, dst = int(spec["src"]), int(spec["dst"])
            answer: dict[str, Any] = {"src": src, "dst": dst}
            for kind in KINDS:
                host, port = spec[kind]
                link = _Link(src, dst, kind, (str(host), int(port)))
                link.server = await asyncio.start_server(link.serve, HOST, 0)
                self.links[(src, dst, kind)] = link
                answer[kind] = list(link.server.sockets[0].getsockname()[:2])
            listening.append(answer)
        return listening

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "stats":
            return {"ok": True, "links": [link.stats() for link in self.links.values()]}
        if op == "heal":
            for link in self.links.values():
                link.unblock()
            return {"ok": True}
        if op in ("block", "unblock"):
            kinds = request.get("kinds", list(KINDS))
            selected: list[_Link] = []
            for src, dst in request.get("links", []):
                for kind in kinds:
                    found = self.links.get((int(src), int(dst), str(kind)))
                    if found is None:
                        return {"ok": False, "error": f"no link {src}->{dst} ({kind})"}
                    selected.append(found)
            for chosen in selected:  # all or nothing: validated above
                if op == "block":
                    chosen.block()
                else:
                    chosen.unblock()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def close(self) -> None:
        for link in self.links.values():
            if link.server is not None:
                link.server.close()
            link.block()  # closes forwarding connections
            for writer in list(link.blackholed):
                writer.transport.abort()
        for link in self.links.values():
            if link.server is not None:
                with contextlib.suppress(Exception):
                    await link.server.wait_closed()


async def _serve_control() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    terminated = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, terminated.set)
    server = _ProxyServer()

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        while not terminated.is_set():
            line_task = asyncio.ensure_future(stdin.readline())
            stop_task = asyncio.ensure_future(terminated.wait())
            await asyncio.wait({line_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            if not line_task.done():
                line_task.cancel()
                break
            line = line_task.result()
            if not line:
                break  # stdin closed: the harness is gone or done
            try:
                request = json.loads(line)
                if request.get("op") == "listen":
                    reply({"ok": True, "listen": await server.listen(request["links"])})
                else:
                    reply(server.handle(request))
            except (ValueError, KeyError, TypeError, OSError) as error:
                reply({"ok": False, "error": f"{type(error).__name__}: {error}"})
    finally:
        await server.close()


def main() -> int:
    try:
        import uvloop
    except ImportError:  # optional: a faster loop, nothing more
        asyncio.run(_serve_control())
    else:
        uvloop.run(_serve_control())
    return 0


# ---------------------------------------------------------------------------- harness side


class LinkProxy:
    """The harness's handle on the proxy process. Thread-safe: one request at a time."""

    def __init__(self, *, python: str = sys.executable, log_path: Path | None = None) -> None:
        self._python = python
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._replies: queue.Queue[bytes | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._listen: dict[Pair, dict[str, Address]] = {}

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, links: Mapping[Pair, Mapping[str, Address]]) -> dict[Pair, dict[str, Address]]:
        """Starts the process with one raft and one http listener per link; `links` maps
        (src, dst) to dst's real {"raft": addr, "http": addr}. Returns the listen addresses."""
        if self._process is not None:
            raise ProxyError("the proxy is already started")
        log: IO[bytes] | int = subprocess.DEVNULL
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self._log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if part
        )
        try:
            self._process = subprocess.Popen(
                [self._python, "-m", "jepsen_like.proxy"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,  # a Ctrl-C to the harness must not cut links mid-heal
            )
        finally:
            if not isinstance(log, int):
                log.close()
        self._reader = threading.Thread(
            target=self._read_replies, args=(self._process,), name="link-proxy-replies", daemon=True
        )
        self._reader.start()
        try:
            answer = self._request(
                {
                    "op": "listen",
                    "links": [
                        {
                            "src": src,
                            "dst": dst,
                            **{kind: list(targets[kind]) for kind in KINDS},
                        }
                        for (src, dst), targets in sorted(links.items())
                    ],
                }
            )
        except BaseException:
            self.stop()
            raise
        self._listen = {
            (int(item["src"]), int(item["dst"])): {
                kind: (str(item[kind][0]), int(item[kind][1])) for kind in KINDS
            }
            for item in answer["listen"]
        }
        return {pair: dict(addresses) for pair, addresses in self._listen.items()}

    def block(self, pairs: Iterable[Pair], kinds: Iterable[str] = KINDS) -> None:
        """Cuts src -> dst for each pair: live connections close, new ones are blackholed."""
        self._request({"op": "block", "links": _pairs(pairs), "kinds": list(kinds)})

    def unblock(self, pairs: Iterable[Pair], kinds: Iterable[str] = KINDS) -> None:
        self._request({"op": "unblock", "links": _pairs(pairs), "kinds": list(kinds)})

    def heal(self) -> None:
        self._request({"op": "heal"})

    def stats(self) -> dict[Pair, dict[str, LinkStats]]:
        answer = self._request({"op": "stats"})
        result: dict[Pair, dict[str, LinkStats]] = {}
        for item in answer["links"]:
            result.setdefault((int(item["src"]), int(item["dst"])), {})[str(item["kind"])] = (
                LinkStats(
                    blocked=bool(item["blocked"]),
                    bytes_forwarded=int(item["bytes_forwarded"]),
                    bytes_returned=int(item["bytes_returned"]),
                    bytes_dropped=int(item["bytes_dropped"]),
                    connections_accepted=int(item["connections_accepted"]),
                    connections_open=int(item["connections_open"]),
                )
            )
        return result

    def blocked(self) -> set[Pair]:
        """The pairs with at least one kind blocked."""
        return {
            pair
            for pair, kinds in self.stats().items()
            if any(stats.blocked for stats in kinds.values())
        }

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Closes stdin (the proxy exits on EOF), then SIGTERM, then SIGKILL, by PID. Idempotent."""
        process = self._process
        if process is None:
            return
        with self._lock:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            for signum in (None, signal.SIGTERM, signal.SIGKILL):
                if signum is not None and process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signum)
                try:
                    process.wait(timeout=_EXIT_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if self._reader is not None:
                self._reader.join(timeout=_EXIT_TIMEOUT_S)
            if process.stdout is not None:
                process.stdout.close()
            self._process = None

    def __enter__(self) -> LinkProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            process = self._process
            if process is None or process.stdin is None:
                raise ProxyError("the proxy is not running")
            try:
                process.stdin.write(json.dumps(message).encode() + b"\n")
                process.stdin.flush()
            except OSError as error:
                raise ProxyError(f"the proxy process is gone: {error}") from None
            deadline = time.monotonic() + _REPLY_TIMEOUT_S
            try:
                line = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ProxyError(f"no answer from the proxy to {message['op']!r}") from None
            if line is None:
                self._replies.put(None)  # later requests fail fast too
                raise ProxyError(f"the proxy process exited (code {process.poll()})")
            answer: dict[str, Any] = json.loads(line)
            if not answer.get("ok"):
                raise ProxyError(f"proxy refused {message['op']!r}: {answer.get('error')}")
            return answer

    def _read_replies(self, process: subprocess.Popen[bytes]) -> None:
        if process.stdout is not None:
            for line in process.stdout:
                self._replies.put(line)
        self._replies.put(None)


def _pairs(pairs: Iterable[Pair]) -> list[list[int]]:
    return [[int(src), int(dst)] for src, dst in pairs]


if __name__ == "__main__":
    sys.exit(main())
