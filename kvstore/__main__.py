"""`python -m kvstore --config FILE` (installed as `kvstore-node`): run one node."""

from __future__ import annotations

import asyncio
import logging
import sys

from kvstore.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(argv)
    except ConfigError as error:
        print(f"kvstore-node: {error}", file=sys.stderr)
        return 2
    from kvstore.node import serve

    try:
        import uvloop
    except ImportError:  # optional: asyncio's own loop works, a little slower
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
