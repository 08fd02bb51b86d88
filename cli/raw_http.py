"""A minimal keep-alive HTTP/1.1 client connection on asyncio streams, for load generation.

It speaks only what our node API answers (Content-Length bodies, no chunking, no redirects), so
one request costs a few bytes operations instead of a full client stack: the load generator must
not be the bottleneck. Everything else in kvctl uses cli.client.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

_HEADER_END = b"\r\n\r\n"


class HttpConnectionError(Exception):
    """The connection failed or the answer was not HTTP/1.1 we understand; reconnect."""


class HttpConnection:
    def __init__(self, endpoint: str, timeout_s: float) -> None:
        parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http://host:port endpoints are supported, not {endpoint!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._host_header = f"{self.host}:{self.port}".encode()
        self._timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = ""
    ) -> tuple[int, bytes]:
        """(status, body). Raises HttpConnectionError or TimeoutError; the connection is then
        closed and the next request opens a new one."""
        try:
            return await asyncio.wait_for(
                self._exchange(method, path, body, content_type), self._timeout_s
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            self.close()
            raise HttpConnectionError(f"{type(e).__name__}: {e}") from e
        except TimeoutError:
            self.close()
            raise

    async def _exchange(
        self, method: str, path: str, body: bytes, content_type: str
    ) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        head = f"{method} {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        writer.write(head.encode() + b"Host: " + self._host_header + _HEADER_END + body)
        header = await reader.readuntil(_HEADER_END)
        status_line, _, rest = header.partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        keep_alive = True
        for line in rest.split(b"\r\n"):
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding":
                raise ValueError("chunked answers are not supported by the load generator")
            elif lowered == b"connection" and value.strip().lower() == b"close":
                keep_alive = False
        payload = await reader.readexactly(length) if length else b""
        if not keep_alive:
            self.close()
        return status, payload

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
