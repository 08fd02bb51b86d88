"""Backup and restore against real node processes: `kvctl snapshot save` taken while a writer
runs, restored into a new cluster, holds every write acknowledged before the save started and
nothing that was never written or was written only after the save ended."""

from __future__ import annotations

import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.kv_cluster import KVCluster

pytestmark = pytest.mark.e2e

KEYS = [f"backup/{i}" for i in range(24)]


class Writer:
    """Writes increasing sequence numbers to KEYS; remembers when each write started and when
    it was acknowledged (monotonic seconds)."""

    def __init__(self, cluster: KVCluster) -> None:
        self.cluster = cluster
        self.started: dict[int, tuple[str, float]] = {}  # sequence -> (key, start)
        self.acknowledged: dict[int, float] = {}  # sequence -> ack time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sequence = 0
        while not self._stop.is_set() and sequence < 20_000:
            sequence += 1
            key = KEYS[sequence % len(KEYS)]
            node = self.cluster.node_ids[sequence % len(self.cluster.node_ids)]
            self.started[sequence] = (key, time.monotonic())
            try:
                response = self.cluster.put(node, key, str(sequence).encode())
            except OSError:
                continue
            if response.status == 200:
                self.acknowledged[sequence] = time.monotonic()

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_backup_taken_under_writes_restores_into_a_new_cluster_key_by_key(
    tmp_path: Path,
) -> None:
    backup = tmp_path / "backup.kvsnap"
    source = KVCluster(tmp_path / "source", nodes=3, shards=4)
    try:
        with Writer(source) as writer:
            deadline = time.monotonic() + 30
            while len(writer.acknowledged) < 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            save_started = time.monotonic()
            exit_code, output, errors = source.kvctl("snapshot", "save", str(backup))
            save_ended = time.monotonic()
            assert exit_code == 0, output + errors
            time.sleep(0.5)  # writes keep coming after the save: they must not be in it
        acknowledged_during = sum(
            save_started <= t <= save_ended for t in writer.acknowledged.values()
        )
    finally:
        source.stop()
    with tarfile.open(backup) as archive:
        assert "manifest.json" in archive.getnames()

    target = KVCluster(tmp_path / "target", nodes=3, shards=4)
    try:
        exit_code, output, errors = target.kvctl("snapshot", "restore", str(backup))
        assert exit_code == 0, output + errors
        assert "checksums match" in output
        for key in KEYS:
            # Every write acknowledged before the save started is there (or a later one of the
            # same key); any value found was really written, and started before the save ended.
            floor = max(
                (
                    s
                    for s, t in writer.acknowledged.items()
                    if t < save_started and writer.started[s][0] == key
                ),
                default=0,
            )
            response = target.get(1, key)
            if response.status == 404:
                assert floor == 0, f"{key}: acknowledged {floor} before the save, restored absent"
                continue
            assert response.status == 200, response.body
            restored = int(response.body)
            assert writer.started[restored][0] == key, f"{key}: restored {restored}, never written"
            assert restored >= floor, (
                f"{key}: acknowledged {floor} before the save, restored {restored}"
            )
            assert writer.started[restored][1] < save_ended, (
                f"{key}: {restored} began after the save"
            )
        exit_code, output, errors = target.kvctl("check")
        assert exit_code == 0, output + errors
        # A second restore into the now non-empty cluster is refused unless --replace.
        exit_code, output, errors = target.kvctl("snapshot", "restore", str(backup))
        assert exit_code == 3, output + errors
        exit_code, output, errors = target.kvctl("snapshot", "restore", str(backup), "--replace")
        assert exit_code == 0, output + errors
    finally:
        target.stop()
    assert len(writer.acknowledged) >= 200, "the writer barely ran"
    print(
        f"acknowledged writes: {len(writer.acknowledged)}, during the save: {acknowledged_during}"
    )


def test_a_damaged_backup_file_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    backup = tmp_path / "backup.kvsnap"
    cluster = KVCluster(tmp_path / "cluster", nodes=1, shards=2, replication=1)
    try:
        for key in KEYS:
            assert cluster.put(1, key, b"v").status == 200
        exit_code, output, errors = cluster.kvctl("snapshot", "save", str(backup))
        assert exit_code == 0, output + errors
        content = bytearray(backup.read_bytes())
        offset = content.index(b"backup/3")  # inside a shard file, not the manifest
        content[offset] ^= 0x01
        backup.write_bytes(bytes(content))
        exit_code, output, errors = cluster.kvctl("snapshot", "restore", str(backup), "--replace")
        assert exit_code == 2, output + errors
        assert "sha256" in errors
    finally:
        cluster.stop()
