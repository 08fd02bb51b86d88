"""kvctl's data commands: get, put, del, scan, txn. Each is a thin shell over cli.client."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.text import Text

from cli.client import KeyValue
from cli.errors import KeyNotFound, PreconditionFailed
from cli.output import (
    key_value_json,
    print_json,
    scan_table,
    stdout_console,
    txn_results_table,
)
from cli.settings import Settings, client_options, settings_of

_PATH = click.Path(dir_okay=False, allow_dash=True, path_type=Path)


def _settings() -> Settings:
    return settings_of(click.get_current_context())


def _explain_precondition(error: PreconditionFailed, key: str, if_version: int | None) -> NoReturn:
    if error.current_version is None:
        current = "a different version"
    elif error.current_version == 0:
        current = "absent"
    else:
        current = f"at version {error.current_version}"
    wanted = "absent" if if_version == 0 else f"at version {if_version}"
    raise PreconditionFailed(
        f"{key!r} is {current}, not {wanted} as --if-version {if_version} requires; "
        "read it again and retry",
        status=error.status,
        current_version=error.current_version,
    ) from None


@click.command("get", short_help="Print a key's value (exit 1 if absent).")
@click.argument("key")
@click.option("--stale", is_flag=True, help="serve from any replica: faster, may lag behind")
@click.option(
    "--output",
    "-o",
    type=_PATH,
    help="write the value to FILE instead of stdout",
)
@client_options
def get_command(key: str, stale: bool, output: Path | None) -> None:
    """Print the value of KEY (raw bytes; exit 1 if absent).

    Reads are linearizable unless --stale. With --json: {"key", "value" (base64), "text" (the
    value as UTF-8, or null), "version"}.

    \b
    Examples:
      kvctl get greeting
      kvctl get photo.png --output photo.png
      kvctl get greeting --json | jq -r .text
    """
    settings = _settings()
    try:
        item = settings.client().get(key, stale=stale)
    except KeyNotFound:
        raise KeyNotFound(f"{key!r} does not exist", status=404) from None
    if output is not None and str(output) != "-":
        output.write_bytes(item.value)
        if not settings.json_output:
            click.echo(
                f"wrote {len(item.value)} bytes to {output} (version {item.version})", err=True
            )
    if settings.json_output:
        print_json(key_value_json(item))
    elif output is None or str(output) == "-":
        stream = sys.stdout.buffer
        stream.write(item.value)
        stream.flush()


@click.command("put", short_help="Set a key from an argument, a file or stdin.")
@click.argument("key")
@click.argument("value", required=False)
@click.option(
    "--file", "-f", "value_file", type=_PATH, help="read the value from FILE ('-': stdin)"
)
@click.option(
    "--if-version",
    type=click.IntRange(min=0),
    metavar="N",
    help="write only if KEY is at version N (0: only if absent); else exit 3",
)
@click.option(
    "--idempotency-key",
    metavar="K",
    help="retries with the same K apply once [default: a fresh random key per call]",
)
@client_options
def put_command(
    key: str,
    value: str | None,
    value_file: Path | None,
    if_version: int | None,
    idempotency_key: str | None,
) -> None:
    """Set KEY to VALUE (or to the bytes of --file F, or of stdin with '-').

    Prints the key's new version. Every write carries an idempotency key, so kvctl may safely
    resend it to the next endpoint when a node fails mid-request.

    \b
    Examples:
      kvctl put greeting hello
      kvctl put photo.png --file photo.png
      echo -n hello | kvctl put greeting -
      kvctl put counter 2 --if-version 17
    """
    settings = _settings()
    data = _read_value(value, value_file)
    try:
        result = settings.client().put(
            key,
            data,
            if_version=if_version,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
    except PreconditionFailed as error:
        _explain_precondition(error, key, if_version)
    if settings.json_output:
        print_json({"key": result.key, "version": result.version})
    else:
        click.echo(f"put {result.key!r} (version {result.version})")


def _read_value(value: str | None, value_file: Path | None) -> bytes:
    if value is not None and value_file is not None:
        raise click.UsageError("give the value either as VALUE or with --file, not both")
    if value_file is not None:
        if str(value_file) == "-":
            return sys.stdin.buffer.read()
        try:
            return value_file.read_bytes()
        except OSError as error:
            raise click.BadParameter(
                f"cannot read {value_file}: {error.strerror}", param_hint="--file"
            ) from None
    if value is None:
        raise click.UsageError("give a VALUE, --file F, or '-' to read the value from stdin")
    if value == "-":
        return sys.stdin.buffer.read()
    return value.encode("utf-8", "surrogateescape")


@click.command("del", short_help="Delete a key (exit 1 if absent).")
@click.argument("key")
@click.option(
    "--if-version",
    type=click.IntRange(min=1),
    metavar="N",
    help="delete only if KEY is at version N; else exit 3",
)
@client_options
def del_command(key: str, if_version: int | None) -> None:
    """Delete KEY (exit 1 if it does not exist).

    \b
    Examples:
      kvctl del greeting
      kvctl del lock --if-version 42
    """
    settings = _settings()
    try:
        result = settings.client().delete(key, if_version=if_version)
    except KeyNotFound:
        raise KeyNotFound(f"{key!r} does not exist", status=404) from None
    except PreconditionFailed as error:
        _explain_precondition(error, key, if_version)
    if settings.json_output:
        print_json({"key": result.key, "version": result.version})
    else:
        click.echo(f"deleted {result.key!r} (it was at version {result.version})")


@click.command("scan", short_help="List keys in order, with versions and values.")
@click.option("--prefix", "-p", default="", help="only keys starting with P")
@click.option("--start", metavar="S", help="first key (inclusive)")
@click.option("--end", metavar="E", help="stop before this key (exclusive)")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=1),
    metavar="N",
    help="at most N keys per page [default: the server's, 1000]",
)
@click.option("--cursor", metavar="C", help="continue where a previous page stopped")
@click.option("--all", "all_pages", is_flag=True, help="fetch every page, not just the first")
@click.option("--stale", is_flag=True, help="serve from any replica: faster, may lag behind")
@client_options
def scan_command(
    prefix: str,
    start: str | None,
    end: str | None,
    limit: int | None,
    cursor: str | None,
    all_pages: bool,
    stale: bool,
) -> None:
    """List keys in order, across all shards, with their versions and a value preview.

    One page unless --all. With --json: {"items": [{"key", "value" (base64), "text",
    "version"}], "next_cursor"}.

    \b
    Examples:
      kvctl scan --prefix user/
      kvctl scan --start a --end m --limit 10
      kvctl scan --all --json | jq -r '.items[].key'
    """
    settings = _settings()
    client = settings.client()
    items: list[KeyValue] = []
    next_cursor: str | None = None
    pages = client.scan(
        prefix=prefix, start=start, end=end, limit=limit, cursor=cursor, stale=stale
    )
    for page in pages:
        items.extend(page.items)
        next_cursor = page.next_cursor
        if not all_pages:
            break
    if settings.json_output:
        print_json({"items": [key_value_json(item) for item in items], "next_cursor": next_cursor})
        return
    console = stdout_console()
    if items:
        console.print(scan_table(items))
    noun = "key" if len(items) == 1 else "keys"
    console.print(Text(f"{len(items)} {noun}", style="dim"))
    if next_cursor is not None:
        console.print(
            Text(f"more keys follow: add --cursor {next_cursor} for the next page, or --all")
        )


@click.command("txn", short_help="Run a compare-then-write transaction (JSON).")
@click.argument("request_file", metavar="FILE|-", type=_PATH)
@client_options
def txn_command(request_file: Path) -> None:
    """Run a transaction from a JSON file ('-': stdin); exit 3 if a compare fails.

    The JSON is the API's: {"compare": [...], "success": [...], "failure": [...]}; values are
    base64 (`printf %s hello | base64`). All keys must live in one shard. Runs the success
    ops when every compare holds, else the failure ops (and exits 3).

    \b
    Example:
      kvctl txn - <<'EOF'
      {"compare": [{"key": "lock", "target": "version", "op": "==", "version": 0}],
       "success": [{"op": "put", "key": "lock", "value": "bWU="}],
       "failure": [{"op": "get", "key": "lock"}]}
      EOF
    """
    settings = _settings()
    request = _read_txn(request_file)
    answer = settings.client().txn(request)
    succeeded = bool(answer["succeeded"])
    if settings.json_output:
        print_json(answer)
    else:
        console = stdout_console()
        if succeeded:
            console.print(Text("SUCCEEDED: every compare held; ran the success ops", "green"))
        else:
            console.print(Text("FAILED: a compare did not hold; ran the failure ops", "red"))
        results = answer.get("results") or []
        if results:
            console.print(txn_results_table(results))
    if not succeeded:
        click.get_current_context().exit(PreconditionFailed.exit_code)


def _read_txn(request_file: Path) -> dict[str, Any]:
    try:
        if str(request_file) == "-":
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            text = request_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise click.BadParameter(f"cannot read {request_file}: {error}") from None
    try:
        request = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(f"{request_file} is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise click.BadParameter(
            f'{request_file} must hold one JSON object: {{"compare", "success", "failure"}}'
        )
    unknown = sorted(set(request) - {"compare", "success", "failure"})
    if unknown:
        raise click.BadParameter(f"{request_file} has unknown fields: {', '.join(unknown)}")
    return request


DATA_COMMANDS = (get_command, put_command, del_command, scan_command, txn_command)
