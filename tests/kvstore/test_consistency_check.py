"""ConsistencyChecker.local_report against a replica whose HashCheck result commits while it
looks: the proposer of a check hears the outcome before the apply transaction commits."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from kvstore.commands import ReplicaHash
from kvstore.consistency_check import ConsistencyChecker

CHECK_INDEX = 10


class CommitsAfterFirstRead:
    """A shard replica (the two reads local_report makes) whose apply transaction, holding the
    HashCheck at CHECK_INDEX, commits right after the first read of its state."""

    def __init__(self) -> None:
        self.reads = 0

    def _committed(self) -> bool:
        self.reads += 1
        return self.reads > 1

    def applied_index(self) -> int:
        return CHECK_INDEX if self._committed() else CHECK_INDEX - 1

    def check_result(self, index: int) -> ReplicaHash | None:
        return ReplicaHash(index, 3, 42) if self._committed() else None


async def test_a_result_committed_while_looking_is_reported_not_called_missing() -> None:
    router = cast(Any, SimpleNamespace(node_id=1))
    replica = cast(Any, CommitsAfterFirstRead())
    checker = ConsistencyChecker(router, {5: replica}, wait_s=2.0)
    report = await checker.local_report(5, CHECK_INDEX)
    assert (report.status, report.key_count) == ("ok", 3)
