"""Jepsen-style testing of the store as a black box: histories of client operations, pure
models, and checkers (linearizability per key, set, list-append). Never imports the store.
"""

from __future__ import annotations

from jepsen_like.append_checker import check_append
from jepsen_like.checker import CHECKERS, applicable_checkers, check_history, verdict
from jepsen_like.history import History, Op, Operation
from jepsen_like.jepsen_format import load_jepsen, parse_jepsen
from jepsen_like.linearizability import check_linearizable
from jepsen_like.model import CasRegister, Model
from jepsen_like.result import CheckResult
from jepsen_like.set_checker import check_set

__all__ = [
    "CHECKERS",
    "CasRegister",
    "CheckResult",
    "History",
    "Model",
    "Op",
    "Operation",
    "applicable_checkers",
    "check_append",
    "check_history",
    "check_linearizable",
    "check_set",
    "load_jepsen",
    "parse_jepsen",
    "verdict",
]
