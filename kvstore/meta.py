"""The metadata Raft group's state machine: the shard map and the user table, replicated so every
node agrees on them and changes to them are linearizable. Members serve the map; other nodes
cache a copy. Users are known only to members, which is why auth needs every node a member.
Map changes (kvstore.map_changes) apply deterministically, or are refused as a Failed outcome."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lmdb
import msgpack

from kvstore.auth import Grants, User
from kvstore.commands import FAILED_PRECONDITION, Failed
from kvstore.map_changes import ChangeRefused, MapChange, apply_change, decode_change
from kvstore.service import KeyVersion
from kvstore.sharding import ShardMap
from raft.core.messages import Entry, EntryKind, Snapshot
from raft.core.types import LogIndex

_MAP_KEY = b"shard_map"
_APPLIED_KEY = b"applied"
_CACHE_KEY = b"learned_shard_map"
_USER_KEY_PREFIX = b"user/"
# Command tags 1-3; kvstore.map_changes' start at 4. Append only: they live in the log.
_SET_MAP = 1
_PUT_USER = 2
_DELETE_USER = 3
# Snapshots that carry users start with this; older ones are the bare encoded shard map.
_SNAPSHOT_V2 = b"META2"
LAST_ADMIN_REFUSED = "refused: that would leave no admin"


SHARD_MAP_KEY = "(shard map)"  # what a change's KeyVersion names: its version is the epoch


def encode_set_map(shard_map: ShardMap) -> bytes:
    packed: bytes = msgpack.packb((_SET_MAP, shard_map.encode()))
    return packed


@dataclass(frozen=True, slots=True)
class DeleteUser:
    name: str


MetaCommand = ShardMap | MapChange | User | DeleteUser


def _encode_user(user: User) -> bytes:
    packed: bytes = msgpack.packb((user.name, user.grants.encode(), user.token_sha256))
    return packed


def _decode_user(raw: bytes) -> User:
    name, grants, token_sha256 = msgpack.unpackb(raw)
    return User(name, Grants.decode(grants), bytes(token_sha256))


def encode_put_user(user: User) -> bytes:
    packed: bytes = msgpack.packb((_PUT_USER, _encode_user(user)))
    return packed


def encode_delete_user(name: str) -> bytes:
    packed: bytes = msgpack.packb((_DELETE_USER, name))
    return packed


def decode_meta_command(data: bytes) -> MetaCommand:
    """Raises ValueError for anything that is not a well-formed meta command."""
    try:
        tag, *fields = msgpack.unpackb(data)
        if tag == _SET_MAP:
            (payload,) = fields
            return ShardMap.decode(payload)
        if tag == _PUT_USER:
            (payload,) = fields
            return _decode_user(payload)
        if tag == _DELETE_USER:
            (name,) = fields
            if not isinstance(name, str):
                raise ValueError("a user name is a string")
            return DeleteUser(name)
    except (TypeError, ValueError, msgpack.UnpackException) as error:
        raise ValueError(f"malformed meta command: {error}") from None
    if type(tag) is not int:
        raise ValueError("malformed meta command: the tag is not an integer")
    try:
        return decode_change(tag, fields)
    except ValueError as error:
        raise ValueError(f"malformed meta command: {error}") from None


def check_meta_command(data: bytes) -> None:
    """Raises ValueError unless `data` is a well-formed meta command (before it takes a slot)."""
    decode_meta_command(data)


class MetaStateMachine:
    """The map this node's meta replica applied (_MAP_KEY, Raft state: only apply, restore
    and the founding initialize write it) and, apart, the newest map learned from peers
    (_CACHE_KEY): a node outside the meta group, or a member that lags, still routes by it."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._db = env.open_db(b"meta.state")
        with env.begin(db=self._db) as txn:
            raw, cached = txn.get(_MAP_KEY), txn.get(_CACHE_KEY)
        self._map: ShardMap | None = ShardMap.decode(raw) if raw else None
        self._cached: ShardMap | None = ShardMap.decode(cached) if cached else None
        self._users: dict[str, User] = {}
        self._users_by_token: dict[bytes, User] = {}
        with env.begin(db=self._db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(_USER_KEY_PREFIX):
                for key, value in cursor:
                    if not key.startswith(_USER_KEY_PREFIX):
                        break
                    self._remember(_decode_user(value))

    # --- the user table (kvstore.auth.UserDirectory) ---

    def user_by_token_hash(self, token_sha256: bytes) -> User | None:
        return self._users_by_token.get(token_sha256)

    def users(self) -> list[User]:
        return sorted(self._users.values(), key=lambda user: user.name)

    def has_admin(self) -> bool:
        return any(user.grants.admin for user in self._users.values())

    def _remember(self, user: User) -> None:
        self._forget(user.name)
        self._users[user.name] = user
        self._users_by_token[user.token_sha256] = user

    def _forget(self, name: str) -> None:
        old = self._users.pop(name, None)
        if old is not None:
            self._users_by_token.pop(old.token_sha256, None)

    def _put_user(self, txn: Any, user: User) -> None:
        txn.put(_USER_KEY_PREFIX + user.name.encode(), _encode_user(user), db=self._db)
        self._remember(user)

    def _delete_user(self, txn: Any, name: str) -> str:
        user = self._users.get(name)
        if user is None:
            return "absent"
        if user.grants.admin and sum(u.grants.admin for u in self._users.values()) == 1:
            return LAST_ADMIN_REFUSED
        txn.delete(_USER_KEY_PREFIX + name.encode(), db=self._db)
        self._forget(name)
        return "deleted"

    @property
    def shard_map(self) -> ShardMap | None:
        """The newest map this node knows, applied or learned."""
        if self._cached is None or (self._map and self._map.epoch >= self._cached.epoch):
            return self._map
        return self._cached

    def initialize(self, shard_map: ShardMap, initial_users: Sequence[User] = ()) -> None:
        """Every founding node writes the same initial map (and bootstrap admin, when auth is
        on) before its meta replica starts."""
        if self.shard_map is not None:
            return
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_MAP_KEY, shard_map.encode())
            for user in initial_users:
                self._put_user(txn, user)
        self._map = shard_map

    def adopt(self, shard_map: ShardMap) -> bool:
        """Cache a newer map learned from a peer (this node's copy was stale). Returns whether
        it was newer. The applied map, and so deterministic apply, is unaffected."""
        current = self.shard_map
        if current is not None and shard_map.epoch <= current.epoch:
            return False
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_CACHE_KEY, shard_map.encode())
        self._cached = shard_map
        return True

    def clear_applied(self) -> None:
        """A new meta replica starts here: it applies from a snapshot, never from the state
        of a replica this node hosted before. The learned map stays for routing meanwhile."""
        current = self.shard_map
        with self._env.begin(write=True, db=self._db) as txn:
            txn.delete(_APPLIED_KEY)
            txn.delete(_MAP_KEY)
            if current is not None:
                txn.put(_CACHE_KEY, current.encode())
            for name in list(self._users):
                txn.delete(_USER_KEY_PREFIX + name.encode())
                self._forget(name)
        self._map, self._cached = None, current

    def applied_index(self) -> LogIndex:
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(_APPLIED_KEY)
        return LogIndex(int.from_bytes(raw, "big") if raw else 0)

    def apply(self, txn: Any, entries: Sequence[Entry]) -> list[object]:
        results: list[object] = []
        for entry in entries:
            result: object = None
            if entry.kind is EntryKind.NORMAL and entry.data:
                try:
                    command = decode_meta_command(entry.data)
                except ValueError as error:
                    raise AssertionError(f"meta entry {entry.index}: {error}") from error
                result = self._apply_one(txn, command)
            results.append(result)
        if entries:
            txn.put(_APPLIED_KEY, entries[-1].index.to_bytes(8, "big"), db=self._db)
        return results

    def _apply_one(self, txn: Any, command: MetaCommand) -> object:
        if isinstance(command, User):
            self._put_user(txn, command)
            return "ok"
        if isinstance(command, DeleteUser):
            return self._delete_user(txn, command.name)
        return self._apply_map_command(txn, command)

    def _apply_map_command(self, txn: Any, command: ShardMap | MapChange) -> KeyVersion | Failed:
        # The map as of this txn, not self._map: apply may be re-run on a retried txn.
        raw = txn.get(_MAP_KEY, db=self._db)
        current = ShardMap.decode(raw) if raw else None
        if isinstance(command, ShardMap):
            new_map = command
        elif current is None:
            raise AssertionError("a map change reached a meta group with no map")
        else:
            try:
                new_map = apply_change(current, command)
            except ChangeRefused as error:
                return Failed(FAILED_PRECONDITION, str(error), current.epoch)
        # Deterministic: only a newer epoch replaces the map.
        if current is None or new_map.epoch > current.epoch:
            txn.put(_MAP_KEY, new_map.encode(), db=self._db)
            current = new_map
        self._map = current
        return KeyVersion(SHARD_MAP_KEY, current.epoch)

    def snapshot(self) -> bytes:
        if self._map is None:
            return b""
        users = [_encode_user(user) for user in self.users()]
        packed: bytes = msgpack.packb((self._map.encode(), users))
        return _SNAPSHOT_V2 + packed

    def restore(self, txn: Any, snapshot: Snapshot) -> None:
        data = snapshot.data
        if data:
            users: list[bytes] = []
            if data.startswith(_SNAPSHOT_V2):
                data, users = msgpack.unpackb(data[len(_SNAPSHOT_V2) :])
            txn.put(_MAP_KEY, data, db=self._db)
            self._map = ShardMap.decode(data)
            for name in list(self._users):
                txn.delete(_USER_KEY_PREFIX + name.encode(), db=self._db)
                self._forget(name)
            for raw in users:
                self._put_user(txn, _decode_user(raw))
        txn.put(_APPLIED_KEY, snapshot.meta.index.to_bytes(8, "big"), db=self._db)
