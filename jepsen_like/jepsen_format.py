"""Histories written by Jepsen itself, as ours: its log lines
`INFO  jepsen.util - 3	:invoke	:cas	[3 0]` (older Knossos-era logs and newer ones with a
timestamp and thread name before `jepsen.util`), or EDN operation maps
`{:type :invoke, :f :cas, :value [3 0], :process 3, :time 123}`, one or many per line or in
one vector. Nemesis operations are skipped. Jepsen's order is the history's order, so an
event's time is its position; the single register becomes key "jepsen".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jepsen_like.history import KINDS, History, Op

JEPSEN_KEY = "jepsen"
_LOG_LINE = re.compile(
    r"jepsen\.util\s+(?:-\s+)?(?P<process>\S+)\s+:(?P<kind>invoke|ok|fail|info)\s+"
    r":?(?P<f>[^\s\]\[{}()]+)(?:\s+(?P<rest>.*))?$"
)


class Keyword(str):
    """An EDN keyword such as `:timed-out`, held without its colon."""

    __slots__ = ()


def load_jepsen(path: Path | str) -> History:
    text = Path(path).read_text(encoding="utf-8")
    return parse_jepsen(text)


def parse_jepsen(text: str) -> History:
    """Jepsen log lines or EDN operation maps -> our History (raises ValueError if none)."""
    is_edn = text.lstrip().startswith(("{", "["))
    records = _edn_records(text) if is_edn else _log_records(text)
    history = History()
    for record in records:
        process = record.get("process")
        if not isinstance(process, int) or isinstance(process, bool):
            continue  # :nemesis, or another non-client process
        kind = str(record.get("type", ""))
        if kind not in KINDS:
            raise ValueError(f"Jepsen operation has type {kind!r}, not one of {KINDS}")
        value = record.get("value")
        error = record.get("error")
        position = len(history)
        history.append(
            Op(
                process=process,
                kind=kind,
                f=str(record.get("f", "")),
                key=JEPSEN_KEY,
                value=_plain(value),
                time_ns=position + 1,
                node=None,
                index=position,
                error=None if error is None else str(_plain(error)),
            )
        )
    if not len(history):
        raise ValueError("no Jepsen client operations found (expected jepsen.util log lines)")
    return history


def _log_records(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        match = _LOG_LINE.search(line.rstrip())
        if match is None:
            continue
        process_text = match["process"]
        process: Any = int(process_text) if re.fullmatch(r"-?\d+", process_text) else None
        record: dict[str, Any] = {"process": process, "type": match["kind"], "f": match["f"]}
        rest = (match["rest"] or "").strip()
        if rest:
            reader = _EdnReader(rest)
            record["value"] = reader.read()
            remainder = rest[reader.position :].strip()
            if remainder:
                record["error"] = remainder
        records.append(record)
    return records


def _edn_records(text: str) -> list[dict[str, Any]]:
    reader = _EdnReader(text)
    records: list[dict[str, Any]] = []
    while reader.skip_space():
        form = reader.read()
        forms = form if isinstance(form, list) else [form]
        for item in forms:
            if not isinstance(item, dict):
                raise ValueError(f"expected an EDN operation map, got {item!r}")
            records.append(item)
    return records


def _plain(value: Any) -> Any:
    """EDN values as JSON-able ones: keywords as strings, sets as sorted lists."""
    if isinstance(value, Keyword):
        return str(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class _EdnReader:
    """Just enough EDN: nil, booleans, numbers, strings, keywords, symbols, vectors, lists,
    maps, sets; tagged literals (#inst "...") yield their value."""

    _ATOM = re.compile(r"[^\s,\[\]{}()\"]+")
    _CLOSE = {"[": "]", "(": ")", "{": "}"}

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0

    def skip_space(self) -> bool:
        """Skip whitespace, commas and ; comments; is there anything left?"""
        text = self.text
        while self.position < len(text):
            char = text[self.position]
            if char in " \t\r\n,":
                self.position += 1
            elif char == ";":
                end = text.find("\n", self.position)
                self.position = len(text) if end < 0 else end
            else:
                return True
        return False

    def read(self) -> Any:
        if not self.skip_space():
            raise ValueError("EDN: unexpected end of input")
        text = self.text
        char = text[self.position]
        if char in "[({":
            self.position += 1
            items = self._until(self._CLOSE[char])
            if char != "{":
                return items
            if len(items) % 2:
                raise ValueError("EDN: a map needs an even number of forms")
            return {_map_key(k): v for k, v in zip(items[::2], items[1::2], strict=True)}
        if char == "#":
            self.position += 1
            if self.position < len(text) and text[self.position] == "{":
                self.position += 1
                return sorted(self._until("}"), key=repr)
            self.read()  # the tag: #inst, #jepsen.history.Op ...
            return self.read()
        if char == '"':
            return self._string()
        if char in "])}":
            raise ValueError(f"EDN: unexpected {char!r} at {self.position}")
        match = self._ATOM.match(text, self.position)
        assert match is not None
        self.position = match.end()
        return _atom(match.group())

    def _until(self, close: str) -> list[Any]:
        items: list[Any] = []
        while True:
            if not self.skip_space():
                raise ValueError(f"EDN: missing {close!r}")
            if self.text[self.position] == close:
                self.position += 1
                return items
            items.append(self.read())

    def _string(self) -> str:
        text = self.text
        self.position += 1
        chars: list[str] = []
        escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
        while self.position < len(text):
            char = text[self.position]
            self.position += 1
            if char == '"':
                return "".join(chars)
            if char == "\\" and self.position < len(text):
                char = escapes.get(text[self.position], text[self.position])
                self.position += 1
            chars.append(char)
        raise ValueError("EDN: unterminated string")


def _atom(token: str) -> Any:
    if token == "nil":
        return None
    if token in ("true", "false"):
        return token == "true"
    if token.startswith(":"):
        return Keyword(token[1:])
    if re.fullmatch(r"[+-]?\d+N?", token):
        return int(token.rstrip("N"))
    if re.fullmatch(r"[+-]?(\d+\.\d*|\d*\.\d+|\d+)([eE][+-]?\d+)?M?", token):
        return float(token.rstrip("M"))
    return token  # a symbol


def _map_key(key: Any) -> Any:
    return str(key) if isinstance(key, Keyword) else key
