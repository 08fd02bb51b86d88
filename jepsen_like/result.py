"""What every checker answers: valid, invalid (with a witness in `details`) or unknown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CheckResult:
    valid: bool | None  # None: unknown (the search ran out of budget, or nothing to check)
    checker: str  # "linearizable", "set" or "append"
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able; "witness" when invalid
    summary: str = ""  # one line for the VERDICT line

    @property
    def verdict(self) -> str:
        return "valid" if self.valid else "invalid" if self.valid is False else "unknown"
