"""KVNode: one node process's objects, wired: LMDB store, Raft host (the metadata group and
every local shard replica), peer transport, router and the HTTP server."""

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
from kvstore.config import ConfigError, NodeConfig
from kvstore.consistency_check import ConsistencyChecker
from kvstore.encryption import KeyFileError, ValueCipher, load_key_file
from kvstore.http_api import AuthSettings, create_app
from kvstore.internal_api import PeerGuard, add_internal_routes
from kvstore.leader_balance import LeaderBalancer
from kvstore.listener import CappedTCPSite
from kvstore.meta import MetaStateMachine
from kvstore.metrics import IntegrityCollector, RaftCollector, SecurityCollector
from kvstore.peer_client import PeerClient
from kvstore.query import PluginLoadError, PluginRegistry
from kvstore.router import Router
from kvstore.sharding import META_GROUP_ID, ShardMap, initial_shard_map
from kvstore.state_machine import KVStateMachine
from kvstore.tls import client_context, http_server_context, peer_server_context
from raft.core.messages import ConfState
from raft.runtime.host import HostConfig, RaftHost
from raft.runtime.transport import TcpTransport, count_handshake_failures
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
        self._tls_client = client_context(config.tls) if config.tls else None
        cluster_secret = config.auth.cluster_secret() if config.auth.enabled else None
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
        self._balancer: asyncio.Task[None] | None = None

    def _start_groups(self) -> ShardMap:
        config = self.config
        self.meta.initialize(
            initial_shard_map(list(config.initial_nodes), config.shards, config.replication),
            self._bootstrap_users(),
        )
        shard_map = self.meta.shard_map
        assert shard_map is not None
        self._refuse_unprotected_start(shard_map)
        if config.node_id in shard_map.meta_voters:
            self.host.add_group(
                META_GROUP_ID,
                self.meta,
                bootstrap=ConfState(voters=frozenset(shard_map.meta_voters)),
            )
        cipher = self._value_cipher()
        for shard in shard_map.shards_on(config.node_id):
            machine = KVStateMachine(self.store.env, shard.id, cipher=cipher)
            self.shards[shard.id] = machine
            self.host.add_group(
                shard.id, machine, bootstrap=ConfState(voters=frozenset(shard.replicas))
            )
        return shard_map

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
        if self.config.node_id not in shard_map.meta_voters:
            # Only metadata members hold the user table; elsewhere no token could be checked.
            raise ConfigError(
                f"[auth] is enabled but node {self.config.node_id} is not a member of the "
                f"metadata group {list(shard_map.meta_voters)}; with auth on every node must "
                "be one (clusters of at most 5 nodes for now)"
            )
        if not self.meta.has_admin():
            raise ConfigError(
                "[auth] is enabled but the user table has no admin: set "
                "auth.bootstrap_admin_token_sha256 before the cluster's first start "
                "(`kvctl cluster up --auth` does) so someone can manage users"
            )

    async def start(self) -> None:
        shard_map = self._start_groups()
        config = self.config
        peers = {
            n.id: config.peer_address_overrides.get(n.id, n.peer_address)
            for n in shard_map.nodes
            if n.id != config.node_id
        }
        self.transport = TcpTransport(
            config.node_id,
            config.peer_listen,
            peers,
            self.host.receive,
            ssl_server=peer_server_context(config.tls) if config.tls else None,
            ssl_client=self._tls_client,
        )
        await self.transport.start()
        await self.host.start(self.transport)
        self._balancer = asyncio.create_task(
            LeaderBalancer(config.node_id, self.host, self.meta).run_forever(),
            name="leader-balance",
        )
        auth = AuthSettings(enabled=config.auth.enabled, directory=self.meta, admin=self.router)
        app = create_app(self.router, registry=self.registry, auth=auth)
        add_internal_routes(app, self.router, self.checker)
        add_admin_routes(app, NodeAdmin(self.router, self.checker))
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
        if self._periodic_check is not None:
            self._periodic_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._periodic_check
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
    try:
        node = KVNode(config)
    except PluginLoadError as error:
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
