"""KVNode: one node process's objects, wired: LMDB store, Raft host (the metadata group and
every local shard replica), peer transport, router, the HTTP server, and the elastic loop that
keeps local replicas, moves and (on the meta leader) placement in line with the shard map."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl

import prometheus_client
from aiohttp import web

from kvstore.admin import NodeAdmin
from kvstore.admin_api import add_admin_routes
from kvstore.auth import Grants, User
from kvstore.balancer import founding_shard_map
from kvstore.config import ConfigError, NodeConfig
from kvstore.consistency_check import ConsistencyChecker
from kvstore.encryption import KeyFileError, ValueCipher, load_key_file
from kvstore.http_api import AuthSettings, create_app
from kvstore.internal_api import PeerGuard, add_internal_routes
from kvstore.listener import CappedTCPSite
from kvstore.local_replicas import LocalReplicas
from kvstore.meta import MetaStateMachine
from kvstore.metrics import IntegrityCollector, RaftCollector, SecurityCollector
from kvstore.moves import MoveExecutor
from kvstore.peer_client import PeerClient
from kvstore.query import PluginLoadError, PluginRegistry
from kvstore.reconciler import Reconciler
from kvstore.router import Router
from kvstore.sharding import META_GROUP_ID, ShardMap
from kvstore.state_machine import KVStateMachine
from kvstore.tls import client_context, http_server_context, peer_server_context
from raft.core.types import NodeId, node_of
from raft.runtime.host import HostConfig, RaftHost
from raft.runtime.transport import TcpTransport, count_handshake_failures
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
        self._tls_client = client_context(config.tls) if config.tls else None
        cluster_secret = config.auth.cluster_secret() if config.auth.enabled else None
        self._cluster_secret = cluster_secret
        self.peer_guard = PeerGuard(tls=config.tls is not None, cluster_secret=cluster_secret)
        self.router = Router(
            config.node_id,
            self.host,
            self.meta,
            self.shards,
            config.limits,
            config.request_timeout_s,
            client_url_overrides=config.client_url_overrides,
            unsafe_stale_reads=config.unsafe_stale_reads,
            query_settings=config.query,
            plugins=PluginRegistry.from_entry_points(),
            peer_client=PeerClient(
                config.request_timeout_s, tls=self._tls_client, cluster_secret=cluster_secret
            ),
        )
        if config.unsafe_stale_reads:
            log.warning("UNSAFE TEST FAULT ON: linearizable reads skip ReadIndex on any replica")
        self.registry = prometheus_client.CollectorRegistry()
        self.transport: TcpTransport | None = None
        self.registry.register(
            RaftCollector(self.host, lambda: self.transport.stats if self.transport else {})
        )
        self.checker = ConsistencyChecker(self.router, self.shards)
        self.registry.register(IntegrityCollector(self.router.quarantine, self.checker))
        self._runner: web.AppRunner | None = None
        self._periodic_check: asyncio.Task[None] | None = None
        self._site: CappedTCPSite | None = None
        self._http_tls_refusals = 0
        self.registry.register(
            SecurityCollector(
                lambda: self.transport.refused_connections if self.transport else {},
                lambda: {
                    "tls_handshake": self._http_tls_refusals,
                    "too_many": self._site.refused if self._site else 0,
                },
                lambda: self.peer_guard.refused,
            )
        )
        self.replicas = LocalReplicas(
            config.node_id,
            self.host,
            self.store,
            self.meta,
            self.shards,
            cipher=self._value_cipher(),
        )
        self.mover = MoveExecutor(self.host, self.router, shards=self.shards)
        self.reconciler = Reconciler(
            self.host,
            self.router,
            down_after_s=config.down_after_s,
            max_moves=config.max_moves,
            split_keys=config.split_keys,
        )
        self._peer_addresses: dict[NodeId, tuple[str, int]] = {}
        self._elastic_task: asyncio.Task[None] | None = None

    async def _load_map(self) -> ShardMap:
        config = self.config
        if not config.join:
            self.meta.initialize(
                founding_shard_map(list(config.initial_nodes), config.shards, config.replication),
                self._bootstrap_users(),
            )
        elif self.meta.shard_map is None:
            await self._fetch_map_to_join()
        shard_map = self.meta.shard_map
        assert shard_map is not None
        self._refuse_unprotected_start(shard_map)
        return shard_map

    async def _fetch_map_to_join(self) -> None:
        """A new node learns the shard map from the nodes its config lists; it may start
        once the map names it (`kvctl node add` registers it first)."""
        config = self.config
        peers = PeerClient(
            config.request_timeout_s, tls=self._tls_client, cluster_secret=self._cluster_secret
        )
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
        raise ConfigError(
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

    def _value_cipher(self) -> ValueCipher | None:
        path = self.config.encryption_key_file
        if path is None:
            return None
        try:
            cipher = load_key_file(path)
        except KeyFileError as error:
            raise ConfigError(str(error)) from error
        log.info("values are encrypted at rest with key %r from %s", cipher.active_key_id, path)
        return cipher

    def _bootstrap_users(self) -> list[User]:
        digest = self.config.auth.bootstrap_admin_token_sha256
        if not self.config.auth.enabled or digest is None:
            return []
        return [User("admin", Grants(admin=True), bytes.fromhex(digest))]

    def _refuse_unprotected_start(self, shard_map: ShardMap) -> None:
        if not self.config.auth.enabled:
            return
        if self.config.node_id not in {node_of(replica) for replica in shard_map.meta_voters}:
            # Only metadata members hold the user table; elsewhere no token could be checked.
            raise ConfigError(
                f"[auth] is enabled but node {self.config.node_id} is not a member of the "
                f"metadata group (nodes {sorted(node_of(r) for r in shard_map.meta_voters)}); "
                "with auth on every node must be one (clusters of at most 5 nodes for now, and "
                "no `kvctl node add`)"
            )
        if not self.meta.has_admin():
            raise ConfigError(
                "[auth] is enabled but the user table has no admin: set "
                "auth.bootstrap_admin_token_sha256 before the cluster's first start "
                "(`kvctl cluster up --auth` does) so someone can manage users"
            )

    async def start(self) -> None:
        shard_map = await self._load_map()
        config = self.config
        self.transport = TcpTransport(
            config.node_id,
            config.peer_listen,
            {},
            self.host.receive,
            ssl_server=peer_server_context(config.tls) if config.tls else None,
            ssl_client=self._tls_client,
        )
        self._update_peers(shard_map)
        self.replicas.sync(shard_map)
        await self.transport.start()
        await self.host.start(self.transport)
        auth = AuthSettings(enabled=config.auth.enabled, directory=self.meta, admin=self.router)
        app = create_app(self.router, registry=self.registry, auth=auth)
        add_internal_routes(app, self.router, self.checker)
        add_admin_routes(app, NodeAdmin(self.router, self.checker), self.router)
        app.middlewares.append(self.peer_guard.middleware)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = config.client_listen
        self._site = CappedTCPSite(
            self._runner,
            host,
            port,
            max_connections=config.limits.max_client_connections,
            ssl_context=self._http_tls_context(),
            reuse_address=True,
        )
        await self._site.start()
        log.info(
            "node %d serving %s on %s:%d, Raft on %s:%d, %d shard replicas; auth %s",
            config.node_id,
            "HTTPS (mutual TLS for peers)" if config.tls else "HTTP",
            host,
            port,
            *config.peer_listen,
            len(self.shards),
            "on" if config.auth.enabled else "off",
        )
        if config.check_interval_s > 0:
            self._periodic_check = asyncio.create_task(
                self.checker.run_periodically(config.check_interval_s), name="consistency-check"
            )
        self._elastic_task = asyncio.create_task(self._run_elastic(), name="elastic")

    def _http_tls_context(self) -> ssl.SSLContext | None:
        if self.config.tls is None:
            return None
        context = http_server_context(self.config.tls)
        count_handshake_failures(context, self._note_http_tls_refusal)
        return context

    def _note_http_tls_refusal(self, error: ssl.SSLError) -> None:
        self._http_tls_refusals += 1
        log.warning("refused an HTTPS connection at the TLS handshake: %s", error.reason or error)

    async def stop(self) -> None:
        if self._elastic_task is not None:
            self._elastic_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._elastic_task
        if self._periodic_check is not None:
            self._periodic_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._periodic_check
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
    try:
        node = KVNode(config)
    except (PluginLoadError, ConfigError) as error:
        log.critical("node %d cannot start: %s", config.node_id, error)
        return 2
    try:
        await node.start()
    except ConfigError as error:
        log.critical("node %d refuses to start: %s", config.node_id, error)
        await node.stop()
        return 2
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
