"""Which node leads the shard of a key, from GET /v1/cluster: a client that sends each request
straight to its shard's leader saves the node the forwarding hop (an extra HTTP exchange).

The token of a key must be computed exactly as kvstore.sharding.key_token does (xxh64 of the
UTF-8 key, seed 0); a test holds the two together. A stale map only costs a forward.
"""

from __future__ import annotations

import bisect

import xxhash

from cli.client import ClusterStatus


def key_token(key: str) -> int:
    return int(xxhash.xxh64_intdigest(key.encode()))


class LeaderRoutes:
    def __init__(self, status: ClusterStatus) -> None:
        urls = {node["id"]: node["client_url"] for node in status["nodes"]}
        shards = sorted(status["shards"], key=lambda shard: shard["start_token"])
        self._starts = [shard["start_token"] for shard in shards]
        # None: no leader known when the map was read; any node will forward.
        self._leader_urls = [urls.get(shard["leader"]) for shard in shards]

    def leader_url(self, key: str) -> str | None:
        return self._leader_urls[bisect.bisect_right(self._starts, key_token(key)) - 1]

    def leader_urls(self) -> set[str]:
        return {url for url in self._leader_urls if url is not None}
