"""The options every kvctl command shares (--endpoints, --json, --timeout, and the security
ones --cacert/--cert/--key/--token), where each comes from when not given, and how a KvctlError
becomes a message and an exit code.

The shared options are accepted both before the command (`kvctl --json get k`) and after it
(`kvctl get k --json`); a value given after the command wins.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from cli import cluster_file
from cli.client import KVClient, TlsOptions
from cli.errors import (
    ClusterUnavailable,
    KvctlError,
    PreconditionFailed,
)

ENDPOINTS_ENV = "KVCTL_ENDPOINTS"
TOKEN_ENV = "KVCTL_TOKEN"
CACERT_ENV = "KVCTL_CACERT"
CERT_ENV = "KVCTL_CERT"
KEY_ENV = "KVCTL_KEY"
LOGIN_TOKEN_FILE = "kvctl.token"  # in the data directory, written by `kvctl login`
DEFAULT_TIMEOUT_S = 10.0

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Settings:
    """The shared options of one invocation (click's context object)."""

    endpoints: str | None = None
    json_output: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    tls_cacert: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None

    def resolved_endpoints(self) -> list[str]:
        """--endpoints, else $KVCTL_ENDPOINTS, else the nodes in the local cluster.json."""
        if self.endpoints:
            endpoints = [_normalize(part) for part in self.endpoints.split(",") if part.strip()]
            if endpoints:
                return endpoints
        data_dir = cluster_file.default_data_dir()
        record = cluster_file.load(data_dir)
        if record is not None and record.endpoints:
            return record.endpoints
        raise ClusterUnavailable(
            f"kvctl does not know where the cluster is: pass --endpoints URL[,URL...], set "
            f"{ENDPOINTS_ENV}, or start a local cluster with `kvctl cluster up` (it writes "
            f"{cluster_file.cluster_file(data_dir)}, which kvctl reads by default)"
        )

    def tls_options(self) -> TlsOptions:
        """Each file from its flag, else its environment variable, else the local cluster's."""
        recorded = self._local_security().tls_options()
        return TlsOptions(
            self.tls_cacert or os.environ.get(CACERT_ENV) or recorded.ca_file,
            self.tls_cert or os.environ.get(CERT_ENV) or recorded.cert_file,
            self.tls_key or os.environ.get(KEY_ENV) or recorded.key_file,
        )

    def resolved_token(self) -> str | None:
        """--token, else $KVCTL_TOKEN, else `kvctl login`'s saved token, else the local
        cluster's admin token (`cluster up --auth`), else none."""
        token = self.token or os.environ.get(TOKEN_ENV)
        if token:
            return token
        saved = login_token_path()
        if saved.exists():
            return cluster_file.read_token(saved)
        return self._local_security().token()

    def _local_security(self) -> cluster_file.ClientSecurity:
        """The local cluster's TLS files and admin token, but only for requests to its own
        nodes: the admin token must never travel to endpoints of another cluster."""
        record = cluster_file.load(cluster_file.default_data_dir())
        if record is None or not set(self.resolved_endpoints()) <= set(record.endpoints):
            return cluster_file.ClientSecurity()
        return record.security

    def client(self, *, token: str | None = None) -> KVClient:
        return KVClient(
            self.resolved_endpoints(),
            timeout_s=self.timeout_s,
            tls=self.tls_options(),
            token=token or self.resolved_token(),
        )


def login_token_path() -> Path:
    return cluster_file.default_data_dir() / LOGIN_TOKEN_FILE


def _normalize(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if "://" in endpoint else "http://" + endpoint


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_root().ensure_object(Settings)


def _remember(field: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            setattr(settings_of(ctx), field, value)

    return callback


def endpoints_option(*, envvar: str | None = None) -> Callable[[F], F]:
    return click.option(
        "--endpoints",
        metavar="URL[,URL...]",
        envvar=envvar,
        expose_value=False,
        callback=_remember("endpoints"),
        help=f"node HTTP URLs, tried in order (default: ${ENDPOINTS_ENV}, else the nodes in "
        "./data/cluster/cluster.json)",
    )


def json_option() -> Callable[[F], F]:
    return click.option(
        "--json",
        "json_output",
        is_flag=True,
        default=None,
        expose_value=False,
        callback=_remember("json_output"),
        help="print one JSON object (errors go to stderr, also as JSON)",
    )


def timeout_option() -> Callable[[F], F]:
    return click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        expose_value=False,
        callback=_remember("timeout_s"),
        help=f"how long to wait for each node [default: {DEFAULT_TIMEOUT_S:g}]",
    )


def seconds_option(flag: str, default: float, help: str) -> Callable[[F], F]:
    """A duration flag, in seconds: --ready-timeout, --wait-timeout."""
    return click.option(
        flag,
        type=click.FloatRange(min=0),
        default=default,
        show_default=True,
        metavar="SECONDS",
        help=help,
    )


def security_options(command: F) -> F:
    """--cacert, --cert, --key and --token."""
    for name, field, envvar, text in (
        ("--cacert", "tls_cacert", CACERT_ENV, "CA certificate (PEM) to verify https:// nodes"),
        ("--cert", "tls_cert", CERT_ENV, "client certificate (PEM), for mutual TLS"),
        ("--key", "tls_key", KEY_ENV, "the client certificate's private key (PEM)"),
    ):
        command = click.option(
            name,
            field,
            metavar="FILE",
            expose_value=False,
            callback=_remember(field),
            help=f"{text} (default: ${envvar}, else the local cluster's)",
        )(command)
    return click.option(
        "--token",
        "token",
        metavar="TOKEN",
        expose_value=False,
        callback=_remember("token"),
        help=f"bearer token (default: ${TOKEN_ENV}, else `kvctl login`'s, else the local "
        "cluster's admin token)",
    )(command)


def client_options(command: F) -> F:
    """--endpoints, --json, --timeout and the security options, for a command that talks to
    the cluster."""
    return endpoints_option()(json_option()(timeout_option()(security_options(command))))


def report_error(error: KvctlError, *, json_output: bool) -> None:
    if json_output:
        body: dict[str, Any] = {
            "code": error.code,
            "message": error.message,
            "exit_code": error.exit_code,
        }
        if error.status is not None:
            body["status"] = error.status
        if isinstance(error, PreconditionFailed) and error.current_version is not None:
            body["current_version"] = error.current_version
        if isinstance(error, ClusterUnavailable) and error.retry_after_s is not None:
            body["retry_after_s"] = error.retry_after_s
        sys.stderr.write(json.dumps({"error": body}, ensure_ascii=False) + "\n")
    else:
        click.secho(f"kvctl: {error.message}", fg="red", err=True)


class KvctlGroup(click.Group):
    """The root group: turns a KvctlError anywhere below into its message and exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KvctlError as error:
            report_error(error, json_output=settings_of(ctx).json_output)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("kvctl: interrupted", err=True)
            ctx.exit(130)


def running_in_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
