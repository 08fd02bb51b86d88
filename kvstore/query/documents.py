"""Stored values seen as JSON documents: strict decoding, dotted field paths, JSON equality and
the canonical text that identifies a value in group keys, top_k and count_distinct.

Pure: no I/O. A value that is not strict UTF-8 JSON decodes to NOT_JSON; a path that leads
nowhere yields MISSING. Neither is ever a JSON value, so `is` tells them apart from null.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

KEY_FIELD: Final = "$key"  # the pseudo-field naming a row's key


class Marker(enum.Enum):
    NOT_JSON = "not_json"  # the stored value is not strict UTF-8 JSON
    MISSING = "missing"  # the field path leads nowhere in this document


NOT_JSON: Final = Marker.NOT_JSON
MISSING: Final = Marker.MISSING

FieldGetter = Callable[[str, Any], Any]  # (key, document or NOT_JSON) -> value or MISSING


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: valid JSON syntax, but no finite double holds it
        raise ValueError(f"{text} overflows a double")
    return value


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_encode_str: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


# orjson reads an integer past 64 bits as a float, where json keeps it exact: a value holding a
# run of 19+ digits takes the json path, so sums of big integers stay exact. Found by mapping
# every digit to "0" and everything else to " " (bytes.translate, then one substring search):
# about 2.5x cheaper than a regex search, and every scanned row pays it.
_DIGITS_AS_ZEROS: Final = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGIT_RUN: Final = b"0" * 19


def decode_document(raw: bytes) -> Any:
    """The JSON document a stored value holds, or NOT_JSON. Strict: UTF-8 only, no NaN or
    Infinity, no number overflowing a double, no lone surrogate escape (not valid Unicode).

    orjson decodes first (scans decode every row, and it is about twice as fast); whatever it
    refuses goes through the json path, whose answer is the definition."""
    if _LONG_DIGIT_RUN not in raw.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        text = raw.decode("utf-8")
        document = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return NOT_JSON
    if _SURROGATE_ESCAPE.search(text) is not None and not _is_valid_unicode(document):
        return NOT_JSON
    return document


def _is_valid_unicode(document: Any) -> bool:
    try:
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def split_field(field: str) -> tuple[str, ...]:
    """'a.b.0' -> ('a', 'b', '0'). The parser has already rejected empty segments."""
    return tuple(field.split("."))


def _index(segment: str) -> int | None:
    """A canonical non-negative decimal ('0', '17', not '01' or '-1') also indexes arrays."""
    if segment.isdigit() and segment.isascii() and (segment == "0" or segment[0] != "0"):
        return int(segment)
    return None


def top_level_name(field: str) -> str | None:
    """The object member a path of one segment names (not `$key`, not an array index): such
    a field is document.get(name) when the document is an object, and MISSING otherwise."""
    segments = split_field(field)
    if field == KEY_FIELD or len(segments) != 1 or _index(segments[0]) is not None:
        return None
    return segments[0]


def make_getter(field: str) -> FieldGetter:
    """A fast (key, document) -> value | MISSING for a field path or `$key`.

    A segment descends into an object by name, or into an array by a canonical decimal index.
    Anything else (a scalar on the way, NOT_JSON) gives MISSING."""
    if field == KEY_FIELD:
        return lambda key, document: key
    name = top_level_name(field)
    if name is not None:

        def get_top_level(key: str, document: Any) -> Any:
            return document.get(name, MISSING) if type(document) is dict else MISSING

        return get_top_level
    steps = tuple((segment, _index(segment)) for segment in split_field(field))

    def get_nested(key: str, document: Any) -> Any:
        value = document
        for segment, index in steps:
            kind = type(value)
            if kind is dict:
                value = value.get(segment, MISSING)
                if value is MISSING:
                    return MISSING
            elif kind is list and index is not None and index < len(value):
                value = value[index]
            else:
                return MISSING
        return value

    return get_nested


def json_equal(left: Any, right: Any) -> bool:
    """JSON equality: numbers by value (1 == 1.0), booleans are not numbers, arrays and objects
    element by element."""
    left_type, right_type = type(left), type(right)
    if left_type is bool or right_type is bool:
        return left is right
    if left_type in (int, float) and right_type in (int, float):
        return bool(left == right)
    if left_type is str or left is None:
        return left_type is right_type and bool(left == right)
    if left_type in (list, tuple) and right_type in (list, tuple):
        return len(left) == len(right) and all(map(json_equal, left, right))
    if left_type is dict and right_type is dict:
        return left.keys() == right.keys() and all(json_equal(v, right[k]) for k, v in left.items())
    return False


_MAX_EXACT_FLOAT: Final = float(1 << 53)


def _normalize(value: Any) -> Any:
    if type(value) is float and value.is_integer() and abs(value) < _MAX_EXACT_FLOAT:
        return int(value)
    if isinstance(value, list | tuple):
        return [_normalize(item) for item in value]
    if isinstance(value, dict):
        return {name: _normalize(item) for name, item in value.items()}
    return value


def canonical_text(value: Any) -> str:
    """Compact ASCII JSON naming a value's identity: equal JSON values (1 and 1.0, objects with
    keys in any order) share one text, and different ones never do. It keys groups, top_k
    counters and count_distinct hashes, and crosses the wire safely (ASCII, any size of int)."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return float.__repr__(value) if type(normal := _normalize(value)) is float else str(normal)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return json.dumps(_normalize(value), sort_keys=True, separators=(",", ":"))


def from_canonical_text(text: str) -> Any:
    return json.loads(text)


_TYPE_RANK: Final = {type(None): 1, bool: 2, int: 3, float: 3, str: 4, list: 5, dict: 6}


def value_order(value: Any) -> tuple[int, Any]:
    """A total order over JSON values for presenting results: MISSING, null, booleans, numbers,
    strings, arrays, objects; within a type by value (arrays and objects by canonical text)."""
    if value is MISSING:
        return (0, 0)
    rank = _TYPE_RANK.get(type(value), 7)
    return (rank, canonical_text(value) if rank >= 5 else value)


__all__ = [
    "KEY_FIELD",
    "MISSING",
    "NOT_JSON",
    "FieldGetter",
    "Marker",
    "canonical_text",
    "decode_document",
    "from_canonical_text",
    "json_equal",
    "json_type_name",
    "make_getter",
    "split_field",
    "top_level_name",
    "value_order",
]
