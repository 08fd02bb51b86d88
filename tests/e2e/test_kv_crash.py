"""Nothing acknowledged is lost: a writer records every acknowledged write while every node is
killed with SIGKILL at random moments and restarted; afterwards each key reads back its last
acknowledged value (or a later write whose outcome the writer could not learn)."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.kv_cluster import KVCluster, wait_for

pytestmark = pytest.mark.e2e

KEYS = [f"crash/{i}" for i in range(12)]


def run_crash_loop(tmp_path: Path, seed: int, cycles: int) -> dict[str, int]:
    rng = random.Random(seed)
    cluster = KVCluster(tmp_path / "cluster", shards=4)
    acknowledged: dict[str, int] = {}  # key -> highest sequence number acknowledged
    attempted: dict[str, set[int]] = {key: set() for key in KEYS}
    stop = threading.Event()
    counts = {"acknowledged": 0, "failed": 0}

    def writer() -> None:
        sequence = 0
        writer_rng = random.Random(seed + 1)
        while not stop.is_set():
            sequence += 1
            key = writer_rng.choice(KEYS)
            attempted[key].add(sequence)
            node = writer_rng.choice(cluster.node_ids)
            try:
                response = cluster.put(node, key, str(sequence).encode(), timeout_s=5)
            except OSError:
                counts["failed"] += 1
                time.sleep(0.02)
                continue
            if response.status == 200:
                acknowledged[key] = sequence  # sequences only grow, per key too
                counts["acknowledged"] += 1
            else:
                counts["failed"] += 1
                time.sleep(0.02)

    thread = threading.Thread(target=writer, daemon=True)
    try:
        thread.start()
        for _ in range(cycles):
            time.sleep(rng.uniform(1.0, 2.5))  # let writes flow
            victims = list(cluster.node_ids)
            rng.shuffle(victims)
            for node_id in victims:  # every node, each at its own random moment
                time.sleep(rng.uniform(0.0, 0.4))
                cluster.kill(node_id)
            time.sleep(rng.uniform(0.1, 0.5))
            cluster.restart_dead()
            cluster.wait_ready()
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=30)
    try:
        cluster.wait_ready()
        for key, sequence in acknowledged.items():

            def read(key: str = key) -> bytes | None:
                response = cluster.get(rng.choice(cluster.node_ids), key)
                return response.body if response.status == 200 else None

            value = int(wait_for(f"a linearizable read of {key}", read, deadline_s=30))
            assert value >= sequence, f"{key}: acknowledged {sequence}, read back {value}"
            assert value in attempted[key], f"{key}: read {value}, which was never written"
    finally:
        cluster.stop()
    assert counts["acknowledged"] > 50, counts
    return counts


def test_every_acknowledged_write_survives_repeated_kill_9_of_all_nodes(tmp_path: Path):
    run_crash_loop(tmp_path, seed=20261124, cycles=3)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_acknowledged_writes_survive_many_crash_cycles(tmp_path: Path, seed: int):
    run_crash_loop(tmp_path, seed=seed, cycles=8)
