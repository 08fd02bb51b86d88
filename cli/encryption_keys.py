"""The key file of encryption at rest: {"active": ID, "keys": {ID: base64 of 32 bytes}}.

kvctl only writes it (`kvctl encryption rotate-key FILE`, `kvctl cluster up --encrypt`); the
node reads it at start (kvstore.encryption). Rotation adds a key and makes it active; old keys
stay, so values sealed with them stay readable.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cli.cluster_file import write_private
from cli.errors import KvctlError


def rotate(path: Path) -> str:
    """Adds a fresh AES-256 key to the file (created if absent), makes it active; returns its id."""
    keys: dict[str, str] = {}
    if path.exists():
        try:
            raw = json.loads(path.read_text())
            keys = dict(raw["keys"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise KvctlError(f"{path} is not a key file: {error!r}") from None
    number = len(keys) + 1
    while f"k{number}" in keys:
        number += 1
    key_id = f"k{number}"
    keys[key_id] = base64.b64encode(os.urandom(32)).decode("ascii")
    write_private(path, json.dumps({"active": key_id, "keys": keys}, indent=2) + "\n")
    return key_id
