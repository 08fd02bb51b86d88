"""Which checkers apply to a history, running them, and the one-line verdict.

A checker is named by what it checks: "linearizable" (read/write/cas registers, per key),
"set" (add + a final read_set), "append" (list-append transactions, Elle-style) and "bank"
(transfers, and reads of every balance by a query).
"""

from __future__ import annotations

from collections.abc import Iterable

from jepsen_like.append_checker import check_append
from jepsen_like.bank_checker import check_bank
from jepsen_like.history import History
from jepsen_like.linearizability import DEFAULT_MAX_STEPS_PER_KEY, check_linearizable
from jepsen_like.model import CasRegister, Model
from jepsen_like.result import CheckResult
from jepsen_like.set_checker import check_set

CHECKERS = ("linearizable", "set", "append", "bank")
_FUNCTIONS = {
    "linearizable": {"read", "write", "cas"},
    "set": {"add", "read_set"},
    "append": {"txn"},
    "bank": {"transfer", "read_all", "read_total"},
}


def applicable_checkers(history: History) -> list[str]:
    """The checkers whose functions (`f` values) appear in the history."""
    functions = history.functions()
    return [name for name in CHECKERS if functions & _FUNCTIONS[name]]


def check_history(
    history: History,
    checkers: Iterable[str] | None = None,
    *,
    model: Model | None = None,
    max_steps_per_key: int = DEFAULT_MAX_STEPS_PER_KEY,
    time_limit_s: float | None = None,
) -> list[CheckResult]:
    """Run the named checkers (default: every one that applies) on a history.

    Raises ValueError for an unknown checker name or a malformed history.
    """
    names = applicable_checkers(history) if checkers is None else list(checkers)
    unknown = [name for name in names if name not in CHECKERS]
    if unknown:
        raise ValueError(f"no checker named {', '.join(unknown)} (choose from {CHECKERS})")
    operations = history.pairs()
    results = []
    for name in names:
        if name == "linearizable":
            results.append(
                check_linearizable(
                    operations,
                    model or CasRegister(),
                    max_steps_per_key=max_steps_per_key,
                    time_limit_s=time_limit_s,
                )
            )
        elif name == "set":
            results.append(check_set(operations))
        elif name == "bank":
            results.append(check_bank(operations))
        else:
            results.append(check_append(operations))
    return results


def verdict(results: list[CheckResult]) -> str:
    """invalid if any checker says so; else unknown if any is unsure (or none ran); else valid."""
    if any(result.valid is False for result in results):
        return "invalid"
    if not results or any(result.valid is None for result in results):
        return "unknown"
    return "valid"


def verdict_line(results: list[CheckResult]) -> str:
    """`VERDICT valid|invalid|unknown <checker> <short summary>`: the deciding checkers."""
    overall = verdict(results)
    if not results:
        return "VERDICT unknown none no checker applies to this history"
    deciding = [r for r in results if r.verdict == overall] or results
    names = ",".join(r.checker for r in deciding)
    summary = "; ".join(r.summary for r in deciding if r.summary)
    return f"VERDICT {overall} {names} {summary}".rstrip()
