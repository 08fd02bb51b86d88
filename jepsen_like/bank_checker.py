"""The bank checker: clients move money between accounts with transactions, and read all the
balances at once with a map-reduce query (`read_all`: every row; `read_total`: sum and count).

Valid iff every ok read sees the bank's total unchanged and no negative balance: a transfer
seen half done (a debit without its credit) or one applied twice breaks the total. The
transfers stay inside one shard, and a query reads each shard at one read point, so any such
tear is the store's fault. Accounts never written hold the opening balance; each read's
input names the bank it reads: {"accounts": N, "opening_balance": B}.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jepsen_like.history import History, Operation, time_origin
from jepsen_like.result import CheckResult

CHECKER = "bank"
_SAMPLE = 10


def check_bank(history: History | Iterable[Operation]) -> CheckResult:
    operations = history.pairs() if isinstance(history, History) else list(history)
    origin = time_origin(operations)
    reads = [o for o in operations if o.f in ("read_all", "read_total") and o.kind == "ok"]
    if not reads:
        return CheckResult(None, CHECKER, {"reason": "no ok read"}, "no ok read to check")
    try:
        bank = reads[0].input
        accounts, opening_balance = int(bank["accounts"]), int(bank["opening_balance"])
    except (TypeError, KeyError, ValueError):
        raise ValueError("a bank read's input must be {accounts, opening_balance}") from None
    expected = accounts * opening_balance
    bad: list[dict[str, Any]] = []
    for read in reads:
        total, negative = _total(read.output, accounts, opening_balance)
        if total != expected or negative:
            problem = f"total {total} != {expected}" if total != expected else "negative balance"
            text = read.describe(origin)
            bad.append({"index": read.invoke.index, "problem": problem, "text": text})
    transfers = [o for o in operations if o.f == "transfer"]
    details: dict[str, Any] = {
        "reads": len(reads),
        "transfers_ok": sum(1 for o in transfers if o.kind == "ok"),
        "transfers_info": sum(1 for o in transfers if o.kind == "info"),
        "expected_total": expected,
        "bad_reads_count": len(bad),
        "bad_reads": bad[:_SAMPLE],
    }
    if not bad:
        summary = f"{len(reads)} reads all saw the total {expected}"
        return CheckResult(True, CHECKER, details, summary)
    details["witness_text"] = "\n".join(f"{b['problem']}: {b['text']}" for b in bad[:_SAMPLE])
    summary = f"{len(bad)} of {len(reads)} reads: {bad[0]['problem']}"
    return CheckResult(False, CHECKER, details, summary)


def _total(output: Any, accounts: int, opening_balance: int) -> tuple[int, bool]:
    """(the bank's total, whether some balance is negative) as one read saw it."""
    if isinstance(output, dict) and set(output) == {"sum", "present"}:  # read_total
        return output["sum"] + (accounts - output["present"]) * opening_balance, False
    if not isinstance(output, dict):
        raise ValueError(f"a bank read returns a dict of balances, got {output!r:.100}")
    balances = list(output.values())
    total = sum(balances) + (accounts - len(balances)) * opening_balance
    return total, any(balance < 0 for balance in balances)
