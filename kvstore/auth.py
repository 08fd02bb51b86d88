"""Who may do what: users, their grants on key prefixes, bearer tokens and the checks on them.

Pure: no HTTP, no Raft, no LMDB. The users live in the metadata group (kvstore.meta); the HTTP
layer turns a failed check into 401/403 through the error tree. Tokens are 256 random bits, so
storing SHA-256(token) is enough: nobody can brute-force a 2^256 preimage, and a slow password
hash would only cost every request time (see docs/security.md).
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kvstore.errors import Forbidden, InvalidRequest

TOKEN_PREFIX: Final = "kvt_"
TOKEN_BYTES: Final = 32  # 256 bits
MAX_USER_NAME_CHARS: Final = 64
MAX_GRANTED_PREFIXES: Final = 64
_USER_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


class Action(enum.Enum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"  # manage users; implies read and write of every key


@dataclass(frozen=True, slots=True)
class Grants:
    """What a user may do. A grant on prefix P covers every key starting with P ("" = all)."""

    admin: bool = False
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    def covers(self, action: Action, key_or_prefix: str) -> bool:
        """Whether every key starting with `key_or_prefix` (a single key is its own prefix)
        is covered by a grant for `action`."""
        if self.admin:
            return True
        if action is Action.ADMIN:
            return False
        granted = self.read if action is Action.READ else self.write
        return any(key_or_prefix.startswith(prefix) for prefix in granted)

    def to_json(self) -> dict[str, Any]:
        return {"admin": self.admin, "read": list(self.read), "write": list(self.write)}

    @classmethod
    def from_json(cls, raw: Any) -> Grants:
        """From an API body: {"admin": bool, "read": [prefix...], "write": [prefix...]}."""
        if not isinstance(raw, Mapping):
            raise InvalidRequest("grants must be a JSON object")
        unknown = sorted(set(raw) - {"admin", "read", "write"})
        if unknown:
            raise InvalidRequest(f"grants have unknown field(s) {', '.join(map(repr, unknown))}")
        admin = raw.get("admin", False)
        if not isinstance(admin, bool):
            raise InvalidRequest("grants.admin must be true or false")
        return cls(
            admin, _prefixes(raw.get("read", []), "read"), _prefixes(raw.get("write", []), "write")
        )

    def encode(self) -> tuple[bool, list[str], list[str]]:
        return (self.admin, list(self.read), list(self.write))

    @classmethod
    def decode(cls, raw: Iterable[Any]) -> Grants:
        admin, read, write = raw
        return cls(bool(admin), tuple(read), tuple(write))


def _prefixes(raw: Any, what: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise InvalidRequest(f"grants.{what} must be a list of key prefixes (strings)")
    if len(raw) > MAX_GRANTED_PREFIXES:
        raise InvalidRequest(f"grants.{what} has more than {MAX_GRANTED_PREFIXES} prefixes")
    if any("\x00" in item or len(item.encode("utf-8", "surrogatepass")) > 4096 for item in raw):
        raise InvalidRequest(f"grants.{what} prefixes must be under 4 KiB and contain no NUL")
    return tuple(dict.fromkeys(raw))  # dedupe, keep order


@dataclass(frozen=True, slots=True)
class User:
    name: str
    grants: Grants
    token_sha256: bytes


# Who a request runs as when authentication is off: everything is allowed.
ANONYMOUS_SUPERUSER: Final = User("anonymous", Grants(admin=True), b"")


def check_user_name(name: Any) -> str:
    if (
        not isinstance(name, str)
        or len(name) > MAX_USER_NAME_CHARS
        or not _USER_NAME.fullmatch(name)
    ):
        raise InvalidRequest(
            f"a user name is 1 to {MAX_USER_NAME_CHARS} characters of A-Z a-z 0-9 _ . @ -"
        )
    return name


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class UserDirectory(Protocol):
    """The replicated user table, as the HTTP layer reads it (kvstore.meta implements it)."""

    def user_by_token_hash(self, token_sha256: bytes) -> User | None: ...

    def users(self) -> list[User]: ...


class UserAdmin(Protocol):
    """Changes to the user table: each one a proposal to the metadata group."""

    async def put_user(self, user: User) -> None: ...

    async def delete_user(self, name: str) -> None: ...


def require(user: User, action: Action, key_or_prefix: str, *, what: str = "key") -> None:
    """Raise Forbidden (403) unless `user` may `action` every key under `key_or_prefix`."""
    if user.grants.covers(action, key_or_prefix):
        return
    if action is Action.ADMIN:
        raise Forbidden(f"user {user.name!r} is not an admin")
    raise Forbidden(f"user {user.name!r} may not {action.value} {what} {key_or_prefix!r}")
