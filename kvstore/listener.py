"""The HTTP listener: aiohttp's TCPSite with a cap on open client connections.

aiohttp has no connection limit of its own; past the cap a new connection is closed as soon as
it is accepted (counted in `refused`), so a flood of idle sockets cannot exhaust the node's
file descriptors or memory. Requests on the connections it keeps are limited per client by
http_api.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

log = logging.getLogger(__name__)


class _CloseAtOnce(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class CappedTCPSite(web.TCPSite):
    def __init__(
        self, runner: web.AppRunner, host: str, port: int, *, max_connections: int, **kwargs: object
    ) -> None:
        super().__init__(runner, host, port, **kwargs)  # type: ignore[arg-type]
        self._max_connections = max_connections
        self.refused = 0

    async def start(self) -> None:
        # TCPSite.start, with the runner's protocol factory wrapped by the cap. NB: it reads
        # TCPSite's private fields, so an aiohttp upgrade may need a look here.
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")

        def protocol_factory() -> asyncio.BaseProtocol:
            if len(server.connections) >= self._max_connections:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning(
                        "refusing HTTP connections: %d open, the limit is %d (%d refused so far)",
                        len(server.connections),
                        self._max_connections,
                        self.refused,
                    )
                return _CloseAtOnce()
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol_factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
