"""Identifiers and positions used throughout Raft: NewTypes, so mypy catches a term passed as
an index."""

from __future__ import annotations

from typing import NewType

NodeId = NewType("NodeId", int)
Term = NewType("Term", int)
LogIndex = NewType("LogIndex", int)

NO_NODE = NodeId(0)  # "nobody": no vote cast, no leader known. Real node ids are >= 1.
