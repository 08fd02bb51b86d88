"""KVNode: one node process's objects, wired: LMDB store, Raft host (the metadata group and
every local shard replica), peer transport, router and the HTTP server."""

from __future__ import annotations

import asyncio
import logging
import signal

import prometheus_client
from aiohttp import web

from kvstore.config import NodeConfig
from kvstore.http_api import create_app
from kvstore.internal_api import add_internal_routes
from kvstore.leader_balance import balance_leaders_forever
from kvstore.meta import MetaStateMachine
from kvstore.metrics import RaftCollector
from kvstore.router import Router
from kvstore.sharding import META_GROUP_ID, ShardMap, initial_shard_map
from kvstore.state_machine import KVStateMachine
from raft.core.messages import ConfState
from raft.runtime.host import HostConfig, RaftHost
from raft.runtime.transport import TcpTransport
from raft.storage.lmdb_log import LmdbLogStore

log = logging.getLogger(__name__)

LMDB_MAP_BYTES = 64 << 30  # address space only; the file grows with the data


class KVNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = LmdbLogStore(
            config.data_dir / "lmdb", map_size_bytes=LMDB_MAP_BYTES, sync=config.fsync
        )
        self.host = RaftHost(
            HostConfig(
                node_id=config.node_id,
                tick_interval_s=config.tick_ms / 1000,
                election_timeout_ticks=config.election_timeout_ticks,
            ),
            self.store,
        )
        self.meta = MetaStateMachine(self.store.env)
        self.shards: dict[int, KVStateMachine] = {}
        self.router = Router(
            config.node_id,
            self.host,
            self.meta,
            self.shards,
            config.limits,
            config.request_timeout_s,
            client_url_overrides=config.client_url_overrides,
            unsafe_stale_reads=config.unsafe_stale_reads,
        )
        if config.unsafe_stale_reads:
            log.warning("UNSAFE TEST FAULT ON: linearizable reads skip ReadIndex on any replica")
        self.registry = prometheus_client.CollectorRegistry()
        self.transport: TcpTransport | None = None
        self.registry.register(
            RaftCollector(self.host, lambda: self.transport.stats if self.transport else {})
        )
        self._runner: web.AppRunner | None = None
        self._balancer: asyncio.Task[None] | None = None

    def _start_groups(self) -> ShardMap:
        config = self.config
        self.meta.initialize(
            initial_shard_map(list(config.initial_nodes), config.shards, config.replication)
        )
        shard_map = self.meta.shard_map
        assert shard_map is not None
        if config.node_id in shard_map.meta_voters:
            self.host.add_group(
                META_GROUP_ID,
                self.meta,
                bootstrap=ConfState(voters=frozenset(shard_map.meta_voters)),
            )
        for shard in shard_map.shards_on(config.node_id):
            machine = KVStateMachine(self.store.env, shard.id)
            self.shards[shard.id] = machine
            self.host.add_group(
                shard.id, machine, bootstrap=ConfState(voters=frozenset(shard.replicas))
            )
        return shard_map

    async def start(self) -> None:
        shard_map = self._start_groups()
        config = self.config
        peers = {
            n.id: config.peer_address_overrides.get(n.id, n.peer_address)
            for n in shard_map.nodes
            if n.id != config.node_id
        }
        self.transport = TcpTransport(config.node_id, config.peer_listen, peers, self.host.receive)
        await self.transport.start()
        await self.host.start(self.transport)
        self._balancer = asyncio.create_task(
            balance_leaders_forever(config.node_id, self.host, self.meta), name="leader-balance"
        )
        app = create_app(self.router, registry=self.registry)
        add_internal_routes(app, self.router)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = config.client_listen
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        log.info(
            "node %d serving HTTP on %s:%d, Raft on %s:%d, %d shard replicas",
            config.node_id,
            host,
            port,
            *config.peer_listen,
            len(self.shards),
        )

    async def stop(self) -> None:
        if self._balancer is not None:
            self._balancer.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.host.stop()
        if self.transport is not None:
            await self.transport.stop()
        await self.router.close()
        self.store.close()


async def serve(config: NodeConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until the Raft loop fails (exit 1): a node whose
    storage failed stops rather than answering every request with a timeout."""
    node = KVNode(config)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"node {config.node_id} ready", flush=True)
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(node.host.wait_failed())
    done, _ = await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stopped, failed):
        task.cancel()
    exit_code = 0
    if failed in done:
        log.critical("node %d stops: %s", config.node_id, failed.result())
        exit_code = 1
    await node.stop()
    return exit_code
