"""kvctl: the command line for the KV store. A thin client over the nodes' HTTP API plus a
launcher for local clusters. It never imports kvstore or raft: it sees the cluster as a user
does, through HTTP and the node command line."""

from __future__ import annotations

from cli.client import ClusterStatus, KeyValue, KeyVersion, KVClient, ScanPage
from cli.errors import (
    ClusterUnavailable,
    KeyNotFound,
    KvctlError,
    OutcomeUnknown,
    PreconditionFailed,
)

__all__ = [
    "ClusterStatus",
    "ClusterUnavailable",
    "KVClient",
    "KeyNotFound",
    "KeyValue",
    "KeyVersion",
    "KvctlError",
    "OutcomeUnknown",
    "PreconditionFailed",
    "ScanPage",
]
