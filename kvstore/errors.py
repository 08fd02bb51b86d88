"""Outcomes of KV operations that a caller can act on; http_api maps each to one status.

KVError
├── InvalidRequest            400  caller bug (bad key, body, parameter); do not retry
│   └── CrossShardTxn         400  a transaction touching keys of several shards
├── Unauthenticated           401  no bearer token, or one nobody was issued (auth on)
├── Forbidden                 403  the token's user lacks the grant for this key/prefix
├── NotFound                  404  the key does not exist
├── PreconditionFailed        412  if_version did not match (carries the current version)
├── PayloadTooLarge           413  key or value over the configured limit
├── TooManyRequests           429  this client has too many requests in flight
├── ShardUnavailable          503  no leader / no quorum right now; retry after `retry_after_s`
│   └── ReplicaCorrupted      503  this node's replica of the shard failed a checksum (names the
│                                  shard and key); it no longer serves it: other replicas do
├── OutcomeUnknown            504  timed out: the write may or may not have applied
└── StaleShardMap             409  the sender's shard map is older than ours (internal)
"""

from __future__ import annotations


class KVError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(KVError):
    status = 400
    code = "invalid_request"


class CrossShardTxn(InvalidRequest):
    code = "cross_shard_txn"


class Unauthenticated(KVError):
    status = 401
    code = "unauthenticated"


class Forbidden(KVError):
    status = 403
    code = "forbidden"


class TooManyRequests(KVError):
    status = 429
    code = "too_many_requests"


class NotFound(KVError):
    status = 404
    code = "not_found"


class PreconditionFailed(KVError):
    status = 412
    code = "precondition_failed"

    def __init__(self, message: str, current_version: int) -> None:
        super().__init__(message)
        self.current_version = current_version


class PayloadTooLarge(KVError):
    status = 413
    code = "payload_too_large"


class ShardUnavailable(KVError):
    status = 503
    code = "shard_unavailable"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReplicaCorrupted(ShardUnavailable):
    code = "replica_corrupted"

    def __init__(self, message: str, shard_id: int, key: str) -> None:
        super().__init__(message)
        self.shard_id = shard_id
        self.key = key


class OutcomeUnknown(KVError):
    status = 504
    code = "outcome_unknown"


class StaleShardMap(KVError):
    status = 409
    code = "stale_shard_map"
