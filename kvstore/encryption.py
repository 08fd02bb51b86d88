"""Encryption of values at rest: AES-256-GCM with keys from a key file, each key with an id.

The key file is JSON: {"active": "k2", "keys": {"k1": "<base64 of 32 bytes>", "k2": "..."}}.
New records are sealed with the active key; a record names the key id it was sealed with, so
after a rotation (add a key, make it active, restart) old records stay readable. A key may be
dropped from the file only once no record uses it. Keys are per node: replicas exchange
plaintext in snapshots (over TLS when it is on), never ciphertext.

Envelope: FORMAT (1 byte) | key id length (1) | key id | nonce (12) | ciphertext + tag (16).
The associated data binds an envelope to its shard, key and version, so a record copied onto
another key fails to open.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_FORMAT: Final = 1
_NONCE_BYTES: Final = 12  # random per record: 2^-32 collision odds only after ~2^32 writes per key
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class KeyFileError(ValueError):
    pass


class ValueCipher:
    def __init__(self, keys: dict[str, bytes], active_key_id: str) -> None:
        if active_key_id not in keys:
            raise KeyFileError(f"the active key id {active_key_id!r} is not among the keys")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.active_key_id = active_key_id
        self._active = self._keys[active_key_id]
        self._active_header = bytes([_FORMAT, len(active_key_id)]) + active_key_id.encode()

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return self._active_header + nonce + self._active.encrypt(nonce, plaintext, associated_data)

    def open(self, envelope: bytes, associated_data: bytes) -> bytes:
        """The plaintext; ValueError if the envelope is malformed, names an unknown key, or
        fails authentication (tampered, or sealed for another key/version)."""
        if len(envelope) < 2 or envelope[0] != _FORMAT:
            raise ValueError("not an encrypted value envelope")
        id_end = 2 + envelope[1]
        key_id = envelope[2:id_end].decode("ascii", "replace")
        cipher = self._keys.get(key_id)
        if cipher is None:
            raise ValueError(f"sealed with key id {key_id!r}, which the key file does not hold")
        nonce = envelope[id_end : id_end + _NONCE_BYTES]
        try:
            return cipher.decrypt(nonce, envelope[id_end + _NONCE_BYTES :], associated_data)
        except InvalidTag:
            raise ValueError(f"failed authentication under key {key_id!r}") from None


def load_key_file(path: Path) -> ValueCipher:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise KeyFileError(f"cannot read the key file {path}: {error}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), dict):
        raise KeyFileError(f'{path}: expected {{"active": ID, "keys": {{ID: base64 key}}}}')
    keys: dict[str, bytes] = {}
    for key_id, encoded in raw["keys"].items():
        if not _KEY_ID.fullmatch(key_id):
            raise KeyFileError(f"{path}: key id {key_id!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        try:
            key = base64.b64decode(str(encoded), validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{path}: key {key_id!r} is not base64") from None
        if len(key) != 32:
            raise KeyFileError(f"{path}: key {key_id!r} must be 32 bytes (AES-256)")
        keys[key_id] = key
    return ValueCipher(keys, str(raw.get("active")))
