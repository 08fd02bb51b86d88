"""What can go wrong in kvctl, each with the exit code a script can branch on.

KvctlError                      5  anything else (bad response, 4xx/5xx not listed, bad local state)
├── KeyNotFound                 1  get/del of an absent key
├── InvalidUsage                2  flags that conflict with local state (click's own errors: 2 too)
├── PreconditionFailed          3  --if-version did not match; a txn ran its failure branch
├── ClusterUnavailable          4  no node answered, or every node answered 503; retry later
├── OutcomeUnknown              5  a write was sent but no answer came back: it may have applied
├── DataDiverged                6  `kvctl check`: replicas disagree, or one failed a checksum
└── NotAuthorized               7  401 (no or bad token) or 403 (the token lacks the grant)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_PRECONDITION_FAILED = 3
EXIT_UNAVAILABLE = 4
EXIT_OTHER = 5
EXIT_DIVERGED = 6
EXIT_NOT_AUTHORIZED = 7


class KvctlError(Exception):
    exit_code = EXIT_OTHER
    code = "error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # the HTTP status that caused it, if any


class KeyNotFound(KvctlError):
    exit_code = EXIT_NOT_FOUND
    code = "not_found"


class InvalidUsage(KvctlError):
    exit_code = EXIT_USAGE
    code = "invalid_usage"


class PreconditionFailed(KvctlError):
    exit_code = EXIT_PRECONDITION_FAILED
    code = "precondition_failed"

    def __init__(
        self, message: str, *, status: int | None = None, current_version: int | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.current_version = current_version


class ClusterUnavailable(KvctlError):
    exit_code = EXIT_UNAVAILABLE
    code = "unavailable"

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class OutcomeUnknown(KvctlError):
    exit_code = EXIT_OTHER
    code = "outcome_unknown"


class DataDiverged(KvctlError):
    exit_code = EXIT_DIVERGED
    code = "diverged"


class NotAuthorized(KvctlError):
    exit_code = EXIT_NOT_AUTHORIZED
    code = "not_authorized"
