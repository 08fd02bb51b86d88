"""Prometheus metrics of the Raft side of a node, read at scrape time (no hot-path cost)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvstore.consistency_check import DIVERGENT, ConsistencyChecker
from kvstore.quarantine import ReplicaQuarantine
from raft.core.types import NodeId
from raft.runtime.host import FSYNC_BUCKETS_S, RaftHost
from raft.runtime.transport import PeerStats


class SecurityCollector(Collector):
    """Connections and calls this node refused: the evidence of a probe or a misconfigured peer."""

    def __init__(
        self,
        raft_refusals: Callable[[], Mapping[str, int]],
        http_connections_refused: Callable[[], Mapping[str, int]],
        internal_calls_refused: Callable[[], int],
    ) -> None:
        self._raft_refusals = raft_refusals
        self._http_connections_refused = http_connections_refused
        self._internal_calls_refused = internal_calls_refused

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "kv_peer_connections_refused",
            "Inbound Raft transport connections refused, by reason (tls_handshake: no "
            "certificate signed by the cluster CA, or not TLS at all; too_many: over the cap)",
            labels=["reason"],
        )
        for reason, count in self._raft_refusals().items():
            refused.add_metric([reason], count)
        yield refused
        http_refused = CounterMetricFamily(
            "kv_http_connections_refused",
            "HTTP connections refused, by reason (tls_handshake: a certificate the cluster CA "
            "did not sign, or plain HTTP to the HTTPS port; too_many: over "
            "limits.max_client_connections)",
            labels=["reason"],
        )
        for reason, count in self._http_connections_refused().items():
            http_refused.add_metric([reason], count)
        yield http_refused
        yield CounterMetricFamily(
            "kv_internal_requests_refused",
            "Requests to /v1/internal/* refused: no node certificate, or wrong cluster secret",
            value=self._internal_calls_refused(),
        )


class RaftCollector(Collector):
    def __init__(
        self, host: RaftHost, peer_stats: Callable[[], Mapping[NodeId, PeerStats]]
    ) -> None:
        self._host = host
        self._peer_stats = peer_stats

    def collect(self) -> Iterator[Metric]:
        host = self._host
        term = GaugeMetricFamily("kv_raft_term", "Current Raft term", labels=["shard"])
        commit = GaugeMetricFamily("kv_raft_commit_index", "Commit index", labels=["shard"])
        applied = GaugeMetricFamily("kv_raft_applied_index", "Applied index", labels=["shard"])
        leader = GaugeMetricFamily(
            "kv_raft_is_leader", "1 if this node leads the shard", labels=["shard"]
        )
        for group_id in host.group_ids():
            status = host.status(group_id)
            label = [str(group_id)]
            term.add_metric(label, status.term)
            commit.add_metric(label, status.commit_index)
            applied.add_metric(label, status.applied_index)
            leader.add_metric(label, 1 if status.role == "leader" else 0)
        yield from (term, commit, applied, leader)
        metrics = host.metrics
        yield CounterMetricFamily(
            "kv_raft_proposals", "Proposals appended to a leader's log", value=metrics.proposals
        )
        cumulative, buckets = 0, []
        bounds = (*FSYNC_BUCKETS_S, float("inf"))
        for bound, count in zip(bounds, metrics.fsync_bucket_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
        yield HistogramMetricFamily(
            "kv_raft_fsync_seconds",
            "Latency of the Raft loop's LMDB transactions (log + hard state + apply, one fsync)",
            buckets=buckets,
            sum_value=metrics.fsync_seconds_total,
        )
        yield CounterMetricFamily(
            "kv_raft_entries_persisted", "Log entries persisted", value=metrics.entries_persisted
        )
        sent = CounterMetricFamily("kv_peer_sent_bytes", "Bytes sent to a peer", labels=["peer"])
        received = CounterMetricFamily(
            "kv_peer_received_bytes", "Bytes received from a peer", labels=["peer"]
        )
        for peer, stats in self._peer_stats().items():
            sent.add_metric([str(peer)], stats.bytes_sent)
            received.add_metric([str(peer)], stats.bytes_received)
        yield sent
        yield received


class IntegrityCollector(Collector):
    """Checksum failures, quarantined replicas and consistency-check results of this node."""

    def __init__(self, quarantine: ReplicaQuarantine, checker: ConsistencyChecker) -> None:
        self._quarantine = quarantine
        self._checker = checker

    def collect(self) -> Iterator[Metric]:
        quarantine, checker = self._quarantine, self._checker
        failures = CounterMetricFamily(
            "kv_checksum_failures",
            "Stored records of a local replica that failed their checksum when read",
            labels=["shard"],
        )
        for shard, count in sorted(quarantine.checksum_failures.items()):
            failures.add_metric([str(shard)], count)
        corrupted = GaugeMetricFamily(
            "kv_replica_corrupted",
            "1 if this node's replica of the shard is quarantined for a checksum failure",
            labels=["shard"],
        )
        for shard in sorted(quarantine.corrupt_keys):
            corrupted.add_metric([str(shard)], 1)
        yield from (failures, corrupted)
        yield CounterMetricFamily(
            "kv_consistency_checks",
            "Shard consistency checks this node ran",
            value=checker.checks_run,
        )
        divergent = GaugeMetricFamily(
            "kv_consistency_check_divergent",
            "1 if this node's latest check of the shard found replicas that disagree or fail "
            "a checksum, else 0",
            labels=["shard"],
        )
        checked_at = GaugeMetricFamily(
            "kv_consistency_check_timestamp_seconds",
            "When this node last checked the shard (Unix time)",
            labels=["shard"],
        )
        for shard, report in sorted(checker.last.items()):
            divergent.add_metric([str(shard)], 1 if report.status == DIVERGENT else 0)
            checked_at.add_metric([str(shard)], report.checked_at_s)
        yield from (divergent, checked_at)
