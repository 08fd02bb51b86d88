"""kvctl snapshot restore refuses a file that is not an intact backup before sending anything
(the endpoint below accepts no connection: any request would fail differently)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from cli.errors import EXIT_USAGE

NOWHERE = "http://127.0.0.1:9"  # discard port: nothing listens


def make_backup(path: Path, manifest: dict, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in {**files, "manifest.json": json.dumps(manifest).encode()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("manifest", "files", "message"),
    [
        ({"format": "other", "version": 1, "shards": []}, {}, "not a kvctl backup"),
        (
            {
                "format": "pyraftkv-backup",
                "version": 1,
                "shards": [{"id": 1, "file": "shard-0001.snap", "bytes": 3, "sha256": "0" * 64}],
            },
            {"shard-0001.snap": b"abc"},
            "sha256",
        ),
        (
            {"format": "pyraftkv-backup", "version": 1, "shards": [{"id": 1, "file": "gone"}]},
            {},
            "damaged",
        ),
    ],
)
def test_a_damaged_backup_is_refused_before_any_request(run, tmp_path, manifest, files, message):
    backup = tmp_path / "b.kvsnap"
    make_backup(backup, manifest, files)
    result = run("snapshot", "restore", str(backup), "--endpoints", NOWHERE)
    assert result.exit_code == EXIT_USAGE
    assert message in result.stderr


def test_a_file_that_is_not_a_tar_is_refused(run, tmp_path):
    backup = tmp_path / "b.kvsnap"
    backup.write_bytes(b"definitely not a tar archive" * 40)
    result = run("snapshot", "restore", str(backup), "--endpoints", NOWHERE)
    assert result.exit_code == EXIT_USAGE
    assert "not a readable backup file" in result.stderr
