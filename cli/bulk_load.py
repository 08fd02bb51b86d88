"""`kvctl load FILE`: stream key/value records from JSON lines or CSV into the cluster through
POST /v1/batch, several batches in flight, with a progress bar.

Plain puts are safe to repeat, so items a batch could not write (their shard had no leader, or
the request got no answer) are sent again, up to --retries times, before they count as failed.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import click
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cli import load_generator
from cli.errors import ClusterUnavailable, InvalidUsage
from cli.output import print_json, stderr_console, stdout_console
from cli.raw_http import HttpConnection, HttpConnectionError
from cli.settings import client_options, running_in_terminal, settings_of

FORMATS = ("jsonl", "csv")
_RETRY_PAUSE_S = 0.2

Item = tuple[str, bytes]


def _format_of(path: Path, chosen: str) -> str:
    if chosen != "auto":
        return chosen
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def _jsonl_items(lines: TextIO) -> Iterator[Item]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record["key"]
            if "value_b64" in record:
                value = base64.b64decode(record["value_b64"], validate=True)
            else:
                value = record["value"].encode()
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise InvalidUsage(
                f'line {number}: expected {{"key": str, "value": str}} or '
                f'{{"key": str, "value_b64": base64}} ({type(error).__name__}: {error})'
            ) from None
        if not isinstance(key, str):
            raise InvalidUsage(f"line {number}: key must be a string")
        yield key, value


def _csv_items(lines: TextIO) -> Iterator[Item]:
    for number, row in enumerate(csv.reader(lines), 1):
        if not row:
            continue
        if len(row) != 2:
            raise InvalidUsage(f"row {number}: expected 2 fields key,value; got {len(row)}")
        yield row[0], row[1].encode()


def read_items(lines: TextIO, file_format: str) -> Iterator[Item]:
    return _csv_items(lines) if file_format == "csv" else _jsonl_items(lines)


def batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def batch_body(items: Sequence[Item]) -> bytes:
    puts = [{"key": key, "value": base64.b64encode(value).decode()} for key, value in items]
    return json.dumps({"puts": puts}, ensure_ascii=False).encode()


@dataclass(slots=True)
class LoadResult:
    written: int = 0
    failed: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    last_error: str = ""

    @property
    def keys_per_s(self) -> float:
        return self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def _send_batch(
    connection: HttpConnection, items: list[Item], retries: int, result: LoadResult
) -> tuple[int, int]:
    """Writes one batch, re-sending what was not written; returns (written, failed)."""
    pending = items
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(_RETRY_PAUSE_S * attempt)
        try:
            status, body = await connection.request(
                "POST", "/v1/batch", batch_body(pending), "application/json"
            )
        except (HttpConnectionError, TimeoutError) as error:
            result.last_error = f"no answer from {connection.host}:{connection.port}: {error}"
            continue
        doc: dict[str, Any] = json.loads(body) if body else {}
        if status == 200:
            if not doc["errors"]:
                return len(items), 0
            result.last_error = doc["errors"][0]["message"]
            pending = [pending[error["index"]] for error in doc["errors"]]
            continue
        message = doc.get("error", {}).get("message", body[:200].decode(errors="replace"))
        result.last_error = f"HTTP {status}: {message}"
        if 400 <= status < 500:
            raise InvalidUsage(f"the cluster refused a batch: {result.last_error}")
    return len(items) - len(pending), len(pending)


async def load(
    items: Iterator[Item],
    endpoints: Sequence[str],
    *,
    batch_size: int,
    concurrency: int,
    retries: int,
    timeout_s: float,
    on_batch: Any = None,
) -> LoadResult:
    """Send `items` in batches over `concurrency` connections; on_batch(written, failed)."""
    result = LoadResult()
    source = batches(items, batch_size)
    started = time.perf_counter()

    async def sender(number: int) -> None:
        connection = HttpConnection(endpoints[number % len(endpoints)], timeout_s)
        try:
            for batch in source:  # a shared iterator: each batch goes to one sender
                written, failed = await _send_batch(connection, batch, retries, result)
                result.written += written
                result.failed += failed
                result.batches += 1
                if on_batch is not None:
                    on_batch(written, failed)
        finally:
            connection.close()

    await asyncio.gather(*(sender(n) for n in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    return result


@click.command("load", short_help="Bulk-load keys from JSON lines or CSV.")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["auto", *FORMATS]),
    default="auto",
    show_default=True,
    help="auto: csv for *.csv, else JSON lines",
)
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--concurrency", "-c", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option("--retries", default=5, show_default=True, type=click.IntRange(0, 100))
@client_options
def load_command(
    file: Path, file_format: str, batch_size: int, concurrency: int, retries: int
) -> None:
    """Write every record of FILE (- for stdin) with POST /v1/batch.

    \b
    JSON lines: {"key": "k", "value": "text"} or {"key": "k", "value_b64": "AAE="}
    CSV:        key,value   (no header; quote fields that hold commas)

    Exit 4 if some records could not be written after --retries attempts.

    \b
    Example: kvctl load users.jsonl --batch-size 1000 --concurrency 4
    """
    settings = settings_of(click.get_current_context())
    endpoints = settings.resolved_endpoints()
    chosen = _format_of(file, file_format)
    show_progress = running_in_terminal() and not settings.json_output
    from_stdin = str(file) == "-"
    raw: BinaryIO = sys.stdin.buffer if from_stdin else file.open("rb")
    with (
        io.TextIOWrapper(raw, encoding="utf-8", newline="") as lines,
        Progress(
            TextColumn("loading"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[written]:,} written  {task.fields[failed]:,} failed"),
            TimeElapsedColumn(),
            console=stderr_console(),
            disable=not show_progress,
        ) as progress,
    ):
        size = None if from_stdin else file.stat().st_size
        task = progress.add_task("load", total=size, written=0, failed=0)

        def on_batch(written: int, failed: int) -> None:
            fields = progress.tasks[task].fields
            position = None if size is None else raw.tell()  # a little ahead: read buffering
            progress.update(
                task,
                completed=position,
                written=fields["written"] + written,
                failed=fields["failed"] + failed,
            )

        loop = load_generator.new_event_loop()
        try:
            result = loop.run_until_complete(
                load(
                    read_items(lines, chosen),
                    endpoints,
                    batch_size=batch_size,
                    concurrency=concurrency,
                    retries=retries,
                    timeout_s=settings.timeout_s,
                    on_batch=on_batch,
                )
            )
        finally:
            loop.close()
    summary = {
        "written": result.written,
        "failed": result.failed,
        "batches": result.batches,
        "elapsed_s": round(result.elapsed_s, 3),
        "keys_per_s": round(result.keys_per_s, 1),
    }
    if settings.json_output:
        print_json(summary)
    else:
        stdout_console().print(
            f"{result.written:,} keys written in {result.elapsed_s:.2f}s "
            f"({result.keys_per_s:,.0f} keys/s, {result.batches:,} batches)"
            + (f"; {result.failed:,} failed" if result.failed else ""),
            highlight=False,
        )
    if result.failed:
        raise ClusterUnavailable(
            f"{result.failed:,} records were not written after {retries} retries "
            f"({result.last_error}); loading them again is safe"
        )
