"""KVNode: one node process's objects, wired: LMDB store, Raft host (the metadata group and
every local shard replica), peer transport, router, the HTTP server, and the elastic loop that
keeps local replicas, moves and (on the meta leader) placement in line with the shard map."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import prometheus_client
from aiohttp import web

from kvstore.admin_api import add_admin_routes
from kvstore.config import NodeConfig
from kvstore.http_api import create_app
from kvstore.internal_api import add_internal_routes
from kvstore.local_replicas import LocalReplicas
from kvstore.meta import MetaStateMachine
from kvstore.metrics import RaftCollector
from kvstore.moves import MoveExecutor
from kvstore.peer_client import PeerClient
from kvstore.reconciler import Reconciler
from kvstore.router import Router
from kvstore.sharding import META_GROUP_ID, ShardMap, initial_shard_map
from kvstore.state_machine import KVStateMachine
from raft.core.types import NodeId
from raft.runtime.host import HostConfig, RaftHost
from raft.runtime.transport import TcpTransport
from raft.storage.lmdb_log import LmdbLogStore

log = logging.getLogger(__name__)

LMDB_MAP_BYTES = 64 << 30  # address space only; the file grows with the data
JOIN_TIMEOUT_S = 60.0  # a joining node waits this long for a shard map that names it


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
        self.replicas = LocalReplicas(config.node_id, self.host, self.store, self.meta, self.shards)
        self.mover = MoveExecutor(self.host, self.router)
        self.reconciler = Reconciler(
            self.host, self.router, down_after_s=config.down_after_s, max_moves=config.max_moves
        )
        self._peer_addresses: dict[NodeId, tuple[str, int]] = {}
        self._elastic_task: asyncio.Task[None] | None = None

    async def _load_map(self) -> ShardMap:
        config = self.config
        if not config.join:
            self.meta.initialize(
                initial_shard_map(list(config.initial_nodes), config.shards, config.replication)
            )
        elif self.meta.shard_map is None:
            await self._fetch_map_to_join()
        shard_map = self.meta.shard_map
        assert shard_map is not None
        return shard_map

    async def _fetch_map_to_join(self) -> None:
        """A new node learns the shard map from the nodes its config lists; it may start
        once the map names it (`kvctl node add` registers it first)."""
        config = self.config
        peers = PeerClient(config.request_timeout_s)
        deadline = asyncio.get_running_loop().time() + JOIN_TIMEOUT_S
        try:
            while asyncio.get_running_loop().time() < deadline:
                for seed in config.initial_nodes:
                    if seed.id == config.node_id:
                        continue
                    url = config.client_url_overrides.get(seed.id, seed.client_url)
                    try:
                        shard_map = ShardMap.decode(await peers.get_bytes(url, "shard-map", 2.0))
                    except Exception:  # this seed is down or not ready: try the next
                        continue
                    if shard_map.has_node(config.node_id):
                        self.meta.adopt(shard_map)
                        return
                await asyncio.sleep(0.5)
        finally:
            await peers.close()
        raise RuntimeError(
            f"node {config.node_id} found no shard map naming it within {JOIN_TIMEOUT_S:g}s: "
            "register it first (POST /v1/admin/nodes, or `kvctl node add`)"
        )

    def _update_peers(self, shard_map: ShardMap) -> None:
        transport = self.transport
        assert transport is not None
        config = self.config
        wanted = {
            n.id: config.peer_address_overrides.get(n.id, n.peer_address)
            for n in shard_map.nodes
            if n.id != config.node_id
        }
        for node_id, address in wanted.items():
            if self._peer_addresses.get(node_id) != address:
                transport.set_peer(node_id, address)
        for node_id in set(self._peer_addresses) - set(wanted):
            transport.remove_peer(node_id)
        self._peer_addresses = wanted

    async def _elastic_round(self) -> None:
        host = self.host
        if not (host.has_group(META_GROUP_ID) and host.is_leader(META_GROUP_ID)):
            # Not a meta member, or one that may lag or have been removed unawares: poll.
            await self.router.refresh_map()
        shard_map = self.meta.shard_map
        assert shard_map is not None
        self._update_peers(shard_map)
        self.replicas.sync(shard_map)
        await self.mover.run_once(shard_map)
        await self.reconciler.run_once(shard_map)

    async def _run_elastic(self) -> None:
        while True:
            await asyncio.sleep(self.config.reconcile_interval_s)
            try:
                await self._elastic_round()
            except asyncio.CancelledError:
                raise
            except AssertionError:
                log.critical("the elastic loop hit a broken invariant", exc_info=True)
                raise
            except Exception:  # a peer or the meta group unavailable: the next round retries
                log.warning("elastic round failed; retrying", exc_info=True)

    async def wait_failed(self) -> BaseException:
        """The error that stopped the Raft loop or the elastic loop; the process exits then."""
        assert self._elastic_task is not None, "start() first"
        raft_failed = asyncio.create_task(self.host.wait_failed())
        elastic = self._elastic_task
        try:
            done, _ = await asyncio.wait(
                {raft_failed, elastic}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            raft_failed.cancel()  # no-op once done
        if raft_failed in done:
            return raft_failed.result()
        error = elastic.exception() if not elastic.cancelled() else None
        return error if error is not None else RuntimeError("the elastic loop ended")

    async def start(self) -> None:
        shard_map = await self._load_map()
        config = self.config
        self.transport = TcpTransport(config.node_id, config.peer_listen, {}, self.host.receive)
        self._update_peers(shard_map)
        self.replicas.sync(shard_map)
        await self.transport.start()
        await self.host.start(self.transport)
        app = create_app(self.router, registry=self.registry)
        add_internal_routes(app, self.router)
        add_admin_routes(app, self.router)
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
        self._elastic_task = asyncio.create_task(self._run_elastic(), name="elastic")

    async def stop(self) -> None:
        if self._elastic_task is not None:
            self._elastic_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._elastic_task
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
    failed = asyncio.create_task(node.wait_failed())
    done, _ = await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stopped, failed):
        task.cancel()
    exit_code = 0
    if failed in done:
        log.critical("node %d stops: %s", config.node_id, failed.result())
        exit_code = 1
    await node.stop()
    return exit_code
