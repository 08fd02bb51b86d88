"""`kvctl bench put|get|mixed|scan`: load the cluster for a while, then print throughput,
latency percentiles and errors. The engine is cli.load_generator; this is its command line."""

from __future__ import annotations

import click
from rich.table import Table

from cli import load_generator
from cli.errors import ClusterUnavailable, KvctlError
from cli.load_generator import BenchConfig, BenchResult, Workload
from cli.output import print_json, stderr_console, stdout_console
from cli.settings import Settings, client_options, running_in_terminal, settings_of
from cli.shard_routes import LeaderRoutes


def result_table(result: BenchResult) -> Table:
    table = Table(title=f"kvctl bench {result.workload.value}", title_justify="left")
    for column in ("conns", "ok", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right")
    table.add_row(
        str(result.concurrency),
        f"{result.ok:,}",
        f"{result.error_count:,}",
        f"{result.throughput_per_s:,.0f}",
        *(f"{result.percentile_ms(q):.2f}" for q in (0.50, 0.90, 0.99, 1.0)),
    )
    return table


def _leader_routes(settings: Settings) -> LeaderRoutes | None:
    try:
        return LeaderRoutes(settings.client().cluster_status())
    except KvctlError as error:
        stderr_console().print(f"not routing by leader ({error.message})", highlight=False)
        return None


@click.command("bench", short_help="Load the cluster and report throughput and latency.")
@click.argument("workload", type=click.Choice([w.value for w in Workload]))
@click.option("--concurrency", "-c", default=16, show_default=True, type=click.IntRange(1, 4096))
@click.option("--value-size", default=100, show_default=True, type=click.IntRange(0, 1 << 20))
@click.option(
    "--keys", default=1000, show_default=True, type=click.IntRange(1), help="size of the key space"
)
@click.option(
    "--duration",
    "duration_s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    metavar="SECONDS",
)
@click.option("--read-percent", default=50, show_default=True, type=click.IntRange(0, 100))
@click.option("--scan-limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--stale", is_flag=True, help="gets and scans from any replica")
@click.option("--no-fill", is_flag=True, help="get/mixed/scan: skip writing the key space first")
@click.option("--key-prefix", default="bench/", show_default=True)
@click.option("--seed", default=1, show_default=True, type=int)
@click.option(
    "--route/--no-route",
    default=True,
    show_default=True,
    help="send each get/put to its shard's leader (read from /v1/cluster), not via any node",
)
@client_options
def bench_command(
    workload: str,
    concurrency: int,
    value_size: int,
    keys: int,
    duration_s: float,
    read_percent: int,
    scan_limit: int,
    stale: bool,
    no_fill: bool,
    key_prefix: str,
    seed: int,
    route: bool,
) -> None:
    """Send WORKLOAD (put, get, mixed or scan) over --concurrency keep-alive connections,
    spread over the endpoints, for --duration seconds; print a table (or --json).

    Non-2xx answers, timeouts and broken connections count as errors, by kind. get, mixed and
    scan first write each of the --keys keys once, unless --no-fill.

    \b
    Example: kvctl bench put --concurrency 64 --value-size 100 --duration 10
    """
    settings = settings_of(click.get_current_context())
    routes = _leader_routes(settings) if route else None
    config = BenchConfig(
        workload=Workload(workload),
        endpoints=settings.resolved_endpoints(),
        concurrency=concurrency,
        value_size=value_size,
        keys=keys,
        duration_s=duration_s,
        key_prefix=key_prefix,
        read_percent=read_percent,
        scan_limit=scan_limit,
        stale=stale,
        timeout_s=settings.timeout_s,
        seed=seed,
        routes=routes,
    )
    console = stderr_console()
    live = running_in_terminal() and not settings.json_output
    loop = load_generator.new_event_loop()
    try:
        if config.workload.needs_data and not no_fill:
            if live:
                console.print(f"writing {keys:,} keys first (--no-fill skips this)")
            failed = loop.run_until_complete(load_generator.fill(config))
            if failed == keys:
                raise ClusterUnavailable(f"all {keys:,} writes of the fill failed; is it up?")

        def progress(elapsed_s: float, ok: int, errors: int) -> None:
            rate = ok / elapsed_s if elapsed_s else 0.0
            console.print(
                f"\r{elapsed_s:6.1f}/{duration_s:g}s  {ok:,} ok  {errors:,} errors  "
                f"{rate:,.0f} req/s",
                end="",
                highlight=False,
            )

        result = loop.run_until_complete(load_generator.run(config, progress if live else None))
    finally:
        loop.close()
    if live:
        console.print()
    if settings.json_output:
        print_json(result.summary())
        return
    stdout_console().print(result_table(result))
    if result.errors:
        kinds = ", ".join(f"{kind}: {count:,}" for kind, count in result.errors.most_common())
        stdout_console().print(f"errors by kind: {kinds}", highlight=False)
