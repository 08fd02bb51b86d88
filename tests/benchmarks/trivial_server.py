"""A bare aiohttp server answering every request with a few bytes: the reference that shows
`kvctl bench` is not the bottleneck (docs/benchmarks.md). Prints its URL, serves until killed.

    python tests/benchmarks/trivial_server.py [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import socket

from aiohttp import web


async def _answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"key":"k","version":1}', content_type="application/json")


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock)
    await site.start()
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
