"""Whole harness runs against real clusters: a short faulty run of the real store must be
valid, and the same harness must call the deliberately broken store invalid."""

from __future__ import annotations

from pathlib import Path

import pytest

from jepsen_like.runner import RunConfig, fresh_cluster_dir, run_test

pytestmark = pytest.mark.e2e


async def test_a_short_run_with_kills_and_partitions_is_valid(tmp_path: Path):
    result = await run_test(
        RunConfig(
            workload="register",
            nemeses=frozenset({"kill", "partition"}),
            time_s=30,
            nodes=3,
            shards=2,
            concurrency=6,
            seed=7,
            out=tmp_path / "run",
        )
    )
    summary = result.summary
    assert result.verdict == "valid", summary["checkers"]
    assert summary["ops"].get("ok", 0) > 100
    kinds = [fault["kind"] for fault in summary["faults"]]
    assert len(kinds) >= 2, summary["faults"]  # the seeded plan picks among the kinds asked
    assert set(kinds) <= {"kill", "partition"}
    for name in ("history.jsonl", "summary.json", "latency.png", "throughput.png", "index.html"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name


async def test_the_harness_catches_stale_reads_served_without_read_index(tmp_path: Path):
    result = await run_test(
        RunConfig(
            workload="register",
            nemeses=frozenset({"partition"}),
            time_s=25,
            nodes=3,
            shards=2,
            concurrency=8,
            seed=11,
            out=tmp_path / "broken",
            broken="stale-reads",
        )
    )
    assert result.verdict == "invalid", result.summary["checkers"]
    witness = result.summary["checkers"]["linearizable"]["details"]
    assert witness  # the report names the key and the operation that could not be linearized


async def test_a_bank_run_with_kills_and_partitions_sees_every_total(tmp_path: Path):
    """Transfers (single-shard transactions) and reads by map-reduce queries under faults."""
    result = await run_test(
        RunConfig(
            workload="bank",
            nemeses=frozenset({"kill", "partition"}),
            time_s=20,
            nodes=3,
            shards=3,
            concurrency=6,
            seed=5,
            out=tmp_path / "bank",
        )
    )
    bank = result.summary["checkers"]["bank"]
    assert result.verdict == "valid", bank
    assert bank["details"]["reads"] > 20
    assert bank["details"]["transfers_ok"] > 20


def test_a_run_into_a_used_directory_starts_its_nodes_on_empty_data(tmp_path: Path):
    # A second `make jepsen` once restarted the first run's nodes on their data: reads of old
    # values that this run never wrote made a correct cluster look non-linearizable.
    stale = tmp_path / "cluster" / "node1" / "lmdb"
    stale.mkdir(parents=True)
    (stale / "data.mdb").write_bytes(b"a previous run's registers")
    cluster_dir = fresh_cluster_dir(tmp_path)
    assert cluster_dir == tmp_path / "cluster"
    assert not cluster_dir.exists()  # TestCluster creates it afresh
