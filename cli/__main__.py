"""Entry point of `kvctl` (also `python -m cli`): the root command and nothing else."""

from __future__ import annotations

import click

from cli.bench import bench_command
from cli.bulk_load import load_command
from cli.cluster_commands import CLUSTER_COMMANDS
from cli.data_commands import DATA_COMMANDS
from cli.elastic_commands import ELASTIC_COMMANDS
from cli.integrity_commands import INTEGRITY_COMMANDS
from cli.query_command import query_command
from cli.security_commands import SECURITY_COMMANDS
from cli.settings import (
    ENDPOINTS_ENV,
    KvctlGroup,
    endpoints_option,
    json_option,
    security_options,
    timeout_option,
)

EPILOG = f"""\b
Where kvctl sends requests: --endpoints, else ${ENDPOINTS_ENV}, else the nodes recorded in
./data/cluster/cluster.json (or $KVCTL_DATA_DIR/cluster.json) by `kvctl cluster up`. Endpoints
are tried in order until one answers.

\b
Exit codes:
  0  ok
  1  key not found (get, del)
  2  usage error
  3  precondition failed (--if-version mismatch, txn compare failed)
  4  cluster unavailable (no node answered, or 503), or not ready in time
  5  any other error (including a write whose outcome is unknown)
  6  kvctl check: replicas of a shard disagree, or one failed a checksum
  7  not authorized (401: no or bad token; 403: the token lacks the grant)

\b
Start here:
  kvctl cluster up && kvctl put greeting hello && kvctl get greeting
"""


@click.group(
    "kvctl",
    cls=KvctlGroup,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@endpoints_option(envvar=ENDPOINTS_ENV)
@json_option()
@timeout_option()
@security_options
@click.version_option(package_name="pyraftkv", prog_name="kvctl")
def kvctl() -> None:
    """kvctl: read and write keys, and run a local cluster, of the sharded Raft KV store."""


for _command in (
    *DATA_COMMANDS,
    query_command,
    *CLUSTER_COMMANDS,
    *ELASTIC_COMMANDS,
    *INTEGRITY_COMMANDS,
    *SECURITY_COMMANDS,
    bench_command,
    load_command,
):
    kvctl.add_command(_command)


def main() -> None:
    kvctl(prog_name="kvctl")


if __name__ == "__main__":
    main()
