"""ConsistencyChecker: compare a hash of every replica's data at the same applied index.

How every replica hashes the same state: a HashCheck command goes through the shard's Raft log
like any write, and each replica hashes its data when it applies that entry (inside the apply
transaction) and stores the result under the entry's index. The checker then asks every replica
for its result at that index and compares. A replica whose hashing met a checksum failure
reports the key, and is quarantined (kvstore.quarantine). The node runs a check of the shards it
leads every `check_interval_s`; `kvctl check` (POST /v1/admin/check) checks every shard now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from kvstore.commands import HashCheck, ReplicaHash, encode_command
from kvstore.errors import KVError
from kvstore.router import Router
from kvstore.service import RequestContext
from kvstore.state_machine import CorruptValueError, KVStateMachine
from raft.core.types import NodeId, node_of

log = logging.getLogger(__name__)

CONSISTENT, DIVERGENT, INCOMPLETE, UNAVAILABLE = (
    "consistent",
    "divergent",
    "incomplete",
    "unavailable",
)
_POLL_INTERVAL_S = 0.05


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    node: int
    status: str  # ok | corrupt | pending (not applied in time) | missing | unreachable
    digest: str | None = None  # 16 hex digits
    key_count: int | None = None
    corrupt_key: str | None = None


@dataclass(frozen=True, slots=True)
class ShardReport:
    shard: int
    status: str  # consistent | divergent | incomplete | unavailable
    index: int | None  # the HashCheck entry's index: where every replica hashed
    replicas: tuple[ReplicaReport, ...]
    message: str
    checked_at_s: float  # Unix time

    def to_json(self) -> dict[str, Any]:
        report = asdict(self)
        report["replicas"] = [asdict(replica) for replica in self.replicas]
        return report


def replica_report(node: NodeId, result: ReplicaHash) -> ReplicaReport:
    if result.corrupt_key is not None:
        return ReplicaReport(node, "corrupt", corrupt_key=result.corrupt_key)
    return ReplicaReport(node, "ok", f"{result.digest:016x}", result.key_count)


def _verdict(shard_id: int, replicas: tuple[ReplicaReport, ...]) -> tuple[str, str]:
    corrupt = [r.node for r in replicas if r.status == "corrupt"]
    digests = {r.digest for r in replicas if r.status == "ok"}
    if corrupt or len(digests) > 1:
        parts = [f"nodes {corrupt} failed a checksum"] if corrupt else []
        if len(digests) > 1:
            parts.append(f"{len(digests)} different data hashes")
        return DIVERGENT, f"shard {shard_id} DIVERGES: " + "; ".join(parts)
    unknown = [r.node for r in replicas if r.status != "ok"]
    if unknown:
        return INCOMPLETE, f"shard {shard_id}: replicas agree, but nodes {unknown} did not answer"
    return CONSISTENT, f"shard {shard_id}: all {len(replicas)} replicas hold the same data"


class ConsistencyChecker:
    def __init__(
        self, router: Router, shards: dict[int, KVStateMachine], *, wait_s: float = 5.0
    ) -> None:
        self._router = router
        self._shards = shards  # this node's replicas
        self._wait_s = wait_s
        self.last: dict[int, ShardReport] = {}  # per shard: the latest check this node ran
        self.checks_run = 0

    async def check_all(self) -> list[ShardReport]:
        shard_ids = [shard.id for shard in self._router.shard_map.shards]
        return list(await asyncio.gather(*(self.check_shard(s) for s in shard_ids)))

    async def check_shard(self, shard_id: int) -> ShardReport:
        shard = self._router.shard_map.shard(shard_id)
        try:
            outcome = await self._router.propose(
                shard_id, encode_command(HashCheck()), RequestContext()
            )
        except KVError as error:
            report = ShardReport(
                shard_id, UNAVAILABLE, None, (), f"shard {shard_id}: {error.message}", time.time()
            )
        else:
            if not isinstance(outcome, ReplicaHash):
                raise AssertionError(f"a HashCheck applied as {outcome!r}")
            replicas = tuple(
                await asyncio.gather(
                    *(
                        self._replica(node_of(replica), shard_id, outcome.index)
                        for replica in shard.replicas
                    )
                )
            )
            status, message = _verdict(shard_id, replicas)
            report = ShardReport(shard_id, status, outcome.index, replicas, message, time.time())
        if report.status == DIVERGENT:
            log.error("consistency check: %s: %s", report.message, report.to_json())
        self.last[shard_id] = report
        self.checks_run += 1
        return report

    async def _replica(self, node: NodeId, shard_id: int, index: int) -> ReplicaReport:
        if node == self._router.node_id:
            return await self.local_report(shard_id, index)
        try:
            answer = await self._router.ask_peer(
                node, f"check?shard={shard_id}&index={index}", timeout_s=self._wait_s + 2
            )
            return ReplicaReport(**answer)
        except Exception as error:  # an unreachable or confused peer is reported, not fatal
            log.info("consistency check: node %d did not answer: %s", node, error)
            return ReplicaReport(node, "unreachable")

    async def local_report(self, shard_id: int, index: int) -> ReplicaReport:
        """This node's result for the HashCheck at `index`, waiting up to wait_s for it to be
        applied here. A corrupt result quarantines the replica."""
        node = self._router.node_id
        machine = self._shards.get(shard_id)
        if machine is None:
            return ReplicaReport(node, "missing")
        deadline = time.monotonic() + self._wait_s
        try:
            while True:
                # The applied index first: a result committed after our look for it (a proposer
                # hears its outcome before the commit) must not pass for one never stored.
                applied = machine.applied_index()
                result = machine.check_result(index)
                if result is not None:
                    if result.corrupt_key is not None:
                        self._router.quarantine.report(
                            shard_id, result.corrupt_key, "found by a consistency check"
                        )
                    return replica_report(node, result)
                if applied >= index:
                    return ReplicaReport(node, "missing")  # applied past it by a snapshot
                if time.monotonic() >= deadline:
                    return ReplicaReport(node, "pending")
                await asyncio.sleep(_POLL_INTERVAL_S)
        except CorruptValueError as error:  # the shard's metadata or the stored result
            self._router.quarantine.report(shard_id, error.key, str(error))
            return ReplicaReport(node, "corrupt", corrupt_key=error.key)

    async def run_periodically(self, interval_s: float) -> None:
        """Check the shards this node leads, every interval_s, forever."""
        while True:
            await asyncio.sleep(interval_s)
            host = self._router.host
            for shard_id in list(self._shards):
                if host.has_group(shard_id) and host.is_leader(shard_id):
                    try:
                        await self.check_shard(shard_id)
                    except Exception:
                        log.exception("periodic consistency check of shard %d failed", shard_id)
