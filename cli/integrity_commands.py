"""kvctl's integrity commands: `check` (do every shard's replicas hold the same data?) and
`snapshot save|restore` (a backup file of every shard, and loading one into a new cluster).

A backup file is an uncompressed tar: manifest.json, then one shard-NNNN.snap per shard. The
manifest records each shard's token range, applied index, key count, content digest and the
file's sha256, so a restore can refuse a damaged file before sending anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from cli.client import ClusterStatus, KVClient
from cli.errors import ClusterUnavailable, DataDiverged, InvalidUsage, KvctlError
from cli.output import print_json, stdout_console
from cli.settings import client_options, settings_of

BACKUP_FORMAT = "pyraftkv-backup"
BACKUP_VERSION = 1
MANIFEST_NAME = "manifest.json"

_PATH = click.Path(dir_okay=False, path_type=Path)


# -- check -----------------------------------------------------------------------------------


def _replica_cell(replica: dict[str, Any]) -> Text:
    status = replica.get("status")
    node = replica.get("node")
    if status == "ok":
        return Text(f"n{node}: {str(replica.get('digest'))[:8]} ({replica.get('key_count')} keys)")
    if status == "corrupt":
        return Text(f"n{node}: CORRUPT at key {replica.get('corrupt_key')!r}", style="bold red")
    return Text(f"n{node}: {status}", style="yellow")


def check_table(report: dict[str, Any]) -> Table:
    table = Table(title="replica consistency (hashes at the same applied index)")
    for column in ("shard", "status", "index", "replicas"):
        table.add_column(column)
    styles = {"consistent": "green", "divergent": "bold red"}
    for shard in report["shards"]:
        replicas = Text("\n").join(_replica_cell(r) for r in shard.get("replicas", []))
        table.add_row(
            str(shard.get("shard")),
            Text(str(shard.get("status")), style=styles.get(str(shard.get("status")), "yellow")),
            str(shard.get("index") or "-"),
            replicas or Text(str(shard.get("message")), style="yellow"),
        )
    return table


@click.command("check", short_help="Compare every shard's replicas (exit 6 if they differ).")
@client_options
def check_command() -> None:
    """Hash every replica of every shard at the same applied index and compare.

    Each shard's leader puts a check marker through the shard's Raft log; every replica hashes
    its data when it applies the marker. Exit 0: all agree; 6: some shard's replicas disagree
    or one failed a checksum (it names the shard, node and key); 4: some replica did not answer.

    \b
    Examples:
      kvctl check
      kvctl check --json | jq '.shards[] | select(.status != "consistent")'
    """
    settings = settings_of(click.get_current_context())
    report = settings.client().check()
    if settings.json_output:
        print_json(report)
    else:
        stdout_console().print(check_table(report))
    problems = [s for s in report["shards"] if s.get("status") != "consistent"]
    divergent = [s for s in problems if s.get("status") == "divergent"]
    if divergent:
        raise DataDiverged("; ".join(str(s.get("message")) for s in divergent))
    if problems:
        raise ClusterUnavailable(
            "not every replica could be compared: "
            + "; ".join(str(s.get("message")) for s in problems)
        )


# -- snapshot save / restore -----------------------------------------------------------------


@click.group("snapshot", short_help="Back up every shard to a file, or restore one.")
def snapshot_group() -> None:
    """Back up the whole cluster to one file, or restore such a file into a new cluster.

    \b
    Examples:
      kvctl snapshot save backup.kvsnap
      kvctl cluster up --data-dir data/restored && \\
        kvctl snapshot restore backup.kvsnap --endpoints http://127.0.0.1:7101
    """


def _shard_file(shard_id: int) -> str:
    return f"shard-{shard_id:04d}.snap"


def _add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    archive.addfile(info, io.BytesIO(data))


def _write_backup(path: Path, client: KVClient, status: ClusterStatus) -> dict[str, Any]:
    """Every shard's backup into a new tar at `path`, the manifest last; returns the manifest."""
    entries: list[dict[str, Any]] = []
    with tarfile.open(path, "w") as archive:
        for shard in sorted(status["shards"], key=lambda s: s["id"]):
            backup = client.shard_backup(shard["id"])
            name = _shard_file(backup.shard_id)
            _add_file(archive, name, backup.blob)
            entries.append(
                {
                    "id": backup.shard_id,
                    "start_token": shard["start_token"],
                    "end_token": shard["end_token"],
                    "file": name,
                    "bytes": len(backup.blob),
                    "sha256": hashlib.sha256(backup.blob).hexdigest(),
                    "applied_index": backup.applied_index,
                    "key_count": backup.key_count,
                    "content_digest": backup.content_digest,
                }
            )
        manifest = {
            "format": BACKUP_FORMAT,
            "version": BACKUP_VERSION,
            "created_at_unix_s": time.time(),
            "epoch": status.get("epoch"),
            "shards": entries,
        }
        _add_file(archive, MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    return manifest


@snapshot_group.command("save")
@click.argument("file", type=_PATH)
@client_options
def save_command(file: Path) -> None:
    """Write a backup of every shard to FILE (safe while clients write).

    Each shard's backup is its leader's state after a linearizable read barrier: it holds every
    write acknowledged before `save` started. Shards are taken one after another, each at its
    own point in time (a transaction never spans shards, so each shard is whole).

    \b
    Examples:
      kvctl snapshot save backup.kvsnap
      kvctl snapshot save nightly.kvsnap --endpoints http://10.0.0.5:7001 --json
    """
    settings = settings_of(click.get_current_context())
    client = settings.client()
    status = client.cluster_status()
    partial = file.with_name(file.name + ".partial")
    try:
        manifest = _write_backup(partial, client, status)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, file)  # a crash mid-save never leaves a file that looks complete
    entries = manifest["shards"]
    keys = sum(entry["key_count"] for entry in entries)
    if settings.json_output:
        print_json({"file": str(file), "manifest": manifest})
    else:
        click.echo(f"saved {len(entries)} shards, {keys} keys to {file}")


def read_backup(file: Path) -> tuple[dict[str, Any], dict[int, bytes]]:
    """The manifest and every shard's blob, each checked against the manifest's sha256."""
    try:
        with tarfile.open(file, "r") as archive:
            files = {}
            for member in archive.getmembers():
                extracted = archive.extractfile(member) if member.isfile() else None
                if extracted is not None:
                    files[member.name] = extracted.read()
    except (OSError, tarfile.TarError) as error:
        raise InvalidUsage(f"{file} is not a readable backup file: {error}") from None
    try:
        manifest = json.loads(files[MANIFEST_NAME])
        if manifest.get("format") != BACKUP_FORMAT or manifest.get("version") != BACKUP_VERSION:
            raise ValueError(f"format {manifest.get('format')!r} {manifest.get('version')!r}")
        blobs = {}
        for entry in manifest["shards"]:
            blob = files[entry["file"]]
            if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                raise ValueError(f"{entry['file']} does not match its sha256 in the manifest")
            blobs[int(entry["id"])] = blob
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidUsage(f"{file} is damaged or not a kvctl backup: {error}") from None
    return manifest, blobs


def _check_same_layout(manifest: dict[str, Any], client: KVClient) -> None:
    def layout(shards: list[Any]) -> list[tuple[int, int, int]]:
        return sorted((s["id"], s["start_token"], s["end_token"]) for s in shards)

    ours = layout(client.cluster_status()["shards"])
    if layout(manifest["shards"]) != ours:
        raise InvalidUsage(
            f"the backup has {len(manifest['shards'])} shards; this cluster has {len(ours)} "
            "with other token ranges. Restore into a cluster started with the same --shards."
        )


@snapshot_group.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--replace",
    is_flag=True,
    help="overwrite shards that already hold keys (default: refuse; restore into a new cluster)",
)
@client_options
def restore_command(file: Path, replace: bool) -> None:
    """Load the backup FILE into the cluster (meant for a new one with the same --shards).

    Every shard file is checked against the manifest's sha256 before anything is sent; each node
    checks the shard's own checksum again, and the restore is verified against the manifest's
    key count and content digest. Restored keys get new versions (this cluster's Raft indexes).

    \b
    Examples:
      kvctl cluster up --shards 8 --data-dir data/restored
      kvctl snapshot restore backup.kvsnap --endpoints http://127.0.0.1:7101
      kvctl snapshot restore backup.kvsnap --replace     # overwrite a cluster that has data
    """
    settings = settings_of(click.get_current_context())
    client = settings.client()
    manifest, blobs = read_backup(file)
    _check_same_layout(manifest, client)
    results = []
    for entry in manifest["shards"]:
        answer = client.restore_shard(int(entry["id"]), blobs[int(entry["id"])], replace=replace)
        expected = (entry["key_count"], entry["content_digest"])
        if (answer.get("key_count"), answer.get("content_digest")) != expected:
            raise KvctlError(
                f"shard {entry['id']} restored as {answer!r}, but the backup says {expected}"
            )
        results.append(answer)
    keys = sum(int(answer["key_count"]) for answer in results)
    if settings.json_output:
        print_json({"file": str(file), "shards": results})
    else:
        click.echo(f"restored {len(results)} shards, {keys} keys from {file}; checksums match")


INTEGRITY_COMMANDS = (check_command, snapshot_group)
