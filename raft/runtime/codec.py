"""Wire encoding of Raft messages: one msgpack array per frame payload, messages as flat lists.

A payload is `[FORMAT_VERSION, sender, [item, ...]]`; an item is `[group_id, tag, *fields]` with the
fields in the order below (entries as `[term, index, kind, data]`). Decoding trusts nothing: any
malformed payload raises `FrameError`, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import msgpack

from raft.core.messages import (
    AppendEntries,
    AppendEntriesReply,
    ConfState,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatReply,
    InstallSnapshot,
    InstallSnapshotReply,
    Message,
    RequestVote,
    RequestVoteReply,
    SnapshotMeta,
    TimeoutNow,
)
from raft.core.types import NodeId

FORMAT_VERSION: Final = 1

# Wire tags are part of the protocol: never renumber, only append.
TAG_REQUEST_VOTE: Final = 0
TAG_REQUEST_VOTE_REPLY: Final = 1
TAG_APPEND_ENTRIES: Final = 2
TAG_APPEND_ENTRIES_REPLY: Final = 3
TAG_HEARTBEAT: Final = 4
TAG_HEARTBEAT_REPLY: Final = 5
TAG_INSTALL_SNAPSHOT: Final = 6
TAG_INSTALL_SNAPSHOT_REPLY: Final = 7
TAG_TIMEOUT_NOW: Final = 8


class FrameError(ValueError):
    """A payload that is not a well-formed batch of valid messages."""


_ENTRY_KINDS: Final = {int(kind): kind for kind in EntryKind}

# One packer for the process: `pack` is a single C call, so sharing it within a thread is safe.
_PACKER: Final = msgpack.Packer(use_bin_type=True)


# --- Encoding: trusted values from our own core, so no validation beyond the type dispatch. ---


def _encode_request_vote(group_id: int, m: RequestVote) -> list[Any]:
    return [
        group_id,
        TAG_REQUEST_VOTE,
        m.sender,
        m.recipient,
        m.term,
        m.last_log_index,
        m.last_log_term,
        m.pre_vote,
        m.leadership_transfer,
    ]


def _encode_request_vote_reply(group_id: int, m: RequestVoteReply) -> list[Any]:
    return [group_id, TAG_REQUEST_VOTE_REPLY, m.sender, m.recipient, m.term, m.granted, m.pre_vote]


def _encode_append_entries(group_id: int, m: AppendEntries) -> list[Any]:
    return [
        group_id,
        TAG_APPEND_ENTRIES,
        m.sender,
        m.recipient,
        m.term,
        m.prev_log_index,
        m.prev_log_term,
        m.leader_commit,
        [[e.term, e.index, e.kind, e.data] for e in m.entries],
    ]


def _encode_append_entries_reply(group_id: int, m: AppendEntriesReply) -> list[Any]:
    return [
        group_id,
        TAG_APPEND_ENTRIES_REPLY,
        m.sender,
        m.recipient,
        m.term,
        m.success,
        m.match_index,
        m.conflict_term,
        m.conflict_index,
    ]


def _encode_heartbeat(group_id: int, m: Heartbeat) -> list[Any]:
    return [group_id, TAG_HEARTBEAT, m.sender, m.recipient, m.term, m.commit, m.read_seq]


def _encode_heartbeat_reply(group_id: int, m: HeartbeatReply) -> list[Any]:
    return [group_id, TAG_HEARTBEAT_REPLY, m.sender, m.recipient, m.term, m.read_seq]


def _encode_install_snapshot(group_id: int, m: InstallSnapshot) -> list[Any]:
    meta = m.meta
    return [
        group_id,
        TAG_INSTALL_SNAPSHOT,
        m.sender,
        m.recipient,
        m.term,
        meta.index,
        meta.term,
        sorted(meta.conf.voters),
        sorted(meta.conf.learners),
        m.offset,
        m.data,
        m.done,
    ]


def _encode_install_snapshot_reply(group_id: int, m: InstallSnapshotReply) -> list[Any]:
    return [
        group_id,
        TAG_INSTALL_SNAPSHOT_REPLY,
        m.sender,
        m.recipient,
        m.term,
        m.snapshot_index,
        m.next_offset,
        m.done,
    ]


def _encode_timeout_now(group_id: int, m: TimeoutNow) -> list[Any]:
    return [group_id, TAG_TIMEOUT_NOW, m.sender, m.recipient, m.term]


_ENCODERS: Final[dict[type[Any], Callable[[int, Any], list[Any]]]] = {
    RequestVote: _encode_request_vote,
    RequestVoteReply: _encode_request_vote_reply,
    AppendEntries: _encode_append_entries,
    AppendEntriesReply: _encode_append_entries_reply,
    Heartbeat: _encode_heartbeat,
    HeartbeatReply: _encode_heartbeat_reply,
    InstallSnapshot: _encode_install_snapshot,
    InstallSnapshotReply: _encode_install_snapshot_reply,
    TimeoutNow: _encode_timeout_now,
}


def encode_batch(sender: NodeId, items: Sequence[tuple[int, Message]]) -> bytes:
    """One frame payload carrying `items`, (group_id, message) pairs, from node `sender`."""
    try:
        encoded = [_ENCODERS[type(message)](group_id, message) for group_id, message in items]
    except KeyError as error:
        raise TypeError(f"not a Raft message type: {error.args[0]!r}") from None
    result: bytes = _PACKER.pack([FORMAT_VERSION, sender, encoded])
    return result


# --- Decoding: untrusted input. Each decoder unpacks the whole item (wrong arity raises), checks
# types exactly (`type(x) is int` also rejects bool), and rejects negative ints: OR-ing ints is
# negative iff one of them is. Anything else that escapes becomes a FrameError in decode_batch.

# `type(x) is _INT` checks exactly like `type(x) is int`, but leaves mypy's `Any` alone, so checked
# values go into NodeId / Term / LogIndex fields without a NewType call per field.
_INT: Final[type[Any]] = int
_BOOL: Final[type[Any]] = bool
_BYTES: Final[type[Any]] = bytes


def _decode_request_vote(f: list[Any]) -> RequestVote:
    _, _, sender, recipient, term, last_index, last_term, pre_vote, transfer = f
    if (
        not (type(sender) is type(recipient) is type(term) is type(last_index) is _INT)
        or type(last_term) is not _INT
        or not (type(pre_vote) is type(transfer) is _BOOL)
        or (sender | recipient | term | last_index | last_term) < 0
    ):
        raise FrameError("malformed RequestVote")
    return RequestVote(
        sender=sender,
        recipient=recipient,
        term=term,
        last_log_index=last_index,
        last_log_term=last_term,
        pre_vote=pre_vote,
        leadership_transfer=transfer,
    )


def _decode_request_vote_reply(f: list[Any]) -> RequestVoteReply:
    _, _, sender, recipient, term, granted, pre_vote = f
    if (
        not (type(sender) is type(recipient) is type(term) is _INT)
        or not (type(granted) is type(pre_vote) is _BOOL)
        or (sender | recipient | term) < 0
    ):
        raise FrameError("malformed RequestVoteReply")
    return RequestVoteReply(
        sender=sender, recipient=recipient, term=term, granted=granted, pre_vote=pre_vote
    )


def _decode_entries(raw_entries: list[Any]) -> tuple[Entry, ...]:
    if type(raw_entries) is not list:
        raise FrameError("entries must be a list")
    entries: list[Entry] = []
    append = entries.append
    kinds = _ENTRY_KINDS
    for raw in raw_entries:
        term, index, kind, data = raw
        if not (type(term) is type(index) is type(kind) is _INT) or type(data) is not _BYTES:
            raise FrameError("malformed entry")
        append(Entry(term, index, data, kinds[kind]))  # Entry rejects term < 0 and index < 1
    return tuple(entries)


def _decode_append_entries(f: list[Any]) -> AppendEntries:
    _, _, sender, recipient, term, prev_index, prev_term, leader_commit, raw_entries = f
    if (
        not (type(sender) is type(recipient) is type(term) is type(prev_index) is _INT)
        or not (type(prev_term) is type(leader_commit) is _INT)
        or (sender | recipient | term | prev_index | prev_term | leader_commit) < 0
    ):
        raise FrameError("malformed AppendEntries")
    return AppendEntries(
        sender=sender,
        recipient=recipient,
        term=term,
        prev_log_index=prev_index,
        prev_log_term=prev_term,
        entries=_decode_entries(raw_entries),
        leader_commit=leader_commit,
    )


def _decode_append_entries_reply(f: list[Any]) -> AppendEntriesReply:
    _, _, sender, recipient, term, success, match_index, conflict_term, conflict_index = f
    if (
        not (type(sender) is type(recipient) is type(term) is type(match_index) is _INT)
        or not (type(conflict_term) is type(conflict_index) is _INT)
        or type(success) is not _BOOL
        or (sender | recipient | term | match_index | conflict_term | conflict_index) < 0
    ):
        raise FrameError("malformed AppendEntriesReply")
    return AppendEntriesReply(
        sender=sender,
        recipient=recipient,
        term=term,
        success=success,
        match_index=match_index,
        conflict_term=conflict_term,
        conflict_index=conflict_index,
    )


def _decode_heartbeat(f: list[Any]) -> Heartbeat:
    _, _, sender, recipient, term, commit, read_seq = f
    if (
        not (
            type(sender) is type(recipient) is type(term) is type(commit) is type(read_seq) is _INT
        )
        or (sender | recipient | term | commit | read_seq) < 0
    ):
        raise FrameError("malformed Heartbeat")
    return Heartbeat(
        sender=sender, recipient=recipient, term=term, commit=commit, read_seq=read_seq
    )


def _decode_heartbeat_reply(f: list[Any]) -> HeartbeatReply:
    _, _, sender, recipient, term, read_seq = f
    if (
        not (type(sender) is type(recipient) is type(term) is type(read_seq) is _INT)
        or (sender | recipient | term | read_seq) < 0
    ):
        raise FrameError("malformed HeartbeatReply")
    return HeartbeatReply(sender=sender, recipient=recipient, term=term, read_seq=read_seq)


def _decode_node_ids(raw: Any) -> frozenset[NodeId]:
    if type(raw) is not list or not all(type(n) is _INT and n >= 0 for n in raw):
        raise FrameError("malformed node id list")
    return frozenset(raw)


def _decode_install_snapshot(f: list[Any]) -> InstallSnapshot:
    _, _, sender, recipient, term, meta_index, meta_term, voters, learners, offset, data, done = f
    if (
        not (type(sender) is type(recipient) is type(term) is type(meta_index) is _INT)
        or not (type(meta_term) is type(offset) is _INT)
        or type(data) is not _BYTES
        or type(done) is not _BOOL
        or (sender | recipient | term | meta_index | meta_term | offset) < 0
    ):
        raise FrameError("malformed InstallSnapshot")
    # ConfState rejects a node that is both voter and learner.
    conf = ConfState(_decode_node_ids(voters), _decode_node_ids(learners))
    return InstallSnapshot(
        sender=sender,
        recipient=recipient,
        term=term,
        meta=SnapshotMeta(meta_index, meta_term, conf),
        offset=offset,
        data=data,
        done=done,
    )


def _decode_install_snapshot_reply(f: list[Any]) -> InstallSnapshotReply:
    _, _, sender, recipient, term, snapshot_index, next_offset, done = f
    if (
        not (type(sender) is type(recipient) is type(term) is type(snapshot_index) is _INT)
        or type(next_offset) is not _INT
        or type(done) is not _BOOL
        or (sender | recipient | term | snapshot_index) < 0
        or next_offset < -1  # -1 asks the leader to restart from 0
    ):
        raise FrameError("malformed InstallSnapshotReply")
    return InstallSnapshotReply(
        sender=sender,
        recipient=recipient,
        term=term,
        snapshot_index=snapshot_index,
        next_offset=next_offset,
        done=done,
    )


def _decode_timeout_now(f: list[Any]) -> TimeoutNow:
    _, _, sender, recipient, term = f
    if (
        not (type(sender) is type(recipient) is type(term) is _INT)
        or (sender | recipient | term) < 0
    ):
        raise FrameError("malformed TimeoutNow")
    return TimeoutNow(sender=sender, recipient=recipient, term=term)


_DECODERS: Final[dict[int, Callable[[list[Any]], Message]]] = {
    TAG_REQUEST_VOTE: _decode_request_vote,
    TAG_REQUEST_VOTE_REPLY: _decode_request_vote_reply,
    TAG_APPEND_ENTRIES: _decode_append_entries,
    TAG_APPEND_ENTRIES_REPLY: _decode_append_entries_reply,
    TAG_HEARTBEAT: _decode_heartbeat,
    TAG_HEARTBEAT_REPLY: _decode_heartbeat_reply,
    TAG_INSTALL_SNAPSHOT: _decode_install_snapshot,
    TAG_INSTALL_SNAPSHOT_REPLY: _decode_install_snapshot_reply,
    TAG_TIMEOUT_NOW: _decode_timeout_now,
}


def decode_batch(payload: bytes) -> tuple[NodeId, list[tuple[int, Message]]]:
    """The sender and (group_id, message) pairs of one frame payload; FrameError if malformed."""
    try:
        version, sender, raw_items = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        if version != FORMAT_VERSION or type(version) is not _INT:
            raise FrameError(f"unsupported frame format version {version!r:.40}")
        if type(sender) is not _INT or sender < 0 or type(raw_items) is not list:
            raise FrameError("malformed batch header")
        decoders = _DECODERS
        items: list[tuple[int, Message]] = []
        append = items.append
        for raw in raw_items:
            group_id = raw[0]
            tag = raw[1]
            if type(group_id) is not _INT or group_id < 0 or type(tag) is not _INT:
                raise FrameError("malformed item header")
            append((group_id, decoders[tag](raw)))
    except FrameError:
        raise
    except Exception as error:  # untrusted bytes: every other failure means the same thing
        raise FrameError(f"undecodable frame: {type(error).__name__}: {error}") from error
    return sender, items
